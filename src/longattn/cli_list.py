"""``longattn list``: the registered mechanisms and their capabilities."""

from __future__ import annotations

import argparse
import json


def mechanism_table(markdown: bool = True) -> str:
    """The registry as a markdown table (name, family, exact, causal, learned, params, paper)."""
    from longattn.registry import specs

    rows = ["| mechanism | family | exact | causal | learned | sub-quadratic | parameters | paper |",
            "|---|---|---|---|---|---|---|---|"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for s in specs():
        params = ", ".join(
            p.name if p.required else f"{p.name}={p.default!r}" for p in s.params
        )
        rows.append(
            f"| `{s.name}` | {s.family} | {yes(s.exact)} | {yes(s.causal)} | {yes(s.learned)} "
            f"| {yes(s.subquadratic)} | {params} | {s.paper} |"
        )
    return "\n".join(rows)


def _run(args: argparse.Namespace) -> int:
    from longattn.registry import mechanisms

    if args.json:
        print(json.dumps(mechanisms(), indent=2))
    else:
        print(mechanism_table())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered mechanisms and their capabilities")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run)
