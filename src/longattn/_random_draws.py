"""Reproducible block draws of BigBird's random attention
(:class:`longattn.patterns.RandomBlocks`): a counter-based hash of (seed, head,
query block, step) and Floyd's sampling without replacement, O(blocks * r^2)."""

from __future__ import annotations

import torch
from torch import Tensor

_MASK62 = (1 << 62) - 1


def _mix(x: Tensor) -> Tensor:
    """A 62-bit integer hash (xor-shift-multiply rounds) of int64 tensors."""
    x = x & _MASK62
    x = ((x ^ (x >> 31)) * 0x5851F42D4C957F2D) & _MASK62
    x = ((x ^ (x >> 29)) * 0x14057B7EF767814F) & _MASK62
    return x ^ (x >> 32)


def _draw_blocks(seed: int, heads: int, t: Tensor, nb: int, r: int, avoid_window: int,
                 avoid_first: int, causal: bool) -> Tensor:
    """For each head and query block in ``t``: up to ``r`` distinct key blocks, drawn by
    Floyd's algorithm from a counter-based hash of (seed, head, block, step).

    Allowed key blocks of query block t: ``j >= avoid_first``, ``|j - t| > avoid_window``,
    and ``j <= t`` (causal) or ``j < nb``. They form at most two ranges, so a draw in
    [0, m) maps to a block in O(1). Returns [heads, len(t), r], sorted, -1 padded."""
    w = avoid_window
    h = torch.arange(heads)[:, None]
    tt = t[None, :]
    # range A: [avoid_first, t - w - 1] (or [avoid_first, t] causal with w < 0)
    a_hi = tt - w - 1 if w >= 0 else (tt if causal else torch.full_like(tt, nb - 1))
    a_hi = torch.minimum(a_hi, torch.full_like(tt, nb - 1))
    len_a = (a_hi - avoid_first + 1).clamp(min=0)
    # range B: [max(t + w + 1, avoid_first), nb - 1], non-causal with w >= 0 only
    b_lo = torch.maximum(tt + w + 1, torch.full_like(tt, avoid_first))
    len_b = (nb - b_lo).clamp(min=0) if (w >= 0 and not causal) else torch.zeros_like(tt)
    m = (len_a + len_b).expand(heads, -1)  # [H, T] blocks to choose from
    k = m.clamp(max=r)  # draws per row
    out = torch.full((heads, t.numel(), r), -1, dtype=torch.long)
    base = _mix((seed * 0x2545F4914F6CDD1D & _MASK62) + h * 0x9E3779B97F4A7C1 + tt * 0x3C6EF372FE94F82B)
    for s in range(r):
        jj = m - k + s  # Floyd: for jj in m-k .. m-1, pick x in [0, jj]; if taken, take jj
        act = s < k
        x = _mix(base + (s * 0x632BE59BD9B4E019 & _MASK62)) % (jj + 1).clamp(min=1)
        taken = (out[..., :s] == x[..., None]).any(-1) if s else torch.zeros_like(act)
        x = torch.where(taken, jj, x)
        out[..., s] = torch.where(act, x, torch.full_like(x, -1))
    idx = out
    in_a = idx < len_a[..., None]
    blocks = torch.where(in_a, avoid_first + idx, b_lo[..., None] + (idx - len_a[..., None]))
    blocks = torch.where(idx >= 0, blocks, torch.full_like(blocks, -1))
    # sorted, -1 last
    key = torch.where(blocks >= 0, blocks, torch.full_like(blocks, 1 << 40))
    order = key.argsort(-1)
    return torch.gather(blocks, -1, order)


def _in_table(tab: Tensor, block: int, i: Tensor, j: Tensor, h: Tensor) -> Tensor:
    """Is key block j // block among the drawn blocks tab[h, i // block, :]?"""
    hh = h.clamp(0, tab.shape[0] - 1)
    qb = (i // block).clamp(0, tab.shape[1] - 1)
    drawn = tab[hh, qb]  # [..., r]
    return ((drawn == (j // block)[..., None]) & (drawn >= 0)).any(-1)


