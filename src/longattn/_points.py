"""Point predicates of the patterns for FlexAttention: the types and helpers that
:meth:`longattn.patterns.Pattern.mask_mod` is written with (Flex lowers elementwise
code and table lookups only: no ``isin``, no ``any``, no ``clamp`` with a tensor
bound). Each pattern's own predicate is its ``mask_mod`` method in
:mod:`longattn.patterns`; :mod:`longattn.ops.pattern.flex_mask` wraps it with
causal, padding and documents.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from longattn.patterns import Pattern

__all__ = ["PointContext", "PointFn", "per_head_mask", "point_clip", "point_int"]

PointFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``f(i, j, h, b, gi) -> bool``: document-local positions i, j, head h, batch row b,
global query position gi (broadcastable int64 tensors); elementwise ops and table
lookups only, so that FlexAttention can lower it."""

_POINT_MAX = 1 << 62


def point_int(x: int) -> Tensor:
    """``x`` as a 0-d int64 tensor (capped at 2^62): a pattern's integers held in
    tensors, so one compiled Flex kernel serves every instance of a pattern kind."""
    return torch.tensor(min(int(x), _POINT_MAX), dtype=torch.long)


def point_clip(x: Tensor, hi: Tensor) -> Tensor:
    """``x`` limited to [0, hi] (Flex does not lower ``clamp`` with a tensor bound)."""
    return torch.minimum(x.clamp(min=0), hi)


@dataclass(frozen=True)
class PointContext:
    """What :meth:`Pattern.mask_mod` builds its point predicate for.

    heads: the heads it covers; causal: it will be intersected with j <= i (random
    blocks then draw among earlier blocks); n: the length its tables are laid over;
    lengths: the distinct document lengths (``(n,)`` without packed documents);
    lidx: [B, N] int64, the index in ``lengths`` of each position's document (None:
    one document per row).
    """

    heads: int
    causal: bool
    n: int
    lengths: tuple[int, ...]
    lidx: Tensor | None = None


def per_head_mask(split: list[tuple[int, int, "Pattern"]], ctx: PointContext) -> tuple[PointFn, str]:
    """Per-head lists: head group k (heads [h0, h0 + nh)) uses its pattern's point
    predicate on the local head h - h0."""
    parts = [(h0, nh, *sub.mask_mod(replace(ctx, heads=nh))) for h0, nh, sub in split]
    lo = [point_int(h0) for h0, *_ in parts]
    hi = [point_int(h0 + nh) for h0, nh, *_ in parts]
    fns = [f for *_, f, _ in parts]

    def per_head(i, j, h, b, gi):
        out = None
        for k, f in enumerate(fns):
            v = (h >= lo[k]) & (h < hi[k]) & f(i, j, (h - lo[k]).clamp(min=0), b, gi)
            out = v if out is None else out | v
        return out

    return per_head, "heads(" + ",".join(name for *_, name in parts) + ")"


