"""Additive (Bahdanau) attention: score(q, k) = w^T tanh(Wq q + Wk k).

Bahdanau, Cho and Bengio 2015. The score is not a dot product, so there is no
fused kernel to call; this module runs the flash idea itself: scores for tiles of
block x block (query, key) pairs, an online softmax over key tiles, nothing of size
Nq x Nk kept, and a hand-written backward that recomputes the tiles. Memory
O(N (A + Dv) + block^2 A) per head; time O(Nq Nk A), quadratic by definition.
Default scale 1 (see :func:`additive_attention`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longattn.ops._checks import check_qkv, check_int
from longattn.registry import REQUIRED, Param, register


def _check_weights(wq: Tensor, wk: Tensor, w: Tensor, H: int, D: int) -> int:
    for name, t in (("wq", wq), ("wk", wk), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if wq.shape[0] != H or wq.dim() != 3 or wq.shape[2] != D:
        raise ValueError(f"wq must be [H, A, D] = [{H}, A, {D}], got {tuple(wq.shape)}")
    A = wq.shape[1]
    if tuple(wk.shape) != (H, A, D):
        raise ValueError(f"wk must be [H, A, D] = [{H}, {A}, {D}], got {tuple(wk.shape)}")
    if tuple(w.shape) != (H, A):
        raise ValueError(f"w must be [H, A] = [{H}, {A}], got {tuple(w.shape)}")
    return A


def _check_scale(scale: object) -> float:
    """The score multiplier: 1 by default (see :func:`additive_attention`)."""
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _tile_scores(pq2: Tensor, pk2: Tensor, w: Tensor, wsum: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """r = 1 / (exp(2 (pq_i + pk_j)) + 1) [B, H, bq, bk, A] and the scores
    scale * w . tanh(pq_i + pk_j) = scale * (sum(w) - 2 w . r)  [B, H, bq, bk].

    ``pq2``, ``pk2`` are 2 pq, 2 pk. tanh(u) = 1 - 2 r: written this way the tile costs
    an add, exp, add, reciprocal (torch's CPU tanh is ~3x slower than exp); exp
    overflow gives r = 0, tanh = 1, exactly the limit."""
    r = (pq2[:, :, :, None, :] + pk2[:, :, None, :, :]).exp_().add_(1.0).reciprocal_()
    s = torch.einsum("bhija,ha->bhij", r, w)
    return r, s.mul_(-2.0).add_(wsum[None, :, None, None]).mul_(scale)


def _tile_visible(i0: int, bq: int, j0: int, bk: int, causal: bool, kpm: Tensor | None,
                  device: torch.device) -> Tensor | None:
    """bool [B or 1, 1, bq, bk] visibility of a tile, or None when all is visible."""
    vis = None
    if causal and j0 + bk - 1 > i0:
        i = torch.arange(i0, i0 + bq, device=device)
        j = torch.arange(j0, j0 + bk, device=device)
        vis = (j[None, :] <= i[:, None])[None, None]
    if kpm is not None:
        kv = kpm[:, None, None, j0 : j0 + bk]
        vis = kv if vis is None else vis & kv
    return vis


def _key_blocks(i0: int, bq: int, nk: int, block: int, causal: bool) -> range:
    """Key block starts a query block [i0, i0 + bq) must visit (causal: up to i0 + bq - 1)."""
    stop = min(nk, i0 + bq) if causal else nk
    return range(0, stop, block)


class _AdditiveFlash(torch.autograd.Function):
    """softmax_j(scale * w_h . tanh(pq_i + pk_j)) v_j over tiles of block x block,
    online softmax; the scores are never stored (recomputed in the backward).

    pq [B, H, Nq, A], pk [B, H, Nk, A], v [B, H, Nk, Dv], w [H, A] (working dtype).
    Saves pq, pk, v, w, out and the row log-sum-exp: O(N (A + Dv)) memory."""

    @staticmethod
    def forward(ctx, pq, pk, v, w, kpm, causal: bool, scale: float, block: int):
        B, H, Nq, A = pq.shape
        Nk, Dv = pk.shape[2], v.shape[-1]
        out = v.new_empty(B, H, Nq, Dv)
        lse = pq.new_empty(B, H, Nq)
        pq2, pk2, wsum = pq * 2, pk * 2, w.sum(-1)
        for i0 in range(0, Nq, block):
            bq = min(block, Nq - i0)
            m = pq.new_full((B, H, bq), float("-inf"))
            l = pq.new_zeros(B, H, bq)
            acc = v.new_zeros(B, H, bq, Dv)
            for j0 in _key_blocks(i0, bq, Nk, block, causal):
                bk = min(block, Nk - j0)
                r, s = _tile_scores(pq2[:, :, i0 : i0 + bq], pk2[:, :, j0 : j0 + bk], w, wsum, scale)
                del r
                vis = _tile_visible(i0, bq, j0, bk, causal, kpm, pq.device)
                if vis is not None:
                    s.masked_fill_(~vis, float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                corr = torch.exp(m - m_safe)  # 0 while m = -inf
                p = torch.exp(s - m_safe[..., None])
                l = l * corr + p.sum(-1)
                acc = acc * corr[..., None] + torch.matmul(p, v[:, :, j0 : j0 + bk])
                m = m_new
            alive = l > 0
            out[:, :, i0 : i0 + bq] = acc / torch.where(alive, l, torch.ones_like(l))[..., None]
            m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            # rows that see no key: lse = +inf so that exp(s - lse) = 0 in the backward
            lse[:, :, i0 : i0 + bq] = torch.where(alive, m_safe + torch.log(l), torch.full_like(l, float("inf")))
        ctx.save_for_backward(pq, pk, v, w, out, lse, kpm)
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        return out

    @staticmethod
    def backward(ctx, g):
        pq, pk, v, w, out, lse, kpm = ctx.saved_tensors
        causal, scale, block = ctx.causal, ctx.scale, ctx.block
        B, H, Nq, A = pq.shape
        Nk = pk.shape[2]
        g = g.to(v.dtype)
        delta = (g * out).sum(-1)  # [B, H, Nq]
        dpq = torch.zeros_like(pq)
        dpk = torch.zeros_like(pk)
        dv = torch.zeros_like(v)
        dw = torch.zeros_like(w)
        dsum = pq.new_zeros(H)  # sum of d score per head (the sum(w) term)
        pq2, pk2, wsum = pq * 2, pk * 2, w.sum(-1)
        for i0 in range(0, Nq, block):
            bq = min(block, Nq - i0)
            gi, li, di = g[:, :, i0 : i0 + bq], lse[:, :, i0 : i0 + bq, None], delta[:, :, i0 : i0 + bq, None]
            for j0 in _key_blocks(i0, bq, Nk, block, causal):
                bk = min(block, Nk - j0)
                vj = v[:, :, j0 : j0 + bk]
                r, s = _tile_scores(pq2[:, :, i0 : i0 + bq], pk2[:, :, j0 : j0 + bk], w, wsum, scale)
                vis = _tile_visible(i0, bq, j0, bk, causal, kpm, pq.device)
                if vis is not None:
                    s.masked_fill_(~vis, float("-inf"))
                p = torch.exp(s - li)  # hidden keys and dead rows: 0
                dv[:, :, j0 : j0 + bk] += torch.matmul(p.transpose(-1, -2), gi)
                ds = p.mul_(torch.matmul(gi, vj.transpose(-1, -2)).sub_(di)).mul_(scale)  # d score
                # score = scale (sum(w) - 2 w . r): d w = sum ds (1 - 2 r)
                dsum += ds.sum((0, 2, 3))
                dw -= 2.0 * torch.einsum("bhij,bhija->ha", ds, r)
                # d tanh argument, without the factor 4 w (applied at the end):
                # 1 - tanh^2 = 4 r (1 - r)
                t = r.addcmul_(r, r, value=-1.0).mul_(ds[..., None])
                dpq[:, :, i0 : i0 + bq] += torch.einsum("bhija->bhia", t)
                dpk[:, :, j0 : j0 + bk] += t.sum(2)
        wf = 4.0 * w[None, :, None, :]
        return dpq * wf, dpk * wf, dv, dw + dsum[:, None], None, None, None, None


def additive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    wq: Tensor,
    wk: Tensor,
    w: Tensor,
    block: int = 64,
) -> Tensor:
    """softmax_j(scale * w_h . tanh(Wq_h q_i + Wk_h k_j)) v_j per head h.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; wq, wk [H, A, D]; w [H, A]
    -> [B, H, Nq, Dv].

    ``scale`` multiplies the scores and defaults to **1**, not 1/sqrt(D): the score
    is not a dot product of D terms (each tanh is in [-1, 1], so |score| <= |w|_1 and
    its size is set by the learned w), as in Bahdanau et al. who use no scale.

    Flash-style: tiles of ``block`` queries x ``block`` keys, an online softmax over
    the key tiles; the [B, H, block, block, A] tanh tile is the largest temporary and
    the backward recomputes it (a torch.autograd.Function). Memory O(N (A + Dv) +
    block^2 A) per head; time O(Nq Nk A): quadratic by definition (every pair needs
    its own tanh). Causal skips the key tiles after the query tile.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    _check_weights(wq, wk, w, d.H, d.D)
    check_int("block", block, minimum=1)
    s = _check_scale(scale)
    work = torch.promote_types(q.dtype, torch.float32)
    pq = torch.einsum("bhnd,had->bhna", q.to(work), wq.to(work)).contiguous()  # [B, H, Nq, A]
    pk = torch.einsum("bhnd,had->bhna", k.to(work), wk.to(work)).contiguous()  # [B, H, Nk, A]
    kpm = key_padding_mask.to(q.device) if key_padding_mask is not None else None
    out = _AdditiveFlash.apply(pq, pk, v.to(work).contiguous(), w.to(work).contiguous(), kpm,
                               bool(causal), s, block)
    return out.to(q.dtype)


class AdditiveAttention(nn.Module):
    """Module owning Wq, Wk [H, A, D] and w [H, A]; forward(q, k, v, causal=, key_padding_mask=)."""

    def __init__(self, heads: int, head_dim: int, attn_dim: int | None = None, block: int = 64) -> None:
        super().__init__()
        check_int("heads", heads, minimum=1)
        check_int("head_dim", head_dim, minimum=1)
        A = check_int("attn_dim", attn_dim if attn_dim is not None else head_dim, minimum=1)
        self.block = check_int("block", block, minimum=1)
        self.wq = nn.Parameter(torch.randn(heads, A, head_dim) / math.sqrt(head_dim))
        self.wk = nn.Parameter(torch.randn(heads, A, head_dim) / math.sqrt(head_dim))
        self.w = nn.Parameter(torch.randn(heads, A) / math.sqrt(A))

    def forward(self, q, k, v, *, causal=False, key_padding_mask=None, scale=None):
        return additive_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            wq=self.wq, wk=self.wk, w=self.w, block=self.block,
        )


register(
    "additive",
    params=(Param("wq", REQUIRED, "[H, A, D] query projection"),
            Param("wk", REQUIRED, "[H, A, D] key projection"),
            Param("w", REQUIRED, "[H, A] score vector"),
            Param("block", 64, "tile side: queries and keys per tile")),
    family="additive", exact=True, causal=True, learned=True, cross=True, subquadratic=False,
    paper="Bahdanau, Cho, Bengio 2015 (quadratic: O(N^2 A) time, O(N A) memory)",
    summary="score = w^T tanh(Wq q + Wk k), scale 1 (learned, no dot product); quadratic time "
            "O(N^2 A) by definition, flash-style tiles: O(N A + block^2 A) memory",
    module=AdditiveAttention,
)(additive_attention)
