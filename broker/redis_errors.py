"""Redis's failures as the broker's own errors (broker.errors), each with what to do about it: a client's caller
(and the HTTP front) meets BrokerErrors only, never a redis-py exception."""

from __future__ import annotations

import redis

from broker.errors import BrokerError, BrokerUnavailable, RedisRefused
from broker.protocol.connections import redacted, unreachable

# What to change, by the error code Redis answers with (redis-py's exception class for the common ones).
ADVICE = {
    "OOM": "it is out of memory (used memory over maxmemory, and its maxmemory-policy evicts nothing): raise "
           "maxmemory (redis.conf, or CONFIG SET maxmemory), or keep less in it: results that expire too slowly "
           "(the workers' result_ttl_s) or a queue let grow long (max_queue_depth)",
    "READONLY": "it is a read-only replica: point redis_url at the primary (after a failover, the promoted one)",
    "NOPERM": "its user may not run a command or touch a key the broker needs: grant it (ACL SETUSER ... "
              "+@all ~rq:* ~eb:*) or connect as another user",
    "NOSCRIPT": "it does not have the broker's Lua script even after it was sent again: the script cache is "
                "flushed as it is used, or a proxy sends EVALSHA and SCRIPT LOAD to different servers",
    "MISCONF": "it cannot write its data to disk and refuses writes until it can: free disk space or fix the "
               "permissions of its dir (its log says which)",
    "WRONGTYPE": "a key the broker uses holds another kind of value: another program writes keys named rq:* or "
                 "eb:* there; give the broker a database of its own (redis://host:port/N)",
    "BUSY": "a script has run too long and blocks it: wait, or SCRIPT KILL",
    "AUTH": "it refused the credential as given: a username in the URL needs Redis 6 or later; give the password "
            "alone (redis://:PASSWORD@host:port/db) or in the file $EB_REDIS_PASSWORD_FILE names",
}
CODES = {redis.exceptions.OutOfMemoryError: "OOM", redis.exceptions.ReadOnlyError: "READONLY",
         redis.exceptions.NoPermissionError: "NOPERM", redis.exceptions.NoScriptError: "NOSCRIPT",
         redis.exceptions.AuthenticationWrongNumberOfArgsError: "AUTH"}


def broker_error(url: str, err: redis.RedisError) -> BrokerError:
    """The BrokerError a caller gets for `err`, met talking to the Redis at `url`."""
    if isinstance(err, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse)):
        return BrokerUnavailable(unreachable(url, err))  # InvalidResponse: what answers there is not Redis
    code = CODES.get(type(err)) or getattr(err, "status_code", None) or str(err).split(" ", 1)[0]
    advice = ADVICE.get(code, "see its log and its configuration (maxmemory, ACLs, replica-read-only)")
    return RedisRefused(f"Redis at {redacted(url)} refused a command: {advice} (Redis said: {err})")


class BrokerErrors:
    """`with BrokerErrors(url):` raises every redis-py exception of the block as broker_error's BrokerError
    (works in coroutines too)."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> "BrokerErrors":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if isinstance(err, redis.RedisError):
            raise broker_error(self.url, err) from None
        return False
