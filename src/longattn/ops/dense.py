"""Full (dense) softmax attention through PyTorch's scaled_dot_product_attention.

Cost O(Nq * Nk * D) time; the flash kernel keeps memory O(N * D) without a mask,
O(Nq * Nk) with a key-padding mask or a bias. Vaswani et al. 2017.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn import patterns as P
from longattn.ops._checks import check_qkv, default_scale
from longattn.registry import Param, register

_CAUSAL = P.Causal()  # one object: its engine plans are cached


def padding_bias(key_padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive [B, 1, 1, Nk] bias: 0 for real keys, -inf for padded ones."""
    zero = torch.zeros((), dtype=dtype, device=key_padding_mask.device)
    ninf = torch.full((), float("-inf"), dtype=dtype, device=key_padding_mask.device)
    return torch.where(key_padding_mask, zero, ninf)[:, None, None, :]


@register(
    "full",
    params=(Param("bias", None, "additive score bias [B|1, H|1, Nq, Nk]"),
            Param("dropout", 0.0, "attention dropout probability")),
    family="dense",
    exact=True,
    causal=True,
    cross=True,
    subquadratic=False,
    bias=True,
    gqa=True,
    bottom_right=True,
    packed=True,
    paper="Vaswani et al. 2017, Attention Is All You Need",
    summary="softmax(QK^T/sqrt(d))V over every key (PyTorch SDPA)",
)
def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    bias: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Dense attention. q [B,H,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] -> [B,H,Nq,Dv].

    ``bias``: additive scores broadcastable to [B, H, Nq, Nk] (e.g. ALiBi).
    Queries whose every key is padded or masked return zeros. Grouped KV heads go
    to SDPA's ``enable_gqa`` (no repeat). Causal with Nq < Nk is bottom-right aligned
    (query r is position Nk - Nq + r) and runs on the exact engine with the causal
    pattern: O((Nq + Nk) D) memory, a decode step costs O(Nk D).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=True)
    s = default_scale(scale, d.D)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    gqa = d.Hkv != d.H
    if causal and d.Nq != d.Nk and bias is None and not dropout:
        from longattn.ops.blocksparse import pattern_attention

        return pattern_attention(q, k, v, _CAUSAL, causal=True, key_padding_mask=key_padding_mask, scale=s)
    if key_padding_mask is None and bias is None and not (causal and d.Nq != d.Nk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=s, dropout_p=dropout,
                                              enable_gqa=gqa)
    mask = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device)
    if key_padding_mask is not None:
        mask = mask + padding_bias(key_padding_mask, q.dtype)
    if bias is not None:
        mask = mask + bias.to(q.dtype)
    if causal:  # bottom-right: query r is position Nk - Nq + r
        tri = torch.ones(d.Nq, d.Nk, dtype=torch.bool, device=q.device).tril(d.Nk - d.Nq)
        mask = mask.masked_fill(~tri, float("-inf"))
    mask = mask.expand(d.B, d.H, d.Nq, d.Nk)
    dead = torch.isneginf(mask).all(-1, keepdim=True)  # rows with no visible key
    mask = mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, dropout_p=dropout, enable_gqa=gqa)
    return out.masked_fill(dead, 0.0)
