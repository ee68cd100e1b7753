"""The shared softmax numerics of the exact engines: one place for each rule.

Every engine that computes softmax attention in pieces (the pattern engine of
:mod:`longattn.ops.pattern`, the sorted-chunk engine of :mod:`longattn.ops._chunked`,
the 2-D strips of :mod:`longattn.ops.local2d`) calls these:

- the tile kernels: :data:`flash_fwd` / :data:`flash_bwd` (PyTorch's fused CPU flash
  kernel, the only reference to it in the package) and :func:`tile_forward` /
  :func:`tile_backward` (the same contract in plain tensor ops, for other devices,
  score caps and non-finite inputs); :func:`kernels` picks the pair, and
  :data:`FORCE_MATH` forces the plain pair everywhere (tests of the non-CPU path);
- the merge of softmax parts by their log-sum-exp (:func:`merge_by_lse` over a stacked
  axis, :func:`merge_running_` into a running (out, lse)), and the fold of a sink
  logit (:func:`add_sinks`, :func:`sink_grad`);
- the small rules: the work dtype (:func:`work_dtype`), the weight floor
  (:func:`exp_floor`, :func:`exp_`), additive masks (:func:`additive_mask`), one head
  size for q, k and v (:func:`pad_head_dim`).

The zero-row rule holds throughout: a query row with no visible key gets output 0
and lse = -inf, never NaN, and a part with lse = -inf gets no weight in a merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

#: aten's fused CPU flash attention: (q, k, v, dropout_p, is_causal, attn_mask=, scale=)
#: -> (out [.., M, D], lse [.., M]); its backward takes (dout, q, k, v, out, lse, ...).
flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: run the plain-matmul tile kernels on the CPU too (tests of the non-CPU path)
FORCE_MATH = False


def flash_ok(x: Tensor) -> bool:
    """Can the fused CPU flash kernel take ``x`` (a CPU float32/float64 tensor)?"""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (accumulate in fp32), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the tile engines: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exp_floor(dtype: torch.dtype) -> float:
    """Log-weights below this are flushed to 0: -30 for float32 (e^-30 ~ 1e-13, far
    below its resolution next to the row's largest weight, 1), -80 for float64."""
    return -80.0 if dtype == torch.float64 else -30.0


def exp_(x: Tensor) -> Tensor:
    """In-place exp that flushes weights below e^exp_floor to 0.

    Left alone, such weights and the gradients they scale become denormal numbers,
    which slow the CPU matmuls ~20x.
    """
    return torch.nn.functional.threshold_(x, exp_floor(x.dtype), float("-inf")).exp_()


def additive_mask(vis: Tensor, dtype: torch.dtype) -> Tensor:
    """bool visibility (True = visible) -> additive mask of the same shape (0 / -inf),
    an expanded view of one zero: O(1) memory until the fill writes the hidden entries."""
    return torch.zeros((), dtype=dtype, device=vis.device).expand(vis.shape).masked_fill(~vis, float("-inf"))


def pad_head_dim(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v zero-padded along the last dim to one head size max(D, Dv): the fused
    flash kernel needs D == Dv. Zero columns of q and k change no score; zero columns
    of v give zero output columns (the caller slices them off with ``[..., :Dv]``)."""
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv < D:
        v = torch.nn.functional.pad(v, (0, D - Dv))
    elif Dv > D:
        q = torch.nn.functional.pad(q, (0, Dv - D))
        k = torch.nn.functional.pad(k, (0, Dv - D))
    return q, k, v


# ----------------------------------------------------------------------------------------
# Tile kernels
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileOpts:
    """How the tiles are computed: ``softcap`` (scores s -> c tanh(s / c)) and ``safe``
    (non-finite inputs: masked scores selected, never added, and no 0 * NaN in a matmul).
    Either runs the plain-matmul kernels; the default runs the CPU flash kernel."""

    softcap: float | None = None
    safe: bool = False

    @property
    def math(self) -> bool:
        return self.softcap is not None or self.safe


FAST = TileOpts()


def scores(q: Tensor, k: Tensor, is_causal: bool, attn_mask: Tensor | None, scale: float,
           softcap: float | None = None, grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Masked scores [.., M, K] in the accumulation dtype, and (``grad`` and ``softcap``)
    the cap's derivative 1 - tanh^2(s / c). ``attn_mask``: bool (True = visible, the
    hidden scores are *selected* to -inf, so a NaN key cannot reach a row that does not
    see it) or additive float. The cap comes before the masks (tanh(-inf) is -1)."""
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)
    dcap = None
    if softcap is not None:
        s = s.div_(softcap).tanh_()
        dcap = 1.0 - s * s if grad else None
        s = s.mul_(softcap)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        s = s + attn_mask.to(acc)
    return s, dcap


def matmul_safe(a: Tensor, b: Tensor, safe: bool) -> Tensor:
    """a @ b where a zero of ``a`` never meets a non-finite entry of ``b`` (0 * NaN would
    spread a hidden key's NaN over every row of the tile): b's non-finite entries are
    zeroed, and the outputs that take one with a non-zero weight are set to NaN.
    ``safe=False``: the plain matmul. Cost: one more matmul of a's support, safe only."""
    if not safe:
        return torch.matmul(a, b)
    bad = ~torch.isfinite(b)
    out = torch.matmul(a, b.masked_fill(bad, 0.0))
    if bool(bad.any()):
        hit = torch.matmul((a != 0).to(a.dtype), bad.to(a.dtype))
        out = out.masked_fill(hit > 0, float("nan"))
    return out


def tile_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool,
                 attn_mask: Tensor | None = None, scale: float | None = None, *,
                 softcap: float | None = None, safe: bool = False) -> tuple[Tensor, Tensor]:
    """The tile kernel in plain tensor ops, for devices without the CPU flash kernel and
    for what that kernel cannot do (``softcap``; ``safe``: non-finite inputs). Same
    contract as :data:`flash_fwd`: output [.., M, Dv] and lse [.., M] of [.., M, D]
    queries over [.., K, D] keys. A row with no visible key gets output 0 and lse
    -inf (the flash kernel's lse there is not: callers mask dead rows' lse themselves).
    ``attn_mask`` bool (True = visible) or additive; ``dropout_p`` is ignored (0).
    Cost O(M K D) time, O(M K) memory per call (the caller bounds M K)."""
    s, _ = scores(q, k, is_causal, attn_mask, scale, softcap)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)
    p = exp_(s.sub_(m))
    z = p.sum(-1, keepdim=True)
    o = matmul_safe(p, v.to(p.dtype), safe).div_(z.clamp_min(torch.finfo(p.dtype).tiny))
    return o.to(q.dtype), (m + torch.log(z)).squeeze(-1)


def tile_backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dropout_p: float,
                  is_causal: bool, attn_mask: Tensor | None = None, scale: float | None = None, *,
                  softcap: float | None = None, safe: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`tile_forward` given the *merged* output o and lse (so the
    gradient is that of the one softmax over all tiles), as the flash kernel does it:
    p = exp(s - lse), dv = p^T g, ds = p * (g v^T - rowsum(g * o)), dq = scale ds k,
    dk = scale ds^T q; with ``softcap`` ds is taken through the cap (times 1 - tanh^2).
    ``safe``: rows without upstream gradient and hidden pairs contribute exact zeros
    (no 0 * NaN from a non-finite row, key or value). A row with no visible key must
    come with lse = +inf (as for the flash kernel): its p is then 0, never NaN.
    Returns (dq, dk, dv)."""
    s, dcap = scores(q, k, is_causal, attn_mask, scale, softcap, grad=True)
    p = exp_(s.sub_(lse.to(s.dtype)[..., None]))
    ga = g.to(s.dtype)
    if safe:
        p = p.masked_fill(~(ga != 0).any(-1, keepdim=True), 0.0)
    delta = (ga * o.to(s.dtype)).sum(-1, keepdim=True)
    dv = matmul_safe(p.transpose(-1, -2), ga, safe)
    ds = matmul_safe(ga, v.to(s.dtype).transpose(-1, -2), safe).sub_(delta).mul_(p)
    if safe:
        ds = ds.masked_fill(p == 0, 0.0)
    if dcap is not None:
        ds = ds.mul_(dcap)
    dq = matmul_safe(ds, k.to(s.dtype), safe).mul_(scale)
    dk = matmul_safe(ds.transpose(-1, -2), q.to(s.dtype), safe).mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kernels(device: torch.device, opts: TileOpts = FAST) -> tuple[Callable, Callable]:
    """(forward, backward) tile kernels for a device and options: the CPU flash kernel
    unless :data:`FORCE_MATH`, another device or ``opts.math``; then the plain ones."""
    if device.type == "cpu" and not FORCE_MATH and not opts.math:
        return flash_fwd, flash_bwd
    if not opts.math:
        return tile_forward, tile_backward
    kw = dict(softcap=opts.softcap, safe=opts.safe)
    return partial(tile_forward, **kw), partial(tile_backward, **kw)


# ----------------------------------------------------------------------------------------
# Merging softmax parts
# ----------------------------------------------------------------------------------------


def merge_by_lse(outs: Tensor, lses: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Merge softmax parts: sum_r softmax_r(lse_r) * out_r along ``dim``.

    outs [..., R, ..., Dv] and lses (outs without the last dim). Parts with
    lse = -inf get no weight; if every part is -inf the result is 0 and the
    merged lse -inf. Differentiable (through lse too) and NaN-free.
    """
    m = lses.amax(dim, keepdim=True).detach()
    m = m.masked_fill(torch.isinf(m), 0.0)
    w = torch.exp(lses - m)
    z = w.sum(dim, keepdim=True)
    w = w / z.clamp_min(torch.finfo(z.dtype).tiny)
    out = (outs * w.unsqueeze(-1)).sum(dim)
    lse = (m + torch.log(z)).squeeze(dim)
    return out, lse


def merge_running_(o_acc: Tensor, l_acc: Tensor, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Fold one part (o [.., Dv], lse [..]) into a running (o_acc, l_acc) of the same
    shapes: l' = logaddexp(l_acc, lse), o' = o_acc e^(l_acc - l') + o e^(lse - l').
    Writes o_acc (and o) in place and returns (o_acc, l'); the caller stores l'. Rows
    where both are -inf stay 0 / -inf. Not differentiable (the engines' forward)."""
    l_new = torch.logaddexp(l_acc, lse)
    l_ref = torch.where(torch.isneginf(l_new), 0.0, l_new)
    o_acc.mul_(torch.exp(l_acc - l_ref)[..., None]).add_(o.mul_(torch.exp(lse - l_ref)[..., None]))
    return o_acc, l_new


def add_sinks(O: Tensor, Lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a sink logit per head (sinks [H]) into a merged softmax (O [B, H, N, Dv],
    Lse [B, H, N, 1]): Lse' = logaddexp(Lse, sink_h), O' = O e^(Lse - Lse') (the sink
    has a zero value). A row with no key gets O' = 0. O is scaled in place."""
    sk = sinks.to(Lse.dtype).view(1, -1, 1, 1)
    L2 = torch.logaddexp(Lse, sk)
    w = torch.where(torch.isneginf(L2), 0.0, torch.exp(Lse - L2))
    return O.mul_(w), L2


def sink_grad(dout: Tensor, out: Tensor, Lse: Tensor, sinks: Tensor) -> Tensor:
    """d loss / d sink_h = -sum over batch and rows of P_sink * (dO . O), P_sink =
    e^(sink_h - Lse') (the sink's softmax weight; rows without gradient add nothing).
    dout, out [B, H, N, Dv]; Lse [B, H, N, 1] (with the sink); returns [H]."""
    sk = sinks.to(Lse.dtype).view(1, -1, 1, 1)
    p_sink = torch.where(torch.isneginf(Lse), 0.0, torch.exp(sk - Lse))[..., 0]
    dot = torch.where(dout == 0, 0.0, dout.to(Lse.dtype) * out.to(Lse.dtype)).sum(-1)
    return -(p_sink * dot).sum((0, 2)).to(sinks.dtype)


__all__ = [
    "FAST", "FORCE_MATH", "TileOpts", "acc_dtype", "add_sinks", "additive_mask", "exp_", "exp_floor",
    "flash_bwd", "flash_fwd", "flash_ok", "kernels", "matmul_safe", "merge_by_lse", "merge_running_",
    "pad_head_dim", "scores", "sink_grad", "tile_backward", "tile_forward", "work_dtype",
]
