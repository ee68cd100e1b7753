"""Kernel (linear / Performer) attention: O(state) exchanges.

Per-rank state sums S = sum phi(k) [v, 1]^T (referenced to the rank's max key
log-scale for FAVOR+), combined by ``all_reduce`` (non-causal) or by an
``all_gather`` of the per-rank totals and an exclusive prefix over the ranks before
this one (causal), which then seeds the rank's chunked causal prefix sums
(:func:`longattn.ops.kernel._causal_chunked`, the single-process code, from that
state). O(F Dv) bytes per rank, independent of N. The feature maps, the key masking
and the ratio are those of :mod:`longattn.ops.kernel`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.distributed.comms import _AllGather, _AllReduceSum, _count, _nbytes
from longattn.ops import kernel as K

_SEG = 1 << 22  # feature elements per segment of the causal pass


def _feature_map(mechanism: str, params: dict[str, Any], D: int) -> tuple[K.FeatureMap, int]:
    """(feature map, chunk size) of ``linear`` / ``performer`` with ``params``: the same
    map as the single-process call (FAVOR+ draws from ``seed``, cached by ops.kernel)."""
    from longattn import registry

    spec = registry.get(mechanism)
    full = spec.resolve(params)
    chunk = full["chunk_size"]
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk!r}")
    if "feature_map" in spec.param_names:  # it names its map (linear); else FAVOR+ (performer)
        return K.resolve_feature_map(full["feature_map"], D), chunk
    if full["redraw_interval"] is not None:
        raise ValueError(f"redraw_interval={full['redraw_interval']!r} needs the module form; "
                         "the functional form draws its features from seed")
    if full["projection"] is not None:
        return K.FavorFeatureMap(D, projection=full["projection"]), chunk
    return K._favor_cached(D, full["num_features"], full["seed"], bool(full["orthogonal"])), chunk


def _kernel_features(fmap: K.FeatureMap, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None,
                     scale: float | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(fq, fk, sk | None, va = [v, 1] with padded keys zeroed), in the working dtype.
    q, k: [B, H, n, D], v [B, H, n, Dv] -> fq, fk [B, H, n, F], sk [B, H, n], va [B, H, n, Dv + 1]."""
    D = q.shape[-1]
    work = K._work_dtype(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    s = scale if scale is not None else fmap.default_scale(D)
    r = math.sqrt(s) if s is not None and s != 1.0 else None
    fq, _ = fmap.scaled(q, r, is_query=True)
    fk, sk = fmap.scaled(k, r, is_query=False)
    fk, sk, va = K._mask_keys(fk, sk, v, kpm)
    return fq, fk, sk, va


def _state(fk: Tensor, sk: Tensor | None, va: Tensor, m: Tensor | None) -> Tensor:
    """sum_j phi(k_j) [v_j, 1]^T [B, H, F, E], referenced to exp(m) when the map has log-scales."""
    if sk is None:
        return torch.matmul(fk.transpose(-1, -2), va)
    return torch.matmul(fk.transpose(-1, -2), va * torch.exp(sk - m[..., None])[..., None])


def _entering_state(fk: Tensor, sk: Tensor | None, va: Tensor, r: int, P: int,
                    group: Any) -> tuple[Tensor, Tensor | None]:
    """(S0, m0): the state of every position before this rank's shard (causal), the
    exclusive prefix over ranks < r of the all-gathered per-rank totals, re-referenced
    to the max m0 of their log-scales (None without log-scales)."""
    m_loc = None if sk is None else sk.detach().amax(-1)  # [B, H]
    T = _state(fk, sk, va, m_loc)  # this rank's total, referenced to its own max
    # [r, B, H, F, E]: the ranks before this one. Rank 0 sums an empty slice: its state
    # still hangs off the gather, so every rank runs the gather's backward collective
    Ts = _AllGather.apply(T, group)[:r]
    if m_loc is None:
        return Ts.sum(0), None
    ms = torch.empty((P, *m_loc.shape), dtype=m_loc.dtype, device=m_loc.device)
    dist.all_gather(list(ms.unbind(0)), m_loc.contiguous(), group=group)
    _count((P - 1) * _nbytes(m_loc), (P - 1) * _nbytes(m_loc))
    m0 = ms[:r].amax(0) if r else m_loc.new_full(m_loc.shape, K._NEG)
    return (Ts * torch.exp(ms[:r] - m0)[..., None, None]).sum(0), m0


def _kernel_sharded(q: Tensor, k: Tensor, v: Tensor, fmap: K.FeatureMap, chunk: int, causal: bool,
                    kpm: Tensor | None, scale: float | None, r: int, P: int, group: Any) -> Tensor:
    """Rank r's shard [B, H, n, Dv] of kernel attention over the whole sequence.
    Non-causal: one ``all_reduce`` of the [B, H, F, Dv + 1] state (and of the key
    log-scale max). Causal: the entering state (:func:`_entering_state`), then the
    single-process chunked pass over the shard in segments of about ``_SEG`` feature
    elements. O(n F Dv + n C F) time per rank."""
    fq, fk, sk, va = _kernel_features(fmap, q, k, v, kpm, scale)
    B, H, n, Fd = fq.shape
    if not causal:
        m = None
        if sk is not None:
            m = sk.detach().amax(-1)
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            _count(_nbytes(m), _nbytes(m))
        S = _AllReduceSum.apply(_state(fk, sk, va, m), group)
        return K._ratio(torch.matmul(fq, S)).to(q.dtype)
    S0, m0 = _entering_state(fk, sk, va, r, P, group)
    rows = max(chunk, (_SEG // max(1, B * H * Fd)) // chunk * chunk)
    outs = []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        o, S0, m0 = K._causal_chunked(fq[:, :, a:b], fk[:, :, a:b], None if sk is None else sk[:, :, a:b],
                                      va[:, :, a:b], chunk, S0, m0)
        outs.append(K._ratio(o))
    return torch.cat(outs, 2).to(q.dtype)
