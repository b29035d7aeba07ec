"""python -m broker stats [--redis-url URL] [--queue encode] [--json] [--watch S]
python -m broker credential: make the Redis password file if missing (mode 0600) and print its path
python -m broker redis-server [--port 6390] [--bind 127.0.0.1]: the project's Redis, asking for that password"""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis

from broker.ops.stats import collect, format_stats
from broker.protocol.config import DEFAULT_REDIS_PORT, redis_url_from_env
from broker.protocol.connections import connect, unreachable
from broker.protocol.queues import DEFAULT_QUEUE


def main(argv=None, prog: str = "python -m broker") -> int:
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stats", help="queue depth, workers, batch sizes, latency and cache hit rate")
    st.add_argument("--redis-url", default=redis_url_from_env())
    st.add_argument("--queue", default=DEFAULT_QUEUE)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", type=float, default=0, help="refresh every N seconds")
    cr = sub.add_parser("credential", help="make the Redis password file if missing (mode 0600); print its path")
    cr.add_argument("--file", help="default: $EB_REDIS_PASSWORD_FILE or var/redis/password")
    rs = sub.add_parser("redis-server", help="run redis-server asking for the password (made on first run)")
    rs.add_argument("--port", type=int, default=DEFAULT_REDIS_PORT)
    rs.add_argument("--bind", default="127.0.0.1")
    rs.add_argument("--file", help="the password file; default: $EB_REDIS_PASSWORD_FILE or var/redis/password")
    args = ap.parse_args(argv)
    if args.command == "credential":
        from broker.ops.redis_server import ensure_credential, password_file

        ensure_credential(args.file)
        print(args.file or password_file())
        return 0
    if args.command == "redis-server":
        from broker.ops.redis_server import exec_redis_server

        exec_redis_server(args.port, args.bind, args.file)
    conn = connect(args.redis_url, socket_connect_timeout=3, socket_timeout=5)
    try:
        while True:
            try:
                s = collect(conn, args.queue)
            except redis.ConnectionError as e:
                print(unreachable(args.redis_url, e), file=sys.stderr)
                return 2
            print(json.dumps(s) if args.json else format_stats(s), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
            print()
    except KeyboardInterrupt:  # Ctrl-C ends --watch
        return 0


if __name__ == "__main__":
    sys.exit(main())
