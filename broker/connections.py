"""Dedicated Redis connections taken from a pool for a reply read later (a pending blocking wait, a raced XREAD,
a claim): one whose reply will never be read must not go back to the pool as it is."""

from __future__ import annotations


def discard_connection(pool, conn) -> None:
    """Closes `conn` (a reply may still be on its way) and gives it back to `pool`; None is a no-op."""
    if conn is not None:
        conn.disconnect()
        pool.release(conn)
