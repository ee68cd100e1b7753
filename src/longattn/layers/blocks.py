"""Transformer blocks: feed-forward, encoder block, decoder block, and their stacks.

Pre-norm (x + f(norm(x)), Xiong et al. 2020) or post-norm (norm(x + f(x)), Vaswani
et al. 2017), residual dropout on every sub-layer output. All tensors are
batch-first [B, N, dim]; ``key_padding_mask`` is bool [B, N], True = real.

- :class:`EncoderBlock`: self-attention (any mechanism, optionally causal: the
  decoder-only LM uses it with ``causal=True``) + feed-forward.
- :class:`DecoderBlock`: causal self-attention + cross-attention over the encoder
  output + feed-forward.
- :class:`Encoder` / :class:`Decoder`: stacks with a final norm in the pre-norm form.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from longattn.layers.attention import MechanismArg, MultiHeadAttention
from longattn.layers.norms import make_norm


class FeedForward(nn.Module):
    """Linear(dim, mult*dim) -> GELU -> dropout -> Linear(mult*dim, dim). O(N * dim^2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class _Residual(nn.Module):
    """One sub-layer with its norm, residual and dropout, pre- or post-norm."""

    def __init__(self, dim: int, norm: str, prenorm: bool, dropout: float) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.prenorm = prenorm
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, f: Any, key_padding_mask: Tensor | None) -> Tensor:
        if self.prenorm:
            return x + self.drop(f(self.norm(x, key_padding_mask)))
        return self.norm(x + self.drop(f(x)), key_padding_mask)


class EncoderBlock(nn.Module):
    """Self-attention + feed-forward. ``causal=True`` makes it a decoder-only (GPT) block.

    Args mirror :class:`~longattn.layers.attention.MultiHeadAttention`; ``norm`` is
    "layer" | "rms" | "batch"; ``mechanism_params`` go to a single mechanism.
    """

    def __init__(self, dim: int, heads: int, mechanism: MechanismArg = "full", *,
                 mechanism_params: dict[str, Any] | None = None, causal: bool = False,
                 norm: str = "layer", prenorm: bool = True, dropout: float = 0.0,
                 attn_dropout: float = 0.0, mlp_ratio: int = 4, rope: bool = False,
                 alibi: bool = False, global_tokens: int = 0, kv_heads: int | None = None,
                 rope_grid: int | None = None) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, mechanism, causal=causal, rope=rope, alibi=alibi, rope_grid=rope_grid,
                                       attn_dropout=attn_dropout, global_tokens=global_tokens,
                                       kv_heads=kv_heads, **(mechanism_params or {}))
        self.ff = FeedForward(dim, mlp_ratio, dropout)
        self.sub_attn = _Residual(dim, norm, prenorm, dropout)
        self.sub_ff = _Residual(dim, norm, prenorm, dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, n_global: int = 0,
                **call_params: Any) -> Tensor:
        x = self.sub_attn(
            x, lambda h: self.attn(h, key_padding_mask=key_padding_mask, n_global=n_global, **call_params),
            key_padding_mask)
        return self.sub_ff(x, self.ff, key_padding_mask)

    def step(self, x: Tensor, states: Sequence[Any], pos: int) -> Tensor:
        """Decoding step on x [B, 1, dim] at position ``pos`` (eval mode)."""
        x = self.sub_attn(x, lambda h: self.attn.step(h, states, pos), None)
        return self.sub_ff(x, self.ff, None)


class DecoderBlock(nn.Module):
    """Causal self-attention + cross-attention (``cross_mechanism``, needs spec.cross) + FF."""

    def __init__(self, dim: int, heads: int, mechanism: MechanismArg = "full", *,
                 mechanism_params: dict[str, Any] | None = None,
                 cross_mechanism: MechanismArg = "full",
                 cross_params: dict[str, Any] | None = None, norm: str = "layer",
                 prenorm: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0,
                 mlp_ratio: int = 4, rope: bool = False, alibi: bool = False, rope_grid: int | None = None) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads, mechanism, causal=True, rope=rope, alibi=alibi, rope_grid=rope_grid,
                                            attn_dropout=attn_dropout, **(mechanism_params or {}))
        self.cross_attn = MultiHeadAttention(dim, heads, cross_mechanism, attn_dropout=attn_dropout,
                                             **(cross_params or {}))
        bad = [g.name for g in self.cross_attn.groups if not g.spec.cross]
        if bad:
            raise ValueError(f"cross_mechanism {bad} cannot do cross-attention (spec.cross=False)")
        self.ff = FeedForward(dim, mlp_ratio, dropout)
        self.sub_self = _Residual(dim, norm, prenorm, dropout)
        self.sub_cross = _Residual(dim, norm, prenorm, dropout)
        self.sub_ff = _Residual(dim, norm, prenorm, dropout)

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor | None = None,
                memory_padding_mask: Tensor | None = None) -> Tensor:
        """x [B, Nt, dim] (target), memory [B, Ns, dim] (encoder output) -> [B, Nt, dim]."""
        x = self.sub_self(x, lambda h: self.self_attn(h, key_padding_mask=key_padding_mask),
                          key_padding_mask)
        x = self.sub_cross(x, lambda h: self.cross_attn(h, memory, key_padding_mask=memory_padding_mask),
                           key_padding_mask)
        return self.sub_ff(x, self.ff, key_padding_mask)


class Encoder(nn.Module):
    """``depth`` EncoderBlocks (+ final norm when pre-norm). Keyword args go to each block."""

    def __init__(self, dim: int, depth: int, heads: int, **kw: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, **kw) for _ in range(depth))
        self.norm = make_norm(kw.get("norm", "layer"), dim) if kw.get("prenorm", True) else None

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, n_global: int = 0,
                **call_params: Any) -> Tensor:
        for blk in self.blocks:
            x = blk(x, key_padding_mask, n_global, **call_params)
        return x if self.norm is None else self.norm(x, key_padding_mask)


class Decoder(nn.Module):
    """``depth`` DecoderBlocks (+ final norm when pre-norm)."""

    def __init__(self, dim: int, depth: int, heads: int, **kw: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, **kw) for _ in range(depth))
        self.norm = make_norm(kw.get("norm", "layer"), dim) if kw.get("prenorm", True) else None

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor | None = None,
                memory_padding_mask: Tensor | None = None) -> Tensor:
        for blk in self.blocks:
            x = blk(x, memory, key_padding_mask, memory_padding_mask)
        return x if self.norm is None else self.norm(x, key_padding_mask)
