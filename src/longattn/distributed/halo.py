"""Exact patterns: fetch the key rows the shard's queries can see, run the exact engine.

The rank asks the owners for exactly the key positions its queries can see
(:func:`longattn.ops.blocksparse.needed_keys`: a halo for windows, the global
columns, the few strided or random blocks) and receives those K/V rows and padding
bits by one ``all_to_all_single``; the backward returns the key gradients by the
reverse ``all_to_all_single``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longattn.distributed.comms import _all_to_all_rows, _FetchRows

_PLAN_CACHE: dict[tuple, tuple] = {}  # (pattern, N, H, causal, rank, world, group, device) -> fetch plan


def _resolve_pattern(mechanism: str, params: dict[str, Any]):
    from longattn import registry
    from longattn.ops.sparse import with_globals

    params = dict(params)
    backend = params.pop("backend", "auto")
    if backend not in ("auto", "engine"):
        raise ValueError(f"distributed pattern attention runs the exact engine: backend must be 'auto' or "
                         f"'engine', got {backend!r}")
    spec = registry.get(mechanism)
    given = spec.pattern_param  # a ready Pattern object (mechanism 'pattern')
    if given is not None:
        from longattn.patterns import Pattern

        if set(params) != {given}:
            raise TypeError(f"mechanism {mechanism!r} takes exactly {given}=..., got {sorted(params)}")
        pat = params[given]
        if not isinstance(pat, Pattern):
            raise TypeError(f"{given} must be a longattn.patterns.Pattern, got {type(pat).__name__}")
        return pat
    full = {k: v for k, v in spec.resolve(params).items() if k != "backend"}
    name = spec.pattern or mechanism
    gparam = spec.global_param or "global_idx"
    gidx = full.pop(gparam, ())
    return with_globals(name, gidx, **full)


def _fetch_plan(pattern, N: int, H: int, causal: bool, r: int, P: int, n: int, group, device):
    """(needed positions, send_idx, send_counts, recv_counts), cached per shard."""
    key = (id(pattern), N, H, causal, r, P, id(group), str(device))
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0] is pattern:
        return hit[1:]
    from longattn.ops.blocksparse import needed_keys

    needed = needed_keys(pattern, N, H, causal=causal, q_start=r * n, q_stop=(r + 1) * n).to(torch.long)
    # the shard's own rows are always present (they cost no communication, and the engine
    # wants at least as many keys as queries)
    needed = torch.unique(torch.cat([needed, torch.arange(r * n, (r + 1) * n)]))
    owner = torch.div(needed, n, rounding_mode="floor")
    recv_counts = torch.bincount(owner, minlength=P)
    counts = recv_counts.to(device)
    send = torch.empty_like(counts)
    dist.all_to_all_single(send, counts, group=group)  # how many rows each rank asks of me
    send_counts = send.cpu().tolist()
    recv_counts = recv_counts.tolist()
    ask = _all_to_all_rows(needed.to(device), recv_counts, send_counts, r, group)  # positions asked of me
    send_idx = (ask - r * n).to(device)
    if len(_PLAN_CACHE) > 256:
        _PLAN_CACHE.clear()
    val = (needed.to(device), send_idx, send_counts, recv_counts)
    _PLAN_CACHE[key] = (pattern, *val)
    return val


def _pattern_sharded(q, k, v, pattern, causal, kpm, scale, r, P, n, group):
    from longattn.ops.blocksparse import pattern_attention

    B, H, _, D = q.shape
    N = n * P
    needed, send_idx, send_counts, recv_counts = _fetch_plan(pattern, N, H, causal, r, P, n, group, q.device)
    kv = _FetchRows.apply(torch.cat([k, v], -1), send_idx, send_counts, recv_counts, r, group)
    kf, vf = kv[..., :D], kv[..., D:]
    mf = None
    if kpm is not None:
        bits = kpm.to(torch.uint8).T.contiguous()[send_idx]  # [S, B]
        mf = _all_to_all_rows(bits, send_counts, recv_counts, r, group).T.bool()
    return pattern_attention(q, kf, vf, pattern, causal=causal, key_padding_mask=mf, scale=scale,
                             n=N, q_start=r * n, k_positions=needed)
