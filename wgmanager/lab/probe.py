"""A TCP echo probe run inside pod namespaces by the tests and `wgmanager lab check`.

    python -m wgmanager.lab.probe serve --port P [--count N]   echo N connections, then exit
    python -m wgmanager.lab.probe send HOST PORT --bytes N      send N bytes, expect them back
    python -m wgmanager.lab.probe stream HOST PORT --seconds S  one connection, a steady echo
                                                                stream for S seconds

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


def stream(host: str, port: int, seconds: float, chunk: int, interval: float,
           timeout: float) -> int:
    """One long TCP connection carrying a steady stream, checked byte for byte.

    Proves a connection survives something (a key rotation): a reset or a timeout is an
    error, and ``max_stall_seconds`` is the longest time no echoed byte arrived.
    """
    import threading

    started = time.monotonic()
    result: dict[str, object] = {"ok": False, "bytes": 0}
    sent = bytearray()
    got = bytearray()
    stall = {"last": started, "max": 0.0}
    errors: list[str] = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)

            def receive() -> None:
                try:
                    while data := s.recv(65536):
                        now = time.monotonic()
                        stall["max"] = max(stall["max"], now - stall["last"])
                        stall["last"] = now
                        got.extend(data)
                except OSError as e:
                    errors.append(f"{type(e).__name__}: {e.strerror or e}")

            reader = threading.Thread(target=receive, daemon=True)
            reader.start()
            n = 0
            while time.monotonic() - started < seconds:
                block = (n.to_bytes(8, "big") * (chunk // 8 + 1))[:chunk]
                s.sendall(block)
                sent.extend(block)
                n += 1
                time.sleep(interval)
            s.shutdown(socket.SHUT_WR)
            reader.join(timeout + 1)
        result["bytes"] = len(got)
        result["ok"] = not errors and bytes(got) == bytes(sent)
        if errors:
            result["error"] = errors[0]
        elif not result["ok"]:
            result["error"] = f"echo mismatch: sent {len(sent)} bytes, got {len(got)} back"
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e.strerror or e}"
    result["seconds"] = round(time.monotonic() - started, 3)
    result["max_stall_seconds"] = round(stall["max"], 3)
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
    st = sub.add_parser("stream")
    st.add_argument("host")
    st.add_argument("port", type=int)
    st.add_argument("--seconds", type=float, default=10.0)
    st.add_argument("--chunk", type=int, default=8192, help="bytes per write")
    st.add_argument("--interval", type=float, default=0.01, help="seconds between writes")
    st.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.port, a.count, a.timeout)
    if a.cmd == "stream":
        return stream(a.host, a.port, a.seconds, a.chunk, a.interval, a.timeout)
    return send(a.host, a.port, a.bytes, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
