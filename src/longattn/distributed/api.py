"""The entry point: :func:`attention` on this rank's shard; it checks the call across
the ranks (:mod:`.fingerprint`) and hands it to the module that moves what the
mechanism needs (:mod:`.halo`, :mod:`.ring`, :mod:`.kernel_state`,
:mod:`.recurrent_state`)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from longattn import registry
from longattn.distributed.fingerprint import _check_shards, _fingerprint
from longattn.distributed.halo import _pattern_sharded, _resolve_pattern
from longattn.distributed.kernel_state import _feature_map, _kernel_sharded
from longattn.distributed.mechanisms import _check_mechanism
from longattn.distributed.recurrent_state import _recurrent_sharded
from longattn.distributed.ring import _ring_sharded
from longattn.ops._checks import check_qkv, default_scale


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str,
    *,
    causal: bool = False,
    group=None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    **params: Any,
) -> Tensor:
    """Rank r's shard of ``longattn.attention(Q, K, V, mechanism, ...)`` over the whole sequence.

    Args:
        q, k: [B, H, n, D], v: [B, H, n, Dv]: rank r of ``group`` holds positions
            [r*n, (r+1)*n) (equal shards on every rank; the sequence is N = n * P).
        mechanism: one of :func:`supported` (exact patterns, ``full``, ``linear``,
            ``performer``, the recurrent family: causal only, its per-token ``g`` and
            ``beta`` given as this rank's shard [B, H, n(, D)]).
        causal: query i sees key j only if j <= i (over the whole sequence).
        group: a torch.distributed process group (default: the world).
        key_padding_mask: this rank's shard [B, n] of the mask (True = a real token).
        scale: score scale (default 1/sqrt(D), as the single-process call).
        **params: the mechanism's parameters, as for ``longattn.attention``.

    Returns:
        [B, H, n, Dv]: this rank's shard of the output. Differentiable in q, k, v:
        the gradients of every shard equal those of the single-process call.

    Every rank of ``group`` must call this with the same mechanism, parameters,
    causal, scale, dtypes and shapes: the ranks compare a fingerprint of the call
    before any other exchange, and where they differ every rank raises the same
    ValueError naming the fields and the ranks.
    """
    if not dist.is_available() or not dist.is_initialized():
        _check_mechanism(mechanism)
        raise RuntimeError("longattn.distributed.attention needs an initialised torch.distributed process group")
    fp = _fingerprint(mechanism, causal, scale, params, q, k, v, key_padding_mask)
    r, P, n = _check_shards(q, k, v, key_padding_mask, group, fp)
    # the ranks agree from here on: a check that fails, fails on every rank
    _check_mechanism(mechanism)
    check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    spec = registry.get(mechanism)
    if causal and not spec.causal:
        raise ValueError(f"mechanism {mechanism!r} cannot be causal (causal=True was given)")
    if spec.sequence_parallel == "recurrent_state":
        if not causal:
            raise ValueError(f"mechanism {mechanism!r} is causal only (a recurrence over the past): "
                             f"call it with causal=True, got causal={causal!r}")
        return _recurrent_sharded(q, k, v, mechanism, params, key_padding_mask, scale, r, P, group)
    if spec.sequence_parallel == "kernel_state":
        if scale is not None:
            default_scale(scale, q.shape[-1])
        fmap, chunk = _feature_map(mechanism, params, q.shape[-1])
        return _kernel_sharded(q, k, v, fmap, chunk, causal, key_padding_mask, scale, r, P, group)
    s = default_scale(scale, q.shape[-1])
    if spec.sequence_parallel == "ring":
        spec.check_params(params)
        return _ring_sharded(q, k, v, params, bool(causal), key_padding_mask, s, r, P, group)
    pattern = _resolve_pattern(mechanism, params)
    return _pattern_sharded(q, k, v, pattern, bool(causal), key_padding_mask, s, r, P, n, group)
