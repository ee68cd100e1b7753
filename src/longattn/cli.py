"""The ``longattn`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longattn", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list registered mechanisms")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        from longattn.registry import specs

        for s in specs():
            print(f"{s.name:24s} {s.family:12s} {s.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
