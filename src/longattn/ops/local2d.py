"""Exact 2D local (neighbourhood) attention for images flattened row-major.

A sequence of N = height * width positions, position p = r * width + c. Query (r, c)
sees key (r', c') iff |r - r'| <= radius_h and |c - c'| <= radius_w (a
(2 radius_h + 1) x (2 radius_w + 1) neighbourhood, Parmar et al. 2018, Image
Transformer, "local 2D"; Ramachandran et al. 2019), intersected with raster order
(r', c') <= (r, c) when ``causal``.

It runs on the exact engine (:mod:`longattn.ops.blocksparse`) as the pattern
:class:`longattn.patterns.Neighborhood2D`: query tiles of 8 x 8 pixels over their
(8 + 2 rh) x (8 + 2 rw) key blocks, one shared mask for every interior tile, the
fused CPU flash kernel for each slice of tiles. Time O(N (8 + 2 rh)(8 + 2 rw) D),
memory O(N D) plus a bounded workspace: no N x N and no per-query key copies.
Grouped KV heads and decode steps (Nq < Nk, bottom-right) come with the engine.
"""

from __future__ import annotations

from torch import Tensor

from longattn import patterns as P
from longattn.ops._checks import check_int, check_qkv
from longattn.ops.blocksparse import pattern_attention
from longattn.registry import REQUIRED, Param, register

_CACHE: dict[tuple[int, int, int, int], P.Neighborhood2D] = {}


def neighborhood(height: int, width: int, radius_h: int, radius_w: int) -> P.Neighborhood2D:
    """The (cached) pattern object: its engine plans are cached with it."""
    key = (height, width, radius_h, radius_w)
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = P.Neighborhood2D(height, width, radius_h, radius_w)
    return _CACHE[key]


@register(
    "local2d",
    params=(Param("height", REQUIRED, "image rows H (N = H * W)"),
            Param("width", REQUIRED, "image columns W"),
            Param("radius_h", 1, "vertical radius: |r - r'| <= radius_h"),
            Param("radius_w", 1, "horizontal radius: |c - c'| <= radius_w")),
    family="pattern",
    exact=True,
    causal=True,
    cross=False,
    subquadratic=True,
    gqa=True,
    bottom_right=True,
    paper="Parmar et al. 2018, Image Transformer (local 2D attention)",
    summary="2D neighbourhood window on a row-major H x W grid, exact, O(N * window), engine tiles",
)
def local2d_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    height: int,
    width: int,
    radius_h: int = 1,
    radius_w: int = 1,
) -> Tensor:
    """q [B, h, Nq, D], k [B, h_kv, N, D], v [B, h_kv, N, Dv] with N = height * width
    -> [B, h, Nq, Dv] (Nq < N: the last Nq pixels in raster order).

    Fully masked queries (all neighbours padded) return zeros."""
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=True)
    H = check_int("height", height, minimum=1)
    W = check_int("width", width, minimum=1)
    rh = check_int("radius_h", radius_h, minimum=0)
    rw = check_int("radius_w", radius_w, minimum=0)
    if H * W != d.Nk:
        raise ValueError(f"height * width ({H} * {W} = {H * W}) must equal the sequence length {d.Nk}")
    return pattern_attention(q, k, v, neighborhood(H, W, rh, rw), causal=causal,
                             key_padding_mask=key_padding_mask, scale=scale)
