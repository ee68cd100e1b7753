"""The ``longattn`` command.

Subcommands live beside the code they drive: each module in ``COMMANDS`` defines
``add_commands(subparsers)``, adding its parsers with ``set_defaults(run=fn)``
where ``fn(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "longattn.cli_list",
    "longattn.viz",
    "longattn.train",
    "longattn.suite",
    "longattn.bench.cli",
    "longattn.evaluation.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longattn",
        description="Efficient attention for long sequences: see, measure, compare.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if name == e.name or name.startswith(f"{e.name}."):  # not there (yet)
                continue
            raise
        mod.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
