"""The `wgmanager` command line: argument parsing and one function per subcommand (``main``),
and the commands big enough for a module of their own."""
