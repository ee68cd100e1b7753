"""Dense masked softmax attention: the oracle every exact path is tested against.

Cost O(Nq * Nk) time and memory; it builds the full score matrix on purpose.
Use it in tests (float64) and for tiny inputs, never for long sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + bias, masked) v, with fully masked rows giving zeros.

    Args:
        q: [B, H, Nq, D]; k: [B, H, Nk, D]; v: [B, H, Nk, Dv].
        mask: bool, broadcastable to [B, H, Nq, Nk]; True = visible.
        causal: intersect with j <= i.
        key_padding_mask: bool [B, Nk], True = real token.
        bias: additive score bias broadcastable to [B, H, Nq, Nk].

    Returns:
        [B, H, Nq, Dv] in q's dtype (computed in at least float32).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    s = default_scale(scale, d.D)
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * s
    if bias is not None:
        scores = scores + bias.to(work)
    visible = torch.ones(d.Nq, d.Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    visible = visible.expand(d.B, d.H, d.Nq, d.Nk)
    if mask is not None:
        visible = visible & mask.to(torch.bool)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~any_visible, 0.0)
    p = torch.softmax(scores, dim=-1) * any_visible
    return torch.matmul(p, v.to(work)).to(q.dtype)
