"""The chunked causal engine of linear attention: prefix sums by chunks (a chunk-local
masked quadratic plus an inter-chunk state), never an [N, F, Dv] cumsum. Shared by
:func:`longattn.ops.kernel.linear_attention` and the sequence-parallel kernel state
(:mod:`longattn.distributed.kernel_state`). Katharopoulos et al. 2020, section 3.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor

from longattn.ops.kernel_features import _NEG

__all__: list[str] = []


def _causal_chunked(
    fq: Tensor,
    fk: Tensor,
    sk: Tensor | None,
    va: Tensor,
    chunk: int,
    state: Tensor | None = None,
    m0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Causal linear attention by chunks. Returns (out [*, N, E], final state [*k, F, E], final m).

    fq: [*q, N, F]; fk, va, sk: [*k, N, .] with leading dims that broadcast against
    fq's (grouped KV heads: fq [B, Hkv, g, N, F], keys [B, Hkv, 1, N, .]: the keys'
    state is computed once per kv head). Inside a chunk of C positions: the masked
    C x C product (phi(q) phi(k)^T) V; across chunks: a state of phi(k)^T V per chunk,
    prefix-summed over chunks only (a [N/C, F, E] tensor, never [N, F, E]).
    O(N (C (F + E) + F E)) time. With log-scales ``sk``, every term of query i is
    referenced to M_i, the max of the log-scales of the keys j <= i (and of the
    state's m0), so nothing overflows and nothing from the future, not even a
    rounding, reaches query i.
    """
    *lq, N, Fd = fq.shape
    lk = list(fk.shape[:-2])
    E = va.shape[-1]
    C = max(1, min(chunk, N))
    nc = -(-N // C)
    pad = nc * C - N
    if pad:
        fq = Fn.pad(fq, (0, 0, 0, pad))
        fk = Fn.pad(fk, (0, 0, 0, pad))
        va = Fn.pad(va, (0, 0, 0, pad))
        if sk is not None:
            sk = Fn.pad(sk, (0, pad), value=_NEG)
    fq_c = fq.view(*lq, nc, C, Fd)
    fk_c = fk.view(*lk, nc, C, Fd)
    va_c = va.view(*lk, nc, C, E)
    if state is None:
        state = fq.new_zeros(*lk, Fd, E)
    tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    p = torch.matmul(fq_c, fk_c.transpose(-1, -2))  # [*q, nc, C, C]

    if sk is None:
        p = p.masked_fill(~tril, 0.0)
        u = torch.matmul(fk_c.transpose(-1, -2), va_c)  # [*k, nc, F, E]
        before = torch.cat([state[..., None, :, :], state[..., None, :, :] + torch.cumsum(u[..., :-1, :, :], -3)], -3)
        out = torch.matmul(p, va_c) + torch.matmul(fq_c, before)
        final = before[..., -1, :, :] + u[..., -1, :, :]
        return out.reshape(*lq, nc * C, E)[..., :N, :], final, None

    if m0 is None:
        m0 = fq.new_full(lk, _NEG)
    sk_c = sk.view(*lk, nc, C)
    anchor = sk.detach()  # anchors cancel in the ratio: no gradient through them
    m_i = torch.maximum(torch.cummax(anchor, -1).values, m0[..., None]).view(*lk, nc, C)
    # intra-chunk: weight exp(s_j - M_i) (<= 1) for j <= i, 0 above the diagonal
    arg = (sk_c[..., None, :] - m_i[..., None]).masked_fill(~tril, float("-inf"))
    out = torch.matmul(p * torch.exp(arg), va_c)
    # inter-chunk: chunk c's state is referenced to m_after[c], the max over chunks <= c
    m_loc = anchor.view(*lk, nc, C).amax(-1)  # [*k, nc]
    m_after = torch.maximum(torch.cummax(m_loc, -1).values, m0[..., None])
    m_before = torch.cat([m0[..., None], m_after[..., :-1]], -1)
    alpha = torch.exp(m_before - m_after)[..., None, None]  # rescale of the running state
    u = torch.matmul(fk_c.transpose(-1, -2), va_c * torch.exp(sk_c - m_after[..., None])[..., None])
    befores = []
    s_run = state
    # O(nc) cheap [F, E] updates; the heavy work is batched above. unbind (not u[..., c]):
    # one backward node for all chunks instead of a full-size zero gradient per chunk
    for u_c, a_c in zip(u.unbind(-3), alpha.unbind(-3)):
        befores.append(s_run)
        s_run = torch.addcmul(u_c, s_run, a_c)
    before = torch.stack(befores, -3)  # [*k, nc, F, E]
    inter = torch.matmul(fq_c, before) * torch.exp(m_before[..., None] - m_i)[..., None]
    out = out + inter
    return out.reshape(*lq, nc * C, E)[..., :N, :], s_run, m_after[..., -1]
