"""The Kubernetes adapter: Node objects in, the node's public-key annotation out."""
