"""A TCP echo probe run inside pod namespaces by the tests and `wgmanager lab check`.

    python -m wgmanager.lab.probe serve --port P [--count N]   echo N connections, then exit
    python -m wgmanager.lab.probe send HOST PORT --bytes N      send N bytes, expect them back

``send`` prints one JSON line (ok, bytes, seconds, error) and exits 0 only when every byte
came back intact, so a truncated or corrupted transfer through the tunnel is a failure.
``serve`` prints "ready" once listening, so callers wait on that line rather than sleeping.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def serve(port: int, count: int, timeout: float) -> int:
    family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, mapped
        srv.bind(("::", port))
        srv.listen(64)
        srv.settimeout(timeout)
        print("ready", flush=True)
        served = 0
        while count == 0 or served < count:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                return 1
            with conn:
                conn.settimeout(timeout)
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
            served += 1
    return 0


def send(host: str, port: int, nbytes: int, timeout: float) -> int:
    payload = os.urandom(nbytes)
    started = time.monotonic()
    result: dict[str, object] = {"ok": False, "bytes": 0}
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := s.recv(65536):
                got += chunk
        result["bytes"] = len(got)
        result["ok"] = bytes(got) == payload
        if not result["ok"]:
            result["error"] = f"echo mismatch: sent {nbytes} bytes, got {len(got)} back"
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e.strerror or e}"
    result["seconds"] = round(time.monotonic() - started, 4)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wgmanager.lab.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=0, help="connections to serve (0 = forever)")
    s.add_argument("--timeout", type=float, default=30.0)
    c = sub.add_parser("send")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--bytes", type=int, default=1024)
    c.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.port, a.count, a.timeout)
    return send(a.host, a.port, a.bytes, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
