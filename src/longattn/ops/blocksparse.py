"""Exact attention over any pattern of :mod:`longattn.patterns`, without an N x N tensor.

How it works
------------
A pattern's components are cut into *tile batches*: T tiles, each a block of bq
queries and a list of K keys (by position). Each slice of a tile batch is one call of
PyTorch's CPU flash-attention kernel, which returns the tiles' outputs and their
log-sum-exp (lse). Tiles are of four kinds:

- ``full``: every listed key is visible (no mask: the fast kernel path);
- ``causal``: key y visible from query x iff y <= x inside the tile (the kernel's
  own causal path);
- ``shared``: one bool [bq, K] mask, the same for every tile (band interiors);
- ``mask``: anything else (edges of the sequence, random blocks, global columns,
  key padding), with a mask computed from the pattern's predicate once per plan.

Rows are read without copies wherever the positions allow it. When tile t, row w
of a batch is position ``start + t * step + w * stride`` (a :class:`View`), the
kernel reads the sequence itself through a strided view. That covers a sliding
window (step = bq, stride 1), the same band inside residue classes mod r (dilated:
stride r), whole groups as tiles (strided: step 1, stride r; block-diagonal: step =
block), BigBird's block window and global rows. Other key lists (random blocks,
global columns) are gathered, a bounded slice at a time::

    local(2, 2), bq = 4:      tile 0 (edge)     tile 1 (view)      tile 2 (view)
    queries 4..7 see keys     keys 0..5         keys 2..9          keys 6..13
    2..9: K = bq + 4 = 8      (masked)          shared band mask   same mask

The band tile bq is 32 rows, the CPU kernel's own query block for short sequences,
so a window of w keys costs about w + 32 keys per query.

All tiles of all components of one head form one softmax: outputs are merged with
their lse (out = sum_t exp(lse_t - L) out_t, L = logsumexp_t lse_t), and a key that
two components both list is counted once (the later component masks it out).
The backward pass calls the kernel's backward per tile with the *merged* output
and L, which gives the exact gradient of the single softmax.

Cost: time ~ the visible entries (plus <= one tile of slack per query block);
memory O(N * D) for inputs, outputs and lse, plus a bounded per-slice workspace
(``WORKSPACE`` elements, small enough to be reused by the allocator rather than
mapped afresh).

On devices other than the CPU the same tiles run through :func:`_math_fwd` and
:func:`_math_bwd` (plain matmuls over one bounded slice at a time): still exact and
sub-quadratic, just without the fused kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale
from longattn.ops._chunked import _exp_
from longattn.patterns import (
    Band,
    Gather,
    Pattern,
    Predicate,
    _Restricted,
)

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: elements allocated per kernel call (outputs, gathered rows, masks, gradients).
#: 4M float32 = 16 MiB: below glibc's mmap threshold, so slices reuse heap memory
#: instead of paying page faults on a fresh mapping every call.
WORKSPACE = 1 << 22
MIN_BAND_TILE = 16
#: query rows per band tile: the CPU flash kernel's query block for sequences < 192.
#: The backward, which writes a key gradient per tile (K/bq times the keys' size),
#: runs its own plan with wider tiles: any tiling that covers each visible pair
#: once gives the exact gradient, given the merged output and lse.
BAND_QUERY_TILE = 32
BAND_QUERY_TILE_BWD = 128
#: causal groups up to this long are cut into query blocks over their prefixes (the
#: kernel skips nothing below its 512-key block)
SHORT_CAUSAL = 512
#: a band wider than this (a + b + 1 keys), or a whole group longer than WIDE_GROUP
#: that cannot run as one kernel call, runs as row tiles of WIDE_TILE queries over one
#: unmasked key range plus two triangles: no per-tile mask wider than WIDE_TILE
WIDE_BAND = 2048
WIDE_GROUP = 256
#: 768 rows: the CPU flash kernel's own 256-row query blocks (64-row tiles run at half
#: its speed); 128 when tiles carry masks (padding, other components): a mask is
#: tile x keys per head
WIDE_TILE = 768
WIDE_TILE_MASKED = 128
#: run the plain-matmul tile kernel on the CPU too (tests of the non-CPU path)
FORCE_MATH = False
#: tests only: fill output buffers that the plan claims to write in full with this
#: value instead of leaving them uninitialised (a wrong claim then shows as NaN)
UNINIT_FILL: float | None = None


@dataclass(frozen=True)
class View:
    """Tile t, row w is position ``start + t * step + w * stride``: a strided view."""

    start: int
    step: int
    stride: int

    def at(self, t0: int) -> "View":
        return replace(self, start=self.start + t0 * self.step)

    def strip_rows(self, T: int, K: int) -> int:
        """Widest strip of rows [s0, s0 + width) in which no position repeats over
        tiles: gradient windows are added strip by strip."""
        if T == 1 or self.step == 0:
            return K
        if self.step % self.stride == 0:
            return min(K, self.step // self.stride)
        if T * self.step <= self.stride:  # interleaved groups (residue classes)
            return K
        return 1


def _as_view(pos: Tensor) -> View | None:
    """The :class:`View` of positions ``pos`` [T, K], if they form one."""
    T, K = pos.shape
    p0 = int(pos[0, 0])
    stride = int(pos[0, 1]) - p0 if K > 1 else 1
    step = int(pos[1, 0]) - p0 if T > 1 else 0
    if p0 < 0 or stride <= 0 or step < 0:
        return None
    want = p0 + step * torch.arange(T)[:, None] + stride * torch.arange(K)
    return View(p0, step, stride) if torch.equal(pos, want) else None


@dataclass
class TileBatch:
    """T tiles of bq queries x K keys (positions, -1 = none).

    qpos: [T, bq]; kpos: [Hk, T, K] with Hk in {1, H}; kind: "full" | "causal" |
    "shared" | "mask"; pred: what the tiles may see (for masks and key padding).
    """

    qpos: Tensor
    kpos: Tensor
    kind: str
    pred: Predicate
    #: kind "shared": bool [bq, K] visibility of every tile
    shared: Tensor | None = None
    #: kind "mask": bool [1 or H, T, bq, K], what each tile sees (computed once, at planning)
    vis: Tensor | None = None
    #: strided views of the sequence for queries / keys, when the positions form one
    qview: View | None = None
    kview: View | None = None
    #: every tile lists the same keys (gathered once, broadcast)
    kshared: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.qpos.shape[0], self.qpos.shape[1], self.kpos.shape[2]

    def finish(self) -> "TileBatch":
        """Find the views and shared key lists (once, at planning)."""
        T = self.qpos.shape[0]
        self.qview = _as_view(self.qpos)
        if self.kpos.shape[0] == 1:
            self.kview = _as_view(self.kpos[0] if self.kpos.shape[1] == T else self.kpos[0].expand(T, -1))
        self.kshared = self.kpos.shape[1] == 1 or bool((self.kpos == self.kpos[:, :1]).all())
        return self


# ----------------------------------------------------------------------------------------
# Planning: components -> tile batches
# ----------------------------------------------------------------------------------------


def _pow2_floor(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)


def _band_batches(c: Band, n: int, causal: bool, pred: Predicate, masked: bool, tile: int,
                  rows: tuple[int, int], padded: bool) -> list[TileBatch]:
    """Tiles of a band within groups (see the module docstring), for the queries in
    ``rows`` = [q0, q1) (tiles holding none of them are not built)."""
    q0, q1 = rows
    groups = c.grouping.groups(n)
    by_len: dict[int, list[Tensor]] = {}
    for g in groups:
        by_len.setdefault(g.numel(), []).append(g)
    out: list[TileBatch] = []
    for L, gs in sorted(by_len.items()):
        P = torch.stack(gs)  # [G, L] positions of each group
        inside = ((P >= q0) & (P < q1)).any(1)
        if not bool(inside.any()):
            continue
        P = P[inside]
        # group-local query range: tiles before u0 or from u1 on hold no query of rows
        u0 = int(torch.searchsorted(P, torch.full((P.shape[0], 1), q0)).min())
        u1 = int(torch.searchsorted(P, torch.full((P.shape[0], 1), q1)).max())
        a = min(c.before, L - 1)
        b = 0 if causal else min(c.after, L - 1)
        plain = not masked and not padded
        out += _band_group_batches(P, L, a, b, pred, masked, tile, u0, u1, plain and u0 == 0 and u1 == L, plain)
    return out


def _map(P: Tensor, u: Tensor) -> Tensor:
    """Group-local indices u [G, T, K] -> positions (or -1 outside [0, L))."""
    L = P.shape[1]
    ok = (u >= 0) & (u < L)
    pos = torch.gather(P[:, None, :].expand(-1, u.shape[1], -1), 2, u.clamp(0, L - 1))
    return torch.where(ok, pos, torch.full_like(pos, -1))


def _flat(P: Tensor, qu: Tensor, ku: Tensor) -> tuple[Tensor, Tensor]:
    """Group-local tiles (qu [T, bq], ku [T, K]) replicated over the groups of P."""
    G = P.shape[0]
    q = _map(P, qu[None].expand(G, -1, -1)).reshape(G * qu.shape[0], -1)
    k = _map(P, ku[None].expand(G, -1, -1)).reshape(1, G * ku.shape[0], -1)
    return q, k


def _band_group_batches(P: Tensor, L: int, a: int, b: int, pred: Predicate, masked: bool,
                        tile: int, u0: int = 0, u1: int | None = None, whole_ok: bool = True,
                        plain: bool = True) -> list[TileBatch]:
    """Band ``-a <= u_j - u_i <= b`` inside each group (row of P, [G, L] positions),
    for group-local queries in [u0, u1). ``whole_ok``: a whole group may run as one
    kernel call (nothing masked or padded, every query wanted); ``plain``: nothing
    masked or padded."""
    u1 = L if u1 is None else u1
    whole = torch.arange(L)[None]
    whole_group = a >= L - 1 and (b >= L - 1 or b == 0)
    if not (whole_group and (whole_ok or L <= WIDE_GROUP)) and (
        a + b + 1 > WIDE_BAND or (L > WIDE_GROUP and a + b + 1 >= L)
    ):
        return _wide_band_batches(P, L, a, b, pred, masked, u0, u1, plain)
    if a >= L - 1 and b >= L - 1:  # whole groups as tiles
        return [TileBatch(*_flat(P, whole, whole), "mask" if masked else "full", pred)]
    if a >= L - 1 and b == 0:
        if masked or not 2 * tile <= L <= SHORT_CAUSAL:
            return [TileBatch(*_flat(P, whole, whole), "mask" if masked else "causal", pred)]
        # short causal groups: the kernel would compute the whole L x L square, so
        # cut queries into blocks of bq, each over its prefix of keys (one call per
        # block, all groups as tiles): ~L^2/2 + L*bq/2 pairs instead of L^2
        out = []
        for s0 in range(0, L, tile):
            s1 = min(s0 + tile, L)
            if s1 <= u0 or s0 >= u1:
                continue
            qu, ku = torch.arange(s0, s1)[None], torch.arange(s1)[None]
            if s0 == 0:
                out.append(TileBatch(*_flat(P, qu, ku), "causal", pred))
            else:
                shared = ku[0][None, :] <= qu[0][:, None]
                out.append(TileBatch(*_flat(P, qu, ku), "shared", pred, shared=shared))
        return out
    if a + b + 1 >= L or a + b < MIN_BAND_TILE or L < 2 * MIN_BAND_TILE:
        # short groups or tiny windows: masked tiles over the span
        bq = min(64, L) if a + b + 1 < L else L
        nq = -(-L // bq)
        s = torch.arange(nq) * bq
        s = s[(s + bq > u0) & (s < u1)]
        qu = s[:, None] + torch.arange(bq)
        qu = torch.where(qu < L, qu, -1)
        lo = (s - a).clamp(min=0) if a + b + 1 < L else torch.zeros_like(s)
        span = min(bq + a + b, L)
        lo = torch.minimum(lo, torch.full_like(lo, L - span))
        ku = lo[:, None] + torch.arange(span)
        return [TileBatch(*_flat(P, qu, ku), "mask", pred)]

    bq = max(MIN_BAND_TILE, min(tile, _pow2_floor(a + b)))
    if u1 - u0 < bq:  # a few queries (a decode step): one tile of just those rows
        bq = u1 - u0
    K = bq + a + b
    s = u0 + torch.arange(-(-(u1 - u0) // bq)) * bq
    ar = torch.arange(bq)
    interior = (s - a >= 0) & (s + bq + b <= L)
    out: list[TileBatch] = []
    si = s[interior]
    if si.numel():
        # one batch per group: its tiles are a strided view with one shared mask
        rel = torch.arange(K)[None, :] - a - ar[:, None]  # j - i
        shared = (rel >= -a) & (rel <= b)
        qu = si[:, None] + ar
        ku = (si - a)[:, None] + torch.arange(K)
        for g in range(P.shape[0]):
            qpos, kpos = _flat(P[g : g + 1], qu, ku)
            out.append(TileBatch(qpos, kpos, "mask" if masked else "shared", pred, shared=shared))
    sb = s[~interior]
    if sb.numel():
        qu = sb[:, None] + ar
        qu = torch.where(qu < L, qu, -1)
        ku = (sb - a)[:, None] + torch.arange(K)
        out.append(TileBatch(*_flat(P, qu, ku), "mask", pred))
    return out


def _wide_band_batches(P: Tensor, L: int, a: int, b: int, pred: Predicate, masked: bool, u0: int,
                       u1: int, unmasked: bool = True) -> list[TileBatch]:
    """A wide band (or a whole group that cannot be one kernel call) as row tiles of
    bq = WIDE_TILE queries [s, s + bq), each over three key ranges::

        left  [s - a, s + bq - 1 - a)   visible iff c >= w   (shared mask, bq x bq-1)
        full  [s + bq - 1 - a, s + b)   every key visible    (no mask)
        right [s + b, s + b + bq)       visible iff c <= w   (the kernel's causal tile)

    (w: row in the tile, c: column in the range; ranges clipped to the group). Only
    tiles cut by the group's ends need their own masks, and those are at most bq wide,
    so memory stays O(L * D) however wide the band: a window covering the sequence
    costs what dense flash attention costs."""
    bq = min(WIDE_TILE if unmasked else WIDE_TILE_MASKED, u1 - u0)
    s = u0 + torch.arange(-(-(u1 - u0) // bq)) * bq
    ar = torch.arange(bq)
    qu = s[:, None] + ar
    qu = torch.where(qu < L, qu, -1)
    out: list[TileBatch] = []

    def part(ku: Tensor, kind: str, shared: Tensor | None) -> None:
        ku = torch.where((ku >= 0) & (ku < L), ku, -1)
        keep = (ku >= 0).any(1)
        if not bool(keep.any()):
            return
        clipped = (ku < 0).any(1)
        for sel, k in ((keep & ~clipped, kind), (keep & clipped, "mask")):
            if bool(sel.any()):
                out.append(TileBatch(*_flat(P, qu[sel], ku[sel]), "mask" if masked else k, pred, shared=shared))

    tri = torch.ones(bq, bq, dtype=torch.bool).tril()
    if bq > 1:
        part((s - a)[:, None] + torch.arange(bq - 1), "shared", torch.arange(bq - 1)[None, :] >= ar[:, None])
    part((s + b)[:, None] + ar, "causal", tri)
    lo = (s + bq - 1 - a).clamp(min=0)
    hi = (s + b - 1).clamp(max=L - 1)
    width = hi - lo + 1
    for K in torch.unique(width[width > 0]).tolist():
        sel = width == K
        ku = lo[sel, None] + torch.arange(K)
        out.append(TileBatch(*_flat(P, qu[sel], ku), "mask" if masked else "full", pred))
    return out


def _gather_batches(c: Gather, pred: Predicate) -> list[TileBatch]:
    def shared(qpos: Tensor, kpos: Tensor) -> Tensor | None:
        ok = c.shared is not None and tuple(c.shared.shape) == (qpos.shape[1], kpos.shape[-1])
        return c.shared if ok else None

    return [TileBatch(qpos, kpos, "mask", pred, shared=shared(qpos, kpos)) for qpos, kpos in c.blocks()]


def _sub(tb: TileBatch, sel: list[int], kind: str, vis: Tensor | None = None) -> TileBatch:
    idx = torch.tensor(sel, dtype=torch.long)
    return TileBatch(tb.qpos[idx], tb.kpos[:, idx], kind, tb.pred, vis=vis,
                     shared=tb.shared if kind == "shared" else None)


def _classify(tb: TileBatch, heads: int) -> list[TileBatch]:
    """Split a batch into tiles needing no mask (every key visible), tiles whose
    visibility is the kernel's own causal structure, tiles seeing the batch's
    ``shared`` mask, and partial tiles that keep their own bool mask; drop tiles
    that see nothing. The predicate is evaluated here, once per plan."""
    T, bq, K = tb.shape
    if tb.kpos.shape[1] != T:
        tb = TileBatch(tb.qpos, tb.kpos.expand(-1, T, -1), tb.kind, tb.pred, shared=tb.shared)
    tri = torch.ones(bq, K, dtype=torch.bool).tril()
    step = max(1, WORKSPACE // max(1, heads * bq * K))
    full, causal, shared, part, part_vis = [], [], [], [], []
    for t0 in range(0, T, step):
        qp = tb.qpos[t0 : t0 + step]
        kp = tb.kpos[:, t0 : t0 + step]
        Tc = qp.shape[0]
        vis = tb.pred(qp[None, :, :, None], kp[:, :, None, :], torch.arange(heads)[:, None, None, None])
        vis = vis.expand(*vis.shape[:-3], Tc, bq, K)
        if vis.dim() < 4:
            vis = vis[None]
        ghost = (qp < 0)[None, :, :, None]  # rows of no query: any answer will do
        is_full = (vis | ghost).flatten(2).all(-1).all(0)
        is_causal = ((vis == tri) | ghost).flatten(2).all(-1).all(0) & ~is_full
        is_shared = torch.zeros_like(is_full)
        if tb.shared is not None:
            is_shared = ((vis == tb.shared) | ghost).flatten(2).all(-1).all(0) & ~is_full & ~is_causal
        empty = ~vis.flatten(2).any(-1).any(0)
        for t in range(Tc):
            if bool(empty[t]):  # every key already counted by an earlier component
                continue
            if bool(is_full[t]):
                full.append(t0 + t)
            elif bool(is_causal[t]):
                causal.append(t0 + t)
            elif bool(is_shared[t]):
                shared.append(t0 + t)
            else:
                part.append(t0 + t)
                part_vis.append(vis[:, t])
    out = []
    if full:
        out.append(_sub(tb, full, "full"))
    if causal:
        out.append(_sub(tb, causal, "causal"))
    if shared:
        out.append(_sub(tb, shared, "shared"))
    if part:
        out.append(_sub(tb, part, "mask", torch.stack(part_vis, dim=1)))
    return out


def plan(pattern: Pattern, n: int, heads: int, causal: bool, tile: int | None = None,
         rows: tuple[int, int] | None = None, keys: Tensor | None = None,
         padded: bool = False) -> list[tuple[TileBatch, bool]]:
    """The tile batches computing ``pattern`` (one head group) at length ``n``, each
    with a flag: True when no earlier batch touched its queries (its outputs are
    written, not merged). Positions are absolute (0..n-1).

    ``rows`` = (q0, q1): plan only the queries in [q0, q1) (a decode step, a shard);
    the work is proportional to what those queries see, not to n. ``keys``: the
    sorted key positions that will be present (others count as absent: the caller
    must provide every visible key). ``padded``: keys will be padded (then no whole
    group runs as one masked kernel call).

    Components whose queries see every key (``Gather.leading``: global rows) come
    first: they need no mask, and the tiles of later components that are left with
    no key (every key already counted) are dropped."""
    q0, q1 = rows or (0, n)
    pattern.prepare(n, heads, causal)
    comps = pattern.components(n, heads, rows=None if (q0, q1) == (0, n) else (q0, q1))
    comps = [c for c in comps if getattr(c, "leading", False)] + [c for c in comps if not getattr(c, "leading", False)]
    touched = torch.zeros(n, dtype=torch.bool)
    batches: list[tuple[TileBatch, bool]] = []
    for idx, c in enumerate(comps):
        earlier = [e.pred for e in comps[:idx]]
        own = c.pred

        def pred(i, j, h, own=own, earlier=earlier):
            m = own(i, j, h) & (j >= 0) & (i >= 0)
            if causal:
                m = m & (j <= i)
            for e in earlier:  # count keys that an earlier component lists only once
                m = m & ~e(i, j, h)
            return m

        masked = bool(earlier) or isinstance(c, _Restricted)
        inner = c.inner if isinstance(c, _Restricted) else c
        if isinstance(inner, Band):
            tbs = _band_batches(inner, n, causal, pred, masked, tile or BAND_QUERY_TILE, (q0, q1), padded)
        elif isinstance(inner, Gather):
            tbs = _gather_batches(inner, pred)
        else:  # pragma: no cover
            raise TypeError(f"unknown component {type(inner).__name__}")
        for tb in tbs:
            tb = _restrict(tb, q0, q1, keys)
            if tb is None:
                continue
            # band tiles of kinds full / causal / shared are exact by construction
            for p in [tb] if tb.kind != "mask" else _classify(tb, heads):
                q = p.qpos[p.qpos >= 0]
                batches.append((p, not bool(touched[q].any())))
                touched[q] = True
    return batches


def _restrict(tb: TileBatch, q0: int, q1: int, keys: Tensor | None) -> TileBatch | None:
    """``tb`` with queries outside [q0, q1) and keys not in ``keys`` marked absent (-1);
    None when no query is left. A batch that loses keys is re-classified (kind mask)."""
    qpos, kpos, kind = tb.qpos, tb.kpos, tb.kind
    if q0 > 0 or q1 < INF_POS:
        out = (qpos < q0) | (qpos >= q1)
        if bool(out.any()):
            qpos = qpos.masked_fill(out, -1)
            live = (qpos >= 0).any(1)
            if not bool(live.any()):
                return None
            if not bool(live.all()):
                qpos = qpos[live]
                kpos = kpos[:, live] if kpos.shape[1] == live.numel() else kpos
    if keys is not None:
        absent = (kpos >= 0) & ~torch.isin(kpos, keys)
        if bool(absent.any()):
            kpos, kind = kpos.masked_fill(absent, -1), "mask"
    if qpos is tb.qpos and kpos is tb.kpos:
        return tb
    return TileBatch(qpos, kpos, kind, tb.pred, shared=tb.shared)


INF_POS = 1 << 62


def _to_rows(batches: list[tuple[TileBatch, bool]], q0: int, keys: Tensor | None) -> list[tuple[TileBatch, bool]]:
    """Absolute positions -> rows of the q tensor (position - q0) and of the k tensor
    (index in ``keys``); then find the strided views and shared key lists."""
    out = []
    for tb, first in batches:
        qpos = tb.qpos if q0 == 0 else torch.where(tb.qpos >= 0, tb.qpos - q0, -1)
        kpos = tb.kpos
        if keys is not None:
            kpos = torch.where(kpos >= 0, torch.searchsorted(keys, kpos.clamp(min=0)), -1)
        out.append((replace(tb, qpos=qpos, kpos=kpos).finish(), first))
    return out


def needed_keys(pattern: Pattern, n: int, heads: int, *, causal: bool = False, q_start: int = 0,
                q_stop: int | None = None) -> Tensor:
    """The sorted key positions that queries [q_start, q_stop) of ``pattern`` (length
    ``n``, ``heads`` heads) may see: what a shard of the sequence must fetch. It may
    list a few keys more than are visible (the edges of band tiles), never fewer.
    Cost ~ the tiles of those queries."""
    q_stop = n if q_stop is None else q_stop
    if not 0 <= q_start < q_stop <= n:
        raise ValueError(f"need 0 <= q_start < q_stop <= n, got q_start={q_start}, q_stop={q_stop}, n={n}")
    parts = [torch.empty(0, dtype=torch.long)]
    for _, nh, p in _head_groups(pattern, 0, heads):
        for tb, _ in plan(p, n, nh, causal, rows=(q_start, q_stop)):
            k = tb.kpos
            if tb.vis is not None:  # only the columns some tile row sees
                seen = tb.vis.any(2)
                shape = torch.broadcast_shapes(seen.shape, k.shape)
                k = k.expand(shape)[seen.expand(shape)]
            parts.append(torch.unique(k[k >= 0]))
    return torch.unique(torch.cat(parts))


# ----------------------------------------------------------------------------------------
# Tile kernels
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Opts:
    """How the tiles are computed: ``softcap`` (scores s -> c tanh(s / c)) and ``safe``
    (non-finite inputs: masked scores selected, never added, and no 0 * NaN in a matmul).
    Either runs the plain-matmul kernels; the default runs the CPU flash kernel."""

    softcap: float | None = None
    safe: bool = False

    @property
    def math(self) -> bool:
        return self.softcap is not None or self.safe


_FAST = _Opts()


def _scores(q: Tensor, k: Tensor, is_causal: bool, attn_mask: Tensor | None, scale: float,
            softcap: float | None = None, grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Masked scores [.., M, K] in the accumulation dtype, and (``grad`` and ``softcap``)
    the cap's derivative 1 - tanh^2(s / c). ``attn_mask``: bool (True = visible, the
    hidden scores are *selected* to -inf, so a NaN key cannot reach a row that does not
    see it) or additive float. The cap comes before the masks (tanh(-inf) is -1)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)
    dcap = None
    if softcap is not None:
        s = s.div_(softcap).tanh_()
        dcap = 1.0 - s * s if grad else None
        s = s.mul_(softcap)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        s = s + attn_mask.to(acc)
    return s, dcap


def _matmul_safe(a: Tensor, b: Tensor, safe: bool) -> Tensor:
    """a @ b where a zero of ``a`` never meets a non-finite entry of ``b`` (0 * NaN would
    spread a hidden key's NaN over every row of the tile): b's non-finite entries are
    zeroed, and the outputs that take one with a non-zero weight are set to NaN.
    ``safe=False``: the plain matmul. Cost: one more matmul of a's support, safe only."""
    if not safe:
        return torch.matmul(a, b)
    bad = ~torch.isfinite(b)
    out = torch.matmul(a, b.masked_fill(bad, 0.0))
    if bool(bad.any()):
        hit = torch.matmul((a != 0).to(a.dtype), bad.to(a.dtype))
        out = out.masked_fill(hit > 0, float("nan"))
    return out


def _math_fwd(q, k, v, dropout_p, is_causal, attn_mask=None, scale=None, *, softcap=None, safe=False):
    """The tile kernel in plain tensor ops, for devices without the CPU flash kernel and
    for what that kernel cannot do (``softcap``; ``safe``: non-finite inputs). Same
    contract as ``aten._scaled_dot_product_flash_attention_for_cpu``: output and lse of
    [B, H, M, D] queries over [B, H, K, D] keys (a row with no visible key gets a zero
    output; its lse is masked by the caller). ``attn_mask`` bool (True = visible) or
    additive. Cost O(M K D) time, O(M K) memory per call (the caller bounds M K)."""
    s, _ = _scores(q, k, is_causal, attn_mask, scale, softcap)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)
    p = _exp_(s.sub_(m))
    z = p.sum(-1, keepdim=True)
    o = _matmul_safe(p, v.to(p.dtype), safe).div_(z.clamp_min(torch.finfo(p.dtype).tiny))
    return o.to(q.dtype), (m + torch.log(z)).squeeze(-1)


def _math_bwd(g, q, k, v, o, lse, dropout_p, is_causal, attn_mask=None, scale=None, *, softcap=None, safe=False):
    """Backward of :func:`_math_fwd` given the merged output and lse, as the flash
    kernel does it: p = exp(s - lse), dv = p^T g, ds = p * (g v^T - rowsum(g * o)),
    dq = scale ds k, dk = scale ds^T q; with ``softcap`` ds is taken through the cap
    (times 1 - tanh^2). ``safe``: rows without upstream gradient and hidden pairs
    contribute exact zeros (no 0 * NaN from a non-finite row, key or value)."""
    s, dcap = _scores(q, k, is_causal, attn_mask, scale, softcap, grad=True)
    p = _exp_(s.sub_(lse.to(s.dtype)[..., None]))
    ga = g.to(s.dtype)
    if safe:
        p = p.masked_fill(~(ga != 0).any(-1, keepdim=True), 0.0)
    delta = (ga * o.to(s.dtype)).sum(-1, keepdim=True)
    dv = _matmul_safe(p.transpose(-1, -2), ga, safe)
    ds = _matmul_safe(ga, v.to(s.dtype).transpose(-1, -2), safe).sub_(delta).mul_(p)
    if safe:
        ds = ds.masked_fill(p == 0, 0.0)
    if dcap is not None:
        ds = ds.mul_(dcap)
    dq = _matmul_safe(ds, k.to(s.dtype), safe).mul_(scale)
    dk = _matmul_safe(ds.transpose(-1, -2), q.to(s.dtype), safe).mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _kernels(device: torch.device, opts: _Opts = _FAST):
    """(forward, backward) tile kernels for a device and options."""
    if device.type == "cpu" and not FORCE_MATH and not opts.math:
        return _flash_fwd, _flash_bwd
    if not opts.math:
        return _math_fwd, _math_bwd
    kw = dict(softcap=opts.softcap, safe=opts.safe)
    return partial(_math_fwd, **kw), partial(_math_bwd, **kw)


# ----------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """A slice of a tile batch small enough for one kernel call.

    Queries and keys are strided views of the sequence (``qview`` / ``kview``) or
    gathered rows (``qidx`` [Tc*bq]; ``kidx`` [Hk, Tc*K], or [Hk, K] when
    ``kshared``), clamped to valid positions (``qvalid`` marks real queries).
    """

    Tc: int
    bq: int
    K: int
    kind: str  # "full" | "causal" | "mask"
    mask: Tensor | None  # additive, broadcastable to [B*H, Tc, bq, K]
    alive: Tensor | None  # bool, broadcastable to [B*H, Tc, bq]: row sees some key
    qview: View | None
    kview: View | None
    qidx: Tensor
    qvalid: Tensor | None  # None: every query is real
    kidx: Tensor
    kshared: bool

    @property
    def flat(self) -> bool:
        """Do all the tiles see the same keys, unmasked (global columns)? Then they run
        as one kernel call over their Tc * bq query rows: the kernel's own query
        blocks, and the shared keys read once."""
        return (self.kind == "full" and self.mask is None and self.alive is None and self.Tc > 1
                and (self.kshared or (self.kview is not None and self.kview.step == 0)))


def _additive(vis: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros((), dtype=dtype, device=vis.device).expand(vis.shape).masked_fill(~vis, float("-inf"))


def _slice_tiles(tb: TileBatch, B: int, H: int, D: int, Dv: int, padded: bool, backward: bool,
                 g: int = 1) -> int:
    """Tiles per kernel call, so that what the call allocates stays under WORKSPACE."""
    T, bq, K = tb.shape
    per = bq * Dv  # the kernel's output (or, backward, dq)
    per += 0 if tb.qview else bq * D
    per += 0 if (tb.kview or tb.kshared) and g == 1 else K * (D + Dv)  # gathered or head-expanded keys
    per += bq * K if (padded or tb.kind == "mask") else 0
    if backward:
        per += K * (D + Dv) + bq * (D + Dv)  # key gradients; dO and O rows
    return max(1, WORKSPACE // (B * H * per))


def _chunks(tb: TileBatch, B: int, H: int, D: int, Dv: int, kpm: Tensor | None, dtype: torch.dtype,
            device: torch.device, backward: bool = False, g: int = 1, additive: bool = True):
    """The kernel calls of a tile batch: views or gathers, and the mask (additive for
    the flash kernel, else bool: True = visible)."""
    as_mask = (lambda vis: _additive(vis, dtype)) if additive else (lambda vis: vis)
    T, bq, K = tb.shape
    step = _slice_tiles(tb, B, H, D, Dv, kpm is not None, backward, g)
    shared_mask = None
    if tb.kind == "shared" and kpm is None:
        shared_mask = as_mask(tb.shared.to(device))
        shared_alive = tb.shared.any(-1)
        shared_alive = None if bool(shared_alive.all()) else shared_alive.to(device)
    for t0 in range(0, T, step):
        qp = tb.qpos[t0 : t0 + step]
        kp = tb.kpos[:, t0 : t0 + step] if tb.kpos.shape[1] > 1 else tb.kpos
        Tc = qp.shape[0]
        kind = tb.kind
        mask = alive = None
        if shared_mask is not None:
            mask, alive, kind = shared_mask, shared_alive, "mask"
        else:
            vis: Tensor | None = None
            if kind == "shared":  # with padded keys
                vis = tb.shared.expand(1, Tc, bq, K)
                kind = "mask"
            elif kind == "mask":
                vis = tb.vis[:, t0 : t0 + step]
            if kpm is not None:
                if vis is not None:
                    base = vis
                elif kind == "causal":
                    base = torch.ones(bq, K, dtype=torch.bool).tril()
                else:
                    base = torch.ones((), dtype=torch.bool)
                kpc = kp.to(kpm.device)
                pad = kpm[:, kpc.clamp(min=0)][:, :, :, None, :] & (kpc >= 0)[None, :, :, None, :]
                vis = (base.to(kpm.device) & pad).expand(B, H, Tc, bq, K).reshape(B * H, Tc, bq, K)
                kind = "mask"
            elif vis is not None and vis.shape[0] != 1 and B > 1:
                vis = vis[None].expand(B, H, Tc, bq, K).reshape(B * H, Tc, bq, K)
            if vis is not None:
                vis = vis.to(device)
                alive = vis.any(-1)
                mask = as_mask(vis)
        kk = kp[:, :1] if tb.kshared else kp
        qflat = qp.reshape(-1)
        valid = qflat >= 0
        yield _Chunk(
            Tc, bq, K, kind, mask, alive,
            qview=tb.qview.at(t0) if tb.qview else None,
            kview=tb.kview.at(t0) if tb.kview else None,
            qidx=qflat.clamp(min=0).to(device),
            qvalid=None if bool(valid.all()) else valid.to(device),
            kidx=kk.reshape(kk.shape[0], -1).clamp(min=0).to(device),
            kshared=tb.kshared,
        )


def _window(x: Tensor, v: View, T: int, width: int) -> Tensor:
    """[BH, N, D] -> the strided view [BH, T, width, D] of rows v.start + t*step + w*stride."""
    BH, N, D = x.shape
    return x.as_strided(
        (BH, T, width, D), (x.stride(0), v.step * x.stride(1), v.stride * x.stride(1), x.stride(2)),
        x.storage_offset() + v.start * x.stride(1),
    )


def _flat_index(idx: Tensor, BH: int, N: int) -> Tensor:
    """Row numbers in x.reshape(BH * N, D) of positions idx ([M], or [H, M] per head)."""
    base = torch.arange(BH, device=idx.device)[:, None] * N
    if idx.shape[0] == 1 or idx.dim() == 1:
        return (base + idx.reshape(1, -1)).reshape(-1)
    return (base + idx.repeat(BH // idx.shape[0], 1)).reshape(-1)


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """Rows idx of a contiguous [BH, N, D] tensor -> [BH, M, D] (a 2-D index_select,
    much faster on the CPU than index_select along dim 1)."""
    BH, N, D = x.shape
    M = idx.shape[-1]
    return x.reshape(BH * N, D).index_select(0, _flat_index(idx, BH, N)).view(BH, M, D)


def _gq(x: Tensor, ch: _Chunk) -> Tensor:
    """The chunk's query rows of x ([BH, N, D]) as [BH, Tc, bq, D]."""
    if ch.qview is not None:
        return _window(x, ch.qview, ch.Tc, ch.bq)
    return _rows(x, ch.qidx).view(x.shape[0], ch.Tc, ch.bq, x.shape[-1])


def _rows_as_one(x: Tensor) -> Tensor:
    """[BH, Tc, bq, D] tiles -> [BH, 1, Tc * bq, D] (a view when the rows are consecutive)."""
    return x.reshape(x.shape[0], 1, -1, x.shape[-1])


def _expand_heads(x: Tensor, g: int) -> Tensor:
    """[B * Hkv, ...] -> [B * Hkv * g, ...]: each kv head once for each of its g query
    heads (head h reads kv head h // g). A copy of one chunk, never of the sequence."""
    if g == 1:
        return x
    return x.unsqueeze(1).expand(x.shape[0], g, *x.shape[1:]).reshape(x.shape[0] * g, *x.shape[1:])


def _kv_index(idx: Tensor, BHk: int, N: int, g: int) -> Tensor:
    """Rows of x.reshape(BHk * N, D) ([B * Hkv, N, D] kv tensor) for per-query-head key
    lists idx [H, M]: query head h of batch b reads kv row b * Hkv + h // g."""
    H = idx.shape[0]
    qh = torch.arange(BHk * g, device=idx.device)
    kv_row = (qh // H) * (H // g) + (qh % H) // g
    return (kv_row[:, None] * N + idx.repeat(BHk * g // H, 1)).reshape(-1)


def _gk(x: Tensor, ch: _Chunk, g: int = 1) -> Tensor:
    """The chunk's key rows of x ([B * Hkv, N, D]) as [B * Hkv * g, Tc, K, D]."""
    if ch.kview is not None:
        return _expand_heads(_window(x, ch.kview, ch.Tc, ch.K), g)
    BH, N, D = x.shape
    Tk = 1 if ch.kshared else ch.Tc
    if g > 1 and ch.kidx.shape[0] > 1:  # per-head key lists: gather per query head
        rows = x.reshape(BH * N, D).index_select(0, _kv_index(ch.kidx, BH, N, g))
        return rows.view(BH * g, Tk, ch.K, D).expand(BH * g, ch.Tc, ch.K, D)
    return _expand_heads(_rows(x, ch.kidx).view(BH, Tk, ch.K, D), g).expand(BH * g, ch.Tc, ch.K, D)


def _merge(O: Tensor, Lse: Tensor, ch: _Chunk, o: Tensor, lse: Tensor, first: bool) -> None:
    """Fold a chunk's (o [BH, Tc, bq, Dv], lse [BH, Tc, bq]) into the running (O, Lse):
    one softmax over all keys. The first component's tiles partition its queries:
    plain writes."""
    if ch.qview is not None:
        o_old = _window(O, ch.qview, ch.Tc, ch.bq)
        l_old = _window(Lse[..., None], ch.qview, ch.Tc, ch.bq)[..., 0]
        if first:
            o_old.copy_(o)
            l_old.copy_(lse)
            return
        l_new = torch.logaddexp(l_old, lse)
        l_ref = torch.where(torch.isneginf(l_new), 0.0, l_new)
        o_old.mul_(torch.exp(l_old - l_ref)[..., None]).add_(o.mul_(torch.exp(lse - l_ref)[..., None]))
        l_old.copy_(l_new)
        return
    BH, _, Dv = O.shape
    o = o.reshape(BH, -1, Dv)
    lse = lse.reshape(BH, -1)
    pos = ch.qidx
    if ch.qvalid is not None:
        pos, o, lse = pos[ch.qvalid], o[:, ch.qvalid], lse[:, ch.qvalid]
    if first:
        o_new, l_new = o, lse
    else:
        o_old, l_old = _rows(O, pos), _rows(Lse[..., None], pos)[..., 0]
        l_new = torch.logaddexp(l_old, lse)
        l_ref = torch.where(torch.isneginf(l_new), 0.0, l_new)
        o_new = o_old.mul_(torch.exp(l_old - l_ref)[..., None]).add_(o.mul_(torch.exp(lse - l_ref)[..., None]))
    O.index_copy_(1, pos, o_new)
    Lse.index_copy_(1, pos, l_new)


def _accumulate(x: Tensor, ch: _Chunk, g: Tensor, heads_per_kv: int = 1) -> None:
    """Add key gradients g [B * H, Tc, K, D] into x [B * Hkv, N, D] at the chunk's keys
    (H = Hkv * heads_per_kv: the query heads of one kv head are summed)."""
    r = heads_per_kv
    if r > 1 and ch.kview is None and ch.kidx.shape[0] > 1:  # per-head key lists
        BH, N, D = x.shape
        if ch.kshared:
            g = g.sum(1, keepdim=True)
        x.view(BH * N, D).index_add_(0, _kv_index(ch.kidx, BH, N, r), g.reshape(-1, D).to(x.dtype))
        return
    if r > 1:
        g = g.view(g.shape[0] // r, r, *g.shape[1:]).sum(1)
    if ch.kview is not None:
        v = ch.kview
        if v.step == 0:  # every tile lists the same keys
            _window(x, v, 1, ch.K).add_(g.sum(1, keepdim=True))
            return
        width = v.strip_rows(ch.Tc, ch.K)
        for s0 in range(0, ch.K, width):  # overlapping windows: add strip by strip
            w = min(width, ch.K - s0)
            _window(x, View(v.start + s0 * v.stride, v.step, v.stride), ch.Tc, w).add_(g[:, :, s0 : s0 + w])
        return
    BH, N, D = x.shape
    if ch.kshared:
        g = g.sum(1, keepdim=True)
    x.view(BH * N, D).index_add_(0, _flat_index(ch.kidx, BH, N), g.reshape(-1, D).to(x.dtype))


def _forward_bh(q, k, v, batches, scale, kpm, H, g, O, Lse, opts: _Opts = _FAST):
    """Fill O [BH, Nq, Dv] (zeros) and Lse [BH, Nq] (-inf), in the accumulation dtype.
    k, v: [B * H / g, Nk, .] (g query heads per kv head)."""
    BH, N, D = q.shape
    Dv = v.shape[-1]
    acc = O.dtype
    fwd, _ = _kernels(q.device, opts)
    for tb, first in batches:
        for ch in _chunks(tb, BH // H, H, D, Dv, kpm, q.dtype, q.device, g=g, additive=fwd is _flash_fwd):
            qc, kc, vc = _gq(q, ch), _gk(k, ch, g), _gk(v, ch, g)
            if ch.flat:
                o, lse = fwd(_rows_as_one(qc), kc[:, :1], vc[:, :1], 0.0, False, scale=scale)
                o, lse = o.reshape(BH, ch.Tc, ch.bq, Dv), lse.reshape(BH, ch.Tc, ch.bq)
            else:
                o, lse = fwd(qc, kc, vc, 0.0, ch.kind == "causal", attn_mask=ch.mask, scale=scale)
            lse = lse.to(acc)
            if ch.alive is not None:
                lse = lse.masked_fill(~ch.alive, float("-inf"))
            _merge(O, Lse, ch, o.to(acc), lse, first)


def _backward(dO, q, k, v, O, Lse, batches, scale, kpm, H, g, dq, dk, dv, opts: _Opts = _FAST):
    """Add the gradients into dq, dk, dv ([BH, N, .], accumulation dtype)."""
    BH, N, D = q.shape
    Dv = v.shape[-1]
    acc = dq.dtype
    _, bwd = _kernels(q.device, opts)
    # ghost queries (zeroed dO) and ghost keys (always masked) get exactly zero
    # gradient from the kernel, so their clamped indices can point at row 0
    Lb = Lse.masked_fill(torch.isneginf(Lse), float("inf"))
    if q.dtype != torch.float64:
        Lb = Lb.float()
    Lb = Lb[..., None].contiguous()
    for tb, _ in batches:
        for ch in _chunks(tb, BH // H, H, D, Dv, kpm, q.dtype, q.device, backward=True, g=g,
                          additive=bwd is _flash_bwd):
            gO = _gq(dO, ch)
            if ch.qvalid is not None:
                gO = gO * ch.qvalid.view(1, ch.Tc, ch.bq, 1).to(gO.dtype)
            qc, kc, vc, Oc, Lc = _gq(q, ch), _gk(k, ch, g), _gk(v, ch, g), _gq(O, ch), _gq(Lb, ch)[..., 0]
            if ch.flat:  # one call over all the rows; the key gradients come summed over them
                gq, gk, gv = bwd(_rows_as_one(gO), _rows_as_one(qc), kc[:, :1], vc[:, :1], _rows_as_one(Oc),
                                 Lc.reshape(BH, 1, -1), 0.0, False, scale=scale)
                gq = gq.reshape(BH, ch.Tc, ch.bq, D)
            else:
                gq, gk, gv = bwd(gO, qc, kc, vc, Oc, Lc, 0.0, ch.kind == "causal", attn_mask=ch.mask, scale=scale)
            if ch.qview is not None:
                _window(dq, ch.qview, ch.Tc, ch.bq).add_(gq)
            else:
                dq.index_add_(1, ch.qidx, gq.reshape(BH, -1, D).to(acc))
            _accumulate(dk, ch, gk, g)
            _accumulate(dv, ch, gv, g)


Groups = list[tuple[int, int, int, int, list[tuple[TileBatch, bool]]]]
"""(first query head, query heads, first kv head, kv heads, tile batches) per head group."""


def _each_group(groups: Groups, B: int, qs: tuple[Tensor, ...], kvs: tuple[Tensor, ...],
                outs_q: tuple[Tensor, ...], outs_kv: tuple[Tensor, ...] = ()):
    """For each head group: its slices of the query-side tensors ``qs``/``outs_q``
    (heads [h0, h0 + nh)) and of the key-side ``kvs``/``outs_kv`` (kv heads [kh0,
    kh0 + nkh)), as contiguous [B * heads, N, .]. Views when the slice is contiguous
    (B == 1, or one group); otherwise copies, and the outputs are written back."""
    for h0, nh, kh0, nkh, batches in groups:
        def part(x: Tensor, a: int, m: int) -> Tensor:
            return x[:, a : a + m].reshape(B * m, x.shape[2], x.shape[3]).contiguous()

        oq = [part(x, h0, nh) for x in outs_q]
        okv = [part(x, kh0, nkh) for x in outs_kv]
        yield batches, nh, nh // nkh, [part(x, h0, nh) for x in qs], [part(x, kh0, nkh) for x in kvs], oq + okv
        for x, xp, a, m in [*((x, xp, h0, nh) for x, xp in zip(outs_q, oq)),
                            *((x, xp, kh0, nkh) for x, xp in zip(outs_kv, okv))]:
            if xp.data_ptr() != x[:, a : a + m].data_ptr():  # a copy: write it back
                x[:, a : a + m] = xp.view(B, m, *x.shape[2:])


def _attend(q: Tensor, k: Tensor, v: Tensor, groups: Groups, kpm: Tensor | None, scale: float, written: bool,
            opts: _Opts) -> tuple[Tensor, Tensor]:
    """Merged output O [B, H, N, Dv] and log-sum-exp Lse [B, H, N, 1] (accumulation dtype)
    of every head group's tiles."""
    B, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if written:  # every row is written by a first batch: no initial fill (and no page
        # faults of a separate pass over a fresh N x D buffer)
        O = torch.empty(B, H, N, v.shape[-1], dtype=acc, device=q.device)
        Lse = torch.empty(B, H, N, 1, dtype=acc, device=q.device)
        if UNINIT_FILL is not None:
            O.fill_(UNINIT_FILL)
            Lse.fill_(UNINIT_FILL)
    else:
        O = torch.zeros(B, H, N, v.shape[-1], dtype=acc, device=q.device)
        Lse = torch.full((B, H, N, 1), float("-inf"), dtype=acc, device=q.device)
    for batches, nh, g, (qg,), (kg, vg), (Og, Lg) in _each_group(groups, B, (q,), (k, v), (O, Lse)):
        _forward_bh(qg, kg, vg, batches, scale, kpm, nh, g, Og, Lg[..., 0], opts)
    return O, Lse


def _add_sinks(O: Tensor, Lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a sink logit per head into the merged softmax: Lse' = logaddexp(Lse, sink_h),
    O' = O e^(Lse - Lse') (the sink has a zero value). A row with no key gets O' = 0."""
    sk = sinks.to(Lse.dtype).view(1, -1, 1, 1)
    L2 = torch.logaddexp(Lse, sk)
    w = torch.where(torch.isneginf(L2), 0.0, torch.exp(Lse - L2))
    return O.mul_(w), L2


def _sink_grad(dout: Tensor, out: Tensor, Lse: Tensor, sinks: Tensor) -> Tensor:
    """d loss / d sink_h = -sum over batch and rows of P_sink * (dO . O), P_sink =
    e^(sink_h - Lse') (the sink's softmax weight; rows without gradient add nothing)."""
    sk = sinks.to(Lse.dtype).view(1, -1, 1, 1)
    p_sink = torch.where(torch.isneginf(Lse), 0.0, torch.exp(sk - Lse))[..., 0]
    dot = torch.where(dout == 0, 0.0, dout.to(Lse.dtype) * out.to(Lse.dtype)).sum(-1)
    return -(p_sink * dot).sum((0, 2)).to(sinks.dtype)


class _BlockSparseAttention(torch.autograd.Function):
    """Exact attention over the tile plans of each head group (see the module doc).

    Non-finite inputs: the fast kernels add masks and multiply hidden weights (0) by
    values, so a NaN key or value can reach rows that do not see it; the output then
    holds a non-finite entry and the call reruns on the safe kernels (selected masks,
    no 0 * NaN), forward and backward. Sinks are folded into the merged (O, Lse); the
    kernels' backward given that (O, Lse) is the exact gradient of the softmax with the
    sink in its denominator."""

    @staticmethod
    def forward(ctx, q, k, v, groups: Groups, bwd_groups: Groups | None, scale, kpm, written: bool,
                sinks: Tensor | None = None, softcap: float | None = None):
        opts = _Opts(softcap=softcap)
        O, Lse = _attend(q, k, v, groups, kpm, scale, written, opts)
        if not bool(torch.isfinite(O).all()):
            opts = _Opts(softcap=softcap, safe=True)
            O, Lse = _attend(q, k, v, groups, kpm, scale, written, opts)
        if sinks is not None:
            O, Lse = _add_sinks(O, Lse, sinks)
        out = O.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, Lse, *(() if sinks is None else (sinks,)))
        ctx.groups, ctx.scale, ctx.kpm, ctx.opts = bwd_groups or groups, scale, kpm, opts
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, Lse, *rest = ctx.saved_tensors
        sinks = rest[0] if rest else None
        opts = getattr(ctx, "opts", None)
        if opts is None:  # a caller's own ctx (the torch.library op): safe iff inputs are not finite
            opts = _Opts(safe=not all(bool(torch.isfinite(x).all()) for x in (q, k, v)))
        B = q.shape[0]
        acc = Lse.dtype
        dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
        qs = (dout.contiguous(), q, out, Lse)
        for batches, nh, g, (dOg, qg, Og, Lg), (kg, vg), (dqg, dkg, dvg) in _each_group(
            ctx.groups, B, qs, (k, v), (dq,), (dk, dv)
        ):
            _backward(dOg, qg, kg, vg, Og, Lg[..., 0], batches, ctx.scale, ctx.kpm, nh, g, dqg, dkg, dvg, opts)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[8]:
            dsinks = _sink_grad(dout, out, Lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, dsinks, None


_PLAN_CACHE: dict[tuple, tuple[Pattern, list[tuple[TileBatch, bool]], bool]] = {}


def _writes_every_row(batches: list[tuple[TileBatch, bool]], n: int) -> bool:
    """Do the first-write batches of a plan cover every query row (so the output
    buffers need no initial value)?"""
    covered = torch.zeros(n, dtype=torch.bool)
    for tb, first in batches:
        if first:
            covered[tb.qpos[tb.qpos >= 0]] = True
    return bool(covered.all())


def _cached_plan(pattern: Pattern, n: int, heads: int, causal: bool, tile: int, rows: tuple[int, int],
                 keys: Tensor | None, padded: bool) -> tuple[list[tuple[TileBatch, bool]], bool]:
    """The plan of :func:`plan` in rows of the given q/k tensors, and whether it
    writes every row; cached per pattern object (not when ``keys`` is given)."""
    key = (id(pattern), n, heads, causal, tile, rows, padded)
    hit = _PLAN_CACHE.get(key) if keys is None else None
    if hit is None or hit[0] is not pattern:
        if len(_PLAN_CACHE) > 256:
            _PLAN_CACHE.clear()
        batches = _to_rows(plan(pattern, n, heads, causal, tile, rows, keys, padded), rows[0], keys)
        hit = (pattern, batches, _writes_every_row(batches, rows[1] - rows[0]))
        if keys is None:
            _PLAN_CACHE[key] = hit
    return hit[1], hit[2]


def pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    n: int | None = None,
    q_start: int | None = None,
    k_positions: Tensor | None = None,
    backend: str = "auto",
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Exact softmax attention restricted to ``pattern``.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. Grouped KV heads:
            H % Hkv == 0, query head h reads kv head h // (H // Hkv) (never repeated
            in memory).
        pattern: any :class:`longattn.patterns.Pattern`, per-head lists included.
        causal: intersect with j <= i (positions, see below).
        key_padding_mask: bool [B, Nk] aligned with k's rows, True = a real token.
        n: the length the pattern is laid over (default Nk).
        q_start: position of q's first row (default n - Nq: the queries are the last
            Nq positions, FlashAttention's bottom-right alignment, so a decode step
            ``q[:, :, -1:]`` over the whole cache is the last row of the full call).
        k_positions: sorted positions [Nk] of k's rows (default arange(n)); every key
            a query can see must be among them (see :func:`needed_keys`).
        backend: "engine" (the tile engine here), "flex" (compiled FlexAttention
            with a BlockMask built from the pattern's components,
            :mod:`longattn.ops.flex`: the fused GPU kernel; on the CPU forward only),
            or "auto": flex on CUDA, the engine elsewhere (on the CPU it is 1.5-2x
            faster than compiled Flex and has a backward).
        sinks: float [H] (may require grad): one logit per query head in the softmax
            denominator only, out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sinks[h]})
            (gpt-oss ``s_aux``). Folded into the merged log-sum-exp: O(Nq) extra work,
            the tile kernels unchanged; d sink_h = -sum_i P_sink,i (dO_i . O_i).
        softcap: c > 0: scores s -> c tanh(s / c) before the softmax (Gemma-2). Runs
            the plain-matmul tile kernels (no fused kernel has the cap): same
            O(visible entries * D) time and bounded workspace, ~2-4x slower than the
            flash kernel on the CPU.

    Returns:
        [B, H, Nq, Dv]. Queries with no visible key get zeros (with or without a
        sink). Differentiable in q, k, v and sinks. Cost ~ the entries the Nq queries
        see (a decode step of a window costs the window, not n); memory
        O((Nq + Nk) * D) + a bounded workspace. A row's output never depends on keys
        it cannot see, even non-finite ones (padded keys are zeroed; a non-finite
        output reruns the call on the safe kernels).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=True)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn.patterns.Pattern, got {type(pattern).__name__}")
    s = default_scale(scale, d.D)
    check_sinks(sinks, d.H)
    check_softcap(softcap)
    if _use_flex(backend, q, k_positions, sinks is not None or softcap is not None):
        from longattn.ops.flex import flex_pattern_attention

        return flex_pattern_attention(q, k, v, pattern, causal=causal, key_padding_mask=key_padding_mask,
                                      scale=s, enable_gqa=d.Hkv != d.H)
    n, q0 = _positions(d, n, q_start, k_positions)
    if d.Dv != d.D:  # the kernel wants one head size: zero columns change no score or output
        w = max(d.D, d.Dv)
        pad = lambda x: torch.nn.functional.pad(x, (0, w - x.shape[-1]))  # noqa: E731
        return pattern_attention(pad(q), pad(k), pad(v), pattern, causal=causal, key_padding_mask=key_padding_mask,
                                 scale=s, n=n, q_start=q0, k_positions=k_positions, backend="engine",
                                 sinks=sinks, softcap=softcap)[..., : d.Dv]
    rows = (q0, q0 + d.Nq)
    keys = None if k_positions is None else k_positions.to("cpu", torch.long)
    padded = key_padding_mask is not None
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))

    def groups(tile: int) -> list[tuple[int, int, int, int, tuple]]:
        return [(h0, nh, kh0, nkh, _cached_plan(p, n, nh, causal, tile, rows, keys, padded))
                for h0, nh, kh0, nkh, p in _kv_groups(pattern, d.H, d.Hkv)]

    fwd = groups(BAND_QUERY_TILE)
    written = all(w for *_, (_, w) in fwd)
    bwd = [(*g[:4], g[4][0]) for g in groups(BAND_QUERY_TILE_BWD)] if grad else None
    if padded:  # padded rows can hold anything (fp16 overflow): zeros reach no output
        keep = key_padding_mask[:, None, :, None]
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, [(*g[:4], g[4][0]) for g in fwd], bwd, s, key_padding_mask, written,
                                       sinks, None if softcap is None else float(softcap))


def check_sinks(sinks: object, H: int) -> None:
    """``sinks`` must be None or a float tensor [H] (one logit per query head)."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a float tensor [H] (one logit per query head), got "
                        f"{getattr(sinks, 'dtype', type(sinks).__name__)}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape [H] = [{H}] (query heads), got {tuple(sinks.shape)}")


def check_softcap(softcap: object) -> None:
    """``softcap`` must be None or a number > 0."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float > 0, got {softcap!r}")
    if not softcap > 0 or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite float > 0, got {softcap!r}")


BACKENDS = ("auto", "engine", "flex")


def _use_flex(backend: str, q: Tensor, k_positions: Tensor | None, terms: bool = False) -> bool:
    """Does this call run on FlexAttention (see :func:`pattern_attention`'s ``backend``)?
    ``terms``: sinks or softcap are given (the engine's, not Flex's here)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "flex" and terms:
        raise ValueError("backend='flex' does not take sinks or softcap here: use backend='engine' or 'auto'")
    if backend == "engine" or terms or (backend == "auto" and q.device.type != "cuda"):
        return False
    from longattn.ops.flex import flex_available

    if not flex_available():
        if backend == "flex":
            raise ValueError("backend='flex' needs FlexAttention (torch >= 2.5)")
        return False
    if k_positions is not None:
        if backend == "flex":
            raise ValueError("backend='flex' takes the whole key sequence (k_positions is the engine's)")
        return False
    return True


def _positions(d, n: int | None, q_start: int | None, k_positions: Tensor | None) -> tuple[int, int]:
    """Validate the position arguments of :func:`pattern_attention`; (n, q_start)."""
    if k_positions is None:
        n = d.Nk if n is None else n
        if n != d.Nk:
            raise ValueError(f"n ({n}) must equal the number of keys ({d.Nk}) unless k_positions is given")
    else:
        if not isinstance(k_positions, Tensor) or k_positions.dim() != 1 or k_positions.numel() != d.Nk:
            raise ValueError(f"k_positions must be a 1-D LongTensor of the {d.Nk} key positions, "
                             f"got {getattr(k_positions, 'shape', k_positions)!r}")
        if n is None:
            raise ValueError("n (the length the pattern is laid over) is required with k_positions")
        if d.Nk > 1 and bool((k_positions[1:] <= k_positions[:-1]).any()):
            raise ValueError("k_positions must be strictly increasing")
        if int(k_positions[0]) < 0 or int(k_positions[-1]) >= n:
            raise ValueError(f"k_positions must lie in [0, n={n}), got [{int(k_positions[0])}, {int(k_positions[-1])}]")
    q0 = n - d.Nq if q_start is None else q_start
    if isinstance(q0, bool) or not isinstance(q0, int) or q0 < 0 or q0 + d.Nq > n:
        raise ValueError(f"q_start must be an int with 0 <= q_start and q_start + Nq <= n; "
                         f"got q_start={q_start!r}, Nq={d.Nq}, n={n}")
    return n, q0


def _kv_groups(pattern: Pattern, H: int, Hkv: int) -> list[tuple[int, int, int, int, Pattern]]:
    """Head groups (first head, heads, first kv head, kv heads, pattern): query head h
    reads kv head h // (H // Hkv)."""
    g = H // Hkv
    out = []
    for h0, nh, p in _head_groups(pattern, 0, H):
        if h0 % g == 0 and nh % g == 0:
            out.append((h0, nh, h0 // g, nh // g, p))
        elif h0 // g == (h0 + nh - 1) // g:
            out.append((h0, nh, h0 // g, 1, p))
        else:
            raise ValueError(
                f"the per-head pattern's group of heads [{h0}, {h0 + nh}) straddles kv heads "
                f"(H={H}, kv heads={Hkv}, {g} query heads each): use a head count per pattern "
                f"that is a multiple or a divisor of {g}"
            )
    return out


def _head_groups(pattern: Pattern, h0: int, heads: int) -> list[tuple[int, int, Pattern]]:
    """Per-head lists flattened to (first head, heads, pattern) groups."""
    split = pattern.heads_split(heads)
    if split is None:
        return [(h0, heads, pattern)]
    return [g for s0, nh, p in split for g in _head_groups(p, h0 + s0, nh)]
