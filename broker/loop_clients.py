"""One asyncio Redis client per event loop, closed when its loop ends, so that a client used across many
`asyncio.run()` calls holds connections for the loops still open only.

An asyncio connection belongs to the loop that made it, so each loop gets its own client. Nothing tells a library
that a loop ended, except that `loop.shutdown_asyncgens()` (which asyncio.run, asyncio.Runner and uvicorn call as
they end) closes the async generators started in it: each loop's client comes with one, suspended until then, that
closes the client in its own loop. A loop closed without that call can no longer close its connections: when the
next loop comes, its client is dropped and its sockets shut down, so Redis forgets them at once (their descriptors
go with the transports, when the collector frees them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class LoopClients:
    """`make()` -> (asyncio client, anything kept with it), one per running event loop."""

    def __init__(self, make):
        self._make = make
        self._by_loop: dict = {}  # event loop -> (client, extra, the async generator that closes the client)

    def get(self) -> tuple:
        """(client, extra) of the running event loop, made on its first call there."""
        loop = asyncio.get_running_loop()
        mine = self._by_loop.get(loop)
        if mine is None:
            self._drop_closed_loops()
            client, extra = self._make()
            closer = self._close_with_loop(loop, client)
            _run_to_first_yield(closer)  # registers it with the running loop
            mine = self._by_loop[loop] = (client, extra, closer)
        return mine[:2]

    async def close(self) -> None:
        """Closes the running loop's client now."""
        mine = self._by_loop.get(asyncio.get_running_loop())
        if mine is not None:
            await mine[2].aclose()

    def __len__(self) -> int:
        return len(self._by_loop)

    async def _close_with_loop(self, loop, client):
        try:
            yield
        finally:
            if self._by_loop.get(loop, (None,))[0] is client:
                del self._by_loop[loop]
            await client.aclose()

    def _drop_closed_loops(self) -> None:
        for loop, (client, _extra, _closer) in list(self._by_loop.items()):
            if loop.is_closed():
                del self._by_loop[loop]
                _shut_down_sockets(client)


def _run_to_first_yield(agen) -> None:
    """Starts `agen`, which awaits nothing before its first yield, from synchronous code in the running loop."""
    try:
        agen.asend(None).send(None)
    except StopIteration:
        return
    raise RuntimeError("the loop's closer awaited before its first yield")


def _shut_down_sockets(client) -> None:
    """Shuts down the sockets of `client`, whose loop is closed (so its transports can't be closed properly)."""
    pool = client.connection_pool
    for conn in [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]:
        writer = getattr(conn, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
