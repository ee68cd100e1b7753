"""Normalisations for sequences, and the label-smoothing cross-entropy loss.

Every norm here has ``forward(x, key_padding_mask=None)`` on x [B, N, dim] so blocks
can call them alike; ``key_padding_mask`` is bool [B, N], True = a real token.

- :class:`LayerNorm` -- Ba et al. 2016; per position, padding cannot matter.
- :class:`RMSNorm` -- Zhang & Sennrich 2019: x / sqrt(mean(x^2) + eps) * g.
- :class:`SequenceBatchNorm` -- Ioffe & Szegedy 2015 over sequences: statistics
  over batch *and* positions, real positions only; running mean/var updated by a
  moving average in training and used in eval.
- :func:`label_smoothing_cross_entropy` -- Szegedy et al. 2016, with ignore_index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with the common ``(x, key_padding_mask=None)`` signature."""

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class RMSNorm(nn.Module):
    """x * g / sqrt(mean(x^2, -1) + eps); computed in at least float32. O(N * dim)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        w = x.to(torch.promote_types(x.dtype, torch.float32))
        y = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class SequenceBatchNorm(nn.Module):
    """BatchNorm over [B, N, dim]: per feature, statistics over B and N, padding excluded.

    Training: mean/var (biased) of the real positions normalise the batch; the
    running statistics move by ``momentum`` toward the batch mean and the unbiased
    variance (as ``nn.BatchNorm1d`` does). Eval: the running statistics are used, so a
    position's output depends on that position only. Padded positions are normalised
    too (their output is defined but meaningless) and never change a real output.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, dim], got shape {tuple(x.shape)}")
        work = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(work)
        if self.training:
            if key_padding_mask is None:
                m = torch.ones(x.shape[:2], dtype=work, device=x.device)
            else:
                if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
                    raise ValueError(
                        f"key_padding_mask must be [B, N] = {list(x.shape[:2])}, "
                        f"got {tuple(key_padding_mask.shape)}"
                    )
                m = key_padding_mask.to(work)
            m = m[..., None]
            count = m.sum()
            if count < 1:
                raise ValueError("SequenceBatchNorm got a batch with no real position")
            mean = (xw * m).sum((0, 1)) / count
            var = ((xw - mean).pow(2) * m).sum((0, 1)) / count
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean.to(work), self.running_var.to(work)
        y = (xw - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(work) + self.bias.to(work)
        return y.to(x.dtype)


NORMS: dict[str, type[nn.Module]] = {
    "layer": LayerNorm,
    "rms": RMSNorm,
    "batch": SequenceBatchNorm,
}
"""Norm kinds by name (``ModelConfig.norm``)."""


def make_norm(kind: str, dim: int) -> nn.Module:
    """A norm of ``kind`` in :data:`NORMS`; ValueError naming the kinds otherwise."""
    try:
        return NORMS[kind](dim)
    except KeyError:
        raise ValueError(f"unknown norm {kind!r}; choose one of {sorted(NORMS)}") from None


def label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Mean over non-ignored targets of (1 - eps) * NLL + eps * mean_c(-log p_c).

    Args:
        logits: [..., C]; target: [...] int64 class indices (``ignore_index`` skipped).
        smoothing: eps in [0, 1).
    Returns:
        a scalar (0 when every target is ignored, never NaN). Computed in float32+.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits [..., C] and target [...] disagree: {tuple(logits.shape)} vs {tuple(target.shape)}"
        )
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logp = logp.reshape(-1, logp.shape[-1])
    t = target.reshape(-1)
    keep = t != ignore_index
    safe = torch.where(keep, t, torch.zeros_like(t))
    nll = -logp.gather(1, safe[:, None])[:, 0]
    smooth = -logp.mean(-1)
    loss = (1.0 - smoothing) * nll + smoothing * smooth
    loss = loss * keep
    return loss.sum() / keep.sum().clamp_min(1)
