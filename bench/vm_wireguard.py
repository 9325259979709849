#!/usr/bin/env python3
"""Kernel WireGuard vs wireguard-go on the same emulated CPU: the kernel lane's VM.

Why: this machine's kernel has no WireGuard, so the only place both implementations can be
compared in one run is the VM the kernel lane boots (tests/kernel/vm.py: Debian's 6.1
kernel under TCG software emulation, 2 vCPUs). bench/vm_wireguard.sh runs inside it: two
namespaces on a veth, a tunnel built by hand with `wg set` (the same commands for both
implementations; wireguard-go is the bookworm-backports build `make setup` installs),
iperf3 TCP, 1 stream, interleaved round by round with plaintext over the same veth.

TCG figures are not throughput claims: the emulated CPU runs ~25x slower than the host and
its cost per instruction differs from real hardware (crypto without AES-NI/AVX, every
syscall and context switch emulated). Only the ratio inside one run says anything, and only
about this emulation.

    .venv/bin/python bench/vm_wireguard.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kernel import vm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    args = p.parse_args()
    run = vm.run(f"ROUNDS={args.rounds} SECONDS_PER_RUN={args.seconds} sh bench/vm_wireguard.sh",
                 timeout=300 + args.rounds * args.seconds * 3 * 4)
    if run.returncode != 0:
        print(run.output or run.console, file=sys.stderr)
        return 1
    samples: dict[str, list[tuple[int, int]]] = {}
    for line in run.output.splitlines():
        if line.startswith("RESULT "):
            _, kind, _, bps, retrans = line.split()
            samples.setdefault(kind, []).append((int(bps), int(retrans)))
        elif line.startswith(("wireguard-go:", "kernel:")):
            print(line)
    medians = {k: statistics.median(b for b, _ in v) for k, v in samples.items()}
    for kind, values in samples.items():
        print(f"{kind:13s} median {medians[kind] / 1e6:8.1f} Mbit/s  samples "
              + ", ".join(f"{b / 1e6:.1f}" for b, _ in values)
              + f"  retransmits {sum(r for _, r in values)}")
    if "kernel" in medians and "wireguard-go" in medians:
        print(f"kernel / wireguard-go: {medians['kernel'] / medians['wireguard-go']:.2f}x")
    print(json.dumps({"samples": samples, "seconds": round(run.seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
