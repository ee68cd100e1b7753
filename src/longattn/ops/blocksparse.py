"""Exact attention over any pattern of :mod:`longattn.patterns`, without an N x N tensor.

How it works
------------
A pattern's components are cut into *tile batches*: T tiles, each a block of bq
queries and a list of K keys (gathered by position). Each tile batch is one call of
PyTorch's CPU flash-attention kernel, which returns the tile's output and its
log-sum-exp (lse). Tiles are of three kinds:

- ``full``: every listed key is visible (no mask: the fast kernel path);
- ``causal``: key y visible from query x iff y <= x inside the tile (the kernel's
  own causal path; a *reversed* tile gives y >= x, the lower edge of a band);
- ``mask``: anything else (edges of the sequence, random blocks, global columns,
  key padding), with an additive mask built from the pattern's predicate.

A band ``-a <= j - i <= b`` over query block [s, s+bq) is split into three tiles::

    keys:   [s-a, s-a+bq)      [s-a+bq, s+b)       [s+b, s+b+bq)
            lower triangle     full middle         upper triangle
            (reversed causal)  (no mask)           (causal)

so the work is about (a + b + 1) keys per query, with no masking. Dilated and
strided patterns are bands after regrouping positions by residue mod the stride.

All tiles of all components of one head form one softmax: outputs are merged with
their lse (out = sum_t exp(lse_t - L) out_t, L = logsumexp_t lse_t), and a key that
two components both list is counted once (the later component masks it out).
The backward pass calls the kernel's backward per tile with the *merged* output
and L, which gives the exact gradient of the single softmax.

Cost: time ~ the visible entries (plus <= one tile of slack per query block);
memory O(N * D) for inputs, outputs and lse, plus a bounded per-chunk workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale
from longattn.patterns import (
    Band,
    Local,
    Gather,
    Pattern,
    Predicate,
    _Restricted,
)

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: elements (B*H*T*bq*K) of mask / gathered keys allowed per kernel call
WORKSPACE = 1 << 24
MIN_BAND_TILE = 16
MAX_BAND_TILE = 256
BAND_QUERY_TILE = 128


@dataclass
class TileBatch:
    """T tiles of bq queries x K keys (positions, -1 = none).

    qpos: [T, bq]; kpos: [Hk, T, K] with Hk in {1, H}; kind: "full" | "causal" |
    "mask"; pred: what the tiles may see (used for "mask" tiles and whenever keys
    are padded). ``visible``: the exact number of visible pairs per head (for FLOP
    counts), when known.
    """

    qpos: Tensor
    kpos: Tensor
    kind: str
    pred: Predicate
    #: (q0, k0, step): tile t is queries [q0 + t*step, +bq) and keys [k0 + t*step, +K)
    #: of the sequence itself, read as strided views (no gather copies)
    view: tuple[int, int, int] | None = None
    #: bool [bq, K] visibility shared by every tile (kind "shared")
    shared: Tensor | None = None
    #: its queries were already covered by an earlier batch of the same component
    again: bool = False
    #: kind "mask": bool [1 or H, T, bq, K], what each tile sees (computed once, at planning)
    vis: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.qpos.shape[0], self.qpos.shape[1], self.kpos.shape[2]


# ----------------------------------------------------------------------------------------
# Planning: components -> tile batches
# ----------------------------------------------------------------------------------------


def _pow2_floor(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)


def _band_batches(c: Band, n: int, causal: bool, pred: Predicate, masked: bool) -> list[TileBatch]:
    """Tiles of a band within groups (see the module docstring)."""
    groups = c.grouping.groups(n)
    by_len: dict[int, list[Tensor]] = {}
    for g in groups:
        by_len.setdefault(g.numel(), []).append(g)
    out: list[TileBatch] = []
    for L, gs in sorted(by_len.items()):
        P = torch.stack(gs)  # [G, L] positions of each group
        a = min(c.before, L - 1)
        b = 0 if causal else min(c.after, L - 1)
        b = min(b, c.after)
        out += _band_group_batches(P, L, a, b, pred, masked)
    return out


def _map(P: Tensor, u: Tensor) -> Tensor:
    """Group-local indices u [G, T, K] -> positions (or -1 outside [0, L))."""
    L = P.shape[1]
    ok = (u >= 0) & (u < L)
    pos = torch.gather(P[:, None, :].expand(-1, u.shape[1], -1), 2, u.clamp(0, L - 1))
    return torch.where(ok, pos, torch.full_like(pos, -1))


def _band_group_batches(P: Tensor, L: int, a: int, b: int, pred: Predicate, masked: bool) -> list[TileBatch]:
    G = P.shape[0]

    def batch(qu: Tensor, ku: Tensor, kind: str, again: bool = False) -> TileBatch:
        # qu [T, bq], ku [T, K] group-local; replicate over the G groups
        q, k = _flat(P, qu, ku)
        return TileBatch(q, k, "mask" if masked else kind, pred, again=again)

    whole = torch.arange(L)[None]
    if a >= L - 1 and b >= L - 1:
        return [batch(whole, whole, "full")]
    if a >= L - 1 and b == 0:
        return [batch(whole, whole, "causal")]
    if a + b + 1 >= L or a + b < MIN_BAND_TILE or L < 2 * MIN_BAND_TILE:
        # short groups or tiny windows: masked tiles over the span
        bq = min(64, L) if a + b + 1 < L else L
        nq = -(-L // bq)
        s = torch.arange(nq) * bq
        qu = s[:, None] + torch.arange(bq)
        qu = torch.where(qu < L, qu, -1)
        lo = (s - a).clamp(min=0) if a + b + 1 < L else torch.zeros_like(s)
        span = min(bq + a + b, L)
        lo = torch.minimum(lo, torch.full_like(lo, L - span))
        ku = lo[:, None] + torch.arange(span)
        return [TileBatch(*_flat(P, qu, ku), "mask", pred)]

    bq = min(MAX_BAND_TILE, _pow2_floor(a + b))
    if G == 1 and bool((P[0] == torch.arange(L)).all()):
        bq = BAND_QUERY_TILE
    nq = -(-L // bq)
    s = torch.arange(nq) * bq
    ar = torch.arange(bq)
    interior = (s - a >= 0) & (s + bq + b <= L)
    out: list[TileBatch] = []
    si = s[interior]
    if si.numel() and G == 1 and bool((P[0] == torch.arange(L)).all()):
        # contiguous queries and keys: one call over strided views, one shared mask
        K = bq + a + b
        rel = torch.arange(K)[None, :] - a - ar[:, None]  # j - i
        shared = (rel >= -a) & (rel <= b)
        t0, t1 = int(si[0]) // bq, int(si[-1]) // bq + 1
        assert t1 - t0 == si.numel()
        qu = si[:, None] + ar
        ku = (si - a)[:, None] + torch.arange(K)
        kind = "mask" if masked else "shared"
        out.append(TileBatch(qu, ku[None], kind, pred, view=(int(si[0]), int(si[0]) - a, bq), shared=shared))
    elif si.numel():
        qu = si[:, None] + ar
        out.append(batch(qu.flip(-1), (si - a)[:, None] + ar.flip(0), "causal"))  # lower (reversed)
        mid = a + b - bq
        if mid > 0:
            out.append(batch(qu, (si - a + bq)[:, None] + torch.arange(mid), "full", again=True))
        out.append(batch(qu, (si + b)[:, None] + ar, "causal", again=True))  # upper
    sb = s[~interior]
    if sb.numel():
        qu = sb[:, None] + ar
        qu = torch.where(qu < L, qu, -1)
        ku = (sb - a)[:, None] + torch.arange(bq + a + b)
        qpos, kpos = _flat(P, qu, ku)
        out.append(TileBatch(qpos, kpos, "mask", pred))
    return out


def _flat(P: Tensor, qu: Tensor, ku: Tensor) -> tuple[Tensor, Tensor]:
    G = P.shape[0]
    q = _map(P, qu[None].expand(G, -1, -1)).reshape(G * qu.shape[0], -1)
    k = _map(P, ku[None].expand(G, -1, -1)).reshape(1, G * ku.shape[0], -1)
    return q, k


def _gather_batches(c: Gather, pred: Predicate) -> list[TileBatch]:
    return [TileBatch(qpos, kpos, "mask", pred) for qpos, kpos in c.blocks()]


def _sub(tb: TileBatch, sel: list[int], kind: str, vis: Tensor | None = None) -> TileBatch:
    idx = torch.tensor(sel, dtype=torch.long)
    return TileBatch(tb.qpos[idx], tb.kpos[:, idx] if tb.kpos.shape[1] > 1 else tb.kpos.expand(-1, tb.qpos.shape[0], -1)[:, idx],
                     kind, tb.pred, again=tb.again, vis=vis)


def _classify(tb: TileBatch, heads: int) -> list[TileBatch]:
    """Split a batch into tiles needing no mask (every key visible), tiles whose
    visibility is the kernel's own causal structure, and partial tiles that keep
    their bool mask. The predicate is evaluated here, once per plan."""
    T, bq, K = tb.shape
    if tb.kpos.shape[1] != T:
        tb = TileBatch(tb.qpos, tb.kpos.expand(-1, T, -1), tb.kind, tb.pred, again=tb.again)
    tri = torch.ones(bq, K, dtype=torch.bool).tril()
    step = max(1, WORKSPACE // max(1, heads * bq * K))
    full, causal, part, part_vis = [], [], [], []
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
        for t in range(Tc):
            if bool(is_full[t]):
                full.append(t0 + t)
            elif bool(is_causal[t]):
                causal.append(t0 + t)
            else:
                part.append(t0 + t)
                part_vis.append(vis[:, t])
    out = []
    if full:
        out.append(_sub(tb, full, "full"))
    if causal:
        out.append(_sub(tb, causal, "causal"))
    if part:
        out.append(_sub(tb, part, "mask", torch.stack(part_vis, dim=1)))
    return out


def plan(pattern: Pattern, n: int, heads: int, causal: bool) -> list[tuple[TileBatch, bool]]:
    """The tile batches computing ``pattern`` (one head group) at length ``n``, each
    with a flag: True for the first component (its tiles partition its queries, so
    their outputs are written, not merged)."""
    pattern.prepare(n, heads)
    comps = pattern.components(n, heads)
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
            tbs = _band_batches(inner, n, causal, pred, masked)
        elif isinstance(inner, Gather):
            tbs = _gather_batches(inner, pred)
        else:  # pragma: no cover
            raise TypeError(f"unknown component {type(inner).__name__}")
        for tb in tbs:
            parts = [tb] if tb.kind == "shared" else _classify(tb, heads)
            batches += [(p, idx == 0 and not p.again) for p in parts]
    return batches


# ----------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """A slice of a tile batch small enough for one kernel call.

    Queries are either a contiguous run of rows (``q0`` set: strided views, slice
    merges) or gathered by ``qidx``. Keys are band windows (``k0`` set), one list
    shared by every tile (``kshared``: gathered once, broadcast), or gathered per tile.
    """

    Tc: int
    bq: int
    K: int
    kind: str  # "full" | "causal" | "mask"
    mask: Tensor | None  # additive, broadcastable to [B*H, Tc, bq, K]
    alive: Tensor | None  # bool, broadcastable to [B*H, Tc, bq]: row sees some key
    q0: int | None = None
    k0: int | None = None
    kstep: int = 0
    qidx: Tensor | None = None  # [Tc*bq] clamped positions
    qvalid: Tensor | None = None
    kidx: Tensor | None = None  # [Hk, Tc*K] or [Hk, K] when kshared
    kvalid: Tensor | None = None
    kshared: bool = False


def _additive(vis: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros((), dtype=dtype).expand(vis.shape).masked_fill(~vis, float("-inf"))


def _contiguous_start(qpos: Tensor) -> int | None:
    flat = qpos.reshape(-1)
    q0 = int(flat[0])
    if q0 >= 0 and torch.equal(flat, torch.arange(q0, q0 + flat.numel())):
        return q0
    return None


def _affine_rows(pos: Tensor) -> tuple[int, int] | None:
    """(start, step) if row t of ``pos`` [T, K] is start + t*step + arange(K), else None."""
    T, K = pos.shape
    p0 = int(pos[0, 0])
    step = int(pos[1, 0]) - p0 if T > 1 else K
    if p0 < 0 or step < 0:
        return None
    want = p0 + step * torch.arange(T)[:, None] + torch.arange(K)
    return (p0, step) if torch.equal(pos, want) else None


def _chunks(tb: TileBatch, B: int, H: int, D: int, kpm: Tensor | None, dtype: torch.dtype,
            backward: bool = False):
    """The kernel calls of a tile batch: views or gathers, and the additive mask."""
    T, bq, K = tb.shape
    per_tile = B * H * max(bq * K, K * D, bq * D)
    step = max(1, WORKSPACE // per_tile)
    if tb.view is not None and kpm is None and tb.kind == "shared":
        # strided views of the sequence; one shared [bq, K] mask, no copies. Forward
        # makes nothing bigger than the output: one call. Backward returns key
        # gradients K/bq times the keys' size, so it stays chunked.
        step = step if backward else T
        q0, k0, st = tb.view
        mask = _additive(tb.shared, dtype)
        alive = tb.shared.any(-1)
        for t0 in range(0, T, step):
            Tc = min(step, T - t0)
            yield _Chunk(Tc, bq, K, "mask", mask, None if bool(alive.all()) else alive,
                         q0=q0 + t0 * st, k0=k0 + t0 * st, kstep=st)
        return
    q0 = _contiguous_start(tb.qpos)
    kshared = tb.kpos.shape[1] == 1 or bool((tb.kpos == tb.kpos[:, :1]).all())
    kaff = _affine_rows(tb.kpos[0]) if tb.kpos.shape[0] == 1 and not kshared else None
    tri = torch.ones(bq, K, dtype=torch.bool).tril()
    for t0 in range(0, T, step):
        qp = tb.qpos[t0 : t0 + step]
        kp = tb.kpos[:, t0 : t0 + step] if tb.kpos.shape[1] > 1 else tb.kpos
        Tc = qp.shape[0]
        kind = tb.kind
        if kind == "shared":  # a view batch with padded keys: masked
            vis: Tensor | None = tb.shared.expand(1, Tc, bq, K)
            kind = "mask"
        elif kind == "mask":
            vis = tb.vis[:, t0 : t0 + step]
        else:
            vis = None
        if kpm is not None:
            base = vis if vis is not None else (tri if kind == "causal" else torch.ones((), dtype=torch.bool))
            pad = kpm[:, kp.clamp(min=0)][:, :, :, None, :] & (kp >= 0)[None, :, :, None, :]
            vis = (base & pad).expand(B, H, Tc, bq, K).reshape(B * H, Tc, bq, K)
            kind = "mask"
        elif vis is not None and vis.shape[0] != 1 and B > 1:
            vis = vis[None].expand(B, H, Tc, bq, K).reshape(B * H, Tc, bq, K)
        mask = alive = None
        if vis is not None:
            alive = vis.any(-1)
            mask = _additive(vis, dtype)
        kk = kp[:, :1] if kshared else kp
        yield _Chunk(
            Tc, bq, K, kind, mask, alive,
            q0=None if q0 is None else q0 + t0 * bq,
            k0=None if kaff is None else kaff[0] + t0 * kaff[1],
            kstep=0 if kaff is None else kaff[1],
            qidx=qp.reshape(-1).clamp(min=0),
            qvalid=qp.reshape(-1) >= 0,
            kidx=kk.reshape(kk.shape[0], -1).clamp(min=0),
            kvalid=kk.reshape(kk.shape[0], -1) >= 0,
            kshared=kshared,
        )


def _windows(x: Tensor, start: int, step: int, T: int, width: int) -> Tensor:
    """[BH, N, D] -> strided view [BH, T, width, D]: rows start + t*step + w."""
    BH, N, D = x.shape
    return x.as_strided(
        (BH, T, width, D), (x.stride(0), step * x.stride(1), x.stride(1), x.stride(2)),
        x.storage_offset() + start * x.stride(1),
    )


def _gq(x: Tensor, ch: _Chunk) -> Tensor:
    """The chunk's query rows of x ([BH, N, D]) as [BH, Tc, bq, D]."""
    if ch.q0 is not None:
        return _windows(x, ch.q0, ch.bq, ch.Tc, ch.bq)
    return x.index_select(1, ch.qidx).view(x.shape[0], ch.Tc, ch.bq, x.shape[-1])


def _gk(x: Tensor, ch: _Chunk, H: int) -> Tensor:
    """The chunk's key rows of x ([BH, N, D]) as [BH, Tc, K, D]."""
    if ch.k0 is not None:
        return _windows(x, ch.k0, ch.kstep, ch.Tc, ch.K)
    BH, N, D = x.shape
    Tk = 1 if ch.kshared else ch.Tc
    if ch.kidx.shape[0] == 1:
        g = x.index_select(1, ch.kidx[0])
    else:
        flat = (torch.arange(H)[:, None] * N + ch.kidx).reshape(-1)
        g = x.reshape(BH // H, H * N, D).index_select(1, flat)
    return g.view(BH, Tk, ch.K, D).expand(BH, ch.Tc, ch.K, D)


def _merge(O: Tensor, Lse: Tensor, ch: _Chunk, o: Tensor, lse: Tensor, first: bool) -> None:
    """Fold a chunk's (o, lse) into the running (O, Lse): one softmax over all keys."""
    BH, _, Dv = O.shape
    o = o.reshape(BH, -1, Dv)
    lse = lse.reshape(BH, -1)
    if ch.q0 is not None:
        rows = slice(ch.q0, ch.q0 + ch.Tc * ch.bq)
        o_old, l_old = O[:, rows], Lse[:, rows]
    else:
        pos = ch.qidx[ch.qvalid]
        o, lse = o[:, ch.qvalid], lse[:, ch.qvalid]
        o_old, l_old = O.index_select(1, pos), Lse.index_select(1, pos)
    if first:  # the first component's tiles partition its queries: plain writes
        o_new, l_new = o, lse
    else:
        l_new = torch.logaddexp(l_old, lse)
        l_ref = torch.where(torch.isneginf(l_new), 0.0, l_new)
        o_new = o_old.mul_(torch.exp(l_old - l_ref)[..., None]).add_(o.mul_(torch.exp(lse - l_ref)[..., None]))
    if ch.q0 is not None:
        if first:
            O[:, rows] = o_new
        Lse[:, rows] = l_new
    else:
        O.index_copy_(1, pos, o_new)
        Lse.index_copy_(1, pos, l_new)


def _forward_bh(q, k, v, batches, scale, kpm, H):
    """(O [BH, N, Dv], Lse [BH, N]) in the accumulation dtype."""
    BH, N, D = q.shape
    Dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    O = torch.zeros(BH, N, Dv, dtype=acc)
    Lse = torch.full((BH, N), float("-inf"), dtype=acc)
    for tb, first in batches:
        for ch in _chunks(tb, BH // H, H, D, kpm, q.dtype):
            o, lse = _flash_fwd(
                _gq(q, ch), _gk(k, ch, H), _gk(v, ch, H), 0.0,
                ch.kind == "causal", attn_mask=ch.mask, scale=scale,
            )
            lse = lse.to(acc)
            if ch.alive is not None:
                lse = lse.masked_fill(~ch.alive, float("-inf"))
            _merge(O, Lse, ch, o.to(acc), lse, first)
    return O, Lse


def _backward(dO, q, k, v, O, Lse, batches, scale, kpm, H):
    BH, N, D = q.shape
    Dv = v.shape[-1]
    B = BH // H
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # ghost queries (zeroed dO) and ghost keys (always masked) get exactly zero
    # gradient from the kernel, so their clamped indices can point at row 0
    dq = torch.zeros(BH, N, D, dtype=acc)
    dk = torch.zeros(BH, N, D, dtype=acc)
    dv = torch.zeros(BH, N, Dv, dtype=acc)
    Lb = Lse.masked_fill(torch.isneginf(Lse), float("inf"))
    if q.dtype != torch.float64:
        Lb = Lb.float()
    heads = torch.arange(H)[:, None]
    for tb, _ in batches:
        for ch in _chunks(tb, B, H, D, kpm, q.dtype, backward=True):
            g = _gq(dO, ch)
            if ch.q0 is None and not bool(ch.qvalid.all()):
                g = g * ch.qvalid.view(1, ch.Tc, ch.bq, 1).to(g.dtype)
            gq, gk, gv = _flash_bwd(
                g, _gq(q, ch), _gk(k, ch, H), _gk(v, ch, H), _gq(O, ch),
                _gq(Lb[..., None], ch)[..., 0], 0.0,
                ch.kind == "causal", attn_mask=ch.mask, scale=scale,
            )
            if ch.q0 is not None:
                _windows(dq, ch.q0, ch.bq, ch.Tc, ch.bq).add_(gq)
            else:
                dq.index_add_(1, ch.qidx, gq.reshape(BH, -1, D).to(acc))
            if ch.k0 is not None:
                st = ch.kstep
                for s0 in range(0, ch.K, st):  # key windows overlap: add them in strips
                    w = min(st, ch.K - s0)
                    _windows(dk, ch.k0 + s0, st, ch.Tc, w).add_(gk[:, :, s0 : s0 + w])
                    _windows(dv, ch.k0 + s0, st, ch.Tc, w).add_(gv[:, :, s0 : s0 + w])
                continue
            if ch.kshared:
                gk, gv = gk.sum(1, keepdim=True), gv.sum(1, keepdim=True)
            flat = (heads * N + ch.kidx).reshape(-1)  # [H * K']
            dk.view(B, H * N, D).index_add_(1, flat, gk.reshape(B, -1, D).to(acc))
            dv.view(B, H * N, Dv).index_add_(1, flat, gv.reshape(B, -1, Dv).to(acc))
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, batches, scale, kpm):
        B, H, N, D = q.shape
        flat = lambda x: x.reshape(B * H, N, x.shape[-1])  # noqa: E731
        O, Lse = _forward_bh(flat(q), flat(k), flat(v), batches, scale, kpm, H)
        out = O.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, Lse)
        ctx.batches, ctx.scale, ctx.kpm = batches, scale, kpm
        return out.view(B, H, N, -1)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, Lse = ctx.saved_tensors
        B, H, N, D = q.shape
        flat = lambda x: x.reshape(B * H, N, x.shape[-1])  # noqa: E731
        dq, dk, dv = _backward(
            flat(dout.contiguous()), flat(q), flat(k), flat(v), out, Lse,
            ctx.batches, ctx.scale, ctx.kpm, H,
        )
        return (dq.to(q.dtype).view_as(q), dk.to(k.dtype).view_as(k),
                dv.to(v.dtype).view(B, H, N, -1), None, None, None)


_PLAN_CACHE: dict[tuple, tuple[Pattern, list[tuple[TileBatch, bool]]]] = {}


def _cached_plan(pattern: Pattern, n: int, heads: int, causal: bool) -> list[tuple[TileBatch, bool]]:
    key = (id(pattern), n, heads, causal)
    hit = _PLAN_CACHE.get(key)
    if hit is None or hit[0] is not pattern:
        if len(_PLAN_CACHE) > 256:
            _PLAN_CACHE.clear()
        hit = (pattern, plan(pattern, n, heads, causal))
        _PLAN_CACHE[key] = hit
    return hit[1]


_FOLD_CACHE: dict[tuple, tuple[Pattern, tuple[int, Pattern] | None]] = {}


def _residue_fold(pattern: Pattern, n: int, heads: int) -> tuple[int, Pattern] | None:
    """(r, band) when the pattern is one band over residue classes mod r and r | n."""
    key = (id(pattern), n, heads)
    hit = _FOLD_CACHE.get(key)
    if hit is None or hit[0] is not pattern:
        pattern.prepare(n, heads)
        comps = pattern.components(n, heads)
        res = None
        if len(comps) == 1 and isinstance(comps[0], Band):
            c = comps[0]
            r = c.grouping.d
            if c.grouping.kind == "residue" and r > 1 and n % r == 0:
                res = (r, Local(c.before, c.after))
        if len(_FOLD_CACHE) > 256:
            _FOLD_CACHE.clear()
        hit = _FOLD_CACHE[key] = (pattern, res)
    return hit[1]


def pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax attention restricted to ``pattern``.

    Args:
        q, k: [B, H, N, D]; v: [B, H, N, Dv] (self-attention: Nq == Nk).
        pattern: any :class:`longattn.patterns.Pattern`, per-head lists included.
        causal: intersect with j <= i.
        key_padding_mask: bool [B, N], True = real token.

    Returns:
        [B, H, N, Dv]. Queries with no visible key get zeros. Differentiable in
        q, k, v. Cost ~ visible entries; memory O(N * D) + a bounded workspace.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn.patterns.Pattern, got {type(pattern).__name__}")
    s = default_scale(scale, d.D)
    split = pattern.heads_split(d.H)
    if split is not None:
        outs = [
            pattern_attention(
                q[:, h0 : h0 + nh], k[:, h0 : h0 + nh], v[:, h0 : h0 + nh], p,
                causal=causal, key_padding_mask=key_padding_mask, scale=s,
            )
            for h0, nh, p in split
        ]
        return torch.cat(outs, dim=1)
    if q.device.type != "cpu":
        return _dense_fallback(q, k, v, pattern, causal, key_padding_mask, s)
    fold = _residue_fold(pattern, d.Nq, d.H)
    if fold is not None:
        # a band over residue classes mod r (dilated, strided) is a plain band over
        # sequences of length N / r once positions are regrouped: fold r into the batch
        r, inner = fold
        L = d.Nq // r

        def fold_in(x: Tensor) -> Tensor:
            return x.reshape(d.B, d.H, L, r, x.shape[-1]).permute(0, 3, 1, 2, 4).reshape(d.B * r, d.H, L, x.shape[-1])

        kpm = None
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(d.B, L, r).transpose(1, 2).reshape(d.B * r, L)
        out = pattern_attention(fold_in(q), fold_in(k), fold_in(v), inner, causal=causal, key_padding_mask=kpm, scale=s)
        return out.reshape(d.B, r, d.H, L, d.Dv).permute(0, 2, 3, 1, 4).reshape(d.B, d.H, d.Nq, d.Dv)
    batches = _cached_plan(pattern, d.Nq, d.H, causal)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, batches, s, key_padding_mask)


def _dense_fallback(q, k, v, pattern, causal, kpm, scale):  # pragma: no cover - GPU only
    from longattn.ops.reference import dense_attention

    m = pattern.mask(q.shape[2], q.shape[1], causal).to(q.device)
    return dense_attention(q, k, v, m[None], causal=causal, key_padding_mask=kpm, scale=scale)
