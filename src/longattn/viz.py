"""Pictures of what each pattern looks at: ``longattn show``.

``show_pattern`` draws the visible (query, key) entries of a pattern as a black and
white matrix, one panel per distinct head (per-head lists, random blocks), like the
attention-matrix figures of the lecture notes. ``pattern_gallery`` draws every
named pattern into a folder (used by the demo and the README).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

import torch

from longattn import patterns as P

#: small, readable settings for pictures at n = 64
GALLERY: dict[str, dict[str, Any]] = {
    "full": {},
    "causal": {},
    "local": {"before": 4, "after": 4},
    "dilated": {"radius": 3, "dilation": 3},
    "strided": {"stride": 8},
    "block_diagonal": {"block": 8},
    "global": {"indices": (0, 1, 32)},
    "random": {"blocks_per_row": 2, "block": 8, "seed": 0},
    "longformer": {"window": 4, "global_indices": (0, 1)},
    "bigbird": {"block": 8, "random_blocks": 1, "global_blocks": 1, "seed": 0},
    "sparse_transformer_strided": {"l": 8},
    "sparse_transformer_fixed": {"l": 8, "c": 2},
}

#: per-head "lecture form" compositions drawn beside the named patterns
LECTURE_FORMS: dict[str, tuple[str, P.Pattern]] = {
    "longformer_heads": (
        "Longformer, one head each: local | dilated | global",
        P.PerHead([P.Local(4, 4), P.Dilated(3, 3), P.GlobalTokens([0, 1])]),
    ),
    "bigbird_heads": (
        "BigBird, one head each: random | local | strided | global",
        P.PerHead([P.RandomBlocks(2, 8, 0), P.Local(4, 4), P.Strided(8), P.GlobalTokens([0, 1])]),
    ),
}


def distinct_heads(pattern: P.Pattern, n: int, heads: int, causal: bool) -> list[tuple[str, torch.Tensor]]:
    """[(label, mask [n, n])] for each head whose mask differs from the one before."""
    m = pattern.mask(n, heads, causal)
    groups: list[list[int]] = []
    for h in range(heads):
        if groups and torch.equal(m[groups[-1][0]], m[h]):
            groups[-1].append(h)
        else:
            groups.append([h])
    if len(groups) == 1:
        return [("all heads", m[0])]
    return [
        (f"head {g[0]}" if len(g) == 1 else f"heads {g[0]}-{g[-1]}", m[g[0]]) for g in groups
    ]


def show_pattern(
    pattern: P.Pattern,
    n: int = 64,
    out: str | Path = "pattern.png",
    *,
    heads: int = 1,
    causal: bool = False,
    title: str | None = None,
) -> Path:
    """Draw the visible entries of ``pattern`` at length ``n`` into ``out`` (PNG).

    Rows are queries i, columns keys j, black = visible. One panel per distinct head.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = distinct_heads(pattern, n, heads, causal)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, m) in zip(axes[0], panels):
        ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        density = m.float().mean().item()
        ax.set_title(f"{label}: {100 * density:.0f}% visible", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks([0, n - 1])
        ax.set_yticks([0, n - 1])
    fig.suptitle(title or repr(pattern)[:90], fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pattern_gallery(out_dir: str | Path = "report/patterns", n: int = 64, heads: int = 4) -> list[Path]:
    """Draw every named pattern (GALLERY) and the per-head lecture forms into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = []
    for name, params in GALLERY.items():
        pat = P.make(name, **params)
        args = ", ".join(f"{k}={v}" for k, v in params.items())
        paths.append(show_pattern(pat, n, out_dir / f"{name}.png", heads=heads, title=f"{name}({args})"))
    for name, (title, pat) in LECTURE_FORMS.items():
        h = len(pat.patterns)
        paths.append(show_pattern(pat, n, out_dir / f"{name}.png", heads=h, title=title))
    return paths


def gallery_markdown(paths: list[Path], relative_to: Path) -> str:
    """A markdown block of images, two per row."""
    lines = []
    for p in paths:
        rel = p.relative_to(relative_to) if p.is_relative_to(relative_to) else p
        lines.append(f"![{p.stem}]({rel.as_posix()})")
    return "\n".join(lines)


def _parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"longattn show: parameters are KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            params[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            params[k] = v
    return params


def _run_show(args: argparse.Namespace) -> int:
    if args.pattern == "all":
        paths = pattern_gallery(args.out if args.out != "pattern.png" else "report/patterns", args.n)
        for p in paths:
            print(p)
        return 0
    params = _parse_params(args.param)
    try:
        pat = P.make(args.pattern, **params)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"longattn show: {e}") from None
    title = f"{args.pattern}({', '.join(f'{k}={v}' for k, v in params.items())})"
    path = show_pattern(pat, args.n, args.out, heads=args.heads, causal=args.causal, title=title)
    print(path)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="draw the visible entries of a pattern (per head) as a PNG",
        description="Draw a pattern, e.g.: longattn show local --n 64 --out local.png before=4 after=4. "
        "PATTERN 'all' draws the whole gallery. Patterns: " + ", ".join(sorted(P.PATTERNS)),
    )
    p.add_argument("pattern", help="pattern name, or 'all'")
    p.add_argument("param", nargs="*", help="pattern parameters as KEY=VALUE (e.g. before=4)")
    p.add_argument("--n", type=int, default=64, help="sequence length drawn (default 64)")
    p.add_argument("--heads", type=int, default=4, help="heads drawn for per-head patterns (default 4)")
    p.add_argument("--causal", action="store_true", help="intersect with j <= i")
    p.add_argument("--out", default="pattern.png", help="output PNG (a folder for 'all')")
    p.set_defaults(run=_run_show)
