"""Exact 2D local (neighbourhood) attention for images flattened row-major.

A sequence of N = height * width positions, position p = r * width + c. Query (r, c)
sees key (r', c') iff |r - r'| <= radius_h and |c - c'| <= radius_w (a
(2 radius_h + 1) x (2 radius_w + 1) neighbourhood, Parmar et al. 2018, Image
Transformer, "local 2D"; Ramachandran et al. 2019), intersected with raster order
(r', c') <= (r, c) when ``causal``.

It runs on the exact engine (:mod:`longattn.ops.blocksparse`). The pixels are first
regrouped tile by tile (8 x 8 tiles, :class:`longattn.patterns.TiledNeighborhood2D`):
then a query tile's keys in each neighbouring row of tiles are one contiguous run,
and a row of tiles is a strided view of the sequence, as for 1-D windows: the fused
CPU flash kernel reads them without gathers, with one shared mask for every interior
tile. Time O(N (2 ceil(rh/8) + 1)(2 ceil(rw/8) + 1) 64 D), memory O(N D) plus a
bounded workspace: no N x N and no per-query key copies. Grouped KV heads come with
the engine; decode rows (Nq < Nk, the last pixels in raster order) run on gathered
tiles in raster positions (:class:`longattn.patterns.Neighborhood2D`).
"""

from __future__ import annotations

import torch
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
    if d.Nq != d.Nk:  # the last Nq pixels in raster order: gathered tiles in raster positions
        return pattern_attention(q, k, v, neighborhood(H, W, rh, rw), causal=causal,
                                 key_padding_mask=key_padding_mask, scale=scale)
    pat, order, inverse = _tiled(H, W, rh, rw, causal)
    idx = order.clamp(min=0).to(q.device)  # padding pixels read pixel 0; nothing sees them
    kpm = None if key_padding_mask is None else key_padding_mask[:, idx] & (order >= 0).to(q.device)
    out = pattern_attention(q.index_select(2, idx), k.index_select(2, idx), v.index_select(2, idx), pat,
                            key_padding_mask=kpm, scale=scale)
    return out.index_select(2, inverse.to(q.device))


_TILED: dict[tuple, tuple[P.TiledNeighborhood2D, Tensor, Tensor]] = {}


def _tiled(H: int, W: int, rh: int, rw: int, causal: bool) -> tuple[P.TiledNeighborhood2D, Tensor, Tensor]:
    """The tiled-layout pattern (8 x 8 tiles), its raster order (tiled position -> pixel,
    -1 padding) and the inverse (pixel -> tiled position); cached."""
    key = (H, W, rh, rw, causal)
    if key not in _TILED:
        if len(_TILED) > 64:
            _TILED.clear()
        pat = P.TiledNeighborhood2D(H, W, rh, rw, t=8, causal=causal)
        order = pat.raster_order()
        inverse = torch.empty(H * W, dtype=torch.long)
        real = order >= 0
        inverse[order[real]] = torch.arange(order.numel())[real]
        _TILED[key] = (pat, order, inverse)
    return _TILED[key]
