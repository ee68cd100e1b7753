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

import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import torch
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale
from longattn.patterns import (
    Band,
    Component,
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

    def batch(qu: Tensor, ku: Tensor, kind: str) -> TileBatch:
        # qu [T, bq], ku [T, K] group-local; replicate over the G groups
        T = qu.shape[0]
        q = _map(P, qu[None].expand(G, -1, -1)).reshape(G * T, -1)
        k = _map(P, ku[None].expand(G, -1, -1)).reshape(1, G * T, -1)
        return TileBatch(q, k, "mask" if masked else kind, pred)

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
    nq = -(-L // bq)
    s = torch.arange(nq) * bq
    ar = torch.arange(bq)
    interior = (s - a >= 0) & (s + b + bq <= L) & (s + bq <= L)
    out: list[TileBatch] = []
    si = s[interior]
    if si.numel():
        qu = si[:, None] + ar
        rq = qu.flip(-1)
        out.append(batch(rq, (si - a)[:, None] + ar.flip(0), "causal"))  # lower (reversed)
        mid = a + b - bq
        if mid > 0:
            out.append(batch(qu, (si - a + bq)[:, None] + torch.arange(mid), "full"))
        out.append(batch(qu, (si + b)[:, None] + ar, "causal"))  # upper
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


def _gather_batches(c: Gather, pred: Predicate, masked: bool) -> list[TileBatch]:
    kind = "full" if (c.dense_keys and not masked and bool((c.kpos >= 0).all())) else "mask"
    return [TileBatch(c.qpos, c.kpos, kind, pred)]


def _component_pred(c: Component | _Restricted) -> Predicate:
    return c.pred


def plan(pattern: Pattern, n: int, heads: int, causal: bool) -> list[TileBatch]:
    """The tile batches computing ``pattern`` (one head group) at length ``n``."""
    pattern.prepare(n, heads)
    comps = pattern.components(n, heads)
    batches: list[TileBatch] = []
    for idx, c in enumerate(comps):
        earlier = [_component_pred(e) for e in comps[:idx]]
        own = _component_pred(c)

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
            batches += _band_batches(inner, n, causal, pred, masked)
        elif isinstance(inner, Gather):
            batches += _gather_batches(inner, pred, masked or causal)
        else:  # pragma: no cover
            raise TypeError(f"unknown component {type(inner).__name__}")
    return batches


# ----------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    qidx: Tensor  # [Tc*bq] clamped positions
    qvalid: Tensor  # [Tc*bq] bool
    kidx: Tensor  # [Hk, Tc*K] clamped positions
    kvalid: Tensor  # [Hk, Tc*K] bool
    Tc: int
    bq: int
    K: int
    kind: str
    mask: Tensor | None  # additive [B*H, Tc, bq, K] or None
    alive: Tensor | None  # bool [B*H, Tc, bq]: row has a visible key


def _chunks(tb: TileBatch, B: int, H: int, D: int, kpm: Tensor | None, dtype: torch.dtype):
    T, bq, K = tb.shape
    per_tile = B * H * max(bq * K, K * D, bq * D)
    step = max(1, WORKSPACE // per_tile)
    use_mask = tb.kind == "mask" or kpm is not None
    for t0 in range(0, T, step):
        qp = tb.qpos[t0 : t0 + step]
        kp = tb.kpos[:, t0 : t0 + step]
        Tc = qp.shape[0]
        mask = alive = None
        kind = tb.kind
        if use_mask:
            i = qp[None, :, :, None]
            j = kp[:, :, None, :]
            h = torch.arange(H)[:, None, None, None]
            vis = tb.pred(i, j, h)
            if tb.kind == "causal":  # the tile structure itself (y <= x)
                vis = vis & torch.ones(bq, K, dtype=torch.bool).tril()
            vis = vis.expand(H, Tc, bq, K)
            if kpm is not None:
                vis = vis[None] & kpm[:, kp.clamp(min=0)][:, :, :, None, :]  # [B, H, Tc, bq, K]
            else:
                vis = vis[None].expand(B, H, Tc, bq, K)
            vis = vis.reshape(B * H, Tc, bq, K)
            alive = vis.any(-1)
            mask = torch.zeros((), dtype=dtype).expand(vis.shape).masked_fill(~vis, float("-inf"))
            kind = "mask"
        yield _Chunk(
            qidx=qp.reshape(-1).clamp(min=0),
            qvalid=qp.reshape(-1) >= 0,
            kidx=kp.reshape(kp.shape[0], -1).clamp(min=0),
            kvalid=kp.reshape(kp.shape[0], -1) >= 0,
            Tc=Tc, bq=bq, K=K, kind=kind, mask=mask, alive=alive,
        )


def _gather_q(x: Tensor, ch: _Chunk) -> Tensor:
    B, H, N, D = x.shape
    return x[:, :, ch.qidx].reshape(B * H, ch.Tc, ch.bq, D)


def _gather_k(x: Tensor, ch: _Chunk) -> Tensor:
    B, H, N, D = x.shape
    if ch.kidx.shape[0] == 1:
        g = x[:, :, ch.kidx[0]]
    else:
        flat = (torch.arange(H)[:, None] * N + ch.kidx).reshape(-1)
        g = x.reshape(B, H * N, D)[:, flat]
    return g.reshape(B * H, ch.Tc, ch.K, D)


def _forward(q, k, v, batches, scale, kpm):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    O = torch.zeros(B, H, N, Dv, dtype=acc)
    Lse = torch.full((B, H, N), float("-inf"), dtype=acc)
    for tb in batches:
        for ch in _chunks(tb, B, H, D, kpm, q.dtype):
            o, lse = _flash_fwd(
                _gather_q(q, ch), _gather_k(k, ch), _gather_k(v, ch), 0.0,
                ch.kind == "causal", attn_mask=ch.mask, scale=scale,
            )
            lse = lse.to(acc)
            if ch.alive is not None:
                lse = lse.masked_fill(~ch.alive, float("-inf"))
            pos = ch.qidx[ch.qvalid]
            lse = lse.reshape(B, H, -1)[:, :, ch.qvalid]
            o = o.reshape(B, H, -1, Dv)[:, :, ch.qvalid].to(acc)
            l_old = Lse[:, :, pos]
            l_new = torch.logaddexp(l_old, lse)
            dead = torch.isneginf(l_new)
            w_old = torch.exp(l_old - l_new).masked_fill(dead, 0.0)
            w_new = torch.exp(lse - l_new).masked_fill(dead, 0.0)
            O[:, :, pos] = O[:, :, pos] * w_old[..., None] + o * w_new[..., None]
            Lse[:, :, pos] = l_new
    return O, Lse


def _backward(dO, q, k, v, O, Lse, batches, scale, kpm):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(B, H, N + 1, D, dtype=acc)
    dk = torch.zeros(B, H * (N + 1), D, dtype=acc)
    dv = torch.zeros(B, H * (N + 1), Dv, dtype=acc)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    Lb = Lse.masked_fill(torch.isneginf(Lse), float("inf")).to(lse_dtype)
    heads = torch.arange(H)[:, None]
    for tb in batches:
        for ch in _chunks(tb, B, H, D, kpm, q.dtype):
            qc = _gather_q(q, ch)
            g = _gather_q(dO, ch)
            if not bool(ch.qvalid.all()):
                g = g * ch.qvalid.view(1, ch.Tc, ch.bq, 1).to(g.dtype)
            gq, gk, gv = _flash_bwd(
                g, qc, _gather_k(k, ch), _gather_k(v, ch), _gather_q(O, ch),
                Lb[:, :, ch.qidx].reshape(B * H, ch.Tc, ch.bq), 0.0,
                ch.kind == "causal", attn_mask=ch.mask, scale=scale,
            )
            qi = torch.where(ch.qvalid, ch.qidx, N)
            dq.index_add_(2, qi, gq.reshape(B, H, -1, D).to(acc))
            ki = torch.where(ch.kvalid, ch.kidx, N)  # [Hk, Tc*K]; ghosts -> slot N
            flat = (heads * (N + 1) + ki).reshape(-1)  # [H * Tc * K]
            dk.index_add_(1, flat, gk.reshape(B, -1, D).to(acc))
            dv.index_add_(1, flat, gv.reshape(B, -1, Dv).to(acc))
    dk = dk.view(B, H, N + 1, D)
    dv = dv.view(B, H, N + 1, Dv)
    return (
        dq[:, :, :N].to(q.dtype),
        dk[:, :, :N].to(k.dtype),
        dv[:, :, :N].to(v.dtype),
    )


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, batches, scale, kpm):
        O, Lse = _forward(q, k, v, batches, scale, kpm)
        out = O.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, Lse)
        ctx.batches, ctx.scale, ctx.kpm = batches, scale, kpm
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, Lse = ctx.saved_tensors
        dq, dk, dv = _backward(
            dout.contiguous(), q, k, v, out, Lse, ctx.batches, ctx.scale, ctx.kpm
        )
        return dq, dk, dv, None, None, None


_PLAN_CACHE: dict[tuple, list[TileBatch]] = {}


def _cached_plan(pattern: Pattern, n: int, heads: int, causal: bool) -> list[TileBatch]:
    key = (id(pattern), n, heads, causal)
    hit = _PLAN_CACHE.get(key)
    if hit is None or hit[0] is not pattern:
        if len(_PLAN_CACHE) > 256:
            _PLAN_CACHE.clear()
        hit = (pattern, plan(pattern, n, heads, causal))
        _PLAN_CACHE[key] = hit
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
    batches = _cached_plan(pattern, d.Nq, d.H, causal)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, batches, s, key_padding_mask)


def _dense_fallback(q, k, v, pattern, causal, kpm, scale):  # pragma: no cover - GPU only
    from longattn.ops.reference import dense_attention

    m = pattern.mask(q.shape[2], q.shape[1], causal).to(q.device)
    return dense_attention(q, k, v, m[None], causal=causal, key_padding_mask=kpm, scale=scale)
