"""Every Redis connection of the broker, its workers and its clients is made by `connect`, which adds the
project's credential to a URL that carries none; and a connection for commands sent now whose replies are read later
(a blocking XREAD raced against a doorbell: when the doorbell answers first, the XREAD's reply is still to come)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
from redis.credentials import CredentialProvider

PASSWORD_FILE_ENV = "EB_REDIS_PASSWORD_FILE"  # the Redis password, in a file of mode 0600 (broker.ops.redis_server)
DEFAULT_PASSWORD_FILE = "var/redis/password"  # where the project's Redis makes it on its first run (.env names it)


class PasswordFile(CredentialProvider):
    """The password in a file, read at each new connection: a credential made after this process started (the
    Redis of a Procfile starting beside it) or changed since is used when it reconnects."""

    def __init__(self, path: str):
        self.path = path

    def get_credentials(self) -> tuple[str]:
        try:
            with open(self.path) as f:
                password = f.read().strip()
        except OSError as e:
            raise redis.AuthenticationError(f"cannot read the Redis password from {self.path} "
                                            f"(${PASSWORD_FILE_ENV}): {e.strerror}") from None
        if not password:
            raise redis.AuthenticationError(f"the Redis password file {self.path} (${PASSWORD_FILE_ENV}) is empty")
        return (password,)

    async def get_credentials_async(self) -> tuple[str]:
        return self.get_credentials()


def _has_credential(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.username or parts.password or "password" in parse_qs(parts.query))


def connect(url: str, *, asyncio: bool = False, **kw):
    """A redis-py client (redis.asyncio's with `asyncio`) for `url`: redis://, rediss:// (TLS) or unix://. A URL
    with no user or password in it authenticates with the password in $EB_REDIS_PASSWORD_FILE when that is set;
    `kw` go to redis-py (timeouts and the like)."""
    path = os.environ.get(PASSWORD_FILE_ENV)
    if path and not _has_credential(url):
        kw.setdefault("credential_provider", PasswordFile(path))
    return (aredis.Redis if asyncio else redis.Redis).from_url(url, **kw)


def redacted(url: str) -> str:
    """`url` as it may be shown in messages and logs: its password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def unreachable(url: str, err: Exception) -> str:
    """What to tell a user whose connection to `url` failed with `err`."""
    text = f"cannot reach Redis at {redacted(url)}: {err}"
    if isinstance(err, redis.AuthenticationError):
        path = os.environ.get(PASSWORD_FILE_ENV)
        if path and not _has_credential(url):
            text += (f" (the password is read from {path}, named by ${PASSWORD_FILE_ENV}: the project's Redis, "
                     f"`python -m broker redis-server`, writes it there on its first run)")
        else:
            text += (f" (this Redis asks for a password: put it in the URL, redis://:PASSWORD@host:port/db, or name "
                     f"the file holding it in ${PASSWORD_FILE_ENV}; the project's Redis keeps it in "
                     f"{DEFAULT_PASSWORD_FILE})")
    return text


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
