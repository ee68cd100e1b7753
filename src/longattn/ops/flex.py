"""Exact patterns through PyTorch FlexAttention, with block masks built from our own
components.

:func:`block_mask_for` turns a :class:`longattn.patterns.Pattern` into a
``torch.nn.attention.flex_attention.BlockMask`` by index math on the pattern's
engine components (:class:`~longattn.patterns.Band`, :class:`~longattn.patterns.Gather`):
per query block, the key blocks where every pair is visible ("full": Flex runs
them unmasked) and the key blocks that are only partly visible ("partial": Flex
evaluates the mask_mod inside them). Nothing evaluates the predicate over N x N
pairs and ``create_block_mask`` is never called: the work and the memory are
proportional to the visible blocks (plus O(N) per-position tables).

The mask_mod is the pattern's predicate, written point by point (a table lookup
instead of ``isin`` or an ``any`` over drawn blocks, which Flex cannot lower), with
the pattern's integers held in 0-d tensors so that one compiled kernel serves every
instance of a pattern kind.

:func:`flex_pattern_attention` runs ``flex_attention`` (compiled with dynamic shapes,
one compiled wrapper per pattern kind, cached) with that mask. On CUDA it has a
forward and a backward; on the CPU, compiled Flex has a forward only (fp32, bf16,
fp16), is compiled per shape with static shapes, and runs on q, k, v zero-padded to
whole blocks (``pad_to_blocks``): at some lengths off the block grid it returned wrong
rows or NaN (issue 29), and padded lengths share their compiled kernels.

Conventions (docs/design.md sections 3, 4, 7): positions are 0-based; with Nq < Nk the
queries are the last Nq positions (bottom-right, FlashAttention >= 2.1); padded keys
(``key_padding_mask`` False) get no weight; ``segment_ids`` packs documents: each
document is attended as if run alone, positions restarting at its first token.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import Tensor

from longattn import patterns as P
from longattn.ops._softmax import merge_by_lse
from longattn.patterns import Band, Gather, Pattern

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None  # type: ignore[assignment]
    flex_attention = None  # type: ignore[assignment]
try:  # torch >= 2.9: return_aux (return_lse is deprecated)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover
    AuxRequest = None  # type: ignore[assignment]

__all__ = ["block_mask_for", "split_block_mask_for", "SplitBlockMask", "flex_pattern_attention", "flex_available",
           "expand_block_mask"]

_BIG = 1 << 62


def flex_available() -> bool:
    """True when this torch has FlexAttention (torch >= 2.5)."""
    return flex_attention is not None


# ----------------------------------------------------------------------------------------
# Head groups and components tagged "cartesian"
# ----------------------------------------------------------------------------------------


def _head_groups(pattern: Pattern, h0: int, heads: int) -> list[tuple[int, int, Pattern]]:
    """Per-head lists flattened to (first head, heads, pattern) groups."""
    split = pattern.heads_split(heads)
    if split is None:
        return [(h0, heads, pattern)]
    return [g for s0, nh, p in split for g in _head_groups(p, h0 + s0, nh)]


def _classes(*names: str) -> tuple[type, ...]:
    return tuple(c for c in (getattr(P, n, None) for n in names) if isinstance(c, type))


# Leaves whose Gather components cover exactly the product of each row's query and key
# positions (so a block wholly inside both lists is provably full).
_CARTESIAN = _classes("GlobalTokens", "RandomBlocks", "_BlockWindow")
_TWO_KIND = _classes("_TwoKindHeads")


def _components(p: Pattern, n: int, heads: int) -> Iterator[tuple[object, bool]]:
    """The pattern's components at length n, each with "its Gather coverage is the
    product of its query and key lists" (False when not known). A union's parts are
    made one after the other, so only one part's position tables live at a time."""
    if isinstance(p, P.Union):
        for part in p.parts:
            yield from _components(part, n, heads)
        return
    if _TWO_KIND and isinstance(p, _TWO_KIND) and hasattr(p, "_inner"):
        yield from _components(p._inner, n, heads)
        return
    ranges = _range_components(p, n, heads)
    if ranges is not None:
        yield from ((c, True) for c in ranges)
        return
    cart = bool(_CARTESIAN) and isinstance(p, _CARTESIAN)
    comps = list(p.components(n, heads))  # a copy: the pattern may keep its own list
    while comps:
        c = comps.pop(0)  # drop each table once used (unless the pattern keeps it)
        yield c, cart and isinstance(c, Gather)


# ----------------------------------------------------------------------------------------
# Block records: (batch, head, query block, key block, full)
# ----------------------------------------------------------------------------------------


@dataclass
class _Grid:
    n: int  # keys (positions 0..n-1)
    nq: int  # queries: positions q0 .. n-1
    b: int  # block size (query and key)

    @property
    def q0(self) -> int:
        return self.n - self.nq

    @property
    def QB(self) -> int:
        return -(-self.nq // self.b)

    @property
    def KB(self) -> int:
        return -(-self.n // self.b)


class _Records:
    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []

    def add(self, bi: int, h: Tensor, qb: Tensor, kb: Tensor, full: Tensor) -> None:
        if qb.numel():
            self.parts.append((torch.full_like(qb, bi).reshape(-1), h.expand(qb.shape).reshape(-1),
                               qb.reshape(-1), kb.reshape(-1), full.expand(qb.shape).reshape(-1)))

    def cat(self) -> tuple[Tensor, ...]:
        if not self.parts:
            z = torch.zeros(0, dtype=torch.long)
            return z, z, z, z, torch.zeros(0, dtype=torch.bool)
        return tuple(torch.cat([p[k].reshape(-1) for p in self.parts]) for k in range(5))


def _ranges_to_blocks(g: _Grid, t: Tensor, klo: Tensor, khi: Tensor, flo: Tensor, fhi: Tensor,
                      full_ok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query blocks ``t`` with global key ranges [klo, khi] (touched) and [flo, fhi]
    (every pair visible when ``full_ok``) -> (qb, kb, full) per touched key block."""
    keep = klo <= khi
    t, klo, khi, flo, fhi, full_ok = (x[keep] for x in (t, klo, khi, flo, fhi, full_ok))
    b0, b1 = klo // g.b, khi // g.b
    cnt = b1 - b0 + 1
    if cnt.numel() == 0:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, torch.zeros(0, dtype=torch.bool)
    rep = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    kb = b0[rep] + (torch.arange(rep.numel()) - first[rep])
    k_first = kb * g.b
    k_last = torch.clamp((kb + 1) * g.b, max=g.n) - 1
    full = full_ok[rep] & (k_first >= flo[rep]) & (k_last <= fhi[rep])
    return t[rep], kb, full


def _band_records(c: Band, g: _Grid, s: int, L: int, causal: bool, t: Tensor, I0: Tensor, I1: Tensor,
                  qwhole: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Key blocks of a band for query blocks ``t`` whose rows in this document are the
    local positions [I0, I1]; ``qwhole``: the block's rows all lie in the document."""
    a, e = min(c.before, L), min(c.after, L)
    kind, d = c.grouping.kind, c.grouping.d
    empty = torch.empty(0, dtype=torch.long)
    if kind == "residue" and d == 1:
        kind = "all"
    if kind == "all":
        lo, hi = (I0 - a).clamp(min=0), (I1 + e).clamp(max=L - 1)
        flo, fhi = (I1 - a).clamp(min=0), (I0 + e).clamp(max=L - 1)
        if causal:
            hi, fhi = torch.minimum(hi, I1), torch.minimum(fhi, I0)
        return _ranges_to_blocks(g, t, lo + s, hi + s, flo + s, fhi + s, qwhole)
    if kind == "chunk":
        c0, c1 = I0 // d, I1 // d
        cnt = c1 - c0 + 1
        rep = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
        gi = c0[rep] + (torch.arange(rep.numel()) - (torch.cumsum(cnt, 0) - cnt)[rep])
        x0, x1 = torch.maximum(I0[rep], gi * d), torch.minimum(I1[rep], gi * d + d - 1)
        top = torch.clamp(gi * d + d - 1, max=L - 1)
        lo, hi = torch.maximum(gi * d, x0 - a), torch.minimum(top, x1 + e)
        flo, fhi = torch.maximum(gi * d, x1 - a), torch.minimum(top, x0 + e)
        if causal:
            hi, fhi = torch.minimum(hi, x1), torch.minimum(fhi, x0)
        ok = qwhole[rep] & (x0 == I0[rep]) & (x1 == I1[rep])
        return _ranges_to_blocks(g, t[rep], lo + s, hi + s, flo + s, fhi + s, ok)
    if kind == "residue":  # j - i in {k d : -a <= k <= e}; never full for d > 1
        w = int((I1 - I0).max()) + 1 if I0.numel() else 0
        if w >= d:  # the shifted copies of the row range overlap: one contiguous range
            lo, hi = (I0 - a * d).clamp(min=0), (I1 + e * d).clamp(max=L - 1)
            if causal:
                hi = torch.minimum(hi, I1)
            return _ranges_to_blocks(g, t, lo + s, hi + s, hi + 1 + s, hi + s, torch.zeros_like(qwhole))
        kmin = torch.maximum(torch.full_like(I1, -a), torch.div(-I1, d, rounding_mode="floor"))
        kmax = torch.minimum(torch.full_like(I0, e), torch.div(L - 1 - I0, d, rounding_mode="floor"))
        if causal:
            kmax = torch.minimum(kmax, torch.zeros_like(kmax))
        cnt = (kmax - kmin + 1).clamp(min=0)
        rep = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
        k = kmin[rep] + (torch.arange(rep.numel()) - (torch.cumsum(cnt, 0) - cnt)[rep])
        lo, hi = (I0[rep] + k * d).clamp(min=0), (I1[rep] + k * d).clamp(max=L - 1)
        if causal:
            hi = torch.minimum(hi, I1[rep])
        return _ranges_to_blocks(g, t[rep], lo + s, hi + s, hi + 1 + s, hi + s, torch.zeros_like(rep, dtype=torch.bool))
    raise ValueError(f"unknown band grouping {kind!r}")  # pragma: no cover
    return empty, empty, torch.empty(0, dtype=torch.bool)


_ROW_CHUNK = 1 << 19  # elements of a position table converted to blocks at a time


def _compact(x: Tensor, new: Tensor, valid: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of x [R, M]: the entries where ``new`` (packed left, -1 padded) [R, U]
    and the sum of ``weight`` over each one's run (an entry and the ``valid``,
    not ``new`` ones after it) [R, U]."""
    rank = torch.cumsum(new, 1) - 1
    U = max(int(rank[:, -1].max()) + 1 if rank.numel() else 0, 1)
    u = torch.full((x.shape[0], U + 1), -1, dtype=torch.long)
    cnt = torch.zeros((x.shape[0], U + 1), dtype=torch.long)
    u.scatter_(1, rank.masked_fill(~new, U), x.masked_fill(~new, -1))
    cnt.scatter_add_(1, rank.masked_fill(~valid, U), weight.masked_fill(~valid, 0))
    return u[:, :U], cnt[:, :U]


def _unique_2d(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of x [R, M] (-1 = none): sorted distinct values [R, U] (-1 padded) and how
    often each occurs. Runs of equal neighbours are collapsed first (no sort), then
    only the few runs of rows out of order are sorted."""
    valid = x >= 0
    new = valid.clone()
    new[:, 1:] &= x[:, 1:] != x[:, :-1]
    u, cnt = _compact(x, new, valid, valid.long())
    if u.shape[1] == 1:
        return u, cnt
    key = u.masked_fill(u < 0, _BIG)
    bad = (key[:, 1:] < key[:, :-1]).any(1)
    if bool(bad.any()):
        ks, order = key[bad].sort(1)
        key[bad], cnt[bad] = ks, cnt[bad].gather(1, order)
    u = key.masked_fill(key == _BIG, -1)
    valid = u >= 0
    new = valid.clone()
    new[:, 1:] &= u[:, 1:] != u[:, :-1]
    if bool((new == valid).all()):
        return u, cnt
    return _compact(u, new, valid, cnt)


def _row_blocks(pos: Tensor, lo: int, hi: int, shift: int, b: int) -> tuple[Tensor, Tensor]:
    """Per row of a position table pos [..., M] (-1 = none): the distinct blocks
    (pos + shift) // b of the positions in [lo, hi), sorted [..., U] (-1 padded), and
    how many positions fall in each [..., U]. Rows go in chunks of ~_ROW_CHUNK
    elements, so the temporaries stay a few MB whatever the table's size."""
    lead, M = pos.shape[:-1], pos.shape[-1]
    flat = pos.reshape(-1, M)
    step = max(1, _ROW_CHUNK // max(M, 1))
    pow2 = b & (b - 1) == 0
    parts = []
    for r in range(0, flat.shape[0], step):
        x = flat[r : r + step]
        y = (x + shift) >> (b.bit_length() - 1) if pow2 else torch.div(x + shift, b, rounding_mode="floor")
        parts.append(_unique_2d(y.masked_fill_((x < lo) | (x >= hi), -1)))
    U = max(p[0].shape[1] for p in parts)
    u = torch.cat([torch.nn.functional.pad(p[0], (0, U - p[0].shape[1]), value=-1) for p in parts])
    cnt = torch.cat([torch.nn.functional.pad(p[1], (0, U - p[1].shape[1])) for p in parts])
    return u.view(*lead, U), cnt.view(*lead, U)


def _gather_records(c: Gather, cart: bool, g: _Grid, s: int, L: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(head or 0, qb, kb, full) for a Gather of a document at offset s, length L.

    ``cart``: the component covers exactly the product of each row's query and key
    positions (rows hold distinct queries, each row distinct keys), so the pairs it
    covers in a block can be counted: the block is full when they are all of it.
    Cost: O(positions in the tables) time, a few MB of temporaries, then
    O(touched blocks)."""
    hs, qbs, kbs, areas = [], [], [], []
    for qpos, kpos in c.blocks():
        qu, qc = _row_blocks(qpos, max(0, g.q0 - s), L, s - g.q0, g.b)  # [T, Uq]
        live = qu[:, 0] >= 0  # rows with a query present
        if not bool(live.any()):
            continue
        if not bool(live.all()):
            qu, qc = qu[live], qc[live]
            if kpos.shape[1] == live.numel() and kpos.shape[1] > 1:
                kpos = kpos[:, live]
        ku, kc = _row_blocks(kpos, 0, L, s, g.b)  # [Hk, T or 1, Uk]
        Hk, T = ku.shape[0], qu.shape[0]
        pq = qu[None, :, :, None].expand(Hk, T, qu.shape[-1], ku.shape[-1])
        pk = ku[:, :, None, :].expand(Hk, T, qu.shape[-1], ku.shape[-1])
        ok = (pq >= 0) & (pk >= 0)
        area = qc[None, :, :, None] * kc[:, :, None, :]
        h = torch.arange(Hk)[:, None, None, None].expand_as(pq)
        hs.append(h[ok])
        qbs.append(pq[ok])
        kbs.append(pk[ok])
        areas.append(area.expand_as(pq)[ok])
    if not qbs:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, z, torch.zeros(0, dtype=torch.bool)
    h, qb, kb, area = (torch.cat(x) for x in (hs, qbs, kbs, areas))
    if not cart:
        return h, qb, kb, torch.zeros_like(qb, dtype=torch.bool)
    return _cart_full(h, qb, kb, area, g)  # the pairs covered in each block, summed over rows


@dataclass
class _Ranges:
    """A component whose coverage is the product of each row's query and key
    positions, given by ranges instead of position tables: row t holds the queries
    [qlo[t], qhi[t]] and, in head h, the keys of the ranges [klo[h, t', m],
    khi[h, t', m]] (t' = t, or 0 when klo has one row for all; empty when lo > hi);
    Hk = 1 (all heads) or the heads. Positions are local to the document."""

    qlo: Tensor
    qhi: Tensor
    klo: Tensor
    khi: Tensor


def _range_components(p: Pattern, L: int, heads: int) -> list[_Ranges] | None:
    """Random blocks, block windows and global tokens as :class:`_Ranges` (O(blocks)
    numbers, where their Gather components list every position: O(N) tables); None
    for another pattern."""
    bw = _classes("_BlockWindow")
    if isinstance(p, P.RandomBlocks) or (bw and isinstance(p, bw)):
        bp = p.block
        t = torch.arange(-(-L // bp))
        qlo, qhi = t * bp, torch.clamp((t + 1) * bp, max=L) - 1
        if isinstance(p, P.RandomBlocks):
            tab = p.table(L, heads)  # [H, T, r] drawn key blocks, -1 = none
            if tab.shape[-1] == 0:
                return []
            klo = torch.where(tab >= 0, tab * bp, torch.full_like(tab, L))
            return [_Ranges(qlo, qhi, klo, torch.clamp(klo + bp, max=L) - 1)]
        klo = ((t - p.radius).clamp(min=0) * bp)[None, :, None]
        return [_Ranges(qlo, qhi, klo, (torch.clamp((t + p.radius + 1) * bp, max=L) - 1)[None, :, None])]
    if isinstance(p, P.GlobalTokens):
        idx = torch.unique(p.indices[(p.indices >= 0) & (p.indices < L)])
        if idx.numel() == 0:
            return []
        first = torch.ones_like(idx, dtype=torch.bool)
        first[1:] = idx[1:] != idx[:-1] + 1
        lo = idx[first]  # runs of consecutive global positions [lo, hi]
        hi = idx[torch.cat([first[1:], torch.ones(1, dtype=torch.bool)])]
        one = torch.zeros(1, dtype=torch.long)
        return [_Ranges(lo, hi, one.view(1, 1, 1), (one + L - 1).view(1, 1, 1)),  # rows see every key
                _Ranges(one, one + L - 1, lo.view(1, 1, -1), hi.view(1, 1, -1))]  # every query sees them
    return None


def _pieces(lo: Tensor, hi: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ranges [lo, hi] (flat, empty when lo > hi) cut at multiples of b: (range number,
    block, positions of the range in the block) per piece. O(pieces)."""
    keep = torch.nonzero(lo <= hi).flatten()
    lo, hi = lo[keep], hi[keep]
    b0, b1 = torch.div(lo, b, rounding_mode="floor"), torch.div(hi, b, rounding_mode="floor")
    cnt = b1 - b0 + 1
    rep = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
    blk = b0[rep] + torch.arange(rep.numel()) - (torch.cumsum(cnt, 0) - cnt)[rep]
    size = torch.minimum(hi[rep], blk * b + b - 1) - torch.maximum(lo[rep], blk * b) + 1
    return keep[rep], blk, size


def _range_records(c: _Ranges, g: _Grid, s: int, L: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(head or 0, qb, kb, full) of a :class:`_Ranges` component of the document at
    offset s, length L. O(touched blocks)."""
    qlo = torch.clamp(c.qlo, min=max(0, g.q0 - s)) + (s - g.q0)  # Flex rows; absent queries cut
    tq, qb, qn = _pieces(qlo, torch.clamp(c.qhi, max=L - 1) + (s - g.q0), g.b)
    Hk, Tk, M = c.klo.shape
    e, kb, kn = _pieces(c.klo.clamp(min=0).reshape(-1) + s, c.khi.clamp(max=L - 1).reshape(-1) + s, g.b)
    hk, tk = e // (Tk * M), (e // M) % Tk
    if Tk == 1:  # one key list for every row
        tq = torch.zeros_like(tq)
    T = int(max(int(tq.max()) if tq.numel() else 0, int(tk.max()) if tk.numel() else 0)) + 1
    order = torch.argsort(tk, stable=True)
    hk, tk, kb, kn = hk[order], tk[order], kb[order], kn[order]
    nq, nk = torch.bincount(tq, minlength=T), torch.bincount(tk, minlength=T)
    qstart, kstart = torch.cumsum(nq, 0) - nq, torch.cumsum(nk, 0) - nk
    pairs = nq * nk
    row = torch.repeat_interleave(torch.arange(T), pairs)
    loc = torch.arange(row.numel()) - (torch.cumsum(pairs, 0) - pairs)[row]
    iq = qstart[row] + torch.div(loc, nk[row], rounding_mode="floor")
    ik = kstart[row] + loc % nk[row].clamp(min=1)
    return _cart_full(hk[ik], qb[iq], kb[ik], qn[iq] * kn[ik], g)


def _cart_full(h: Tensor, qb: Tensor, kb: Tensor, area: Tensor, g: _Grid) -> tuple[Tensor, ...]:
    """Records (h, qb, kb) with the pairs each covers (rows disjoint): one per block,
    full when its pairs are the whole block."""
    code = (h * g.QB + qb) * g.KB + kb
    uniq, inv = torch.unique(code, return_inverse=True)
    tot = torch.zeros(uniq.numel(), dtype=torch.long).index_add_(0, inv, area)
    kb = uniq % g.KB
    qb = (uniq // g.KB) % g.QB
    h = uniq // (g.KB * g.QB)
    rows = torch.clamp(g.nq - qb * g.b, max=g.b)
    keys = torch.clamp(g.n - kb * g.b, max=g.b)
    return h, qb, kb, tot == rows * keys


def _documents(segment_ids: Tensor | None, B: int, n: int) -> list[list[tuple[int, int]]]:
    """Per batch row: the documents as (start, length)."""
    if segment_ids is None:
        return [[(0, n)]]
    ids = segment_ids.to("cpu")
    out = []
    for bi in range(B):
        change = torch.nonzero(ids[bi, 1:] != ids[bi, :-1]).flatten() + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.long), change]).tolist()
        ends = starts[1:] + [n]
        out.append([(s0, s1 - s0) for s0, s1 in zip(starts, ends)])
    return out


def _records(pattern: Pattern, g: _Grid, heads: int, causal: bool,
             docs: list[list[tuple[int, int]]]) -> tuple[tuple[Tensor, ...], bool]:
    """Every touched (batch, head, qb, kb, full); whether the heads differ."""
    groups = _head_groups(pattern, 0, heads)
    per_head = len(groups) > 1 or any(p.head_dependent for _, _, p in groups)
    rec = _Records()
    qb_all = torch.arange(g.QB)
    qfirst = g.q0 + qb_all * g.b  # first position of each query block
    qlast = g.q0 + torch.clamp((qb_all + 1) * g.b, max=g.nq) - 1
    for bi, row in enumerate(docs):
        for s, L in row:
            if s + L <= g.q0:  # no query of this document is present
                continue
            t0 = (max(s, g.q0) - g.q0) // g.b
            t1 = (s + L - 1 - g.q0) // g.b
            t = qb_all[t0 : t1 + 1]
            I0 = torch.clamp(qfirst[t], min=s) - s
            I1 = torch.clamp(qlast[t], max=s + L - 1) - s
            qwhole = (qfirst[t] >= s) & (qlast[t] <= s + L - 1)
            for h0, nh, p in groups:
                p.prepare(L, nh, causal)
                hbase = torch.tensor(h0 if per_head else 0)
                for c, cart in _components(p, L, nh):
                    inner = getattr(c, "inner", c)  # a restricted component: always partial
                    restricted = inner is not c
                    if isinstance(inner, Band):
                        qb, kb, full = _band_records(inner, g, s, L, causal, t, I0, I1, qwhole)
                        if restricted:
                            full = torch.zeros_like(full)
                        if per_head and nh > 1:
                            hh = torch.arange(nh)[:, None] + h0
                            rec.add(bi, hh.expand(nh, qb.numel()), qb.expand(nh, -1), kb.expand(nh, -1),
                                    full.expand(nh, -1))
                        else:
                            rec.add(bi, hbase.expand(qb.shape), qb, kb, full)
                    elif isinstance(inner, (Gather, _Ranges)):
                        hk, qb, kb, full = (_range_records(inner, g, s, L) if isinstance(inner, _Ranges) else
                                            _gather_records(inner, cart and not restricted, g, s, L))
                        if restricted:
                            full = torch.zeros_like(full)
                        one_head_list = bool(qb.numel()) and int(hk.max()) == 0 and _kpos_heads(inner) == 1
                        if per_head and nh > 1 and one_head_list:
                            hh = torch.arange(nh)[:, None] + h0
                            rec.add(bi, hh.expand(nh, qb.numel()), qb.expand(nh, -1), kb.expand(nh, -1),
                                    full.expand(nh, -1))
                        else:
                            rec.add(bi, hk + (h0 if per_head else 0), qb, kb, full)
                    else:  # pragma: no cover
                        raise TypeError(f"unknown component {type(inner).__name__}")
    return rec.cat(), per_head


def _kpos_heads(c: Gather | _Ranges) -> int:
    if isinstance(c, _Ranges):
        return c.klo.shape[0]
    return max(kpos.shape[0] for _, kpos in c.blocks())


# ----------------------------------------------------------------------------------------
# Point-by-point predicates for the mask_mod (Flex lowers pointwise code only)
# ----------------------------------------------------------------------------------------

_PointFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]  # (i, j, h, b, gi) -> bool


def _clip(x: Tensor, hi: Tensor) -> Tensor:
    """x limited to [0, hi] (tensor bounds: ``clamp`` with a tensor bound does not lower)."""
    return torch.minimum(x.clamp(min=0), hi)


def _c(x: int) -> Tensor:
    return torch.tensor(min(int(x), _BIG), dtype=torch.long)


def _pointwise(p: Pattern, heads: int, causal: bool, lengths: list[int], lidx: Tensor | None,
               n: int) -> tuple[_PointFn, str]:
    """The pattern's predicate on local positions (i, j), head h in [0, heads), batch
    b and global query position gi; and a structural name (its "kind")."""
    split = p.heads_split(heads)
    if split is not None:
        parts = [(h0, nh, *_pointwise(sub, nh, causal, lengths, lidx, n)) for h0, nh, sub in split]
        lo = [_c(h0) for h0, *_ in parts]
        hi = [_c(h0 + nh) for h0, nh, *_ in parts]
        fns = [f for *_, f, _ in parts]
        tail = _TWO_KIND and isinstance(p, _TWO_KIND)

        def per_head(i, j, h, b, gi):
            out = None
            for k, f in enumerate(fns):
                sel = (h >= lo[k]) & (h < hi[k])
                v = sel & f(i, j, (h - lo[k]).clamp(min=0), b, gi)
                out = v if out is None else out | v
            return out & (j <= i) if tail else out

        return per_head, "heads(" + ",".join(name for *_, name in parts) + ")"
    if isinstance(p, P.Union) or isinstance(p, P.Intersection):
        subs = [_pointwise(q, heads, causal, lengths, lidx, n) for q in p.parts]
        fns = [f for f, _ in subs]
        union = isinstance(p, P.Union)

        def combine(i, j, h, b, gi):
            out = fns[0](i, j, h, b, gi)
            for f in fns[1:]:
                out = (out | f(i, j, h, b, gi)) if union else (out & f(i, j, h, b, gi))
            return out

        return combine, ("or(" if union else "and(") + ",".join(nm for _, nm in subs) + ")"
    if _TWO_KIND and isinstance(p, _TWO_KIND):
        f, nm = _pointwise(p._inner, heads, causal, lengths, lidx, n)
        return (lambda i, j, h, b, gi: f(i, j, h, b, gi) & (j <= i)), f"causal({nm})"
    if isinstance(p, P.Full):
        return (lambda i, j, h, b, gi: j >= 0), "full"
    if isinstance(p, P.Causal):
        return (lambda i, j, h, b, gi: j <= i), "causal"
    if isinstance(p, P.Local):
        a, e = _c(p.before), _c(p.after)
        return (lambda i, j, h, b, gi: (j >= i - a) & (j <= i + e)), "local"
    if isinstance(p, P.Dilated):
        r, d = _c(p.radius * p.dilation), _c(p.dilation)
        return (lambda i, j, h, b, gi: ((j - i) % d == 0) & ((j - i).abs() <= r)), "dilated"
    if isinstance(p, P.Strided):
        d = _c(p.stride)
        return (lambda i, j, h, b, gi: (j - i) % d == 0), "strided"
    if isinstance(p, P.BlockDiagonal):
        d = _c(p.block)
        return (lambda i, j, h, b, gi: (i // d) == (j // d)), "block_diagonal"
    if isinstance(p, P.GlobalTokens):
        tab = torch.zeros(n, dtype=torch.bool)
        idx = p.indices[p.indices < n]
        tab[idx] = True
        top = _c(n - 1)
        return (lambda i, j, h, b, gi: tab[_clip(i, top)] | tab[_clip(j, top)]), "global"
    if isinstance(p, P.RandomBlocks):
        return _random_pointwise(p, heads, causal, lengths, lidx), f"random{p.blocks_per_row}"
    bw = _classes("_BlockWindow")
    if bw and isinstance(p, bw):
        blk, r = _c(p.block), _c(p.radius)
        return (lambda i, j, h, b, gi: ((j // blk) - (i // blk)).abs() <= r), "block_window"
    sc = _classes("_SummaryColumns")
    if sc and isinstance(p, sc):
        ll, cc = _c(p.l), _c(p.l - p.c)
        return (lambda i, j, h, b, gi: (j % ll >= cc) & (j <= i)), "summary_columns"
    # an unknown pattern: its own predicate (it must be pointwise for Flex to lower it)
    return (lambda i, j, h, b, gi: p.visible(i, j, h)), f"custom:{type(p).__qualname__}:{id(p)}"


def _random_pointwise(p, heads: int, causal: bool, lengths: list[int], lidx: Tensor | None) -> _PointFn:
    """Drawn-block membership unrolled over the r draws; with packed documents one
    table per distinct document length, stacked (row base looked up per position)."""
    tabs = []
    for L in lengths:
        try:
            tabs.append(p.table(L, heads, causal))
        except TypeError:  # an older table(n, heads)
            tabs.append(p.table(L, heads))
    r = tabs[0].shape[-1]
    base = torch.tensor([0] + [t.shape[1] for t in tabs[:-1]], dtype=torch.long).cumsum(0)
    tab = torch.cat(tabs, 1).contiguous() if tabs[0].numel() else tabs[0]
    blk = _c(p.block)
    hmax, rmax = _c(max(tab.shape[0] - 1, 0)), _c(max(tab.shape[1] - 1, 0))
    if r == 0:
        return lambda i, j, h, b, gi: j < 0
    multi = lidx is not None and len(lengths) > 1

    def member(i, j, h, b, gi):
        row = i // blk
        if multi:
            row = row + base[lidx[b, gi]]
        row = _clip(row, rmax)
        hh = _clip(h, hmax)
        kb = j // blk
        out = tab[hh, row, 0] == kb
        for s in range(1, r):
            out = out | (tab[hh, row, s] == kb)
        return out

    return member


# ----------------------------------------------------------------------------------------
# The BlockMask
# ----------------------------------------------------------------------------------------


def _lists(B: int, H: int, rows: int, key: tuple[Tensor, Tensor, Tensor], col: Tensor, width: int | None
           ) -> tuple[Tensor, Tensor]:
    """Group records by (b, h, row) -> counts [B, H, rows] and sorted column lists
    [B, H, rows, W] (W = the longest list, or ``width``)."""
    b, h, r = key
    flat = (b * H + h) * rows + r
    order = torch.argsort(flat * (_BIG >> 31) + col, stable=True) if flat.numel() else flat
    flat, col = flat[order], col[order]
    num = torch.bincount(flat, minlength=B * H * rows)
    start = torch.cumsum(num, 0) - num
    rank = torch.arange(flat.numel()) - start[flat]
    W = int(num.max()) if num.numel() and flat.numel() else 0
    W = max(W, 1) if width is None else max(width, W, 1)
    idx = torch.zeros(B * H * rows, W, dtype=torch.int32)
    idx[flat, rank] = col.to(torch.int32)
    return num.view(B, H, rows).to(torch.int32), idx.view(B, H, rows, W)


def block_mask_for(
    pattern: Pattern,
    n: int,
    heads: int,
    *,
    causal: bool = False,
    block: int = 128,
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    q_len: int | None = None,
    device: torch.device | str = "cpu",
    compact: bool | None = None,
    with_q_blocks: bool = True,
    pad_to_blocks: bool = False,
):
    """A FlexAttention ``BlockMask`` for ``pattern`` over ``n`` keys and ``heads`` heads,
    built from the pattern's components (never from N x N predicate evaluations).

    Every visible block is in the lists, so a row block that sees every key block
    (a global query block) makes the lists [QB, KB] wide: see
    :func:`split_block_mask_for` for the form that keeps them narrow.

    Args:
        pattern: any :class:`longattn.patterns.Pattern` (per-head lists included).
        n: number of keys (= positions the pattern is laid over).
        heads: query heads (the mask has H = heads when the pattern differs per head,
            else H = 1, broadcast).
        causal: intersect with j <= i (positions).
        block: Flex block size (query and key).
        key_padding_mask: bool [B, n], True = real key; padded keys are never visible.
        segment_ids: [B, n] integer ids, runs of equal ids are documents; each is
            attended as if run alone (positions restart at its first token).
        q_len: number of queries Nq <= n (default n); query row r is position
            n - q_len + r (bottom-right).
        device: where the mask tensors go.
        compact: kv/q index lists only as wide as the longest list (O(visible
            blocks)); False pads them to the number of blocks, which the CPU Flex
            kernel requires. Default: compact except on the CPU.
        with_q_blocks: also build the transposed (per key block) lists Flex needs for
            the backward pass (built sparsely here, not by Flex's dense transpose).
        pad_to_blocks: lay the mask over q and k zero-padded at the end to whole
            blocks: seq_lengths (QB * block, KB * block), padded keys never visible
            (the last key block, if cut, is partial), padded query rows to be sliced
            off. The visibility among real positions is that of (q_len, n). This is
            how :func:`flex_pattern_attention` runs the CPU's compiled Flex, which
            returned wrong rows or NaN at some lengths off the block grid (issue 29).

    Returns:
        ``BlockMask`` with seq_lengths (q_len, n) (see ``pad_to_blocks``), BLOCK_SIZE (block, block), the
        partial blocks in ``kv_num_blocks/kv_indices``, the full ones in
        ``full_kv_num_blocks/full_kv_indices`` and the pattern's predicate (with
        causal, padding and documents) as ``mask_mod``. Cost: O(visible blocks +
        N) time, and the lists, O(B H QB W) with W the longest list.
    """
    g, B, docs = _check_build(pattern, n, heads, block, q_len, key_padding_mask, segment_ids)
    recs, H = _visible_blocks(pattern, g, heads, causal, key_padding_mask, segment_ids, docs, B)
    mask_mod = _mask_mod(pattern, heads, causal, g, key_padding_mask, segment_ids, docs, torch.device(device),
                         pad_to_blocks)
    return _assemble(g, B, H, recs, mask_mod, device, compact, with_q_blocks, pad_to_blocks)


HEAVY_FACTOR = 4.0
HEAVY_MIN_BLOCKS = 16


@dataclass
class SplitBlockMask:
    """A BlockMask without its few dense ("heavy") query and key blocks.

    ``block_mask`` lists only the light query blocks x light key blocks (and its
    mask_mod says so too, for Flex's eager path, which reads the mask_mod alone); the
    pairs of a heavy query block (with any key) and of any query with a heavy key
    block are left to :func:`flex_pattern_attention`'s side computation, which
    evaluates ``mask_mod`` (the pattern's whole predicate, with causal, padding and
    documents) on those pairs only. ``heavy_q_blocks`` [Rq] and ``heavy_k_blocks`` [Rk] are
    block numbers (int64, CPU); blocks are ``block`` rows/keys, the last one cut at
    ``nq``/``n``. ``light_blocks``: how many blocks the lists hold (0: Flex has
    nothing to do).
    """

    block_mask: object
    mask_mod: Callable
    heavy_q_blocks: Tensor
    heavy_k_blocks: Tensor
    block: int
    n: int
    nq: int
    light_blocks: int

    def heavy_rows(self, device: torch.device | str = "cpu") -> Tensor:
        """Query rows (0-based rows of q, [R] int64) of the heavy query blocks."""
        return _block_positions(self.heavy_q_blocks, self.block, self.nq).to(device)

    def heavy_keys(self, device: torch.device | str = "cpu") -> Tensor:
        """Key positions ([C] int64) of the heavy key blocks."""
        return _block_positions(self.heavy_k_blocks, self.block, self.n).to(device)


def _block_positions(blocks: Tensor, block: int, limit: int) -> Tensor:
    """The positions [len(blocks) * block, cut at limit] of the given blocks, sorted."""
    pos = (blocks.sort().values[:, None] * block + torch.arange(block)).flatten()
    return pos[pos < limit]


def split_block_mask_for(
    pattern: Pattern,
    n: int,
    heads: int,
    *,
    causal: bool = False,
    block: int = 128,
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    q_len: int | None = None,
    device: torch.device | str = "cpu",
    compact: bool | None = None,
    with_q_blocks: bool = True,
    heavy_factor: float = HEAVY_FACTOR,
    heavy_min_blocks: int = HEAVY_MIN_BLOCKS,
    pad_to_blocks: bool = False,
) -> SplitBlockMask:
    """:func:`block_mask_for` with the dense rows and columns taken out of the lists.

    A query block is heavy when its list (the most key blocks it touches in any batch
    row and head) is longer than max(heavy_factor x the median list, heavy_min_blocks);
    a key block is heavy when as many query blocks touch it. Nothing depends on the
    pattern's name: BigBird's and Longformer's global rows and columns, a
    ``global`` pattern's, a per-head global head's are found by their counts. The
    lists then hold the rest: W is O(the typical row), not KB.

    Args:
        pattern, n, heads, causal, block, key_padding_mask, segment_ids, q_len,
            device, compact, with_q_blocks, pad_to_blocks: as :func:`block_mask_for`
            (``pad_to_blocks`` pads ``block_mask`` only: ``mask_mod`` and the heavy
            rows and keys stay on the real lengths).
        heavy_factor, heavy_min_blocks: the thresholds above.

    Returns:
        :class:`SplitBlockMask`. Cost: O(visible blocks + N) time; lists
        O(B H QB W_light) int32 (at N = 2^20, BigBird block 64: a few MB where the
        whole mask needs 512 MB).
    """
    g, B, docs = _check_build(pattern, n, heads, block, q_len, key_padding_mask, segment_ids)
    if not heavy_factor > 0 or isinstance(heavy_min_blocks, bool) or not isinstance(heavy_min_blocks, int):
        raise ValueError(f"heavy_factor must be > 0 and heavy_min_blocks an int, got {heavy_factor!r}, "
                         f"{heavy_min_blocks!r}")
    recs, H = _visible_blocks(pattern, g, heads, causal, key_padding_mask, segment_ids, docs, B)
    hq, hk = _heavy_blocks(recs, g, B, H, heavy_factor, heavy_min_blocks)
    if hq.numel() or hk.numel():
        keep = ~(_block_flags(hq, g.QB)[recs[2]] | _block_flags(hk, g.KB)[recs[3]])
        recs = tuple(x[keep] for x in recs)
    mask_mod = _mask_mod(pattern, heads, causal, g, key_padding_mask, segment_ids, docs, torch.device(device),
                         pad_to_blocks)
    light = _without_blocks(mask_mod, g, hq, hk, torch.device(device)) if hq.numel() or hk.numel() else mask_mod
    bm = _assemble(g, B, H, recs, light, device, compact, with_q_blocks, pad_to_blocks)
    return SplitBlockMask(bm, mask_mod, hq, hk, block, n, g.nq, int(recs[0].numel()))


def _block_flags(blocks: Tensor, count: int) -> Tensor:
    """[count] bool, True at the given block numbers."""
    flags = torch.zeros(count, dtype=torch.bool)
    flags[blocks] = True
    return flags


def _without_blocks(mask_mod: Callable, g: _Grid, hq: Tensor, hk: Tensor, device: torch.device) -> Callable:
    """mask_mod AND (query block not in hq) AND (key block not in hk): two table
    lookups, evaluated by Flex in partial blocks only."""
    qtab, ktab = _block_flags(hq, g.QB).to(device), _block_flags(hk, g.KB).to(device)
    bt, qtop, ktop = _c(g.b).to(device), _c(g.QB - 1).to(device), _c(g.KB - 1).to(device)

    def light_mask_mod(b, h, q_idx, kv_idx):
        m = mask_mod(b, h, q_idx, kv_idx)
        return m & ~qtab[_clip(q_idx // bt, qtop)] & ~ktab[_clip(kv_idx // bt, ktop)]

    light_mask_mod.longattn_kind = ("light", mask_mod.longattn_kind)  # type: ignore[attr-defined]
    return light_mask_mod



def _heavy_blocks(recs: tuple[Tensor, ...], g: _Grid, B: int, H: int, factor: float, min_blocks: int
                  ) -> tuple[Tensor, Tensor]:
    """Heavy query blocks [Rq] and key blocks [Rk] (int64, sorted) from the
    deduplicated records (b, h, qb, kb, full): a block whose count (list length, or
    query blocks touching it; the most over b and h) exceeds max(factor x the median
    nonzero count, min_blocks). O(records + B H (QB + KB))."""
    bi, hi, qb, kb = recs[:4]
    out = []
    for idx, size in ((qb, g.QB), (kb, g.KB)):
        cnt = torch.bincount((bi * H + hi) * size + idx, minlength=B * H * size).view(B * H, size).amax(0)
        nz = cnt[cnt > 0]
        if nz.numel() == 0:
            out.append(torch.zeros(0, dtype=torch.long))
            continue
        lim = max(factor * float(nz.median()), float(min_blocks))
        out.append(torch.nonzero(cnt > lim).flatten())
    return out[0], out[1]


def _check_build(pattern: Pattern, n: int, heads: int, block: int, q_len: int | None,
                 key_padding_mask: Tensor | None, segment_ids: Tensor | None
                 ) -> tuple[_Grid, int, list[list[tuple[int, int]]]]:
    """Validate :func:`block_mask_for`'s arguments; (grid, batch B, documents per row)."""
    if BlockMask is None:  # pragma: no cover
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn.patterns.Pattern, got {type(pattern).__name__}")
    for name, val, lo in (("n", n, 1), ("heads", heads, 1), ("block", block, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    nq = n if q_len is None else q_len
    if isinstance(nq, bool) or not isinstance(nq, int) or not 1 <= nq <= n:
        raise ValueError(f"q_len must be an int with 1 <= q_len <= n={n}, got {q_len!r}")
    B = 1
    for name, t in (("key_padding_mask", key_padding_mask), ("segment_ids", segment_ids)):
        if t is not None:
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != n:
                raise ValueError(f"{name} must be a [B, {n}] tensor, got {getattr(t, 'shape', t)!r}")
            if B != 1 and t.shape[0] != B:
                raise ValueError(f"key_padding_mask and segment_ids disagree in batch: {B} vs {t.shape[0]}")
            B = t.shape[0]
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")
    if segment_ids is not None and (segment_ids.is_floating_point() or segment_ids.dtype == torch.bool):
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    return _Grid(n, nq, block), B, _documents(segment_ids, B, n)


def _visible_blocks(pattern: Pattern, g: _Grid, heads: int, causal: bool, key_padding_mask: Tensor | None,
                    segment_ids: Tensor | None, docs: list[list[tuple[int, int]]], B: int
                    ) -> tuple[tuple[Tensor, ...], int]:
    """Every visible block once, as (b, h, qb, kb, full) int64/bool vectors, after
    causal and padding; and H (heads when the pattern differs per head, else 1).
    O(visible blocks + B N)."""
    block, n, nq = g.b, g.n, g.nq
    (bi, hi, qb, kb, full), per_head = _records(pattern, g, heads, causal, docs)
    H = heads if per_head else 1
    if causal:  # keys after the last query of the block: none; full only below the first
        k_first = kb * block
        k_last = torch.clamp((kb + 1) * block, max=n) - 1
        q_first = g.q0 + qb * block
        q_last = g.q0 + torch.clamp((qb + 1) * block, max=nq) - 1
        keep = k_first <= q_last
        full = full & (k_last <= q_first)
        bi, hi, qb, kb, full = (x[keep] for x in (bi, hi, qb, kb, full))
    if key_padding_mask is not None:
        kpm = key_padding_mask.to("cpu")
        padk = torch.nn.functional.pad(kpm, (0, g.KB * block - n), value=False).view(B, g.KB, block)
        real = padk.sum(-1)
        size = torch.clamp(n - torch.arange(g.KB) * block, max=block)
        if bi.numel() and segment_ids is None:  # records are batch-free: one copy per row
            R = bi.numel()
            bi = torch.arange(B).repeat_interleave(R)
            hi, qb, kb, full = (x.repeat(B) for x in (hi, qb, kb, full))
        keep = real[bi, kb] > 0
        full = full & (real[bi, kb] == size[kb])
        bi, hi, qb, kb, full = (x[keep] for x in (bi, hi, qb, kb, full))
    # one record per (b, h, qb, kb): full when any record says full
    if bi.numel():
        code = ((bi * H + hi) * g.QB + qb) * g.KB + kb
        uniq, inv = torch.unique(code, return_inverse=True)
        full = torch.zeros(uniq.numel(), dtype=torch.bool).index_put_((inv,), full, accumulate=True)
        kb = uniq % g.KB
        rest = uniq // g.KB
        qb = rest % g.QB
        rest = rest // g.QB
        hi, bi = rest % H, rest // H
    return (bi, hi, qb, kb, full), H


def _assemble(g: _Grid, B: int, H: int, recs: tuple[Tensor, ...], mask_mod: Callable,
              device: torch.device | str, compact: bool | None, with_q_blocks: bool, padded: bool = False):
    """The BlockMask of the records (b, h, qb, kb, full): partial and full kv lists
    [B, H, QB, W] (and the transposed q lists [B, H, KB, W'] when ``with_q_blocks``),
    moved to ``device``. O(records log records) + the lists. ``padded``: laid over q
    and k padded to whole blocks (see :func:`_pad_to_blocks`)."""
    device = torch.device(device)
    if compact is None:
        compact = device.type != "cpu"
    bi, hi, qb, kb, full = recs
    seq_lengths = (g.nq, g.n)
    if padded:
        seq_lengths = (g.QB * g.b, g.KB * g.b)
        mask_mod = _pad_to_blocks(mask_mod, g, device)
        if g.n % g.b:  # the last key block holds padded keys: never full (Flex skips mask_mod there)
            full = full & (kb != g.KB - 1)
    part = ~full
    kv_w = None if compact else g.KB
    q_w = None if compact else g.QB
    kv_num, kv_idx = _lists(B, H, g.QB, (bi[part], hi[part], qb[part]), kb[part], kv_w)
    fkv_num, fkv_idx = _lists(B, H, g.QB, (bi[full], hi[full], qb[full]), kb[full], kv_w)
    to = lambda x: x.to(device)  # noqa: E731
    bm = BlockMask.from_kv_blocks(
        to(kv_num), to(kv_idx), to(fkv_num), to(fkv_idx), BLOCK_SIZE=(g.b, g.b), mask_mod=mask_mod,
        seq_lengths=seq_lengths, compute_q_blocks=False,
    )
    if with_q_blocks:  # the transposed lists, from the same records (Flex's own transpose is dense)
        q_num, q_idx = _lists(B, H, g.KB, (bi[part], hi[part], kb[part]), qb[part], q_w)
        fq_num, fq_idx = _lists(B, H, g.KB, (bi[full], hi[full], kb[full]), qb[full], q_w)
        bm.q_num_blocks, bm.q_indices = to(q_num), to(q_idx)
        bm.full_q_num_blocks, bm.full_q_indices = to(fq_num), to(fq_idx)
    return bm


def _pad_to_blocks(mask_mod: Callable, g: _Grid, device: torch.device) -> Callable:
    """``mask_mod`` for q and k padded to whole blocks (QB * block rows, KB * block
    keys): padded keys (kv_idx >= n) are never visible. (``mask_mod`` clips its own
    table lookups, as Flex evaluates it past the lengths in a cut block; padded query
    rows are sliced off by :func:`_light`.)"""
    n = _c(g.n).to(device)

    def padded_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (kv_idx < n)

    padded_mask_mod.longattn_kind = ("padded", mask_mod.longattn_kind)  # type: ignore[attr-defined]
    return padded_mask_mod


def _mask_mod(pattern: Pattern, heads: int, causal: bool, g: _Grid, kpm: Tensor | None,
              seg: Tensor | None, docs: list[list[tuple[int, int]]], device: torch.device, padded: bool = False):
    """mask_mod(b, h, q_idx, kv_idx): the predicate at (document-local) positions, with
    causal, padding and documents. ``padded``: its [B, N] tables are KB * block wide
    (lookups are clipped to n - 1 anyway), so that every length with as many blocks
    shares one static-shape compiled kernel."""
    n, q0 = g.n, g.q0
    if padded and kpm is not None:
        kpm = torch.nn.functional.pad(kpm, (0, g.KB * g.b - n), value=False)
    if seg is None:
        lengths, lidx, start = [n], None, None
    else:
        lengths = sorted({L for row in docs for _, L in row})
        where = {L: k for k, L in enumerate(lengths)}
        B = len(docs)
        width = g.KB * g.b if padded else n
        start = torch.zeros(B, width, dtype=torch.long)
        lidx = torch.zeros(B, width, dtype=torch.long)
        for bi, row in enumerate(docs):
            for s, L in row:
                start[bi, s : s + L] = s
                lidx[bi, s : s + L] = where[L]
    fn, kind = _pointwise(pattern, heads, causal, lengths, lidx, n)
    top, q0t = _c(n - 1).to(device), _c(q0).to(device)
    kpm_d = kpm.to(device) if kpm is not None else None
    start_d = start.to(device) if start is not None else None
    # move the closure's tensors to the device: rebuild with device tables
    fn = _to_device(fn, device)

    if start_d is None:
        def mask_mod(b, h, q_idx, kv_idx):
            i = q_idx + q0t
            j = kv_idx
            m = fn(i, j, h, b, i)
            if causal:
                m = m & (j <= i)
            if kpm_d is not None:
                m = m & kpm_d[b, _clip(j, top)]
            return m
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            gi = _clip(q_idx + q0t, top)
            gj = _clip(kv_idx, top)
            si = start_d[b, gi]
            m = (start_d[b, gj] == si) & fn(gi - si, gj - si, h, b, gi)
            if causal:
                m = m & (gj <= gi)
            if kpm_d is not None:
                m = m & kpm_d[b, gj]
            return m

    mask_mod.longattn_kind = (kind, causal, kpm is not None, seg is not None, q0 > 0)  # type: ignore[attr-defined]
    return mask_mod


def _to_device(fn, device: torch.device):
    """A copy of ``fn`` (and of the point functions it closes over) whose captured
    tensors live on ``device``."""
    if device.type == "cpu" or not isinstance(fn, types.FunctionType):
        return fn
    seen: dict[int, object] = {}

    def move(obj):
        if isinstance(obj, Tensor):
            return obj.to(device)
        if isinstance(obj, types.FunctionType):
            if id(obj) in seen:
                return seen[id(obj)]
            cells = None
            if obj.__closure__:
                cells = tuple(types.CellType(move(c.cell_contents)) if _has(c) else c for c in obj.__closure__)
            new = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, cells)
            seen[id(obj)] = new
            return new
        if isinstance(obj, list):
            return [move(x) for x in obj]
        if isinstance(obj, tuple):
            return tuple(move(x) for x in obj)
        return obj

    return move(fn)


def _has(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def expand_block_mask(bm, batch: int = 1, heads: int = 1) -> Tensor:
    """The dense bool mask [batch, heads, Nq, Nk] a BlockMask stands for: full blocks
    all visible, partial blocks AND-ed with its mask_mod, the rest invisible. For
    tests at small sizes (it is Nq x Nk by construction)."""
    nq, nk = bm.seq_lengths
    bq, bk = bm.BLOCK_SIZE
    QB, KB = -(-nq // bq), -(-nk // bk)
    part = torch.zeros(batch, heads, QB, KB, dtype=torch.bool)
    fullb = torch.zeros_like(part)
    for dst, num, idx in ((part, bm.kv_num_blocks, bm.kv_indices), (fullb, bm.full_kv_num_blocks, bm.full_kv_indices)):
        if num is None:
            continue
        num, idx = num.cpu().long(), idx.cpu().long()
        for b in range(batch):
            for h in range(heads):
                nb_, ib = num[min(b, num.shape[0] - 1), min(h, num.shape[1] - 1)], idx[min(b, idx.shape[0] - 1), min(h, idx.shape[1] - 1)]
                for t in range(QB):
                    cols = ib[t, : int(nb_[t])]
                    assert not bool(dst[b, h, t, cols].any()), "a key block listed twice"
                    dst[b, h, t, cols] = True
    assert not bool((part & fullb).any()), "a block both full and partial"
    i = torch.arange(QB * bq).clamp(max=nq - 1)[None, None, :, None]
    j = torch.arange(KB * bk).clamp(max=nk - 1)[None, None, None, :]
    bb = torch.arange(batch)[:, None, None, None]
    hh = torch.arange(heads)[None, :, None, None]
    dev = bm.kv_indices.device
    mm = bm.mask_mod(bb.to(dev), hh.to(dev), i.to(dev), j.to(dev)).cpu().expand(batch, heads, QB * bq, KB * bk)
    pb = part.repeat_interleave(bq, 2).repeat_interleave(bk, 3)
    fb = fullb.repeat_interleave(bq, 2).repeat_interleave(bk, 3)
    out = fb | (pb & mm)
    return out[:, :, :nq, :nk]


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------

_COMPILED: dict[object, Callable] = {}
_MASKS: dict[tuple, tuple[Pattern, object]] = {}
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the CPU Flex template takes
_SIDE_ELEMENTS = 1 << 23  # scores per chunk of the heavy rows/columns (fp32: 32 MiB)
_SIDE_MIN_STEP = 128  # ... but at least this many keys (rows) per chunk


def _flex_call(q, k, v, block_mask, scale, enable_gqa, lse=False):
    if not lse:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if AuxRequest is not None:  # torch >= 2.9
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                                  return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)


def _compiled(kind: object, dynamic: bool = True) -> Callable:
    """torch.compile(flex_attention) (with dynamic shapes unless ``dynamic=False``), one
    wrapper per pattern kind (a code object of its own, so each kind has its own compile
    cache and recompile budget)."""
    fn = _COMPILED.get(kind)
    if fn is None:
        code = _flex_call.__code__.replace(co_name=f"_flex_call_{len(_COMPILED)}")
        wrapper = types.FunctionType(code, _flex_call.__globals__, code.co_name, _flex_call.__defaults__)
        fn = torch.compile(wrapper, dynamic=dynamic)
        _COMPILED[kind] = fn
    return fn


def _light(q: Tensor, k: Tensor, v: Tensor, bm, scale: float, enable_gqa: bool, lse: bool):
    """Compiled Flex over the BlockMask's lists: out [B, H, Nq, Dv] (q's dtype), and
    with ``lse`` also the log-sum-exp [B, H, Nq] (fp32, natural log, -inf for a row
    whose lists show it no key). The CPU has neither a backward nor the lse."""
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise NotImplementedError("FlexAttention has no CPU backward: run under torch.no_grad() or on CUDA")
        if lse:
            raise NotImplementedError("compiled Flex on the CPU returns no log-sum-exp, which split=True (heavy "
                                      "rows and columns outside Flex) needs: use split=False on the CPU")
        if q.dtype not in _CPU_DTYPES:
            raise TypeError(f"compiled Flex on the CPU takes {', '.join(map(str, _CPU_DTYPES))} inputs, got "
                            f"q of {q.dtype}: use backend='engine' (or cast)")
    kind = getattr(bm.mask_mod, "longattn_kind", None)
    if q.device.type != "cpu":
        return _compiled((kind, q.dtype, enable_gqa, lse))(q, k, v, bm, scale, enable_gqa, lse)
    nq, (pq, pk) = q.shape[2], bm.seq_lengths
    # a mask built with pad_to_blocks: q and k zero-padded to whole blocks, the padded
    # rows sliced off (the padded keys are hidden by its mask_mod)
    q, k, v = (x.detach() if x.shape[2] == n else _pad_rows(x.detach(), n) for x, n in ((q, pq), (k, pk), (v, pk)))
    # torch 2.13's CPU Flex template fails to build (C++ error "cur_kvSplitSize4 was not
    # declared") when a dynamic-shape graph is recompiled for new shapes, or when a
    # mask table's length is a size symbol other than the key length (the padded case):
    # on the CPU every shape gets a wrapper of its own, compiled with static shapes.
    kind = (kind, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype)
    out = _compiled(kind, dynamic=False)(q, k, v, bm, scale, enable_gqa, lse)
    return out if out.shape[2] == nq else out[:, :, :nq]


def _pad_rows(x: Tensor, n: int) -> Tensor:
    """[B, H, N, D] -> [B, H, n, D], zero rows appended (n >= N)."""
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


# ----------------------------------------------------------------------------------------
# Heavy rows and columns, outside Flex
# ----------------------------------------------------------------------------------------


def _chunk_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of q [B, H, R, D] over k [B, Hkv, C, D], v [B, Hkv, C, Dv]
    (H % Hkv == 0, never repeated), mask broadcastable to [B, H, R, C]: out
    [B, H, R, Dv] and lse [B, H, R]; a row with no visible key gives zeros and
    lse -inf, and gradients without NaN. Memory O(B H R C)."""
    B, H, R, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    gq = H // Hkv
    s = torch.matmul(q.reshape(B, Hkv, gq * R, D), k.transpose(-1, -2)).view(B, H, R, C) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)  # a shift: out and lse do not depend on it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1)
    out = torch.matmul(p.view(B, Hkv, gq * R, C), v).view(B, H, R, v.shape[-1])
    seen = den > 0
    den1 = torch.where(seen, den, torch.ones_like(den))
    lse = torch.where(seen, m.squeeze(-1) + torch.log(den1), torch.full_like(den, float("-inf")))
    return out / den1[..., None], lse


def _merge(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Softmax attentions over disjoint key sets as one (:func:`longattn.ops._softmax.merge_by_lse`)."""
    if len(outs) == 1:
        return outs[0], lses[0]
    return merge_by_lse(torch.stack(outs), torch.stack(lses), 0)


def _masked_chunk(q: Tensor, k: Tensor, v: Tensor, *, mask_mod: Callable, rows: Tensor, keys: Tensor,
                  scale: float, work: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_chunk_attention` of q's ``rows`` over the ``keys`` (k, v already cut to
    them), with the mask from ``mask_mod`` on these pairs only, in ``work`` precision."""
    B, H = q.shape[:2]
    dev = q.device
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    mask = mask_mod(b, h, rows[None, None, :, None], keys[None, None, None, :])
    return _chunk_attention(q.to(work), k.to(work), v.to(work), mask, scale)


def _run(fn: Callable, *xs: Tensor):
    """fn(*xs), recomputed in the backward (checkpointed) when a gradient may follow,
    so that no chunk's scores are kept."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return torch.utils.checkpoint.checkpoint(fn, *xs, use_reentrant=False)
    return fn(*xs)


def _heavy_rows_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, mask_mod: Callable, scale: float,
                          work: torch.dtype) -> tuple[Tensor, Tensor]:
    """The query ``rows`` [R] (rows of q) over every key, in key chunks of
    ~_SIDE_ELEMENTS scores merged by their lse: out [B, H, R, Dv], lse [B, H, R].
    Time O(B H R Nk D); memory O(B H R (chunk + Nk / chunk x Dv))."""
    B, H = q.shape[:2]
    Nk = k.shape[2]
    qr = q.index_select(2, rows)
    step = max(_SIDE_MIN_STEP, _SIDE_ELEMENTS // (B * H * rows.numel()))
    outs, lses = [], []
    for c0 in range(0, Nk, step):
        c1 = min(Nk, c0 + step)
        keys = torch.arange(c0, c1, device=q.device)
        fn = functools.partial(_masked_chunk, mask_mod=mask_mod, rows=rows, keys=keys, scale=scale, work=work)
        o, lse = _run(fn, qr, k[:, :, c0:c1], v[:, :, c0:c1])
        outs.append(o)
        lses.append(lse)
    return _merge(outs, lses)


def _heavy_keys_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, mask_mod: Callable, scale: float,
                          work: torch.dtype) -> tuple[Tensor, Tensor]:
    """Every query over the ``keys`` [C] only, in query chunks of ~_SIDE_ELEMENTS
    scores: out [B, H, Nq, Dv], lse [B, H, Nq] (-inf where none is visible).
    Time O(B H Nq C D); memory O(B H (chunk + Nq Dv))."""
    B, H, Nq = q.shape[:3]
    kc, vc = k.index_select(2, keys), v.index_select(2, keys)
    step = max(_SIDE_MIN_STEP, _SIDE_ELEMENTS // (B * H * keys.numel()))
    outs, lses = [], []
    for r0 in range(0, Nq, step):
        r1 = min(Nq, r0 + step)
        rows = torch.arange(r0, r1, device=q.device)
        fn = functools.partial(_masked_chunk, mask_mod=mask_mod, rows=rows, keys=keys, scale=scale, work=work)
        o, lse = _run(fn, q[:, :, r0:r1], kc, vc)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _split_attention(q: Tensor, k: Tensor, v: Tensor, sbm: SplitBlockMask, scale: float, enable_gqa: bool,
                     light: Callable | None = None) -> Tensor:
    """Attention through a :class:`SplitBlockMask`: Flex over the light lists
    (``light``, default :func:`_light`), merged by lse with every query over the heavy
    key blocks; the heavy query blocks' rows then replaced by those rows over every
    key. Each pair is counted once: Flex sees light x light, the column part
    light-or-heavy rows x heavy keys, the row part overwrites heavy rows.
    Returns [B, H, Nq, Dv] in q's dtype; differentiable where ``light`` is."""
    light = _light if light is None else light
    rows, keys = sbm.heavy_rows(q.device), sbm.heavy_keys(q.device)
    if not rows.numel() and not keys.numel():
        return light(q, k, v, sbm.block_mask, scale, enable_gqa, False)
    work = torch.promote_types(q.dtype, torch.float32)
    B, H, Nq = q.shape[:3]
    if sbm.light_blocks:
        out, lse = light(q, k, v, sbm.block_mask, scale, enable_gqa, True)
        out, lse = out.to(work), lse.to(work)
    else:
        out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=work)
        lse = q.new_full((B, H, Nq), float("-inf"), dtype=work)
    if keys.numel():
        out_k, lse_k = _heavy_keys_attention(q, k, v, keys, sbm.mask_mod, scale, work)
        out, lse = _merge([out, out_k], [lse, lse_k])
    if rows.numel():
        out_r, _ = _heavy_rows_attention(q, k, v, rows, sbm.mask_mod, scale, work)
        out = out.index_copy(2, rows, out_r)
    return out.to(q.dtype)


def flex_pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    enable_gqa: bool = False,
    block: int = 128,
    compact: bool | None = None,
    split: bool | None = None,
    heavy_factor: float = HEAVY_FACTOR,
    heavy_min_blocks: int = HEAVY_MIN_BLOCKS,
) -> Tensor:
    """Exact attention restricted to ``pattern`` through compiled FlexAttention.

    With ``split`` (the default on CUDA), the few heavy query and key blocks (a
    global row or column: see :func:`split_block_mask_for`) are not in the BlockMask:
    Flex runs the rest and returns its log-sum-exp, every query is attended over the
    heavy key blocks in chunks (the pattern's predicate evaluated on those Nq x C
    pairs only) and merged with it by the lse, and the heavy rows are attended over
    every key in chunks (R x Nk pairs) and overwrite Flex's rows. The lists stay
    O(typical row) wide; the side work is O(B H (R Nk + Nq C) D) time and
    O(B H (Nq + R) Dv) memory plus a bounded chunk (recomputed in the backward).

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. Hkv < H needs
            ``enable_gqa=True`` and H % Hkv == 0 (query head h reads kv head
            h // (H // Hkv)).
        pattern, causal, key_padding_mask, segment_ids: as :func:`block_mask_for`;
            with Nq < Nk the queries are the last Nq positions.
        scale: default 1/sqrt(D).
        block, compact: as :func:`block_mask_for`.
        split: take heavy blocks out of Flex (default: on CUDA; the CPU's compiled
            Flex returns no lse, and its lists are padded to KB wide anyway).
        heavy_factor, heavy_min_blocks: as :func:`split_block_mask_for`.

    Returns:
        [B, H, Nq, Dv]; queries with no visible key give zeros. On CUDA
        differentiable; on the CPU forward only (compiled Flex has no CPU backward),
        fp32/bf16/fp16 only (TypeError otherwise), computed on q, k, v zero-padded to
        whole blocks (the padded keys masked, the padded rows sliced off).
    """
    if flex_attention is None:  # pragma: no cover
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    _check_qkv(q, k, v, enable_gqa)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    s = D ** -0.5 if scale is None else float(scale)
    split = _split_default(q.device) if split is None else bool(split)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # the CPU's compiled Flex (which runs unsplit: it returns no lse) gets whole blocks
    # only: at some lengths off the block grid (N = 8 mod 16 below one block) it
    # returned wrong rows or NaN (issue 29)
    pad = q.device.type == "cpu" and not split
    key = (id(pattern), Nk, H, causal, block, Nq, q.device, compact, grad, split, heavy_factor, heavy_min_blocks)
    cacheable = key_padding_mask is None and segment_ids is None
    hit = _MASKS.get(key) if cacheable else None
    sbm = hit[1] if hit is not None and hit[0] is pattern else None
    if sbm is None:
        sbm = split_block_mask_for(pattern, Nk, H, causal=causal, block=block, key_padding_mask=key_padding_mask,
                                   segment_ids=segment_ids, q_len=Nq, device=q.device, compact=compact,
                                   with_q_blocks=grad or q.device.type != "cpu",
                                   heavy_factor=heavy_factor, heavy_min_blocks=heavy_min_blocks if split else _BIG,
                                   pad_to_blocks=pad)
        if cacheable:
            if len(_MASKS) > 64:
                _MASKS.clear()
            _MASKS[key] = (pattern, sbm)
    return _split_attention(q, k, v, sbm, s, enable_gqa)


def _split_default(device: torch.device) -> bool:
    """Split heavy blocks out of Flex by default? Not on the CPU: its compiled Flex
    returns no log-sum-exp, and its lists are padded to KB wide anyway."""
    return device.type != "cpu"


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> None:
    """Ranks, shapes, dtypes and GQA of :func:`flex_pattern_attention`'s inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, N, D] tensor, got {getattr(t, 'shape', t)!r}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    B, H, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != Hkv or k.shape[-1] != D or v.shape[2] != Nk:
        raise ValueError(f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if Hkv != H and not (enable_gqa and H % Hkv == 0):
        raise ValueError(f"k/v have {Hkv} heads and q {H}: pass enable_gqa=True with H % Hkv == 0")
    if Nq > Nk:
        raise ValueError(f"Nq ({Nq}) must be <= Nk ({Nk}): queries are the last Nq positions")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
