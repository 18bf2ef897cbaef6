"""/metrics, /healthz and /readyz on one small threaded HTTP server; nothing else is exposed.

Every long-running program serves them (the worker, anomaly-notify): its loop reports to a
`Health`, the HTTP thread reads it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class Health:
    """What the loop reports about itself; read by the HTTP thread."""

    def __init__(
        self,
        liveness_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        needs_model: bool = True,
    ) -> None:
        self.liveness_seconds = liveness_seconds
        self.clock = clock
        self.needs_model = needs_model  # a program without a model (anomaly-notify) is ready without one
        self.last_heartbeat = clock()
        self.model_loaded = False
        self.redis_ok = False
        self.stopping = False

    def heartbeat(self) -> None:
        """The loop is alive (called once per iteration)."""
        self.last_heartbeat = self.clock()

    def alive(self) -> bool:
        """The loop ran recently."""
        return self.clock() - self.last_heartbeat < self.liveness_seconds

    def ready(self) -> bool:
        """Model loaded (if the program needs one), Redis reachable, and not shutting down."""
        return (self.model_loaded or not self.needs_model) and self.redis_ok and not self.stopping

    def readiness(self) -> str:
        """What /readyz says after ok or not ok: each condition as key=0|1."""
        model = f"model_loaded={int(self.model_loaded)} " if self.needs_model else ""
        return f"{model}redis_ok={int(self.redis_ok)} stopping={int(self.stopping)}"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


def make_app(registry: CollectorRegistry, health: Health) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /metrics from prometheus-client, health checks as plain text."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            if path == "/healthz":
                ok, detail = health.alive(), "loop alive" if health.alive() else "loop stalled"
            else:
                ok, detail = health.ready(), health.readiness()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{'ok' if ok else 'not ok'}: {detail}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class HttpServer:
    """Serves the app in a daemon thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self._server = make_server(
            host, port, make_app(registry, health), ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> HttpServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
