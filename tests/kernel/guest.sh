#!/bin/sh
# PID 1 in the kernel lane's VM (after the initramfs, scripts/build-vm.sh): mounts what a
# node has, loads WireGuard, runs the command the host left in the out share and powers
# off. The command's output goes to the console (the host streams it) and to out/log; its
# exit status to out/rc. The VM has no network device: only the namespaces tests create.
project=$1
out=/run/wgm-out
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
# No tmpfs on /tmp: the root is already an overlay on tmpfs, and a mount there would hide
# a project that lives under /tmp (a CI checkout in a mktemp directory).
chmod 1777 /tmp
mkdir -p /run/netns /sys/fs/bpf
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname wgm-vm
ip link set lo up
modprobe -a wireguard tun veth bridge
echo "guest: kernel $(uname -r), $(nproc) CPUs, wireguard module $(cat /sys/module/wireguard/version)"
cd "$project"
( sh "$out/cmd"; echo $? > "$out/rc" ) 2>&1 | tee "$out/log"
sync
echo o > /proc/sysrq-trigger
sleep 10
