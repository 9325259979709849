"""wgmanager: transparent WireGuard encryption of pod-to-pod traffic between Kubernetes nodes."""

__version__ = "0.1.0"
