"""Execution of the pattern engine: tile batches -> the merged softmax (out, lse).

:func:`engine_forward` runs the tile batches of each head group through the tile
kernels of :mod:`longattn.ops._softmax` (a bounded slice of tiles per call), merging
every tile's output by its log-sum-exp into one softmax per head; a non-finite output
reruns on the safe kernels and sinks are folded in. :func:`engine_backward` calls the
kernels' backward per tile with the merged output and lse, which gives the exact
gradient of that one softmax. :class:`_BlockSparseAttention` is the thin autograd
wrapper. The overview is in :mod:`longattn.ops.pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longattn.ops._softmax import (
    FAST,
    TileOpts,
    acc_dtype,
    add_sinks,
    additive_mask,
    flash_bwd,
    flash_fwd,
    kernels,
    merge_running_,
    sink_grad,
)
from longattn.ops.pattern.plan import WORKSPACE, TileBatch, View

#: tests only: fill output buffers that the plan claims to write in full with this
#: value instead of leaving them uninitialised (a wrong claim then shows as NaN)
UNINIT_FILL: float | None = None


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
    as_mask = (lambda vis: additive_mask(vis, dtype)) if additive else (lambda vis: vis)
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
        l_old.copy_(merge_running_(o_old, l_old, o, lse)[1])
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
        o_new, l_new = merge_running_(_rows(O, pos), _rows(Lse[..., None], pos)[..., 0], o, lse)
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


def _forward_bh(q, k, v, batches, scale, kpm, H, g, O, Lse, opts: TileOpts = FAST):
    """Fill O [BH, Nq, Dv] (zeros) and Lse [BH, Nq] (-inf), in the accumulation dtype.
    k, v: [B * H / g, Nk, .] (g query heads per kv head)."""
    BH, N, D = q.shape
    Dv = v.shape[-1]
    acc = O.dtype
    fwd, _ = kernels(q.device, opts)
    for tb, first in batches:
        for ch in _chunks(tb, BH // H, H, D, Dv, kpm, q.dtype, q.device, g=g, additive=fwd is flash_fwd):
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


def _backward(dO, q, k, v, O, Lse, batches, scale, kpm, H, g, dq, dk, dv, opts: TileOpts = FAST):
    """Add the gradients into dq, dk, dv ([BH, N, .], accumulation dtype)."""
    BH, N, D = q.shape
    Dv = v.shape[-1]
    acc = dq.dtype
    _, bwd = kernels(q.device, opts)
    # ghost queries (zeroed dO) and ghost keys (always masked) get exactly zero
    # gradient from the kernel, so their clamped indices can point at row 0
    Lb = Lse.masked_fill(torch.isneginf(Lse), float("inf"))
    if q.dtype != torch.float64:
        Lb = Lb.float()
    Lb = Lb[..., None].contiguous()
    for tb, _ in batches:
        for ch in _chunks(tb, BH // H, H, D, Dv, kpm, q.dtype, q.device, backward=True, g=g,
                          additive=bwd is flash_bwd):
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
            opts: TileOpts) -> tuple[Tensor, Tensor]:
    """Merged output O [B, H, N, Dv] and log-sum-exp Lse [B, H, N, 1] (accumulation dtype)
    of every head group's tiles."""
    B, H, N, D = q.shape
    acc = acc_dtype(q.dtype)
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


def engine_forward(q: Tensor, k: Tensor, v: Tensor, groups: Groups, kpm: Tensor | None, scale: float,
                   written: bool, sinks: Tensor | None = None,
                   softcap: float | None = None) -> tuple[Tensor, Tensor, TileOpts]:
    """The merged softmax of every head group's tiles: (O [B, H, Nq, Dv], Lse [B, H, Nq, 1],
    the tile options used), O and Lse in the accumulation dtype.

    q [B, H, Nq, D]; k, v [B, Hkv, Nk, .] contiguous (padded keys zeroed); ``groups``:
    each head group's plan; ``written``: the plans write every row. A row with no
    visible key gets O = 0 and Lse = -inf (or the sink's logit). Non-finite inputs: the
    fast kernels add masks and multiply hidden weights (0) by values, so a NaN key or
    value can reach rows that do not see it; a non-finite O reruns on the safe kernels
    (selected masks, no 0 * NaN). ``sinks`` [H] are folded into the merged (O, Lse).
    Cost ~ the visible entries * D; memory O(Nq * Dv) + the kernels' bounded workspace."""
    opts = TileOpts(softcap=softcap)
    O, Lse = _attend(q, k, v, groups, kpm, scale, written, opts)
    if not bool(torch.isfinite(O).all()):
        opts = TileOpts(softcap=softcap, safe=True)
        O, Lse = _attend(q, k, v, groups, kpm, scale, written, opts)
    if sinks is not None:
        O, Lse = add_sinks(O, Lse, sinks)
    return O, Lse, opts


def engine_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, Lse: Tensor, groups: Groups,
                    kpm: Tensor | None, scale: float, opts: TileOpts) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the accumulation dtype, given the merged ``out`` [B, H, Nq, Dv] and
    ``Lse`` [B, H, Nq, 1] of :func:`engine_forward` (with any sink folded in: the kernels'
    backward given that (out, Lse) is the exact gradient of the softmax with the sink in
    its denominator). ``groups`` may be a plan of other tiles (any tiling covering each
    visible pair once). Same cost as the forward, plus the key gradients' workspace."""
    B = q.shape[0]
    acc = Lse.dtype
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    qs = (dout.contiguous(), q, out, Lse)
    for batches, nh, g, (dOg, qg, Og, Lg), (kg, vg), (dqg, dkg, dvg) in _each_group(
        groups, B, qs, (k, v), (dq,), (dk, dv)
    ):
        _backward(dOg, qg, kg, vg, Og, Lg[..., 0], batches, scale, kpm, nh, g, dqg, dkg, dvg, opts)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    """Exact attention over the tile plans of each head group: :func:`engine_forward` /
    :func:`engine_backward` under autograd (inputs: q, k, v, forward groups, backward
    groups or None, scale, key padding mask, written, sinks, softcap)."""

    @staticmethod
    def forward(ctx, q, k, v, groups: Groups, bwd_groups: Groups | None, scale, kpm, written: bool,
                sinks: Tensor | None = None, softcap: float | None = None):
        O, Lse, opts = engine_forward(q, k, v, groups, kpm, scale, written, sinks, softcap)
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
            opts = TileOpts(safe=not all(bool(torch.isfinite(x).all()) for x in (q, k, v)))
        dq, dk, dv = engine_backward(dout, q, k, v, out, Lse, ctx.groups, ctx.kpm, ctx.scale, opts)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[8]:
            dsinks = sink_grad(dout, out, Lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, dsinks, None
