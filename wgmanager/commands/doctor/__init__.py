"""`wgmanager doctor`: preflight checks of a node, each with a one-line fix.

``checks`` probes the host (kernel, BPF, bpffs, WireGuard, headers, capabilities), ``net``
the network and the API, ``rules`` holds the pure judgements both use.
"""
