"""``longattn list``: the registered mechanisms and what each one supports.

The table shows, before any call, which conventions of real models a mechanism
accepts (grouped KV heads, decode steps over a cache, packed documents, cross
attention), whether it runs past one process and inside ``torch.compile`` as one
custom op, and whether it owns learned tensors.

Most columns are the registry's spec fields (:class:`longattn.registry.Mechanism`).
Two are not spec fields and are read from the modules that implement them:
``seq-parallel`` is :func:`longattn.distributed.supported` and ``compile op`` is
:func:`longattn.ops.custom.supported` with the mechanism's default parameters; ``decode``
also counts a model decoding state of :mod:`longattn.decoding` (the recurrent family).
``sinks`` and ``softcap`` are shown where the spec has those fields (False otherwise).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from longattn.registry import Mechanism

#: (column title, meaning) of each capability column, in table order
CAPABILITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("exact", "equals softmax attention over its pattern to rounding error"),
    ("causal", "accepts causal=True"),
    ("gqa", "grouped KV heads computed without repeating K/V (others: K/V repeated for it)"),
    ("decode", "decode steps: causal with Nq < Nk, bottom-right aligned, or a model decoding state "
               "(the recurrent family's O(state) step)"),
    ("packed", "segment_ids: documents packed in one row, each attending alone"),
    ("cross", "accepts Nq != Nk (cross-attention)"),
    ("seq-parallel", "longattn.distributed.attention runs it over a process group"),
    ("compile op", "one torch.library custom op under torch.compile (no graph break)"),
    ("learned", "owns parameters or buffers (use longattn.build / the layers)"),
    ("sinks", "learned attention sinks (one logit per head in the denominator)"),
    ("softcap", "score cap s -> c tanh(s / c)"),
    ("sub-quadratic", "never builds an Nq x Nk tensor"),
)


def capabilities(spec: Mechanism) -> dict[str, bool]:
    """The capability columns of ``spec``, keyed by the titles of :data:`CAPABILITY_COLUMNS`.

    Cost: one registry lookup per column; importing :mod:`longattn.distributed` and
    :mod:`longattn.compile_ops` on first use.
    """
    from longattn import decoding, distributed
    from longattn import compile_ops as custom

    return {
        "exact": spec.exact,
        "causal": spec.causal,
        "gqa": spec.gqa,
        "decode": spec.bottom_right or spec.name in decoding.DECODE_STATES
        or spec.family in decoding.FAMILY_STATES,
        "packed": spec.packed,
        "cross": spec.cross,
        "seq-parallel": spec.name in distributed.supported(),
        "compile op": custom.supported(spec.name, spec.defaults()),
        "learned": spec.learned,
        "sinks": bool(getattr(spec, "sinks", False)),
        "softcap": bool(getattr(spec, "softcap", False)),
        "sub-quadratic": spec.subquadratic,
    }


def _params_text(spec: Mechanism) -> str:
    return ", ".join(p.name if p.required else f"{p.name}={p.default!r}" for p in spec.params)


def mechanism_table(markdown: bool = True) -> str:
    """The registry as a markdown table: name, family, one yes/no column per entry of
    :data:`CAPABILITY_COLUMNS`, parameters with defaults, paper.

    Args:
        markdown: kept for compatibility; the table is always markdown (it reads as
            plain text too).
    """
    from longattn.registry import specs

    titles = [t for t, _ in CAPABILITY_COLUMNS]
    rows = ["| mechanism | family | " + " | ".join(titles) + " | parameters | paper |",
            "|---|---|" + "---|" * len(titles) + "---|---|"]
    for s in specs():
        caps = capabilities(s)
        cells = " | ".join("yes" if caps[t] else "no" for t in titles)
        rows.append(f"| `{s.name}` | {s.family} | {cells} | {_params_text(s)} | {s.paper} |")
    return "\n".join(rows)


def mechanism_records() -> list[dict[str, Any]]:
    """``longattn.mechanisms()`` with a ``capabilities`` dict (:func:`capabilities`) added
    to each entry: what ``longattn list --json`` prints."""
    from longattn.registry import specs

    return [{**s.describe(), "capabilities": capabilities(s)} for s in specs()]


def _legend() -> str:
    return "\n".join(f"- {title}: {meaning}" for title, meaning in CAPABILITY_COLUMNS)


def _run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(mechanism_records(), indent=2))
    else:
        print(mechanism_table())
        print()
        print(_legend())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``list`` subcommand to the ``longattn`` parser."""
    p = sub.add_parser("list", help="list registered mechanisms and their capabilities")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run)
