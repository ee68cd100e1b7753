"""The recurrent family (gated_delta, kda, ssd, gla, retention; causal only): the state
passes along the ranks.

A shard's state map is affine in the state entering it, S_out = M_r S_in + T_r; each
rank computes its (T_r, M_r) in one chunked pass (:mod:`longattn.ops.recurrent`'s
own chunked kernels), they are all-gathered (O(P Dk (Dk + Dv)) bytes per head,
independent of N) and rank r composes those of the ranks before it into its entering
state, then runs its shard from it. The per-token gates (``g``, ``beta``) are given
as the rank's shard, like q.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from longattn.distributed.comms import _AllGather

def _recurrent_gates(mechanism: str, params: dict[str, Any], q: Tensor,
                     kpm: Tensor | None) -> tuple[Any, Tensor, Tensor | None, int, bool]:
    """(kind, g, beta, chunk_size, use_qk_l2norm) of a recurrent mechanism's functional form
    on this rank's shard: g, beta are the shard's rows [B, H, n(, D)] (defaults: no decay,
    beta = 1; retention's g from ``gamma``), zeroed at padded keys as the module form does."""
    from longattn import registry
    from longattn.ops.recurrent.api import KINDS, _retention_g

    full = registry.get(mechanism).resolve(params)
    kind = KINDS[mechanism]
    B, H, n, D = q.shape
    if "gamma" in full:
        g = _retention_g(full["gamma"], B, H, n, q)
    else:
        g = full.get("g")
        g = q.new_zeros((B, H, n, D) if kind.per_channel else (B, H, n)) if g is None else g
    beta = (q.new_ones(B, H, n) if full.get("beta") is None else full["beta"]) if kind.delta else None
    if kpm is not None:
        real = kpm[:, None, :].to(g.dtype)
        g = g * (real[..., None] if kind.per_channel else real)
        beta = None if beta is None else beta * real
    norm = full.get("use_qk_l2norm")
    return kind, g, beta, full["chunk_size"], kind.delta if norm is None else bool(norm)


def _recurrent_sharded(q: Tensor, k: Tensor, v: Tensor, mechanism: str, params: dict[str, Any],
                       kpm: Tensor | None, scale: float | None, r: int, P: int, group: Any) -> Tensor:
    """Rank r's shard of a recurrent mechanism (causal). The state map of a shard is
    affine in the state entering it, S_out = M_r S_in + T_r (M_r [Dk, Dk]: the decays
    and the delta rule's I - beta k kᵀ act on the left): one chunked pass over
    [v, 0] from [0, I] gives [T_r, M_r] together (the state's columns evolve
    independently); the (T, M) of every rank are all-gathered (O(P Dk (Dk + Dv)) bytes,
    independent of n), rank r composes those of ranks < r into its entering state and
    runs its shard from it. Gradients flow back through the gather and both passes.
    Cost: two chunked passes over the shard (O(n C D + n D^2) each, the first with
    Dv + Dk value columns) and O(r Dk^2 Dv) to compose."""
    from longattn.ops.recurrent.api import _run

    kind, g, beta, chunk, norm = _recurrent_gates(mechanism, params, q, kpm)
    if kpm is not None:
        real = kpm[:, None, :, None]
        k, v = k * real.to(k.dtype), v * real.to(v.dtype)
    B, H, n, Dk = q.shape
    Dv = v.shape[-1]

    def run(vv: Tensor, s0: Tensor | None) -> tuple[Tensor, Tensor]:
        return _run(kind, q, k, vv, g, beta, scale=scale, initial_state=s0, output_final_state=True,
                    use_qk_l2norm=norm, segment_ids=None, chunk_size=chunk)

    work = torch.promote_types(q.dtype, torch.float32)
    eye = torch.eye(Dk, dtype=work, device=q.device).expand(B, H, Dk, Dk)
    _, TM = run(torch.cat([v, v.new_zeros(B, H, n, Dk)], -1),
                torch.cat([eye.new_zeros(B, H, Dk, Dv), eye], -1))
    # [r, B, H, Dk, Dv + Dk]; every rank's state hangs off the gather (rank 0's as zeros),
    # so every rank runs the gather's backward collective
    before = _AllGather.apply(TM, group)[:r]
    S = before.sum(0)[..., :Dv] * 0.0
    for j in range(r):
        S = torch.matmul(before[j, ..., Dv:], S) + before[j, ..., :Dv]
    out, _ = run(v, S)
    return out
