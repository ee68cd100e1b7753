"""Positional encodings: sinusoidal, learned, frequency (continuous inputs), RoPE, ALiBi.

Shapes are batch-first: token features ``x`` are [B, N, dim]; per-head tensors are
[B, H, N, D] (the layout of the attention mechanisms).

- :func:`sinusoidal_table` / :class:`SinusoidalPositionalEncoding` -- Vaswani et al.
  2017: PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)).
- :class:`LearnedPositionalEncoding` -- one trained vector per position (BERT/GPT).
- :func:`frequency_encoding` / :class:`FrequencyEncoding` -- for continuous inputs
  (Mildenhall et al. 2020, NeRF; Tancik et al. 2020): x -> [x, sin(2^l x), cos(2^l x)]
  for l < L, feature by feature.
- :class:`RotaryEmbedding` -- RoPE (Su et al. 2021, RoFormer): rotate each pair
  (x[2i], x[2i+1]) of q and k by the angle p * base^(-2i/D), so q_i . k_j depends on
  positions only through i - j.
- :func:`alibi_slopes` / :func:`alibi_bias` -- ALiBi (Press et al. 2022): the score
  bias -slope_h * |i - j|. It is an Nq x Nk tensor, so only the dense mechanism
  (``full``) should get it at long N; the layer refuses it for mechanisms without
  the ``bias`` capability.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n: int, dim: int, *, base: float = 10000.0, offset: int = 0,
                     dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """[n, dim] table of positions offset .. offset+n-1; dim must be even. O(n * dim)."""
    if dim % 2:
        raise ValueError(f"dim must be even for the sinusoidal encoding, got {dim}")
    pos = torch.arange(offset, offset + n, dtype=torch.float64, device=device)[:, None]
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    ang = pos * inv[None, :]
    table = torch.stack((ang.sin(), ang.cos()), dim=-1).reshape(n, dim)
    return table.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table: x [B, N, dim] -> x + PE[offset:offset+N]. Any N."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even for the sinusoidal encoding, got {dim}")
        self.dim, self.base = dim, base

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """``positions``: LongTensor [B, N] (packed documents restart at 0), else offset.."""
        if positions is not None:
            n = int(positions.max()) + 1 if positions.numel() else 1
            table = sinusoidal_table(n, self.dim, base=self.base, dtype=x.dtype, device=x.device)
            return x + table[positions]
        pe = sinusoidal_table(x.shape[1], self.dim, base=self.base, offset=offset,
                              dtype=x.dtype, device=x.device)
        return x + pe[None]


class LearnedPositionalEncoding(nn.Module):
    """Adds a trained vector per position: x [B, N, dim] -> x + P[offset:offset+N]."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.table = nn.Embedding(max_len, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit scale, like the sinusoidal table and the (scaled) token embeddings, so
        neither positions nor tokens drown the other at the start."""
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """``positions``: LongTensor [B, N] (packed documents restart at 0), else offset.."""
        if positions is not None:
            if positions.numel() and int(positions.max()) >= self.max_len:
                raise ValueError(f"positions up to {int(positions.max())} exceed max_len={self.max_len} "
                                 "of the learned positional encoding")
            return x + self.table(positions).to(x.dtype)
        n = x.shape[1]
        if offset + n > self.max_len:
            raise ValueError(
                f"sequence positions up to {offset + n} exceed max_len={self.max_len} "
                "of the learned positional encoding"
            )
        pos = torch.arange(offset, offset + n, device=x.device)
        return x + self.table(pos)[None].to(x.dtype)


def frequency_encoding(x: Tensor, bands: int) -> Tensor:
    """x [..., F] -> [..., F * (1 + 2 * bands)]: [x, sin(2^0 x), cos(2^0 x), sin(2^1 x), ...].

    Computed in at least float32, returned in x's dtype. ``bands=0`` returns x.
    """
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 0:
        raise ValueError(f"bands must be an int >= 0, got {bands!r}")
    if bands == 0:
        return x
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    freqs = 2.0 ** torch.arange(bands, dtype=work.dtype, device=x.device)   # [L]
    ang = work[..., None, :] * freqs[:, None]                                # [..., L, F]
    parts = torch.stack((ang.sin(), ang.cos()), dim=-2)                      # [..., L, 2, F]
    parts = parts.flatten(-3)                                                # [..., 2 L F]
    return torch.cat((work, parts), dim=-1).to(x.dtype)


class FrequencyEncoding(nn.Module):
    """Module form of :func:`frequency_encoding`; ``out_features(F) = F * (1 + 2L)``."""

    def __init__(self, bands: int) -> None:
        super().__init__()
        frequency_encoding(torch.zeros(1), bands)  # validates
        self.bands = bands

    def out_features(self, in_features: int) -> int:
        return in_features * (1 + 2 * self.bands)

    def forward(self, x: Tensor) -> Tensor:
        return frequency_encoding(x, self.bands)


class RotaryEmbedding(nn.Module):
    """RoPE on [B, H, N, D] tensors (D even): pair (2i, 2i+1) rotated by p * base^(-2i/D).

    ``rotate(x, offset)`` uses positions offset .. offset+N-1; ``positions`` may be
    given explicitly as a LongTensor [N], or [B, N] (per row: packed documents).
    Computed in at least float32.

    ``grid_width`` = W: 2D (axial) RoPE for raster-ordered images: position p is the pixel
    (row p // W, column p % W); the first D/2 channels rotate by the row, the last D/2 by
    the column, each with frequencies base^(-4i/D) (D a multiple of 4). A score then
    depends on the 2D offset between the pixels: "the pixel above" is one relative rule
    (Heo et al. 2024, Rotary Position Embedding for Vision Transformer, axial form).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, grid_width: int | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if grid_width is not None:
            if isinstance(grid_width, bool) or not isinstance(grid_width, int) or grid_width < 1:
                raise ValueError(f"grid_width must be a positive int or None, got {grid_width!r}")
            if head_dim % 4:
                raise ValueError(f"2D RoPE (grid_width={grid_width}) needs head_dim % 4 == 0, got {head_dim}")
        self.head_dim, self.base, self.grid_width = head_dim, base, grid_width
        half = head_dim if grid_width is None else head_dim // 2  # channels per axis
        inv = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def _angles(self, positions: Tensor, work: torch.dtype) -> Tensor:
        """positions [N] or [B, N] -> rotation angles [..., N, D/2]."""
        inv = self.inv_freq.to(work)
        if self.grid_width is None:
            return positions.to(work)[..., None] * inv
        row, col = positions // self.grid_width, positions % self.grid_width
        return torch.cat((row.to(work)[..., None] * inv, col.to(work)[..., None] * inv), dim=-1)

    def rotate(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        n = x.shape[-2]
        if positions is None:
            positions = torch.arange(offset, offset + n, device=x.device)
        work = torch.promote_types(x.dtype, torch.float32)
        ang = self._angles(positions, work)                                     # [N, D/2] or [B, N, D/2]
        if ang.dim() == 3:
            ang = ang[:, None]                                                  # [B, 1, N, D/2]
        cos, sin = ang.cos(), ang.sin()
        xw = x.to(work).unflatten(-1, (-1, 2))                                # [..., N, D/2, 2]
        a, b = xw[..., 0], xw[..., 1]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)

    forward = rotate


def alibi_slopes(heads: int) -> Tensor:
    """Per-head ALiBi slopes [H] (Press et al. 2022): 2^(-8 h / H) for h = 1..H when H is
    a power of two; otherwise the paper's interleaving of the two nearest powers."""
    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    n = 2 ** int(math.floor(math.log2(heads)))
    slopes = pow2(n)
    if n < heads:
        slopes += pow2(2 * n)[0::2][: heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, nq: int, nk: int, *, q_offset: int = 0,
               device: torch.device | None = None) -> Tensor:
    """[1, H, Nq, Nk] bias -slope_h * |(i + q_offset) - j|. O(H * Nq * Nk) memory."""
    i = torch.arange(q_offset, q_offset + nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    dist = (i - j).abs().float()
    return -(slopes.to(device)[None, :, None, None] * dist[None, None])
