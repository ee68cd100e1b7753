"""Full (dense) softmax attention through PyTorch's scaled_dot_product_attention.

Cost O(Nq * Nk * D) time; the flash kernel keeps memory O(N * D) without a mask,
O(Nq * Nk) with a key-padding mask or a bias. Learned sinks and score caps run on the
exact engine (:mod:`longattn.ops.blocksparse`, O(N * D) memory), or, with a bias, on
the dense masked softmax of :mod:`longattn.ops.reference` (O(Nq * Nk) memory).
Vaswani et al. 2017.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn import patterns as P
from longattn.ops._checks import Dims, check_qkv, default_scale
from longattn.ops.blocksparse import check_sinks, check_softcap, pattern_attention
from longattn.ops.packing import packed_documents
from longattn.registry import Param, register

_CAUSAL = P.Causal()  # one object each: their engine plans are cached
_FULL = P.Full()


def padding_bias(key_padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive [B, 1, 1, Nk] bias: 0 for real keys, -inf for padded ones."""
    zero = torch.zeros((), dtype=dtype, device=key_padding_mask.device)
    ninf = torch.full((), float("-inf"), dtype=dtype, device=key_padding_mask.device)
    return torch.where(key_padding_mask, zero, ninf)[:, None, None, :]


@register(
    "full",
    params=(Param("bias", None, "score bias [B|1, H|1, Nq|1, Nk|1]: float added, bool = keep (SDPA)"),
            Param("dropout", 0.0, "attention dropout probability")),
    family="dense",
    compile_recompute=True, random_params=("dropout",), dynamo_traced="aligned", sequence_parallel="ring",
    exact=True,
    causal=True,
    cross=True,
    subquadratic=False,
    bias=True,
    gqa=True,
    bottom_right=True,
    packed=True,
    sinks=True,
    softcap=True,
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
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Dense attention. q [B,H,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] -> [B,H,Nq,Dv].

    ``bias``: broadcastable to [B, H, Nq, Nk] (e.g. ALiBi); float is added to the
    scores, bool is a mask (True = keep, as SDPA reads it). With packed documents
    (``segment_ids``) it is given for the whole row and sliced per document.
    ``sinks`` [H] / ``softcap`` c: see :func:`longattn.attention`; without a bias they
    run on the exact engine (O(N D) memory), with one on the dense masked softmax
    (O(Nq Nk) memory); dropout does not combine with them.
    Queries whose every key is padded or masked return zeros. Grouped KV heads go
    to SDPA's ``enable_gqa`` (no repeat). Causal with Nq < Nk is bottom-right aligned
    (query r is position Nk - Nq + r) and runs on the exact engine with the causal
    pattern: O((Nq + Nk) D) memory, a decode step costs O(Nk D). Padded keys are
    zeroed and a causal row never reads a later key, even a non-finite one.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=causal,
                  cross=True)  # not causal: any Nq, Nk (cross-attention over a shorter encoder)
    s = default_scale(scale, d.D)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    check_sinks(sinks, d.H)
    check_softcap(softcap)
    terms = sinks is not None or softcap is not None
    if terms and dropout:
        raise ValueError(f"dropout ({dropout}) does not combine with sinks or softcap; use dropout=0.0")
    docs = packed_documents() if bias is not None else None
    if docs is not None:  # the bias is given for the packed rows: slice it per document
        row, pos, (rows, n) = docs
        bias = document_bias(check_bias(bias, rows, d.H, n, n), row, pos)
    bias = check_bias(bias, d.B, d.H, d.Nq, d.Nk)
    if key_padding_mask is not None:  # padded rows can hold anything (fp16 overflow)
        keep = key_padding_mask[:, None, :, None]
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    engine = bias is None and not dropout
    if engine and (terms or (causal and d.Nq != d.Nk)):
        return pattern_attention(q, k, v, _CAUSAL if causal else _FULL, causal=causal,
                                 key_padding_mask=key_padding_mask, scale=s, sinks=sinks, softcap=softcap)
    if terms:
        from longattn.ops.reference import dense_attention

        return dense_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=s, bias=bias,
                               sinks=sinks, softcap=softcap)
    out = _sdpa(q, k, v, d, causal, key_padding_mask, s, bias, dropout)
    if causal and engine and not bool(torch.isfinite(out).all()):
        # a non-finite key or value can reach earlier rows inside SDPA's tiles: the
        # engine selects masked scores and never multiplies a hidden value by 0
        return pattern_attention(q, k, v, _CAUSAL, causal=True, key_padding_mask=key_padding_mask, scale=s,
                                 backend="engine")
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, d: Dims, causal: bool, key_padding_mask: Tensor | None, s: float,
          bias: Tensor | None, dropout: float) -> Tensor:
    """SDPA with the padding, bias and bottom-right causal mask folded into one
    additive mask (rows with no visible key give zeros)."""
    gqa = d.Hkv != d.H
    if key_padding_mask is None and bias is None and not (causal and d.Nq != d.Nk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=s, dropout_p=dropout,
                                              enable_gqa=gqa)
    mask = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device)
    if key_padding_mask is not None:
        mask = mask + padding_bias(key_padding_mask, q.dtype)
    if bias is not None and bias.dtype == torch.bool:
        mask = torch.where(bias, mask, float("-inf"))
    elif bias is not None:
        mask = mask + bias.to(q.dtype)
    if causal:  # bottom-right: query r is position Nk - Nq + r
        tri = torch.ones(d.Nq, d.Nk, dtype=torch.bool, device=q.device).tril(d.Nk - d.Nq)
        mask = mask.masked_fill(~tri, float("-inf"))
    mask = mask.expand(d.B, d.H, d.Nq, d.Nk)
    dead = torch.isneginf(mask).all(-1, keepdim=True)  # rows with no visible key
    mask = mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, dropout_p=dropout, enable_gqa=gqa)
    return out.masked_fill(dead, 0.0)


def check_bias(bias: object, B: int, H: int, Nq: int, Nk: int) -> Tensor | None:
    """``bias`` as a 4-D view broadcastable to [B, H, Nq, Nk] (float or bool);
    TypeError/ValueError naming it and the accepted shapes otherwise."""
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor broadcastable to [B, H, Nq, Nk], got {type(bias).__name__}")
    if not (bias.dtype.is_floating_point or bias.dtype == torch.bool):
        raise TypeError(f"bias must be a float (added to the scores) or bool (True = keep) tensor, "
                        f"got dtype {bias.dtype}")
    want = (B, H, Nq, Nk)
    if bias.dim() > 4 or any(n not in (1, w) for n, w in zip(bias.shape[::-1], want[::-1])):
        raise ValueError(f"bias must be broadcastable to [B, H, Nq, Nk] = {list(want)} "
                         f"(each of [B|1, H|1, Nq|1, Nk|1], up to 4 dims), got {tuple(bias.shape)}")
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def document_bias(bias: Tensor, row: Tensor, pos: Tensor) -> Tensor:
    """A whole-row bias [B|1, H|1, N|1, N|1] sliced to packed documents (row [M] of each,
    positions [M, L] of its slots, :func:`longattn.ops.packing.packed_documents`):
    [M|1, H|1, L|1, L|1]. Cost O(M L^2) (full attention over the documents is that)."""
    dev = bias.device
    b = row.to(dev) if bias.shape[0] > 1 else torch.zeros_like(row, device=dev)
    pi = pos.to(dev) if bias.shape[2] > 1 else torch.zeros_like(pos[:, :1], device=dev)
    pj = pos.to(dev) if bias.shape[3] > 1 else torch.zeros_like(pos[:, :1], device=dev)
    out = bias[b[:, None, None], :, pi[:, :, None], pj[:, None, :]]  # [M, Li, Lj, H|1]
    return out.permute(0, 3, 1, 2)
