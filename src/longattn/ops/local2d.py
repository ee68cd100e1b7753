"""Exact 2D local (neighbourhood) attention for images flattened row-major.

A sequence of N = height * width positions, position p = r * width + c. Query (r, c)
sees key (r', c') iff |r - r'| <= radius_h and |c - c'| <= radius_w (a
(2 radius_h + 1) x (2 radius_w + 1) neighbourhood, Parmar et al. 2018, Image
Transformer, "local 2D"; Ramachandran et al. 2019), intersected with raster order
(r', c') <= (r, c) when ``causal``.

Two exact paths, both tiles of the CPU flash kernel with one shared mask per class
of tiles (interior, or touching a given border):

- *haloed strips* (:class:`StripPlan`; unpadded images of >= ``STRIP_MIN_PIXELS`` on
  the CPU): K and V are copied once into column strips with a halo, where every query
  tile's 2-D key block is one contiguous run, so the tiles are strided views and
  nothing is gathered per tile. At 128 x 128, radius 7 x 7, this runs the forward
  ~1.3x faster than the engine path.
- the pattern engine (:mod:`longattn.ops.blocksparse`) with
  :class:`longattn.patterns.Neighborhood2D` (8 x 8 query tiles over gathered key
  blocks): key padding, decode steps (Nq < Nk, bottom-right), small images, other
  devices (FlexAttention on CUDA).

Time O(N (th + 2 rh)(tw + 2 rw) D), memory O(N D) plus a bounded workspace: no N x N
and no per-query key copies. Grouped KV heads are read in place on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn import patterns as P
from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.ops._softmax import acc_dtype
from longattn.ops._softmax import additive_mask as _additive
from longattn.ops._softmax import flash_bwd as _flash_bwd
from longattn.ops._softmax import flash_fwd as _flash_fwd
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
    sinks=True,
    softcap=True,
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
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """q [B, h, Nq, D], k [B, h_kv, N, D], v [B, h_kv, N, Dv] with N = height * width
    -> [B, h, Nq, Dv] (Nq < N: the last Nq pixels in raster order).

    Fully masked queries (all neighbours padded) return zeros. ``sinks`` / ``softcap``
    (see :func:`longattn.attention`) run on the pattern engine. A non-finite output of
    the strips (a NaN key can reach a tile's other rows there) reruns on the engine,
    whose rows never read keys they cannot see."""
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=True)
    H = check_int("height", height, minimum=1)
    W = check_int("width", width, minimum=1)
    rh = check_int("radius_h", radius_h, minimum=0)
    rw = check_int("radius_w", radius_w, minimum=0)
    if H * W != d.Nk:
        raise ValueError(f"height * width ({H} * {W} = {H * W}) must equal the sequence length {d.Nk}")
    if sinks is None and softcap is None and _strips_apply(q, k, v, key_padding_mask, H * W):
        plans = strip_plan(H, W, rh, rw, causal), strip_plan(H, W, rh, rw, causal, TILE_BWD)
        out = _StripAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), *plans, default_scale(scale, d.D))
        if bool(torch.isfinite(out).all()):
            return out
    return pattern_attention(q, k, v, neighborhood(H, W, rh, rw), causal=causal,
                             key_padding_mask=key_padding_mask, scale=scale, sinks=sinks, softcap=softcap)


#: images of at least this many pixels run over haloed strips (see :class:`StripPlan`);
#: smaller ones, padded keys, decode rows and non-CPU devices take the pattern engine
STRIP_MIN_PIXELS = 1024


def _strips_apply(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, n: int) -> bool:
    return (kpm is None and q.shape[2] == n and n >= STRIP_MIN_PIXELS and q.device.type == "cpu"
            and q.shape[-1] == v.shape[-1] and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


# ----------------------------------------------------------------------------------------
# Haloed strips: the 2-D tiles as strided views (no per-tile gathers)
# ----------------------------------------------------------------------------------------

#: query tile (rows, columns) of the forward: 4 x 8 over (4 + 2 rh) x (8 + 2 rw) keys (at
#: radius 7 x 7, 57% of the keys a tile reads are visible). The backward writes a key
#: gradient per tile, so it runs wider tiles (fewer, larger key blocks): any tiling that
#: covers each pair once gives the exact gradient, given the merged output and lse.
TILE = (4, 8)
TILE_BWD = (8, 8)
#: elements of one backward call's per-tile key gradient (4 MiB in fp32)
BWD_WORKSPACE = 1 << 20


def _runs(keys: list) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of equal consecutive entries."""
    out, a = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[a]:
            out.append((a, i))
            a = i
    return out


class StripPlan:
    """The tiling of an ``height x width`` image for :class:`_StripAttention`.

    Query tiles of th x tw pixels; tile (s, i) is rows [i th, (i+1) th) of column strip
    s = columns [s tw, (s+1) tw). Keys live in *haloed strips*: strip s with rw extra
    columns on each side and rh extra rows above and below (zeros outside the image),
    stored contiguously, so the (th + 2 rh) x (tw + 2 rw) key block of every tile is
    one contiguous run of that buffer and a strip's tiles are one strided view (step
    th rows). K and V are copied once into this layout ((tw + 2 rw) / tw copies), never
    per tile. A tile's mask depends only on whether its rows / columns touch the image
    border: one mask per tile row (broadcast over strips) serves a whole class of
    strips, so a head takes one kernel call per class of strips (left border, inner,
    right border)::

        strip 0 (tw = 2, rw = 1), rh = 1: the buffer holds image columns -1..2 and rows
        -1..H; tile rows i = 0, 1 read buffer rows [0, 4) and [2, 6): overlapping runs
        . . . .   <- row -1 (zeros)
        . # # #   <- row 0   tile 0 = rows 0-1, columns 0-1
        . # # #
        . # # #   <- row 2   tile 1 = rows 2-3
        . # # #
        . . . .   <- row H (zeros)
    """

    def __init__(self, height: int, width: int, radius_h: int, radius_w: int, causal: bool,
                 tile: tuple[int, int] = TILE) -> None:
        H, W, rh, rw = height, width, radius_h, radius_w
        th, tw = min(tile[0], H), min(tile[1], W)
        self.H, self.W, self.rh, self.rw, self.th, self.tw = H, W, rh, rw, th, tw
        self.Tr, self.S = -(-H // th), -(-W // tw)
        self.Hp, self.Wp = self.Tr * th, self.S * tw
        self.kh, self.kw = th + 2 * rh, tw + 2 * rw
        self.L, self.K = th * tw, self.kh * self.kw

        def edge(t: int, size: int, extent: int, radius: int, n: int) -> tuple:
            k = t * size - radius + torch.arange(extent)
            qq = t * size + torch.arange(size)
            return tuple(((k >= 0) & (k < n)).tolist()), tuple((qq < n).tolist())

        rkeys = [edge(i, th, self.kh, rh, H) for i in range(self.Tr)]
        ckeys = [edge(s, tw, self.kw, rw, W) for s in range(self.S)]
        self.row_runs, self.col_runs = _runs(rkeys), _runs(ckeys)
        a = torch.arange(th)[:, None, None, None]
        b = torch.arange(tw)[None, :, None, None]
        dy = torch.arange(self.kh)[None, None, :, None] - rh - a
        dx = torch.arange(self.kw)[None, None, None, :] - rw - b
        base = (dy.abs() <= rh) & (dx.abs() <= rw)
        if causal:  # raster order: an earlier row, or this row up to this column
            base = base & ((dy < 0) | ((dy == 0) & (dx <= 0)))
        self.vis: dict[tuple[int, int], Tensor] = {}
        for i0, _ in self.row_runs:
            for s0, _ in self.col_runs:
                (kr, qr), (kc, qc) = (tuple(torch.tensor(x) for x in e) for e in (rkeys[i0], ckeys[s0]))
                vis = base & kr[None, None, :, None] & kc[None, None, None, :]
                real = (qr[:, None] & qc[None, :])[:, :, None, None]
                # a padding query (outside the image) sees its whole block: finite, never read
                self.vis[(i0, s0)] = (vis | ~real).reshape(self.L, self.K)
        self._masks: dict[tuple, dict] = {}

    def masks(self, dtype: torch.dtype, device: torch.device) -> dict[int, Tensor]:
        """Per class of strips (keyed by its first strip): the additive masks of every
        tile row, [1, Tr, L, K], broadcast over the class's strips (built once per dtype
        and device), so one kernel call covers tiles of any row class."""
        key = (dtype, str(device))
        if key not in self._masks:
            self._masks[key] = {
                c0: torch.cat([_additive(self.vis[(r0, c0)], dtype).expand(r1 - r0, self.L, self.K)
                               for r0, r1 in self.row_runs])[None].to(device)
                for c0, _ in self.col_runs
            }
        return self._masks[key]

    def calls(self, max_tiles: int | None = None):
        """(i0, i1, s0, s1, c0): rectangles of tiles inside one class of strips (c0: its
        first strip, the key of :meth:`masks`), every tile row at once or cut into pieces
        of at most ``max_tiles`` tiles (whole rows of a piece first)."""
        for c0, c1 in self.col_runs:
            rows = self.Tr if max_tiles is None else max(1, min(self.Tr, max_tiles))
            cols = c1 - c0 if max_tiles is None else max(1, max_tiles // rows)
            for i0 in range(0, self.Tr, rows):
                for s0 in range(c0, c1, cols):
                    yield i0, min(self.Tr, i0 + rows), s0, min(c1, s0 + cols), c0

    # -- layouts ------------------------------------------------------------------------
    def tiles(self, x: Tensor, out: Tensor, fill: float = 0.0) -> Tensor:
        """[N, D] pixels -> query tiles, copied into ``out`` [S, Tr, th * tw, D] (``fill``
        beyond the image)."""
        D = x.shape[-1]
        img = x.view(self.H, self.W, D)
        if (self.Hp, self.Wp) != (self.H, self.W):
            img = F.pad(img, (0, 0, 0, self.Wp - self.W, 0, self.Hp - self.H), value=fill)
        t = img.view(self.Tr, self.th, self.S, self.tw, D).permute(2, 0, 1, 3, 4)
        out.view(t.shape).copy_(t)
        return out

    def untiles(self, t: Tensor, out: Tensor) -> Tensor:
        """Inverse of :meth:`tiles`: [S, Tr, th * tw, D] -> ``out`` [N, D]."""
        D = t.shape[-1]
        img = t.view(self.S, self.Tr, self.th, self.tw, D).permute(1, 2, 0, 3, 4).reshape(self.Hp, self.Wp, D)
        out.view(self.H, self.W, D).copy_(img[: self.H, : self.W])
        return out

    def unhalo(self, g: Tensor, out: Tensor, pad: Tensor) -> Tensor:
        """Adjoint of :class:`HaloBuffers`: sums the strips' overlapping columns back into
        ``out`` [N, D]; ``pad`` is a reused [Hp + 2 rh, Wp + 2 rw, D] buffer, zeroed here."""
        D = g.shape[-1]
        rh, rw = self.rh, self.rw
        pad.zero_()
        st = pad.stride()
        every = -(-self.kw // self.tw)  # strips s, s + every, ... do not overlap
        for s0 in range(min(every, self.S)):
            gs = g[s0::every]
            view = pad.as_strided((gs.shape[0], pad.shape[0], self.kw, D), (every * self.tw * st[1], st[0], st[1], st[2]),
                                  pad.storage_offset() + s0 * self.tw * st[1])
            view.add_(gs)
        out.view(self.H, self.W, D).copy_(pad[rh : rh + self.H, rw : rw + self.W])
        return out

    def blocks(self, h: Tensor, i0: int, i1: int, s0: int, s1: int, every: int = 1, first: int = 0) -> Tensor:
        """Haloed strips [S, R, kw, D] -> the key blocks [s1 - s0, n, K, D] of tiles rows
        i0 + first, i0 + first + every, ... < i1 (overlapping windows of the buffer)."""
        S, R, kw, D = h.shape
        n = len(range(i0 + first, i1, every))
        st = h.stride()
        return h.as_strided((s1 - s0, n, self.K, D), (st[0], every * self.th * st[1], st[2], st[3]),
                            h.storage_offset() + s0 * st[0] + (i0 + first) * self.th * st[1])


class HaloBuffers:
    """[N, D] pixels -> haloed strips [S, Hp + 2 rh, tw + 2 rw, D] (zeros outside the
    image; :class:`StripPlan`'s layout) for many heads in a row, in one reused buffer: its zeros
    (halo rows, columns outside the image) are written once, and each call copies the
    image into the rest straight from ``x`` (one strided copy for the strips wholly inside
    the image, one per edge strip). Each call overwrites the previous call's strips."""

    def __init__(self, plan: StripPlan, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.plan = plan
        self.strips = torch.zeros(plan.S, plan.Hp + 2 * plan.rh, plan.kw, dim, dtype=dtype, device=device)
        first = [s * plan.tw - plan.rw for s in range(plan.S)]  # image column of each strip's column 0
        inner = [s for s in range(plan.S) if first[s] >= 0 and first[s] + plan.kw <= plan.W]
        self.inner = (inner[0], inner[-1] + 1) if inner else (0, 0)
        self.edges = [(s, max(0, -first[s]), min(plan.kw, plan.W - first[s]))
                      for s in range(plan.S) if not self.inner[0] <= s < self.inner[1]]

    def __call__(self, x: Tensor) -> Tensor:
        p = self.plan
        D = x.shape[-1]
        img = x.view(p.H, p.W, D)
        rows = slice(p.rh, p.rh + p.H)
        s0, s1 = self.inner
        if s1 > s0:
            st = img.stride()
            view = img.as_strided((s1 - s0, p.H, p.kw, D), (p.tw * st[1], st[0], st[1], st[2]),
                                  img.storage_offset() + (s0 * p.tw - p.rw) * st[1])
            self.strips[s0:s1, rows].copy_(view)
        for s, a, b in self.edges:
            if b > a:
                c = s * p.tw - p.rw
                self.strips[s, rows, a:b].copy_(img[:, c + a : c + b])
        return self.strips


_STRIP_PLANS: dict[tuple, StripPlan] = {}


def strip_plan(height: int, width: int, radius_h: int, radius_w: int, causal: bool,
               tile: tuple[int, int] = TILE) -> StripPlan:
    key = (height, width, radius_h, radius_w, causal, tile)
    if key not in _STRIP_PLANS:
        if len(_STRIP_PLANS) > 64:
            _STRIP_PLANS.clear()
        _STRIP_PLANS[key] = StripPlan(height, width, radius_h, radius_w, causal, tile)
    return _STRIP_PLANS[key]


class _StripAttention(torch.autograd.Function):
    """local2d over haloed strips, one (batch, kv head) at a time; exact forward and
    backward through the CPU flash kernels (the backward gets the merged output and lse,
    so each tile's gradient is its exact share)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: StripPlan, bwd_plan: StripPlan, scale: float):
        B, H, N, D = q.shape
        Hk, Dv = k.shape[1], v.shape[-1]
        g = H // Hk
        masks = plan.masks(q.dtype, q.device)
        out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, N, 1, device=q.device, dtype=acc_dtype(q.dtype))
        ot = q.new_empty(plan.S, plan.Tr, plan.L, Dv)
        lt = lse.new_empty(plan.S, plan.Tr, plan.L)
        halo_k, halo_v = HaloBuffers(plan, D, k.dtype, k.device), HaloBuffers(plan, Dv, v.dtype, v.device)
        qt_buf = q.new_empty(plan.S, plan.Tr, plan.L, D)
        for b in range(B):
            for hk in range(Hk):
                kh, vh = halo_k(k[b, hk]), halo_v(v[b, hk])
                for h in range(hk * g, (hk + 1) * g):
                    qt = plan.tiles(q[b, h], out=qt_buf)
                    for i0, i1, s0, s1, c0 in plan.calls():
                        o, l = _flash_fwd(qt[s0:s1, i0:i1], plan.blocks(kh, i0, i1, s0, s1),
                                          plan.blocks(vh, i0, i1, s0, s1), 0.0, False,
                                          attn_mask=masks[c0][:, i0:i1], scale=scale)
                        ot[s0:s1, i0:i1] = o
                        lt[s0:s1, i0:i1] = l
                    plan.untiles(ot, out=out[b, h])
                    plan.untiles(lt[..., None], out=lse[b, h])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = bwd_plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H, N, D = q.shape
        Hk = k.shape[1]
        g = H // Hk
        acc = acc_dtype(q.dtype)
        masks = plan.masks(q.dtype, q.device)
        dout = dout.contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        every = -(-plan.kh // plan.th)  # tile rows i, i + every, ... read disjoint key rows
        halo_k, halo_v = HaloBuffers(plan, D, k.dtype, k.device), HaloBuffers(plan, v.shape[-1], v.dtype, v.device)
        # buffers reused by every head (fresh ones would be mapped and faulted in each time)
        dkh, dvh = (torch.empty(x.strips.shape, dtype=acc, device=q.device) for x in (halo_k, halo_v))
        pad = torch.empty(plan.Hp + 2 * plan.rh, plan.Wp + 2 * plan.rw, max(D, v.shape[-1]), dtype=acc, device=q.device)
        qt, ot, gt, dqt = (torch.empty(plan.S, plan.Tr, plan.L, x.shape[-1], dtype=x.dtype, device=x.device)
                           for x in (q, out, dout, q))
        lt = torch.empty(plan.S, plan.Tr, plan.L, 1, dtype=lse.dtype, device=lse.device)
        for b in range(B):
            for hk in range(Hk):
                kh, vh = halo_k(k[b, hk]), halo_v(v[b, hk])
                dkh.zero_()
                dvh.zero_()
                for h in range(hk * g, (hk + 1) * g):
                    for x, buf in ((q, qt), (out, ot), (dout, gt)):
                        plan.tiles(x[b, h], out=buf)
                    plan.tiles(lse[b, h], fill=float("inf"), out=lt)  # beyond the image: P = 0
                    # the kernel returns a key gradient per tile: calls of a bounded size
                    for i0, i1, s0, s1, c0 in plan.calls(max(1, BWD_WORKSPACE // (plan.K * D))):
                        r = (slice(s0, s1), slice(i0, i1))
                        gq, gk, gv = _flash_bwd(gt[r], qt[r], plan.blocks(kh, i0, i1, s0, s1),
                                                plan.blocks(vh, i0, i1, s0, s1), ot[r], lt[r][..., 0],
                                                0.0, False, attn_mask=masks[c0][:, i0:i1], scale=scale)
                        dqt[r] = gq
                        for first in range(min(every, i1 - i0)):
                            plan.blocks(dkh, i0, i1, s0, s1, every, first).add_(gk[:, first::every])
                            plan.blocks(dvh, i0, i1, s0, s1, every, first).add_(gv[:, first::every])
                    plan.untiles(dqt, out=dq[b, h])
                plan.unhalo(dkh, out=dk[b, hk], pad=pad[..., :D])
                plan.unhalo(dvh, out=dv[b, hk], pad=pad[..., : v.shape[-1]])
        return dq, dk, dv, None, None, None
