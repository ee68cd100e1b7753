"""Planning of the pattern engine: a pattern's components -> tile batches.

:class:`TileBatch` (T tiles of bq queries x K keys, with their kind and visibility),
:class:`View` (tiles that are strided views of the sequence), the band and gather
batches, :func:`plan` / :func:`needed_keys`, the per-pattern plan cache and the head
groups. Pure index math on the CPU: no attention is computed here (see
:mod:`longattn.ops.pattern.engine`); the overview is in :mod:`longattn.ops.pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from longattn.patterns import (
    Band,
    Gather,
    Pattern,
    Predicate,
    _Restricted,
)

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
