"""The local lab: simulated nodes and pods in network namespaces on one machine."""
