"""The node's datapath: the eBPF steering program, its pinned maps, and links/sysctls."""
