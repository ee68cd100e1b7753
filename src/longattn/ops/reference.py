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
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + bias, masked) v, with fully masked rows giving zeros.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] (H % Hkv == 0: query
            head h reads kv head h // (H // Hkv); repeated here, this is the oracle).
        mask: bool, broadcastable to [B, H, Nq, Nk]; True = visible.
        causal: intersect with j <= i; with Nq < Nk bottom-right aligned (query r is
            position Nk - Nq + r).
        key_padding_mask: bool [B, Nk], True = real token.
        bias: additive score bias broadcastable to [B, H, Nq, Nk] (a bool bias is a
            mask, True = visible, as in SDPA).
        sinks: [H] learned sink logits: each joins its head's softmax denominator only,
            out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sinks[h]}) (gpt-oss ``s_aux``).
            A row with no visible key gives zeros.
        softcap: c > 0: scores s -> c tanh(s / c) before bias and masks (Gemma-2).

    Returns:
        [B, H, Nq, Dv] in q's dtype (computed in at least float32). Differentiable in
        q, k, v, a float bias and sinks.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=causal,
                  cross=True)
    s = default_scale(scale, d.D)
    work = torch.promote_types(q.dtype, torch.float32)
    if d.Hkv != d.H:
        k, v = (x.repeat_interleave(d.H // d.Hkv, 1) for x in (k, v))
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * s
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = torch.ones(d.Nq, d.Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(d.Nk - d.Nq)
    visible = visible.expand(d.B, d.H, d.Nq, d.Nk)
    if bias is not None and bias.dtype == torch.bool:
        visible = visible & bias
    elif bias is not None:
        scores = scores + bias.to(work)
    if mask is not None:
        visible = visible & mask.to(torch.bool)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~any_visible, 0.0)
    if sinks is not None:  # one more column: the sink's logit, with a zero value
        sink = sinks.to(work).view(1, d.H, 1, 1).expand(d.B, d.H, d.Nq, 1)
        p = torch.softmax(torch.cat([scores, sink], -1), dim=-1)[..., :-1] * any_visible
    else:
        p = torch.softmax(scores, dim=-1) * any_visible
    return torch.matmul(p, v.to(work)).to(q.dtype)
