"""The token-by-token recurrence of the family: the reference ("naive") and the decode step.

One step, on heads already expanded (q, k [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv]):

    S = diag(exp(g)) S                      g [B, H, Dg], Dg = 1 (scalar) or Dk
    S = S + k (beta (v - Sᵀ k))ᵀ            delta rule (beta [B, H]); else S = S + k vᵀ
    o = Sᵀ q                                (q already scaled)

:func:`recurrent_reference` loops it over the sequence (O(N Dk Dv), autograd
through the loop): written from the recurrence alone, it is what the chunked
engine is tested against, in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def recurrent_step_core(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
                        S: Tensor) -> tuple[Tensor, Tensor]:
    """One token: returns (o [B, H, Dv], new state [B, H, Dk, Dv]). O(Dk Dv)."""
    S = torch.exp(g)[..., None] * S
    if beta is None:
        u = v
    else:
        u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k[..., :, None] * u[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", S, q), S


def recurrent_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor | None = None,
    *,
    scale: float,
    initial_state: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence token by token, in the dtype given (use float64 for a reference).

    Args:
        q, k: [B, H, N, Dk] (heads already expanded, q and k already normalised if so).
        v: [B, H, N, Dv].
        g: [B, H, N] (scalar decay) or [B, H, N, Dk] (per channel), log decays <= 0.
        beta: [B, H, N] for the delta rule, None for a plain write k vᵀ.
        scale: multiplies q.
        initial_state: [B, H, Dk, Dv] (zeros if None).
        resets: bool [B, N]: True where a document starts (the state is zeroed first).

    Returns:
        (o [B, H, N, Dv], final state [B, H, Dk, Dv]). O(N Dk Dv) time, a Python
        loop over N: a reference, not a kernel.
    """
    B, H, N, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    gd = g if g.dim() == 4 else g[..., None]
    outs = []
    for t in range(N):
        if resets is not None and t > 0:
            S = S * (~resets[:, t]).to(S.dtype)[:, None, None, None]
        bt = None if beta is None else beta[:, :, t]
        o, S = recurrent_step_core(q[:, :, t] * scale, k[:, :, t], v[:, :, t], gd[:, :, t], bt, S)
        outs.append(o)
    return torch.stack(outs, 2), S
