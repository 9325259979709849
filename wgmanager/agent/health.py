"""The agent's /healthz and /readyz, for the kubelet's probes.

/healthz is liveness (the main loop ticks and the watcher runs), /readyz readiness (synced
with the API and the last reconcile succeeded); both answer the agent's health document as
JSON, with 200 or 503. The server runs on its own daemon thread, so a long reconcile never
delays a probe.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from wgmanager.errors import WgmError


@dataclass(frozen=True, slots=True)
class HealthSettings:
    address: str = "0.0.0.0"  # hostNetwork: kubelet probes the node's address
    port: int = 9876


def serve_health(settings: HealthSettings,
                 state: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Starts serving; ``state()`` gives the document (``alive`` and ``ready`` decide)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            doc = state()
            if self.path == "/healthz":
                ok = bool(doc["alive"])
            elif self.path == "/readyz":
                ok = bool(doc["ready"])
            else:
                self.send_error(404)
                return
            body = json.dumps(doc).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    try:
        server = ThreadingHTTPServer((settings.address, settings.port), Handler)
    except OSError as e:
        raise WgmError(f"cannot serve health checks on {settings.address}:{settings.port}:"
                       f" {e.strerror}; choose another --health-port") from e
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
