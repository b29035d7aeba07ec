"""A small HTTP/1.1 server on asyncio streams: just what broker.http_front's JSON API needs.

Content-Length bodies only (a Transfer-Encoding is refused with 501), bounded before they are read (413);
request heads bounded too (431); keep-alive as HTTP/1.1 defines it; `Expect: 100-continue` answered once the
body's size is accepted (curl sends it for bodies over 1 KiB). No TLS: put a proxy in front for that.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 32 * 1024  # request line + headers
KEEPALIVE_IDLE_S = 75.0  # an idle keep-alive connection is closed after this long
READ_TIMEOUT_S = 30.0  # a request body must arrive within this long once its head has
BODY_METHODS = ("POST", "PUT", "PATCH")


class HttpError(Exception):
    """Answer with `status` and a JSON {"message", "code"}; `close` ends the connection after it (used when the
    rest of the request can't be skipped reliably)."""

    def __init__(self, status: int, message: str, *, close: bool = False, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers or {}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    version: str  # "HTTP/1.1" | "HTTP/1.0"
    headers: dict  # lower-cased names
    body: bytes
    peer: tuple | None  # (ip, port, ...) of the client
    local: tuple | None  # (ip, port, ...) the client connected to

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)
    close: bool = False


def json_response(status: int, obj, headers: dict | None = None) -> Response:
    return Response(status, json.dumps(obj, ensure_ascii=False).encode(), headers=headers or {})


def error_response(status: int, message: str, headers: dict | None = None, close: bool = False) -> Response:
    r = json_response(status, {"message": message, "code": status}, headers)
    r.close = close
    return r


Handler = Callable[[Request], Awaitable[Response]]


def parse_head(head: bytes) -> tuple[str, str, str, dict]:
    """(method, target, version, headers) of a request head ending in CRLF CRLF."""
    lines = head.lstrip(b"\r\n")[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, "malformed request line: expected 'METHOD /path HTTP/1.1'", close=True)
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"{version} is not supported: speak HTTP/1.1", close=True)
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"malformed header line {raw[:80]!r}", close=True)
        key, val = name.decode("latin-1").lower(), value.strip().decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != val:
                raise HttpError(400, "conflicting Content-Length headers", close=True)
            if key != "content-length":
                val = f"{headers[key]}, {val}"
        headers[key] = val
    return method.upper(), target, version, headers


def body_length(method: str, headers: dict, max_body_bytes: int) -> int:
    """How many body bytes to read, refusing what can't or mustn't be read."""
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding bodies are not supported: send the body with a Content-Length",
                        close=True)
    cl = headers.get("content-length")
    if cl is None:
        if method in BODY_METHODS:
            raise HttpError(411, f"{method} needs a Content-Length header", close=True)
        return 0
    if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
        raise HttpError(400, f"Content-Length {cl[:20]!r} is not a byte count", close=True)
    n = int(cl)
    if n > max_body_bytes:
        raise HttpError(413, f"request body of {n} bytes is over this server's limit of {max_body_bytes} bytes "
                             "(max_body_bytes)", close=True)
    return n


class HttpServer:
    """Serves `handler` on (host, port). `handler` may raise HttpError; any other exception becomes a 500."""

    def __init__(self, handler: Handler, max_body_bytes: int):
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._busy = 0  # requests being handled (between head read and response written)

    async def start(self, host: str, port: int) -> int:
        """Listens; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD_BYTES)
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace_s: float = 5.0) -> None:
        """Stops accepting, lets requests being handled finish for up to grace_s, then closes every connection."""
        if self._server is None:
            return
        self._server.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), KEEPALIVE_IDLE_S)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return  # the client went away or stayed idle
                except asyncio.LimitOverrunError:
                    await self._write(writer, error_response(431, f"request head over {MAX_HEAD_BYTES} bytes",
                                                             close=True), False)
                    return
                self._busy += 1
                try:
                    resp, keep = await self._one(reader, writer, head, peer, local)
                    await self._write(writer, resp, keep)
                finally:
                    self._busy -= 1
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client left mid-request or mid-response: nobody to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader, writer, head: bytes, peer, local) -> tuple[Response, bool]:
        """Reads one request's body and handles it: (response, keep the connection open)."""
        try:
            method, target, version, headers = parse_head(head)
            n = body_length(method, headers, self.max_body_bytes)
            if n and headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await asyncio.wait_for(reader.readexactly(n), READ_TIMEOUT_S) if n else b""
            path, _, query = target.partition("?")
            req = Request(method, path, query, version, headers, body, peer, local)
        except HttpError as e:
            return error_response(e.status, e.message, e.headers, close=True), False
        try:
            resp = await self.handler(req)
        except HttpError as e:
            resp = error_response(e.status, e.message, e.headers, close=e.close)
        except Exception as e:  # a bug in a handler answers 500 and keeps the server up
            log.exception("%s %s failed", req.method, req.path)
            resp = error_response(500, f"internal error: {type(e).__name__}: {e}", close=True)
        if req.method == "HEAD":
            resp.headers.setdefault("Content-Length", str(len(resp.body)))
            resp.body = b""
        return resp, req.keep_alive and not resp.close

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, keep: bool) -> None:
        reason = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"Content-Type: {resp.content_type}",
                 f"Connection: {'keep-alive' if keep else 'close'}"]
        if "Content-Length" not in resp.headers:
            lines.append(f"Content-Length: {len(resp.body)}")
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if resp.body:
            writer.write(resp.body)
        await writer.drain()
