"""Pictures of what each pattern looks at: ``longattn show``.

``show_pattern`` draws the visible (query, key) entries of a pattern as a black and
white matrix, one panel per distinct head (per-head lists, random blocks), like the
attention-matrix figures of the lecture notes. ``pattern_gallery`` draws every
named pattern into a folder (used by the demo and the README). ``show_selection``
draws what the content-based ``topk_blocks`` selected for a given input (queries x key
blocks), since a selection has no fixed pattern to draw.
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


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, imported on first use
    (matplotlib is an optional extra, never imported with the package)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: str | Path, *, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``out`` (PNG; parent folders created), close it and
    return the path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    return out


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
    plt = _pyplot()

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
    return _save(fig, out, dpi=110)


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


#: cell codes of :func:`selection_map`, in drawing priority (a higher code wins a cell)
SELECTION_CODES = {0: "not read", 1: "sink keys", 2: "window keys", 3: "selected block", 4: "own block"}


@torch.no_grad()
def selection_map(q: torch.Tensor, k: torch.Tensor, *, block: int = 64, topk: int = 8, gate: str = "mean",
                  sink_tokens: int = 0, window: int = 0, causal: bool = True, shared: bool = False,
                  head: int = 0, batch: int = 0) -> torch.Tensor:
    """What ``topk_blocks`` reads for each query of one head: long [Nq, Nk / block] codes
    (:data:`SELECTION_CODES`): its own block, the blocks its gate selected (read whole),
    blocks it reads only for the first ``sink_tokens`` or last ``window`` positions, or 0.

    q [B, H, Nq, D], k [B, Hkv, Nk, D] (Nq <= Nk: the queries are the last Nq positions);
    the selection is :func:`longattn.ops.topk_blocks.select_blocks`, the mechanism's own.
    Cost O(Nq * Nk / block * D) for the gate; the map is Nq x (Nk / block).
    """
    from longattn.ops.topk_blocks import _check_params, select_blocks

    _check_params(block, topk, gate, sink_tokens, window, shared)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, N, D], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    H, Hkv, Nq, Nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if not 0 <= head < H:
        raise ValueError(f"head must be in [0, {H}), got {head}")
    sel = select_blocks(q[batch : batch + 1], k[batch : batch + 1], block=block, topk=topk, gate=gate,
                        shared=shared or H == Hkv, causal=causal, key_padding_mask=None)
    R = H // Hkv
    sel = sel[0, head // R, 0 if sel.shape[2] == 1 else head % R]  # [Nq, K]
    nb = -(-Nk // block)
    pos = torch.arange(Nq) + (Nk - Nq)  # each query's position
    blocks = torch.arange(nb)
    codes = torch.zeros(Nq, nb, dtype=torch.long)
    if sink_tokens:  # blocks holding a sink key the query may see
        first_keys = blocks * block
        sink = (first_keys < sink_tokens)[None, :].expand(Nq, nb)
        codes[sink & (first_keys[None, :] <= pos[:, None]) if causal else sink] = 1
    if window:  # blocks holding one of the query's last `window` positions
        lo, hi = (pos - window + 1).clamp_min(0) // block, pos // block
        codes[(blocks[None, :] >= lo[:, None]) & (blocks[None, :] <= hi[:, None])] = 2
    picked = torch.zeros(Nq, nb + 1, dtype=torch.bool)
    picked.scatter_(1, torch.where(sel >= 0, sel, nb), True)
    codes[picked[:, :nb]] = 3
    codes[torch.arange(Nq), pos // block] = 4
    return codes


def show_selection(q: torch.Tensor, k: torch.Tensor, out: str | Path = "selection.png", *, block: int = 64,
                   topk: int = 8, gate: str = "mean", sink_tokens: int = 0, window: int = 0, causal: bool = True,
                   shared: bool = False, head: int = 0, title: str | None = None) -> Path:
    """Draw what ``topk_blocks`` selected for a real input: queries (rows) x key blocks
    (columns), its own block, the gate's selected blocks, and the blocks it reads only for
    sink or window keys shaded apart (:func:`selection_map`); writes a PNG, returns its path."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    codes = selection_map(q, k, block=block, topk=topk, gate=gate, sink_tokens=sink_tokens, window=window,
                          causal=causal, shared=shared, head=head)
    colors = ["#ffffff", "#2ca02c", "#98df8a", "#1f4e9c", "#ff7f0e"]
    Nq, nb = codes.shape
    fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + 0.25 * nb), 5.0))
    ax.imshow(codes.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=4, aspect="auto", interpolation="nearest",
              extent=(-0.5, nb - 0.5, Nq - 0.5, -0.5))
    ax.set_xlabel(f"key block (blocks of {block} keys)")
    ax.set_ylabel("query position")
    read = (codes >= 3).sum(1).float().mean().item()
    ax.set_title(title or f"topk_blocks(block={block}, topk={topk}, gate={gate!r}, sink_tokens={sink_tokens}, "
                          f"window={window}), head {head}: {read:.1f} whole blocks read per query", fontsize=9)
    present = sorted(set(codes.unique().tolist()) - {0})
    handles = [Patch(facecolor=colors[c], edgecolor="#666666", label=SELECTION_CODES[c]) for c in present]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    return _save(fig, out, dpi=110)


def gallery_markdown(paths: list[Path], relative_to: Path) -> str:
    """A markdown block of images, two per row."""
    lines = []
    for p in paths:
        rel = p.relative_to(relative_to) if p.is_relative_to(relative_to) else p
        lines.append(f"![{p.stem}]({rel.as_posix()})")
    return "\n".join(lines)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The attention matrix of every layer of ``model`` on one input ``x`` [1, N].

    Every mechanism here is linear in the values, so a head group called with
    v = identity [N, N] returns its effective attention matrix exactly, whatever it
    computes inside (a pattern, LSH buckets, Performer features...). Returns one
    [heads, Nq, Nk] tensor per attention layer, in call order.
    """
    from longattn.layers.attention import HeadGroup

    maps: list[list[torch.Tensor]] = []
    current: dict[int, int] = {}

    def hook(mod: HeadGroup, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        q, k, v = args[:3]
        nk, d = k.shape[2], v.shape[-1]
        cols = []
        for c0 in range(0, nk, d):  # value width stays d (fast kernels need Dv == D)
            basis = torch.zeros(nk, d, dtype=v.dtype)
            w = min(d, nk - c0)
            basis[c0 : c0 + w, :w] = torch.eye(w, dtype=v.dtype)
            cols.append(mod.forward(q, k, basis.expand(k.shape[0], k.shape[1], -1, -1), **kwargs)[0, :, :, :w])
        a = torch.cat(cols, dim=-1)  # [heads, Nq, Nk]
        layer = current.setdefault(id(mod.__dict__.get("_layer_owner", mod)), len(current))
        while len(maps) <= layer:
            maps.append([])
        maps[layer].append(a)

    groups = [m for m in model.modules() if isinstance(m, HeadGroup)]
    owners = [m for m in model.modules() if any(isinstance(c, HeadGroup) for c in m.children())]
    for o in owners:
        for c in o.children():
            if isinstance(c, HeadGroup):
                c.__dict__["_layer_owner"] = o
    handles = [g.register_forward_hook(hook, with_kwargs=True) for g in groups]
    was = model.training
    model.eval()
    try:
        model(x, key_padding_mask=key_padding_mask)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
        for g in groups:
            g.__dict__.pop("_layer_owner", None)
    return [torch.cat(m, dim=0) for m in maps]


def load_trained(checkpoint: str | Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model, train config, task config) rebuilt from a ``longattn train`` checkpoint."""
    from longattn import tasks
    from longattn.train import TrainConfig, build_model, load_checkpoint

    st = load_checkpoint(checkpoint)
    cfg = TrainConfig(**st["signature"])
    spec = tasks.get(cfg.task)
    task_cfg = spec.make_config(**cfg.task_options)
    model = build_model(cfg, task_cfg, spec.kind)
    model.load_state_dict(st["model"])
    return model, cfg, task_cfg


def show_checkpoint(checkpoint: str | Path, out: str | Path, example: int = 0) -> Path:
    """Draw each layer's attention maps (per head) of a trained model on a test example."""
    plt = _pyplot()

    from longattn import tasks

    model, cfg, task_cfg = load_trained(checkpoint)
    data = tasks.load(cfg.task, "test", seed=cfg.data_seed, config=task_cfg)
    x = torch.as_tensor(data.x[example : example + 1])
    m = torch.as_tensor(data.mask[example : example + 1])
    maps = attention_maps(model, x, key_padding_mask=m)
    n = int(m.sum())
    rows, cols = len(maps), max(a.shape[0] for a in maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for r, a in enumerate(maps):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < a.shape[0]:
                ax.imshow(a[c, :n, :n].float().numpy(), cmap="magma", interpolation="nearest")
                ax.set_title(f"layer {r} head {c}", fontsize=8)
    fig.suptitle(f"{cfg.task}, mechanism {cfg.mechanism}: attention on test example {example}", fontsize=10)
    return _save(fig, out, dpi=100)


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
    if args.checkpoint:
        print(show_checkpoint(args.checkpoint, args.out if args.out != "pattern.png" else "attention.png"))
        return 0
    if args.pattern is None:
        raise SystemExit("longattn show: give a PATTERN (or 'all'), or --checkpoint")
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
    p.add_argument("pattern", nargs="?", help="pattern name, or 'all'")
    p.add_argument("param", nargs="*", help="pattern parameters as KEY=VALUE (e.g. before=4)")
    p.add_argument("--n", type=int, default=64, help="sequence length drawn (default 64)")
    p.add_argument("--heads", type=int, default=4, help="heads drawn for per-head patterns (default 4)")
    p.add_argument("--causal", action="store_true", help="intersect with j <= i")
    p.add_argument("--out", default="pattern.png", help="output PNG (a folder for 'all')")
    p.add_argument("--checkpoint", help="draw the attention maps of a model trained by `longattn train`")
    p.set_defaults(run=_run_show)
