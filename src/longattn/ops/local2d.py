"""Exact 2D local (neighbourhood) attention for images flattened row-major.

A sequence of N = height * width positions, position p = r * width + c. Query (r, c)
sees key (r', c') iff |r - r'| <= radius_h and |c - c'| <= radius_w (a
(2 radius_h + 1) x (2 radius_w + 1) neighbourhood, Parmar et al. 2018, Image
Transformer, "local 2D"; Ramachandran et al. 2019), intersected with raster order
(r', c') <= (r, c) when ``causal``.

Algorithm (no N x N tensor): the width is cut into column tiles of ``cw`` columns;
for each image row and tile, the keys are the 2 radius_h + 1 neighbouring rows times
the tile widened by radius_w on each side, gathered with ``unfold``. Scores are
[.., N, (2 rh + 1) * (cw + 2 rw)]: time and memory O(N * (2 rh + 1) * (cw + 2 rw) * D),
linear in N. Columns outside the exact window inside a tile are masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.registry import REQUIRED, Param, register


def _tiles(x: Tensor, rh: int, rw: int, cw: int, wp: int, fill: float | bool) -> Tensor:
    """x [..., H, W, E] -> [..., H, nT, R * C, E]: for each (row, tile) its key neighbourhood."""
    H, W = x.shape[-3], x.shape[-2]
    x = F.pad(x.movedim(-1, -3), (rw, wp - W + rw, rh, rh), value=fill)   # [..., E, H+2rh, Wp+2rw]
    x = x.movedim(-3, -1)                                                 # [..., H+2rh, Wp+2rw, E]
    R, C = 2 * rh + 1, cw + 2 * rw
    x = x.unfold(-3, R, 1).unfold(-3, C, cw)                               # [..., H, nT, E, R, C]
    return x.movedim(-3, -1).flatten(-3, -2)                               # [..., H, nT, R*C, E]


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
    paper="Parmar et al. 2018, Image Transformer (local 2D attention)",
    summary="2D neighbourhood window on a row-major H x W grid, exact, O(N * window)",
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
    """q, k [B, h, N, D], v [B, h, N, Dv] with N = height * width -> [B, h, N, Dv].

    Fully masked queries (all neighbours padded) return zeros. Computed in float32+.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    H = check_int("height", height, minimum=1)
    W = check_int("width", width, minimum=1)
    rh = check_int("radius_h", radius_h, minimum=0)
    rw = check_int("radius_w", radius_w, minimum=0)
    if H * W != d.Nq:
        raise ValueError(f"height * width ({H} * {W} = {H * W}) must equal the sequence length {d.Nq}")
    s = default_scale(scale, d.D)
    work = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    cw = min(W, max(8, 2 * rw))
    nT = -(-W // cw)
    wp = nT * cw
    R, C = 2 * rh + 1, cw + 2 * rw

    qt = q.to(work).unflatten(2, (H, W))
    qt = F.pad(qt, (0, 0, 0, wp - W)).unflatten(3, (nT, cw))               # [B, h, H, nT, cw, D]
    kt = _tiles(k.to(work).unflatten(2, (H, W)), rh, rw, cw, wp, 0.0)      # [B, h, H, nT, RC, D]
    vt = _tiles(v.to(work).unflatten(2, (H, W)), rh, rw, cw, wp, 0.0)      # [B, h, H, nT, RC, Dv]

    # static visibility [H, nT, cw, R*C] from index arithmetic
    r = torch.arange(H, device=dev)[:, None, None, None, None]
    t = torch.arange(nT, device=dev)[None, :, None, None, None]
    a = torch.arange(cw, device=dev)[None, None, :, None, None]
    dr = torch.arange(R, device=dev)[None, None, None, :, None]
    b = torch.arange(C, device=dev)[None, None, None, None, :]
    qc = t * cw + a
    kr = r + dr - rh
    kc = t * cw + b - rw
    vis = (kr >= 0) & (kr < H) & (kc >= 0) & (kc < W) & ((kc - qc).abs() <= rw) & (qc < W)
    if causal:
        vis = vis & (kr * W + kc <= r * W + qc)
    vis = vis.flatten(-2)[None, None]                                      # [1, 1, H, nT, cw, RC]
    if key_padding_mask is not None:
        kp = _tiles(key_padding_mask.view(d.B, H, W, 1), rh, rw, cw, wp, False)[..., 0]
        vis = vis & kp[:, None, :, :, None, :]                            # [B, 1, H, nT, 1, RC]

    scores = torch.matmul(qt, kt.transpose(-1, -2)) * s                    # [B, h, H, nT, cw, RC]
    scores = scores.masked_fill(~vis, float("-inf"))
    alive = vis.any(-1, keepdim=True)
    scores = scores.masked_fill(~alive, 0.0)
    p = torch.softmax(scores, -1) * alive
    out = torch.matmul(p, vt)                                              # [B, h, H, nT, cw, Dv]
    out = out.flatten(3, 4)[:, :, :, :W].flatten(2, 3)
    return out.to(q.dtype)
