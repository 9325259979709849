"""WireGuard device backends: kernel (netlink) and userspace (wireguard-go over UAPI)."""
