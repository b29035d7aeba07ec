"""A connection for commands sent now whose replies are read later (a blocking XREAD raced against a doorbell:
when the doorbell answers first, the XREAD's reply is still to come)."""

from __future__ import annotations

import redis

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class DeferredReplies:
    """A connection of its own from `client`'s pool, with at most one send's replies outstanding. A connection
    that went stale (Redis restarted) or whose replies never came is replaced, never reused as it is."""

    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._conn = None
        self._pending = 0

    def send(self, *commands: tuple) -> None:
        """Sends `commands`; an earlier send's replies are read first if they have come, else the connection
        is replaced (a blocking command may keep it for seconds)."""
        if self._conn is not None:
            try:
                if self._conn.can_read(timeout=0):
                    if not self._pending:  # an idle connection turns readable only when the server closed it
                        raise redis.ConnectionError("the server closed the connection")
                    self.read()
                elif self._pending:
                    self.discard()
            except CONNECTION_ERRORS:
                self.discard()
        if self._conn is None:
            self._conn = self._pool.get_connection()
        try:
            self._conn.send_packed_command(self._conn.pack_commands(commands))
        except CONNECTION_ERRORS:
            self.discard()
            raise
        self._pending = len(commands)

    def fileno(self) -> int:
        return self._conn._sock.fileno()

    def read(self) -> list:
        """The outstanding replies, read (blocking until they come)."""
        try:
            replies = [self._conn.read_response() for _ in range(self._pending)]
        except BaseException:  # replies left half read would answer the next send
            self.discard()
            raise
        self._pending = 0
        return replies

    def discard(self) -> None:
        """Closes the connection (a reply may still be on its way) and gives it back to the pool."""
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
        self._conn = None
        self._pending = 0
