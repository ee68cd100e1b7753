"""Additive (Bahdanau) attention: score(q, k) = w^T tanh(Wq q + Wk k).

Bahdanau, Cho and Bengio 2015. The score is not a dot product, so there is no
flash kernel: scores are computed for blocks of queries, so memory stays
O(block * Nk * A) rather than O(Nq * Nk * A); time O(Nq * Nk * A).
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
    """softmax_j(w_h . tanh(Wq_h q_i + Wk_h k_j)) v_j per head h.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; wq, wk [H, A, D]; w [H, A]
    -> [B, H, Nq, Dv]. ``scale`` multiplies the scores (default 1). Queries are
    processed ``block`` at a time.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    _check_weights(wq, wk, w, d.H, d.D)
    check_int("block", block, minimum=1)
    s = 1.0 if scale is None else float(scale)
    work = torch.promote_types(q.dtype, torch.float32)
    pq = torch.einsum("bhnd,had->bhna", q.to(work), wq.to(work))  # [B, H, Nq, A]
    pk = torch.einsum("bhnd,had->bhna", k.to(work), wk.to(work))  # [B, H, Nk, A]
    vw = v.to(work)
    outs = []
    j = torch.arange(d.Nk, device=q.device)
    for i0 in range(0, d.Nq, block):
        e = torch.tanh(pq[:, :, i0 : i0 + block, None, :] + pk[:, :, None, :, :])
        score = torch.einsum("bhija,ha->bhij", e, w.to(work)) * s
        vis = torch.ones(score.shape[-2:], dtype=torch.bool, device=q.device)
        if causal:
            i = torch.arange(i0, i0 + score.shape[-2], device=q.device)
            vis = j[None, :] <= i[:, None]
        vis = vis.expand_as(score)
        if key_padding_mask is not None:
            vis = vis & key_padding_mask[:, None, None, :]
        alive = vis.any(-1, keepdim=True)
        p = torch.softmax(score.masked_fill(~vis, float("-inf")).masked_fill(~alive, 0.0), -1)
        outs.append(torch.matmul(p * alive, vw))
    return torch.cat(outs, dim=2).to(q.dtype)


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
            Param("block", 64, "queries per block")),
    family="additive", exact=True, causal=True, learned=True, cross=True, subquadratic=False,
    paper="Bahdanau, Cho, Bengio 2015",
    summary="score = w^T tanh(Wq q + Wk k) (learned, no dot product)",
    module=AdditiveAttention,
)(additive_attention)
