"""uvicorn plumbing of the HTTP front (broker.http.front): the listening socket, a deadline for request heads,
and the access log."""

from __future__ import annotations

import errno
import logging
import socket
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

access_log = logging.getLogger("broker.http_front.access")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, or a ValueError that says what to do when the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} in use: another front? set EB_HTTP_PORT (Procfile), EB_PORT or --port") \
                from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request head: uvicorn times out idle keep-alive
    connections only, and any byte restarts that clock, so a client trickling a head would hold its connection
    forever. Here a connection that has no request in flight gets client_timeout_s for its next head."""

    head_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def _head_expired(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no head within the deadline: nobody to answer


class AccessLog:
    """ASGI middleware: one log line and one count per request (method, path, status, ms, prompts, tokens)."""

    def __init__(self, app, requests, routes: tuple[str, ...]):
        """`requests`: a Counter labelled (path, status); paths outside `routes` count as "other"."""
        self.app, self.requests, self.routes = app, requests, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in self.routes else "other"
            self.requests.labels(path, str(status[0])).inc()
            access_log.info("%s %s %d %.1f ms prompts=%d tokens=%d", scope["method"], scope["path"], status[0],
                            (time.perf_counter() - t0) * 1e3, state.get("prompts", 0), state.get("tokens", 0))
