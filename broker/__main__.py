"""python -m broker stats [--redis-url URL] [--queue encode] [--json] [--watch S]"""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis

from broker.config import redis_url_from_env
from broker.stats import collect, format_stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m broker")
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stats", help="queue depth, workers, batch sizes, latency and cache hit rate")
    st.add_argument("--redis-url", default=redis_url_from_env())
    st.add_argument("--queue", default="encode")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", type=float, default=0, help="refresh every N seconds")
    args = ap.parse_args(argv)
    conn = redis.Redis.from_url(args.redis_url, socket_connect_timeout=3, socket_timeout=5)
    try:
        while True:
            try:
                s = collect(conn, args.queue)
            except redis.ConnectionError as e:
                print(f"cannot reach Redis at {args.redis_url}: {e}", file=sys.stderr)
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
