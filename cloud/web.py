"""The coordinator's read-only HTTP side: the status page, /metrics, /api/status and /healthz, from the
standard library's ThreadingHTTPServer in a daemon thread.

It only reads. It is unauthenticated and unencrypted: bind it to localhost or a private network.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from offsite.cloud import status_page
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.status import read_status
from offsite.errors import ConfigError

log = logging.getLogger("offsite.cloud.web")
_TEXT = "text/plain; charset=utf-8"
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            # the page needs nothing but its own inline style: no script runs, nothing is fetched
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}


def _page(handler: _Handler) -> tuple[bytes, str]:
    return status_page.render(read_status(handler.server.coordinator)).encode(), "text/html; charset=utf-8"


def _api_status(handler: _Handler) -> tuple[bytes, str]:
    return json.dumps(read_status(handler.server.coordinator), indent=2, allow_nan=False).encode(), "application/json"


def _metrics(handler: _Handler) -> tuple[bytes, str]:
    return handler.server.coordinator.metrics.exposition(handler.headers.get("Accept"))


def _healthz(handler: _Handler) -> tuple[bytes, str]:
    handler.server.coordinator.state.jobs()  # the state database answers
    return b"ok\n", _TEXT


ROUTES: dict[str, Callable[[_Handler], tuple[bytes, str]]] = {
    "/": _page, "/api/status": _api_status, "/metrics": _metrics, "/healthz": _healthz}


class _Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version, sys_version = "offsite", ""  # no Python version in the Server header

    def do_GET(self) -> None:
        route = ROUTES.get(urlsplit(self.path).path)
        if route is None:
            return self._send(404, b"not found\n", _TEXT)
        try:
            body, content_type = route(self)
        except Exception:
            log.exception("GET %s failed", urlsplit(self.path).path)
            return self._send(500, b"internal error\n", _TEXT)
        self._send(200, body, content_type)

    def _not_allowed(self) -> None:
        self._send(405, b"method not allowed: this server only reads\n", _TEXT, {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _send(self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in {**_HEADERS, "Content-Type": content_type, "Content-Length": str(len(body)), **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # the default writes every request to stderr
        log.debug("%s " + format, self.address_string(), *args)


class WebServer(ThreadingHTTPServer):
    """The HTTP server; its routes read `coordinator`."""

    daemon_threads = True

    def __init__(self, host: str, port: int, coordinator: Coordinator):
        self.coordinator = coordinator
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self) -> None:
        self.shutdown()  # returns once serve_forever has
        self.server_close()


def start_web(coordinator: Coordinator, address: str) -> WebServer:
    """Serve on `address` (HOST:PORT, [v6]:PORT; port 0 picks a free one) from a daemon thread."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--http-address must be HOST:PORT, got {address!r}")
    server = WebServer(host.strip("[]"), int(port), coordinator)
    threading.Thread(target=server.serve_forever, name="status-page", daemon=True).start()
    return server
