"""Attention patterns: which key j each query i may see (docs/design.md section 4).

Each pattern is written once as a *predicate* ``visible(i, j, h)`` on broadcast
integer tensors (attention-gym style). The same pattern also describes itself to
the exact engine (:mod:`longattn.ops.blocksparse`) as a list of *components*
without any N x N object:

- :class:`Band`: a band ``-before <= u_j - u_i <= after`` inside groups of
  positions: the whole sequence (local), residue classes mod d (dilated, strided:
  "a band after regrouping by residue"), or contiguous chunks (block-diagonal).
  The engine runs it as unmasked square and triangular tiles.
- :class:`Gather`: blocks of queries, each with a short list of key positions
  (global columns and rows, random blocks, Sparse Transformer summary columns).

A pattern's components may overlap; the engine counts every key once (a later
component is masked by the earlier ones) and merges them into one softmax.

For FlexAttention a pattern gives its predicate point by point too
(:meth:`Pattern.mask_mod`: elementwise code and table lookups, its integers in 0-d
tensors; helpers in :mod:`longattn._points`), so a new pattern runs on Flex without
an edit of :mod:`longattn.ops.flex`.

Small masks (N=8, before=1, after=2), ``#`` visible::

    local(1, 2)        dilated(1, 2)      strided(3)         global_tokens([0])
    ###.....           #.#.....           #..#..#.           ########
    ####....           .#.#....           .#..#..#           #.......
    .####...           #.#.#...           ..#..#..           #.......
    ..####..           .#.#.#..           #..#..#.           #.......
    ...####.           ..#.#.#.           .#..#..#           #.......
    ....####           ...#.#.#           ..#..#..           #.......
    .....###           ....#.#.           #..#..#.           #.......
    ......##           .....#.#           .#..#..#           #.......
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from longattn._points import PointContext, PointFn, per_head_mask, point_clip, point_int  # noqa: F401 (re-exported)
from longattn._random_draws import _draw_blocks, _in_table

Predicate = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``pred(i, j, h) -> bool``: i, j, h are broadcastable int64 tensors."""

INF = 1 << 40  # an "unbounded" window


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------------------
# Engine components
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """How a Band regroups positions.

    kind "all": one group, the sequence. "residue": group g holds g, g+d, g+2d, ...
    (dilated/strided). "chunk": group g holds [g*d, (g+1)*d) (block-diagonal).
    """

    kind: str = "all"
    d: int = 1

    def groups(self, n: int) -> list[Tensor]:
        """The positions of each group, in order (u = index in the group)."""
        if self.kind == "all":
            return [torch.arange(n)]
        if self.kind == "residue":
            return [torch.arange(g, n, self.d) for g in range(min(self.d, n))]
        if self.kind == "chunk":
            return [torch.arange(s, min(s + self.d, n)) for s in range(0, n, self.d)]
        raise ValueError(f"unknown grouping {self.kind!r}")

    def same_group(self, i: Tensor, j: Tensor) -> Tensor:
        if self.kind == "all":
            return torch.ones((), dtype=torch.bool)
        if self.kind == "residue":
            return (j - i) % self.d == 0
        return i // self.d == j // self.d

    def offset(self, i: Tensor, j: Tensor) -> Tensor:
        """u_j - u_i for positions in the same group."""
        if self.kind == "residue":
            return (j - i) // self.d
        return j - i


@dataclass(frozen=True)
class Band:
    """Keys with ``-before <= u_j - u_i <= after`` in the query's group."""

    before: int
    after: int
    grouping: Grouping = field(default_factory=Grouping)

    def pred(self, i: Tensor, j: Tensor, h: Tensor) -> Tensor:
        off = self.grouping.offset(i, j)
        return self.grouping.same_group(i, j) & (off >= -self.before) & (off <= self.after)


@dataclass(frozen=True)
class Gather:
    """Query blocks, each with its list of key positions.

    qpos: [T, bq] query positions (-1 = none); kpos: [Hk, T, K] key positions
    (-1 = none), Hk = 1 (all heads) or H. ``more``: further (qpos, kpos) pairs of
    other shapes, for other queries. A query appears in at most one block.
    ``pred`` is exactly what the component covers: the engine evaluates it once per
    plan to find the tiles that need no mask, and to count overlapping keys once.
    ``leading``: its queries see every key (global rows); the engine plans it before
    the other components, so it needs no mask and theirs skip its queries.
    """

    qpos: Tensor
    kpos: Tensor
    pred: Predicate
    more: tuple[tuple[Tensor, Tensor], ...] = ()
    leading: bool = False
    #: bool [bq, K]: what every tile sees when none of its keys is cut off (the engine
    #: then runs such tiles with this one mask instead of a mask per tile)
    shared: Tensor | None = None

    def blocks(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.qpos, self.kpos), *self.more]


Component = Band | Gather


# --------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------


class Pattern:
    """A set of visible (query, key) pairs; see the module docstring."""

    #: True when visibility depends on the head (random blocks, per-head lists)
    head_dependent: bool = False

    def visible(self, i: Tensor, j: Tensor, h: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def components(self, n: int, heads: int, rows: tuple[int, int] | None = None) -> list[Component]:  # pragma: no cover
        """The engine components at length ``n``. ``rows`` = (q0, q1): only queries in
        [q0, q1) will be computed (a decode step, a shard); a pattern may use it to
        skip the rest, and the engine drops whatever it does not skip."""
        raise NotImplementedError

    def prepare(self, n: int, heads: int, causal: bool = False) -> None:
        """Bind length-dependent state (random tables, head counts) before ``visible``.
        ``causal``: the pattern will be intersected with j <= i (random blocks are then
        drawn among earlier blocks only)."""
        for child in self.children():
            child.prepare(n, heads, causal)

    def children(self) -> list["Pattern"]:
        return []

    def length_quantum(self, causal: bool = False) -> int:
        """1 when the visibility among positions [0, L) does not depend on the length
        n >= L the pattern is laid over (then a packed document may be padded freely);
        else q: only lengths rounded up to a multiple of q give the same layout."""
        out = 1
        for child in self.children():
            out = math.lcm(out, child.length_quantum(causal))
        return out

    def heads_split(self, heads: int) -> list[tuple[int, int, "Pattern"]] | None:
        """For per-head lists: [(first head, number of heads, pattern)], else None."""
        return None

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        """The predicate point by point, for FlexAttention's mask_mod: a
        :data:`PointFn` and its structural kind (the compile-cache key: instances of
        one kind share a compiled kernel, their integers held in 0-d tensors, see
        :func:`point_int`). A pattern overrides it to run on Flex; this default
        splits per-head lists (:meth:`heads_split`) and else calls :meth:`visible`
        itself (a kind per instance; it must be pointwise for Flex to lower it)."""
        split = self.heads_split(ctx.heads)
        if split is not None:
            return per_head_mask(split, ctx)
        return (lambda i, j, h, b, gi: self.visible(i, j, h)), f"custom:{type(self).__qualname__}:{id(self)}"

    def mask(self, n: int, heads: int = 1, causal: bool = False) -> Tensor:
        """The dense bool mask [heads, n, n] (True = visible), for tests and pictures."""
        _check_int("n", n, 1)
        self.prepare(n, heads, causal)
        i = torch.arange(n)[None, :, None]
        j = torch.arange(n)[None, None, :]
        h = torch.arange(heads)[:, None, None]
        m = self.visible(i, j, h).expand(heads, n, n)
        if causal:
            m = m & (j <= i)
        return m.clone()

    def visible_count(self, n: int, heads: int = 1, causal: bool = False, chunk: int | None = None) -> int:
        """Visible (i, j) pairs summed over heads, without an n x n tensor (chunked rows)."""
        total = 0
        chunk = chunk or max(1, (1 << 21) // (n * heads))
        self.prepare(n, heads, causal)
        j = torch.arange(n)[None, None, :]
        h = torch.arange(heads)[:, None, None]
        for s in range(0, n, chunk):
            i = torch.arange(s, min(s + chunk, n))[None, :, None]
            m = self.visible(i, j, h)
            if causal:
                m = m & (j <= i)
            total += int(m.expand(heads, i.shape[1], n).sum())
        return total

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union([self, other])

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection([self, other])

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "head_dependent"
        )
        return f"{type(self).__name__}({fields})"


class Full(Pattern):
    """Every key: ``True``."""

    def visible(self, i, j, h):
        return torch.ones((), dtype=torch.bool)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        return (lambda i, j, h, b, gi: j >= 0), "full"

    def components(self, n, heads, rows=None):
        return [Band(INF, INF)]


class Causal(Pattern):
    """``j <= i``."""

    def visible(self, i, j, h):
        return j <= i

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        return (lambda i, j, h, b, gi: j <= i), "causal"

    def components(self, n, heads, rows=None):
        return [Band(INF, 0)]


class Local(Pattern):
    """Sliding window ``i - before <= j <= i + after`` (truncated attention)."""

    def __init__(self, before: int = 64, after: int = 64) -> None:
        self.before = _check_int("before", before, 0)
        self.after = _check_int("after", after, 0)

    def visible(self, i, j, h):
        return (j >= i - self.before) & (j <= i + self.after)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        a, e = point_int(self.before), point_int(self.after)
        return (lambda i, j, h, b, gi: (j >= i - a) & (j <= i + e)), "local"

    def components(self, n, heads, rows=None):
        return [Band(self.before, self.after)]


class Dilated(Pattern):
    """Longformer's dilated window: ``(j - i) % d == 0 and |j - i| <= radius * d``."""

    def __init__(self, radius: int = 8, dilation: int = 2) -> None:
        self.radius = _check_int("radius", radius, 0)
        self.dilation = _check_int("dilation", dilation, 1)

    def visible(self, i, j, h):
        return ((j - i) % self.dilation == 0) & ((j - i).abs() <= self.radius * self.dilation)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        r, d = point_int(self.radius * self.dilation), point_int(self.dilation)
        return (lambda i, j, h, b, gi: ((j - i) % d == 0) & ((j - i).abs() <= r)), "dilated"

    def components(self, n, heads, rows=None):
        return [Band(self.radius, self.radius, Grouping("residue", self.dilation))]


class Strided(Pattern):
    """Every s-th position, unbounded: ``(j - i) % s == 0``."""

    def __init__(self, stride: int = 64) -> None:
        self.stride = _check_int("stride", stride, 1)

    def visible(self, i, j, h):
        return (j - i) % self.stride == 0

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        d = point_int(self.stride)
        return (lambda i, j, h, b, gi: (j - i) % d == 0), "strided"

    def components(self, n, heads, rows=None):
        return [Band(INF, INF, Grouping("residue", self.stride))]


class BlockDiagonal(Pattern):
    """Within the same block of ``block`` positions: ``j // block == i // block``."""

    def __init__(self, block: int = 64) -> None:
        self.block = _check_int("block", block, 1)

    def visible(self, i, j, h):
        return i // self.block == j // self.block

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        d = point_int(self.block)
        return (lambda i, j, h, b, gi: (i // d) == (j // d)), "block_diagonal"

    def components(self, n, heads, rows=None):
        return [Band(INF, INF, Grouping("chunk", self.block))]


def _as_index(idx: Sequence[int] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(idx, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} must name at least one position")
    if (t < 0).any():
        raise ValueError(f"{name} must be non-negative positions, got {t.tolist()[:8]}")
    return torch.unique(t)


def _member(x: Tensor, idx: Tensor) -> Tensor:
    return torch.isin(x, idx.to(x.device))


def _blocks(pos: Tensor, bq: int) -> Tensor:
    """Cut a 1-D position list into [T, bq] rows, padding with -1."""
    n = pos.numel()
    t = -(-n // bq)
    out = torch.full((t * bq,), -1, dtype=torch.long)
    out[:n] = pos
    return out.view(t, bq)


QUERY_BLOCK = 128


class GlobalTokens(Pattern):
    """Global positions: ``i in idx or j in idx``. Positions >= N are ignored: that
    token is not there (a shorter input, a decode step before it, a packed document
    shorter than the index), exactly as the predicate, which never meets them."""

    def __init__(self, indices: Sequence[int] | Tensor = (0,)) -> None:
        self.indices = _as_index(indices, "indices")

    def visible(self, i, j, h):
        return _member(i, self.indices) | _member(j, self.indices)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        """A [n] bool table looked up at i and j (``isin`` does not lower)."""
        tab = torch.zeros(ctx.n, dtype=torch.bool)
        tab[self.indices[self.indices < ctx.n]] = True
        top = point_int(ctx.n - 1)
        return (lambda i, j, h, b, gi: tab[point_clip(i, top)] | tab[point_clip(j, top)]), "global"

    def components(self, n, heads, rows=None):
        idx = self.indices[self.indices < n]
        if idx.numel() == 0:
            return []
        q0, q1 = rows or (0, n)
        cols = idx
        rows_pred = lambda i, j, h: _member(i, idx)  # noqa: E731
        cols_pred = lambda i, j, h: _member(j, idx)  # noqa: E731
        start = q0 // QUERY_BLOCK * QUERY_BLOCK
        qpos = _blocks(torch.arange(start, q1), QUERY_BLOCK)
        comps: list[Component] = [
            Gather(qpos, cols.expand(1, qpos.shape[0], -1).clone(), cols_pred),
        ]
        # rows in blocks of at most 32 (bounded masks when keys are padded), as even as
        # they go (16 global rows: one block of 16, not 32 with 16 empty), every key listed
        mine = idx[(idx >= q0) & (idx < q1)]
        m = mine.numel()
        if m:
            blocks = -(-m // 32)
            comps.append(Gather(_blocks(mine, -(-m // blocks)), torch.arange(n)[None, None, :], rows_pred,
                                leading=True))
        return comps


class RandomBlocks(Pattern):
    """BigBird random attention: key block ``j // block`` is one of ``blocks_per_row``
    blocks drawn (without replacement) for query block ``i // block``, per head.

    The draw for query block t of head h is a pure function of (seed, h, t) and of
    the blocks it may choose from, so it is reproducible and the same in training and
    evaluation. As in BigBird, the draw avoids the key blocks that other parts of a
    composition already cover: those within ``avoid_window`` blocks of the query
    block and the first ``avoid_first`` (global) blocks. Rows have
    ``min(blocks_per_row, blocks left)`` random blocks.

    Causal (``prepare(n, heads, causal=True)``): block t draws among the blocks
    before it only, so the draw does not depend on n: the pattern over a prefix is
    the prefix of the pattern (cached decoding equals recomputation). Non-causal:
    block t draws among all ``ceil(n / block)`` blocks, so the draws depend on n.
    """

    head_dependent = True

    def __init__(
        self, blocks_per_row: int = 3, block: int = 64, seed: int = 0,
        avoid_window: int = -1, avoid_first: int = 0,
    ) -> None:
        self.blocks_per_row = _check_int("blocks_per_row", blocks_per_row, 0)
        self.block = _check_int("block", block, 1)
        self.seed = _check_int("seed", seed, 0)
        self.avoid_window = _check_int("avoid_window", avoid_window, -1)
        self.avoid_first = _check_int("avoid_first", avoid_first, 0)
        self._cache: dict[tuple[int, int, bool, int, int], Tensor] = {}
        self._causal = False

    def table(self, n: int, heads: int, causal: bool | None = None, rows: tuple[int, int] | None = None) -> Tensor:
        """[heads, blocks, r] drawn key blocks (-1 = none) for query blocks
        ``rows`` (a block range, default all). O(blocks * r^2), no blocks^2 table."""
        causal = self._causal if causal is None else causal
        nb = -(-n // self.block)
        t0, t1 = rows or (0, nb)
        key = (n, heads, causal, t0, t1)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = _draw_blocks(
                self.seed, heads, torch.arange(t0, t1), nb, self.blocks_per_row,
                self.avoid_window, self.avoid_first, causal,
            )
        return self._cache[key]

    def prepare(self, n: int, heads: int, causal: bool = False) -> None:
        self._causal = causal
        self._active = self.table(n, heads, causal)

    def length_quantum(self, causal: bool = False) -> int:
        return 1 if causal else self.block

    def visible(self, i, j, h):
        tab = getattr(self, "_active", None)
        if tab is None:
            raise RuntimeError("RandomBlocks.prepare(n, heads) must be called before visible()")
        return _in_table(tab, self.block, i, j, h)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        """Drawn-block membership unrolled over the r draws (``any`` does not lower);
        with packed documents one table per distinct document length, stacked (each
        position's row base looked up by its document)."""
        tabs = [self.table(L, ctx.heads, ctx.causal) for L in ctx.lengths]
        r, kind = tabs[0].shape[-1], f"random{self.blocks_per_row}"
        if r == 0:
            return (lambda i, j, h, b, gi: j < 0), kind
        base = torch.tensor([0] + [t.shape[1] for t in tabs[:-1]], dtype=torch.long).cumsum(0)
        tab = torch.cat(tabs, 1).contiguous()
        blk, lidx = point_int(self.block), ctx.lidx if len(ctx.lengths) > 1 else None
        hmax, rmax = point_int(max(tab.shape[0] - 1, 0)), point_int(max(tab.shape[1] - 1, 0))

        def member(i, j, h, b, gi):
            row = i // blk if lidx is None else i // blk + base[lidx[b, gi]]
            row, hh, kb = point_clip(row, rmax), point_clip(h, hmax), j // blk
            out = tab[hh, row, 0] == kb
            for s in range(1, r):
                out = out | (tab[hh, row, s] == kb)
            return out

        return member, kind

    def components(self, n, heads, rows=None):
        b = self.block
        nb = -(-n // b)
        t0, t1 = (0, nb) if rows is None else (rows[0] // b, -(-rows[1] // b))
        tab = self.table(n, heads, rows=(t0, t1))  # [H, T, r]
        if tab.shape[-1] == 0:
            return []
        T, r = tab.shape[1], tab.shape[2]
        qpos = _blocks(torch.arange(t0 * b, min(n, t1 * b)), b)  # [T, b]
        kpos = (tab[..., None] * b + torch.arange(b)).reshape(heads, T, r * b)
        kpos = torch.where((tab[..., None] >= 0).expand(-1, -1, -1, b).reshape(heads, T, r * b) & (kpos < n),
                           kpos, torch.full_like(kpos, -1))
        full_tab = self._active if getattr(self, "_active", None) is not None else self.table(n, heads)
        pred = lambda i, j, h: _in_table(full_tab, b, i, j, h)  # noqa: E731
        return [Gather(qpos, kpos, pred)]


class _TwoKindHeads(Pattern):
    """Sparse Transformer patterns: two causal kinds A and B, either in separate head
    halves (``mode="heads"``, the paper's interleaved form) or united in every head."""

    def _combine(self, a: Pattern, b: Pattern, mode: str) -> None:
        if mode not in ("heads", "union"):
            raise ValueError(f"mode must be 'heads' or 'union', got {mode!r}")
        self.mode = mode
        self._inner: Pattern = PerHead([a, b]) if mode == "heads" else Union([a, b])
        self.head_dependent = mode == "heads"

    def children(self):
        return [self._inner]

    def visible(self, i, j, h):
        return self._inner.visible(i, j, h) & (j <= i)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        f, kind = self._inner.mask_mod(ctx)
        return (lambda i, j, h, b, gi: f(i, j, h, b, gi) & (j <= i)), f"causal({kind})"

    def components(self, n, heads, rows=None):
        return self._inner.components(n, heads, rows)

    def heads_split(self, heads):
        return self._inner.heads_split(heads)


class SparseTransformerStrided(_TwoKindHeads):
    """Child et al. 2019, strided: head kind A ``0 <= i - j < l``; kind B
    ``(i - j) % l == 0``; both causal. ``mode="heads"``: the first half of the heads
    are kind A, the rest kind B; ``mode="union"``: A or B in every head."""

    def __init__(self, l: int = 64, mode: str = "heads") -> None:  # noqa: E741
        self.l = _check_int("l", l, 1)
        self._combine(Local(self.l - 1, 0), Intersection([Strided(self.l), Causal()]), mode)


class SparseTransformerFixed(_TwoKindHeads):
    """Child et al. 2019, fixed: kind A ``j // l == i // l``; kind B
    ``j % l >= l - c`` (the last c positions of every block are summaries); causal.
    ``mode`` as in :class:`SparseTransformerStrided`."""

    def __init__(self, l: int = 64, c: int = 8, mode: str = "heads") -> None:  # noqa: E741
        self.l = _check_int("l", l, 1)
        self.c = _check_int("c", c, 1)
        if self.c > self.l:
            raise ValueError(f"c must be <= l, got c={c}, l={l}")
        self._combine(Intersection([BlockDiagonal(self.l), Causal()]), _SummaryColumns(self.l, self.c), mode)


class _SummaryColumns(Pattern):
    """``j % l >= l - c`` and ``j <= i``: causal summary columns of the fixed pattern.

    Query block t sees only summary keys up to its end, so keys are listed as a
    prefix per query block (cost ~ N * visible, not N * all summaries)."""

    def __init__(self, l: int, c: int) -> None:  # noqa: E741
        self.l, self.c = l, c

    def visible(self, i, j, h):
        return (j % self.l >= self.l - self.c) & (j <= i)

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        ll, cc = point_int(self.l), point_int(self.l - self.c)
        return (lambda i, j, h, b, gi: (j % ll >= cc) & (j <= i)), "summary_columns"

    def components(self, n, heads, rows=None):
        keys = torch.arange(n)
        keys = keys[keys % self.l >= self.l - self.c]
        return prefix_gather(keys, n, self.visible, rows=rows)


def prefix_gather(keys: Tensor, n: int, pred: Predicate, bq: int = QUERY_BLOCK, group: int = 16,
                  rows: tuple[int, int] | None = None) -> list[Component]:
    """Gather components for "query i sees the sorted ``keys`` that are <= i".

    Query blocks are taken ``group`` at a time (a span of ``bq * group`` queries).
    Keys before the span are seen by every query of it (unmasked tiles); keys inside
    the span form a short masked tail. Work ~ N * visible, not N * len(keys)."""
    span = bq * group

    def start(i: Tensor) -> Tensor:
        return (i // span) * span

    def prefix_pred(i, j, h):
        return pred(i, j, h) & (j < start(i))

    def tail_pred(i, j, h):
        return pred(i, j, h) & (j >= start(i))

    heads: list[tuple[Tensor, Tensor]] = []
    tails: list[tuple[Tensor, Tensor]] = []
    qpos_all = _blocks(torch.arange(n), bq)
    q0, q1 = rows or (0, n)
    for t0 in range(q0 // span * group, min(qpos_all.shape[0], -(-q1 // bq)), group):
        qpos = qpos_all[t0 : t0 + group]
        s0, s1 = t0 * bq, int(qpos.max())
        before = keys[keys < s0]
        inside = keys[(keys >= s0) & (keys <= s1)]
        if before.numel():
            heads.append((qpos, before.expand(1, qpos.shape[0], -1).clone()))
        if inside.numel():
            tails.append((qpos, inside.expand(1, qpos.shape[0], -1).clone()))
    comps: list[Component] = []
    if heads:
        comps.append(Gather(*heads[0], prefix_pred, more=tuple(heads[1:])))
    if tails:
        comps.append(Gather(*tails[0], tail_pred, more=tuple(tails[1:])))
    return comps


class _Combination(Pattern):
    """Union and Intersection: checked operands (no per-head lists), folded with
    ``_op`` point by point."""

    _op: Callable[[Tensor, Tensor], Tensor]
    _kind: str

    def __init__(self, parts: Sequence[Pattern]) -> None:
        parts = list(parts)
        name = type(self).__name__
        if not parts:
            raise ValueError(f"{name} needs at least one pattern")
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"{name} operands must be Patterns, got {type(p).__name__}")
            if p.heads_split(1) is not None:
                raise ValueError(f"a per-head pattern list cannot be an operand of a {name.lower()}")
        self.parts = parts
        self.head_dependent = any(p.head_dependent for p in parts)

    def children(self):
        return self.parts

    def visible(self, i, j, h):
        out = self.parts[0].visible(i, j, h)
        for p in self.parts[1:]:
            out = type(self)._op(out, p.visible(i, j, h))
        return out

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        subs = [p.mask_mod(ctx) for p in self.parts]
        fns, op = [f for f, _ in subs], type(self)._op

        def combine(i, j, h, b, gi):
            out = fns[0](i, j, h, b, gi)
            for f in fns[1:]:
                out = op(out, f(i, j, h, b, gi))
            return out

        return combine, f"{self._kind}(" + ",".join(nm for _, nm in subs) + ")"


class Union(_Combination):
    """Visible in any operand. Overlaps are counted once by the engine."""

    _op, _kind = staticmethod(operator.or_), "or"

    def components(self, n, heads, rows=None):
        return [c for p in self.parts for c in p.components(n, heads, rows)]


class Intersection(_Combination):
    """Visible in every operand: the first operand's components, masked by the rest."""

    _op, _kind = staticmethod(operator.and_), "and"

    def components(self, n, heads, rows=None):
        first, rest = self.parts[0], self.parts[1:]
        causal_only = all(isinstance(p, Causal) for p in rest)
        out: list[Component] = []
        for c in first.components(n, heads, rows):
            if causal_only and isinstance(c, Band):
                # a band cut to j <= i is the band with after = 0: still unmasked tiles
                out.append(Band(c.before, min(c.after, 0), c.grouping))
            else:
                out.append(_Restricted(c, lambda i, j, h, r=rest: _all(r, i, j, h)))
        return out


def _all(patterns: Sequence[Pattern], i: Tensor, j: Tensor, h: Tensor) -> Tensor:
    out = patterns[0].visible(i, j, h)
    for p in patterns[1:]:
        out = out & p.visible(i, j, h)
    return out


@dataclass(frozen=True)
class _Restricted:
    """A component whose coverage is cut by an extra predicate (always masked)."""

    inner: Component
    extra: Predicate

    def pred(self, i, j, h):
        return self.inner.pred(i, j, h) & self.extra(i, j, h)


class PerHead(Pattern):
    """One pattern per head group: heads split evenly, group g uses ``patterns[g]``.

    The lecture form of Longformer (one head local, one strided, one global) and
    BigBird (random, local, strided, global heads). ``heads`` must be a multiple of
    ``len(patterns)``.
    """

    head_dependent = True

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        patterns = list(patterns)
        if not patterns:
            raise ValueError("PerHead needs at least one pattern")
        for p in patterns:
            if not isinstance(p, Pattern):
                raise TypeError(f"PerHead entries must be Patterns, got {type(p).__name__}")
        self.patterns = patterns
        self._heads = len(patterns)

    def children(self):
        return self.patterns

    def prepare(self, n: int, heads: int, causal: bool = False) -> None:
        self._heads = heads
        for _, per, p in self.heads_split(heads):
            p.prepare(n, per, causal)

    def heads_split(self, heads: int) -> list[tuple[int, int, Pattern]]:
        g = len(self.patterns)
        if heads % g:
            raise ValueError(
                f"a per-head list of {g} patterns needs heads divisible by {g}, got heads={heads}"
            )
        per = heads // g
        return [(k * per, per, p) for k, p in enumerate(self.patterns)]

    def visible(self, i, j, h):
        g = len(self.patterns)
        per = max(self._heads // g, 1)
        out = None
        for k, p in enumerate(self.patterns):
            sel = (h // per).clamp(max=g - 1) == k
            local_h = h - k * per
            v = p.visible(i, j, local_h.clamp(min=0)) & sel
            out = v if out is None else out | v
        return out

    def components(self, n, heads, rows=None):
        raise RuntimeError("PerHead patterns are split by heads_split() before planning")


def longformer(window: int = 256, global_indices: Sequence[int] = (0,), dilation: int = 1) -> Pattern:
    """Beltagy et al. 2020: a sliding window (optionally dilated) plus global tokens.

    ``window`` is the one-sided width: i - window <= j <= i + window."""
    w = _check_int("window", window, 0)
    _check_int("dilation", dilation, 1)
    base: Pattern = Local(w, w) if dilation == 1 else Dilated(max(w // dilation, 0), dilation)
    return Union([base, GlobalTokens(global_indices)])


def bigbird(block: int = 64, random_blocks: int = 3, global_blocks: int = 1, seed: int = 0) -> Pattern:
    """Zaheer et al. 2020: random blocks + a window of 3 blocks + global blocks.

    Window: query block t sees key blocks t-1, t, t+1 (``j//b - i//b`` in [-1, 1]);
    global: the first ``global_blocks`` blocks are global rows and columns."""
    b = _check_int("block", block, 1)
    g = _check_int("global_blocks", global_blocks, 0)
    parts: list[Pattern] = [_BlockWindow(b, 1)]
    if random_blocks:  # drawn outside the window and the global blocks, as in the paper
        parts.append(RandomBlocks(random_blocks, b, seed, avoid_window=1, avoid_first=g))
    if g:
        parts.append(GlobalTokens(range(g * b)))
    return Union(parts)


class Neighborhood2D(Pattern):
    """2-D neighbourhood on a row-major ``height x width`` grid (position i = r * W + c):
    ``|r_i - r_j| <= radius_h and |c_i - c_j| <= radius_w`` (Parmar et al. 2018, Image
    Transformer "local 2D"; neighbourhood attention). With causal: raster order j <= i.

    Engine components: query tiles of ``th x tw`` pixels, each over its (th + 2 rh) x
    (tw + 2 rw) key block; every interior tile sees the same shared mask, only tiles at
    the image border keep their own. ``tile``: (th, tw), default 8 x 8 (about half of a
    7 x 7 radius block's keys are visible to each query)::

        height 4, width 5, radius 1 x 1, query (1, 2) = position 7:
        . # # # .
        . # @ # .
        . # # # .
        . . . . .
    """

    def __init__(self, height: int, width: int, radius_h: int = 1, radius_w: int = 1,
                 tile: tuple[int, int] | None = None) -> None:
        self.height = _check_int("height", height, 1)
        self.width = _check_int("width", width, 1)
        self.radius_h = _check_int("radius_h", radius_h, 0)
        self.radius_w = _check_int("radius_w", radius_w, 0)
        th, tw = tile or (8, 8)
        self.tile = (min(_check_int("tile[0]", th, 1), self.height), min(_check_int("tile[1]", tw, 1), self.width))

    def visible(self, i, j, h):
        W = self.width
        n = self.height * W
        return (((i // W) - (j // W)).abs() <= self.radius_h) & (((i % W) - (j % W)).abs() <= self.radius_w) \
            & (i < n) & (j < n)

    def components(self, n, heads, rows=None):
        H, W, rh, rw = self.height, self.width, self.radius_h, self.radius_w
        if n != H * W:
            raise ValueError(f"height * width ({H} * {W} = {H * W}) must equal the sequence length {n}")
        th, tw = self.tile
        R0 = torch.arange(0, H, th)
        C0 = torch.arange(0, W, tw)
        r0, c0 = (x.reshape(-1) for x in torch.meshgrid(R0, C0, indexing="ij"))  # [T] tile corners

        def grid(rs: Tensor, cs: Tensor, h: int, w: int) -> Tensor:
            r = rs[:, None, None] + torch.arange(h)[None, :, None]
            c = cs[:, None, None] + torch.arange(w)[None, None, :]
            ok = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            return torch.where(ok, r * W + c, torch.full_like(r, -1)).reshape(len(rs), h * w)

        qpos = grid(r0, c0, th, tw)
        if rows is not None:
            keep = ((qpos >= rows[0]) & (qpos < rows[1])).any(1)
            r0, c0, qpos = r0[keep], c0[keep], qpos[keep]
        kh, kw = th + 2 * rh, tw + 2 * rw
        kpos = grid(r0 - rh, c0 - rw, kh, kw)[None]
        a = torch.arange(th)[:, None, None, None]
        b = torch.arange(tw)[None, :, None, None]
        ka = torch.arange(kh)[None, None, :, None]
        kb = torch.arange(kw)[None, None, None, :]
        shared = (((ka - rh - a).abs() <= rh) & ((kb - rw - b).abs() <= rw)).reshape(th * tw, kh * kw)
        return [Gather(qpos, kpos, self.visible, shared=shared)]


class _BlockWindow(Pattern):
    """Key blocks within ``radius`` blocks of the query block: |j//b - i//b| <= radius."""

    def __init__(self, block: int, radius: int) -> None:
        self.block, self.radius = block, radius

    def visible(self, i, j, h):
        return ((j // self.block) - (i // self.block)).abs() <= self.radius

    def mask_mod(self, ctx: PointContext) -> tuple[PointFn, str]:
        blk, r = point_int(self.block), point_int(self.radius)
        return (lambda i, j, h, b, gi: ((j // blk) - (i // blk)).abs() <= r), "block_window"

    def components(self, n, heads, rows=None):
        b, r = self.block, self.radius
        q0, q1 = rows or (0, n)
        t = torch.arange(q0 // b, -(-q1 // b))
        qpos = _blocks(torch.arange(t[0] * b, min(n, int(t[-1] + 1) * b)), b)
        kb = t[:, None] + torch.arange(-r, r + 1)  # [T, 2r+1] key blocks
        kpos = (kb[..., None] * b + torch.arange(b)).reshape(1, len(t), -1)
        kpos = torch.where((kpos >= 0) & (kpos < n), kpos, torch.full_like(kpos, -1))
        return [Gather(qpos, kpos, self.visible)]


# --------------------------------------------------------------------------------------
# Names -> patterns (used by the registry and `longattn show`)
# --------------------------------------------------------------------------------------

PATTERNS: dict[str, Callable[..., Pattern]] = {
    "full": Full,
    "causal": Causal,
    "local": Local,
    "dilated": Dilated,
    "strided": Strided,
    "block_diagonal": BlockDiagonal,
    "global": lambda indices=(0,): GlobalTokens(indices),
    "random": RandomBlocks,
    "sparse_transformer_strided": SparseTransformerStrided,
    "sparse_transformer_fixed": SparseTransformerFixed,
    "longformer": longformer,
    "bigbird": bigbird,
}


def make(name: str, **params) -> Pattern:
    """Build a named pattern: ``make("local", before=2, after=2)``."""
    try:
        ctor = PATTERNS[name]
    except KeyError:
        raise ValueError(f"unknown pattern {name!r}; known: {sorted(PATTERNS)}") from None
    try:
        return ctor(**params)
    except TypeError as e:
        raise TypeError(f"pattern {name!r}: {e}") from None
