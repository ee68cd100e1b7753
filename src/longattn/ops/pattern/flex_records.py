"""The visible blocks of a pattern, by index math on its engine components: the
records (batch, head, query block, key block, full) that
:mod:`longattn.ops.pattern.flex_mask` turns into a FlexAttention ``BlockMask``.

Per query block, the key blocks where every pair is visible ("full") and those only
partly visible ("partial"), from the pattern's :class:`~longattn.patterns.Band` and
:class:`~longattn.patterns.Gather` components (random blocks, block windows and
global tokens as ranges): nothing evaluates the predicate over N x N pairs. Cost
O(visible blocks + N) time; position tables converted a bounded chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from longattn import patterns as P
from longattn.patterns import Band, Gather, Pattern

BIG = 1 << 62


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
class Grid:
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


def _ranges_to_blocks(g: Grid, t: Tensor, klo: Tensor, khi: Tensor, flo: Tensor, fhi: Tensor,
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


def _band_records(c: Band, g: Grid, s: int, L: int, causal: bool, t: Tensor, I0: Tensor, I1: Tensor,
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
    key = u.masked_fill(u < 0, BIG)
    bad = (key[:, 1:] < key[:, :-1]).any(1)
    if bool(bad.any()):
        ks, order = key[bad].sort(1)
        key[bad], cnt[bad] = ks, cnt[bad].gather(1, order)
    u = key.masked_fill(key == BIG, -1)
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


def _gather_records(c: Gather, cart: bool, g: Grid, s: int, L: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


def _range_records(c: _Ranges, g: Grid, s: int, L: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


def _cart_full(h: Tensor, qb: Tensor, kb: Tensor, area: Tensor, g: Grid) -> tuple[Tensor, ...]:
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


def documents(segment_ids: Tensor | None, B: int, n: int) -> list[list[tuple[int, int]]]:
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


def _records(pattern: Pattern, g: Grid, heads: int, causal: bool,
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



def visible_blocks(pattern: Pattern, g: Grid, heads: int, causal: bool, key_padding_mask: Tensor | None,
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
