"""A loopback HTTP server that serves real video files and misbehaves on demand.

Each path is registered with a :class:`Route`: the bytes to serve and a behaviour. A
behaviour can be limited to the first ``times`` requests (then the file is served
normally), which is how retry-then-succeed is tested. Every request is logged with its
arrival time, so tests can check the number of attempts and the wait between them.

Behaviours: ``ok``; ``status`` (any code, optional ``Retry-After``); ``stall`` (headers,
part of the body, then silence until the client gives up); ``truncate`` (announce the full
``Content-Length``, send half, close); ``html`` (a web page where a video was expected);
``garbage`` (``video/mp4`` header, bytes that are not a video).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Behaviour = Literal["ok", "status", "stall", "truncate", "html", "garbage"]


@dataclass
class Route:
    body: bytes = b""
    behaviour: Behaviour = "ok"
    status: int = 200
    retry_after: str | None = None
    times: int | None = None  # misbehave on the first N requests only; None: always
    stall_s: float = 30.0
    hits: list[float] = field(default_factory=list)  # arrival times (time.monotonic)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up mid-response is what several tests provoke: stay quiet."""


class LoopbackServer:
    """``ThreadingHTTPServer`` on 127.0.0.1 with a route table; use :func:`serve`."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def add(self, path: str, route: Route) -> str:
        self.routes["/" + path.lstrip("/")] = route
        return self.url(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._respond(head=True)

            def do_GET(self) -> None:
                self._respond(head=False)

            def _respond(self, head: bool) -> None:
                path = self.path.split("?")[0]
                with server._lock:
                    route = server.routes.get(path)
                    if route is not None:
                        route.hits.append(time.monotonic())
                        n = len(route.hits)
                if route is None:
                    return self._status(404, None, head)
                misbehave = route.times is None or n <= route.times
                kind = route.behaviour if misbehave else "ok"
                if kind == "status":
                    return self._status(route.status, route.retry_after, head)
                if kind == "html":
                    page = b"<html><head><title>Oops</title></head><body>Not here</body></html>"
                    return self._send(page, "text/html; charset=utf-8", head)
                if kind == "garbage":
                    return self._send(b"\x00not a video\x00" * 4096, "video/mp4", head)
                body = route.body
                if kind == "ok" or head:
                    return self._send(body, "video/mp4", head)
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if kind == "stall":
                    server._stop.wait(route.stall_s)
                self.close_connection = True

            def _status(self, status: int, retry_after: str | None, head: bool) -> None:
                body = f"error {status}".encode()
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _send(self, body: bytes, content_type: str, head: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        return Handler


@contextmanager
def serve() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._stop.set()
        server.httpd.shutdown()
        server.httpd.server_close()
