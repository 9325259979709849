#!/bin/sh
# Runs inside the kernel lane's VM (bench/vm_wireguard.py boots it): iperf3 through a
# WireGuard tunnel between two namespaces, kernel WireGuard and wireguard-go interleaved
# round by round on the same emulated CPU, plus plaintext over the same veth. Prints one
# "RESULT <kind> <round> <bits/s> <retransmits>" line per run. Everything it makes is in
# the namespaces bA and bB, removed at the end.
set -eu
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
ip netns add bA; ip netns add bB
trap 'ip netns pids bA | xargs -r kill 2>/dev/null; ip netns pids bB | xargs -r kill 2>/dev/null; ip netns del bA; ip netns del bB' EXIT
ip link add va netns bA type veth peer vb netns bB
ip -n bA addr add 192.168.90.1/24 dev va; ip -n bB addr add 192.168.90.2/24 dev vb
for ns in bA bB; do ip -n $ns link set lo up; done
ip -n bA link set va up; ip -n bB link set vb up
ka=$(wg genkey); kb=$(wg genkey)
pa=$(echo "$ka" | wg pubkey); pb=$(echo "$kb" | wg pubkey)

# One interface name per side: wireguard-go's UAPI sockets share /run/wireguard.
tunnel_up() {  # $1: kernel | go
  for side in A B; do
    if [ "$1" = kernel ]; then ip -n b$side link add wg$side type wireguard
    else ip netns exec b$side wireguard-go wg$side >/dev/null; fi
  done
  echo "$ka" > /tmp/ka; echo "$kb" > /tmp/kb
  ip netns exec bA wg set wgA private-key /tmp/ka listen-port 51900 peer "$pb" \
    endpoint 192.168.90.2:51900 allowed-ips 10.90.0.2/32
  ip netns exec bB wg set wgB private-key /tmp/kb listen-port 51900 peer "$pa" \
    endpoint 192.168.90.1:51900 allowed-ips 10.90.0.1/32
  ip -n bA addr add 10.90.0.1/24 dev wgA; ip -n bB addr add 10.90.0.2/24 dev wgB
  ip -n bA link set wgA mtu 1420 up; ip -n bB link set wgB mtu 1420 up
}

tunnel_down() {
  ip -n bA link del wgA 2>/dev/null || true; ip -n bB link del wgB 2>/dev/null || true
  sleep 0.5  # wireguard-go exits once its TUN is gone
}

measure() {  # $1: kind, $2: round, $3: server address
  ip netns exec bB iperf3 -s -D -1 -p 5301 >/dev/null 2>&1
  sleep 0.5
  ip netns exec bA iperf3 -c "$3" -p 5301 -t "$SECONDS_PER_RUN" -O 1 -J > /tmp/iperf.json
  python3 - "$1" "$2" <<'PY'
import json, sys
end = json.load(open("/tmp/iperf.json"))["end"]
print("RESULT", sys.argv[1], sys.argv[2], int(end["sum_received"]["bits_per_second"]),
      end["sum_sent"].get("retransmits", 0))
PY
}

echo "wireguard-go: $(wireguard-go --version | head -n1) (the bookworm-backports .deb, unpacked)"
echo "kernel: $(uname -r), wireguard module $(cat /sys/module/wireguard/version)"
r=1
while [ $r -le "$ROUNDS" ]; do
  measure plaintext $r 192.168.90.2
  tunnel_up kernel; measure kernel $r 10.90.0.2; tunnel_down
  tunnel_up go; measure wireguard-go $r 10.90.0.2; tunnel_down
  r=$((r + 1))
done
