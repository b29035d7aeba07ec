"""`python -m shm sweep [--prefix eb] [--grace-s 0]`: remove expired and orphaned segments, print their names."""
import argparse
import sys

from .names import DEFAULT_PREFIX
from .sweep import sweep


def main(argv=None, prog: str = "python -m shm") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="unlink expired segments and those whose creator process is dead")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"segment name prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--grace-s", type=float, default=0.0,
                   help="spare dead creators' segments younger than this many seconds (default 0)")
    args = parser.parse_args(argv)
    try:
        removed = sweep(args.prefix, grace_s=args.grace_s)
    except ValueError as e:
        parser.error(str(e))
    for name in removed:
        print(name)
    print(f"removed {len(removed)} segment(s) with prefix {args.prefix!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
