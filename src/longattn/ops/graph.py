"""Attention restricted to the edges of a graph: scatter softmax, O(E) memory.

Query i attends to key j iff the edge (j -> i) is in ``edge_index`` (row 0 the
source/key j, row 1 the target/query i), as in graph attention networks
(Velickovic et al. 2018) with dot-product scores. Cost O(E * D) time and memory;
no N x N object for a sparse graph.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale
from longattn.registry import REQUIRED, Param, register

#: elements (B * H * edges * D) gathered at once (16 MiB in fp32: reused by the allocator)
EDGE_CHUNK = 1 << 22


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[:, :, idx] for x [B, H, N, D] as one 2-D index_select (far faster on the CPU
    than index_select along dim 2)."""
    B, H, N, D = x.shape
    flat = (torch.arange(B * H, device=x.device)[:, None] * N + idx).reshape(-1)
    return x.reshape(B * H * N, D).index_select(0, flat).view(B, H, idx.numel(), D)


def _ckpt(fn, *args):
    """Run ``fn`` without keeping its intermediates when gradients are needed."""
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def check_edge_index(edge_index: object, nq: int, nk: int) -> Tensor:
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a LongTensor [2, E], got {type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"edge_index must be an integer tensor, got dtype {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    ei = edge_index.long()
    if ei.numel():
        if int(ei.min()) < 0 or int(ei[0].max()) >= nk or int(ei[1].max()) >= nq:
            raise ValueError(
                f"edge_index out of range: sources must be in [0, {nk}), targets in [0, {nq}); "
                f"got sources in [{int(ei[0].min())}, {int(ei[0].max())}], "
                f"targets in [{int(ei[1].min())}, {int(ei[1].max())}]"
            )
    return ei


@register(
    "graph",
    params=(Param("edge_index", REQUIRED, "LongTensor [2, E]: row 0 key j, row 1 query i"),),
    family="graph", exact=True, causal=True, cross=True, subquadratic=True,
    paper="Velickovic et al. 2018, Graph Attention Networks (dot-product scores)",
    summary="softmax over the in-edges of each node (scatter softmax, O(E))",
)
def graph_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    edge_index: Tensor,
) -> Tensor:
    """out_i = sum_{(j->i) in E} softmax_j(q_i . k_j * scale) v_j.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], edge_index [2, E] ->
    [B, H, Nq, Dv]. Duplicate edges count twice. ``causal`` drops edges with j > i.
    A node with no (visible) in-edge gets zeros.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    s = default_scale(scale, d.D)
    ei = check_edge_index(edge_index, d.Nq, d.Nk).to(q.device)
    src, dst = ei[0], ei[1]
    keep = torch.ones_like(src, dtype=torch.bool)
    if causal:
        keep &= src <= dst
    src, dst = src[keep], dst[keep]
    work = torch.promote_types(q.dtype, torch.float32)
    E = src.numel()
    # edges are processed in chunks whose gathered rows are recomputed in the
    # backward (checkpoint), so memory is O(E * H) for the scores, not O(E * H * D)
    step = max(1, EDGE_CHUNK // max(1, d.B * d.H * max(d.D, d.Dv)))
    chunks = [(s0, min(s0 + step, E)) for s0 in range(0, E, step)]

    def edge_scores(q, k, s_, d_):
        return (_rows(q, d_).to(work) * _rows(k, s_).to(work)).sum(-1) * s

    score = torch.cat(
        [_ckpt(edge_scores, q, k, src[a:b], dst[a:b]) for a, b in chunks], dim=2
    ) if E else q.new_zeros(d.B, d.H, 0, dtype=work)
    if key_padding_mask is not None:
        score = score.masked_fill(~key_padding_mask[:, None, :].index_select(2, src), float("-inf"))
    idx = dst.expand(d.B, d.H, -1)
    mx = torch.full((d.B, d.H, d.Nq), float("-inf"), dtype=work, device=q.device)
    mx = mx.scatter_reduce(2, idx, score.detach(), reduce="amax", include_self=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(score - mx.gather(2, idx))  # padded edges -> 0
    den = torch.zeros(d.B, d.H, d.Nq, dtype=work, device=q.device).scatter_add(2, idx, w)

    def weighted_values(w_, v, s_, d_):
        out = torch.zeros(d.B, d.H, d.Nq, d.Dv, dtype=work, device=v.device)
        return out.index_add(2, d_, w_[..., None] * _rows(v, s_).to(work))

    num = torch.zeros(d.B, d.H, d.Nq, d.Dv, dtype=work, device=q.device)
    for a, b in chunks:
        num = num + _ckpt(weighted_values, w[:, :, a:b], v, src[a:b], dst[a:b])
    out = num / den.clamp_min(torch.finfo(work).tiny)[..., None]
    return out.to(q.dtype)
