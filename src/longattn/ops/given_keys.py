"""Attention over given keys: each query attends to exactly the key positions it is given.

The primitive the select-then-attend family builds on (docs/design.md section 9): MoBA and
Quest pick key blocks, NSA/DSA pick tokens, then one exact softmax runs over what was
picked. Here ``indices`` [B, Nq, topk] (or per head) lists the key positions of every
query, and

    out[b, h, i] = sum_{j in S(b, h, i)} e^{s_ij} v_j / (sum_{j in S} e^{s_ij} + e^{sink_h})

with s_ij = scale * q_i . k_j, S the set of listed positions (a position listed twice
in a row counts once), less the ones causality or key padding hide; -1 marks an empty
slot; ``sinks`` (optional, one logit per head) join the denominator only (learned
sinks, as gpt-oss); without them a row that sees nothing gives zeros.

How it runs: queries are taken in chunks; for a chunk, the listed key and value rows
are gathered ([chunk, topk, D], bounded), scores are batched matmuls of each query
against its own gathered keys, the softmax is computed in fp32 (fp16/bf16 inputs), and
the output written. The backward (written by hand, :func:`given_keys_bwd`) recomputes
the chunk's scores from the saved log-sum-exp and scatters dK, dV into the key rows
with ``index_add_``. Memory O(Nq * topk) (plus a bounded chunk), never Nq x Nk; time
O(Nq * topk * D) per head. Grouped KV heads read kv head h // (H / Hkv) directly: K
and V are never repeated. :mod:`longattn.ops.graph` is the CSR alternative for
arbitrary edge lists.

Selection mechanisms that describe their keys chunk by chunk (no [Nq, topk] index
tensor at all), possibly as whole key blocks (``granule``: one copy per block instead of
one per key, e.g. :func:`longattn.ops.topk_blocks.block_plan`), use :class:`SlotPlan`
and :func:`given_keys_apply` directly. Where many queries read the same key blocks, the
key-block-major engine of :mod:`longattn.ops.topk_blocks` is faster (a [64, D] x
[D, block] matmul per tile instead of one gathered [topk, D] block per query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


import torch
from torch import Tensor

from longattn.ops._checks import check_key_padding_mask, check_qkv, default_scale
from longattn.ops._csr import bag_sum, sddmm_into

#: elements of gathered keys + values (and scores) one chunk may hold (~64 MiB in fp32)
CHUNK_ELEMENTS = 1 << 24

#: edges (query, key slot) one chunk of the shared-list path holds (its CSR pattern and
#: per-head scores: ~16 MiB of int64 indices and 8 MiB per float buffer)
CSR_EDGES = 1 << 21


@dataclass(frozen=True)
class SlotPlan:
    """Which keys the queries see, produced chunk by chunk (recomputed in the backward).

    ``fn(c0, c1) -> (idx, valid)`` for query rows c0 <= r < c1: ``idx`` long
    [B, Gi, Rg, c1 - c0, width] of granules (runs of ``granule`` consecutive keys:
    granule g is keys g * granule ... g * granule + granule - 1; granule 1: key
    positions) in [0, ceil(Nk / granule)), ``valid`` bool [B, Gi, Rg, c1 - c0,
    width * granule], one flag per key of each slot (False: ignored; keys past Nk must
    be False). Whole granules are gathered at once (one copy of granule * D numbers:
    faster than key by key). Gi is 1 (one list for every kv head) or Hkv;
    Rg is 1 (one list per kv head group) or H / Hkv (one list per query head, then Gi
    must be Hkv). Valid slots of one row must name distinct keys (each key counted
    once): the plan's maker guarantees it. ``shared``: Gi = Rg = 1 (one list per query
    for every head), which the maker knows and states.
    """

    fn: Callable[[int, int], tuple[Tensor, Tensor]]
    width: int
    per_query_head: bool = False
    granule: int = 1
    shared: bool = False


@dataclass(frozen=True)
class _Geom:
    B: int
    Hkv: int
    Rg: int
    R2: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    G: int = 1

    @property
    def ng(self) -> int:
        """granules per kv head (keys padded to ng * G)"""
        return -(-self.Nk // self.G)

    @property
    def H(self) -> int:
        return self.Hkv * self.Rg * self.R2


def _geometry(q: Tensor, k: Tensor, v: Tensor, plan: SlotPlan) -> _Geom:
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    R = H // Hkv
    Rg = R if plan.per_query_head else 1
    return _Geom(B, Hkv, Rg, R // Rg, Nq, Nk, D, Dv, plan.granule)


def _chunk_rows(g: _Geom, width: int, chunk: int | None, budget: int | None = None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    width = width * g.G
    per_row = g.B * g.Hkv * g.Rg * width * (g.D + g.Dv) + 3 * g.B * g.H * width
    return max(1, min(g.Nq, (CHUNK_ELEMENTS if budget is None else budget) // max(per_row, 1)))


def _shared_lists(plan: SlotPlan, Nq: int) -> bool:
    """Whether ``plan`` gives one key list per query for every head (Gi = Rg = 1): then
    the token-major path gathers each key once for all kv heads (rows of Hkv * D numbers)."""
    return plan.shared and not plan.per_query_head and Nq > 0


def _granules(x: Tensor, g: _Geom) -> Tensor:
    """[B, Hkv, Nk, d] -> [B * Hkv * ng, G * d] (keys padded with zeros to ng * G)."""
    pad = g.ng * g.G - g.Nk
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(g.B * g.Hkv * g.ng, g.G * x.shape[-1])


def _gather(flat: Tensor, idx: Tensor, g: _Geom) -> tuple[Tensor, Tensor]:
    """Granules of ``flat`` [B * Hkv * ng, G * d] at ``idx`` [B, Gi, Rg, C, T] ->
    keys [B, Hkv, Rg, C, T * G, d] and the flat granule numbers (for the scatter)."""
    base = (torch.arange(g.B, device=idx.device)[:, None] * g.Hkv
            + torch.arange(g.Hkv, device=idx.device)[None, :]) * g.ng
    rows = (base[:, :, None, None, None] + idx).expand(g.B, g.Hkv, *idx.shape[2:])
    out = flat.index_select(0, rows.reshape(-1)).view(*rows.shape[:-1], -1, flat.shape[1] // g.G)
    return out, rows


def _sink_view(sinks: Tensor | None, g: _Geom) -> Tensor | None:
    """sinks [H] -> [1, Hkv, Rg, 1, R2] (query head h = (g * Rg + rg) * R2 + r2)."""
    if sinks is None:
        return None
    return sinks.view(1, g.Hkv, g.Rg, 1, g.R2)


def _scores(qc: Tensor, kg: Tensor, valid: Tensor, scale: float) -> Tensor:
    """qc [B, Hkv, Rg, C, R2, D], kg [B, Hkv, Rg, C, T, D] -> masked scores [.., C, R2, T]."""
    s = torch.matmul(qc, kg.transpose(-1, -2)) * scale
    return s.masked_fill(~valid.unsqueeze(-2), float("-inf"))


def _csr_rows(g: _Geom, width: int, chunk: int | None) -> int:
    """Query rows per chunk of the shared-list path: about ``CSR_EDGES`` edges."""
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, min(g.Nq, CSR_EDGES // max(1, width * g.G)))


def _slot_keys(idx: Tensor, valid: Tensor, b: int, g: _Geom) -> tuple[Tensor, Tensor]:
    """Row b of a shared plan's chunk (idx [B, 1, 1, C, T] granules, valid [B, 1, 1, C, T G])
    as key positions col [C * T * G] (0 where the slot is not valid) and ok [C, T * G]."""
    i = idx[b, 0, 0]
    if g.G > 1:
        i = (i.unsqueeze(-1) * g.G + torch.arange(g.G, device=i.device)).flatten(-2)
    ok = valid[b, 0, 0]
    return torch.where(ok, i, torch.zeros_like(i)).reshape(-1), ok


def _transposed_csr(col: Tensor, nk: int, W: int) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk's edges in key-major order: (perm [E] edge ids, their query rows [E],
    rowptr over keys [nk + 1])."""
    perm = torch.argsort(col, stable=True)
    trow = torch.zeros(nk + 1, dtype=torch.long, device=col.device)
    torch.cumsum(torch.bincount(col, minlength=nk), 0, out=trow[1:])
    return perm, perm // W, trow


def _fwd_shared(q: Tensor, k: Tensor, v: Tensor, plan: SlotPlan, g: _Geom, *, scale: float,
                sinks: Tensor | None, chunk: int | None) -> tuple[Tensor, Tensor]:
    """:func:`given_keys_fwd` for one key list per query shared by every head (Gi = Rg = 1).

    Each chunk's slots become one CSR pattern with W = width * G slots in every row (a slot
    that is not valid points at key 0 and gets weight 0); per head, the scores are one
    sampled product (:func:`~longattn.ops._csr.sddmm_into`) against the head's key table,
    the softmax runs over [C, W], and the output is one weighted bag sum of value rows
    (:func:`~longattn.ops._csr.bag_sum`). No gathered [C, W, D] copy is made and one
    head's key table stays in the cache. Same outputs and ``lse`` layout as the general path.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    W = plan.width * g.G
    C = _csr_rows(g, plan.width, chunk)
    out = q.new_empty(g.B, g.H, g.Nq, g.Dv)
    lse = torch.empty(g.B, g.Hkv, 1, g.Nq, g.R2, dtype=work, device=q.device)
    sink = None if sinks is None else sinks.to(work)
    offs = torch.arange(0, C * W + 1, W, device=q.device)
    s = torch.empty(C * W, dtype=work, device=q.device)
    for c0 in range(0, g.Nq, C):
        c1 = min(g.Nq, c0 + C)
        n = c1 - c0
        idx, valid = plan.fn(c0, c1)
        for b in range(g.B):
            col, ok = _slot_keys(idx, valid, b, g)
            for h in range(g.H):
                kvh = h // g.R2
                sh = sddmm_into(s[: n * W], offs[: n + 1], col, q[b, h, c0:c1].to(work), k[b, kvh].to(work), scale)
                sh = sh.view(n, W).masked_fill_(~ok, float("-inf"))
                m = sh.amax(-1)
                if sink is not None:
                    m = torch.maximum(m, sink[h])
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                p = torch.exp(sh.sub_(m[:, None]))
                den = p.sum(-1)
                if sink is not None:
                    den = den + torch.exp(sink[h] - m)
                p.div_(den.clamp_min(torch.finfo(work).tiny)[:, None])
                out[b, h, c0:c1] = bag_sum(v[b, kvh].to(work), col, offs[: n + 1], p.view(-1))
                lse[b, kvh, 0, c0:c1, h % g.R2] = torch.where(den > 0, m + torch.log(den), torch.full_like(m, float("inf")))
    return out, lse


def _bwd_shared(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, plan: SlotPlan,
                g: _Geom, *, scale: float, sinks: Tensor | None, chunk: int | None,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`given_keys_bwd` for shared key lists (see :func:`_fwd_shared`): per chunk and
    head, p = exp(s - lse) from the sampled product again, dP = dO . v_j another, dQ a bag
    sum of key rows; dK and dV bag sums of query and dO rows over the chunk's edges in
    key-major order (one argsort per chunk and batch row, shared by every head)."""
    work = torch.promote_types(q.dtype, torch.float32)
    W = plan.width * g.G
    C = _csr_rows(g, plan.width, chunk)
    dq = torch.empty(g.B, g.H, g.Nq, g.D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(g.B, g.Hkv, g.Nk, g.D, dtype=work, device=k.device)
    dv = torch.zeros(g.B, g.Hkv, g.Nk, g.Dv, dtype=work, device=v.device)
    sink = None if sinks is None else sinks.to(work)
    dsink = None if sink is None else torch.zeros_like(sink)
    offs = torch.arange(0, C * W + 1, W, device=q.device)
    s = torch.empty(C * W, dtype=work, device=q.device)
    dp = torch.empty(C * W, dtype=work, device=q.device)
    for c0 in range(0, g.Nq, C):
        c1 = min(g.Nq, c0 + C)
        n = c1 - c0
        idx, valid = plan.fn(c0, c1)
        for b in range(g.B):
            col, ok = _slot_keys(idx, valid, b, g)
            perm, trows, trow = _transposed_csr(col, g.Nk, W)
            for h in range(g.H):
                kvh = h // g.R2
                qh, kt, vt = q[b, h, c0:c1].to(work), k[b, kvh].to(work), v[b, kvh].to(work)
                doh = dout[b, h, c0:c1].to(work).contiguous()  # (an expanded dO would take the slow bag path)
                delta = (doh * out[b, h, c0:c1].to(work)).sum(-1)
                lc = lse[b, kvh, 0, c0:c1, h % g.R2]
                sh = sddmm_into(s[: n * W], offs[: n + 1], col, qh, kt, scale).view(n, W)
                p = torch.exp(sh.masked_fill_(~ok, float("-inf")).sub_(lc[:, None]))
                dph = sddmm_into(dp[: n * W], offs[: n + 1], col, doh, vt, 1.0).view(n, W)
                ds = dph.sub_(delta[:, None]).mul_(p).view(-1)
                dq[b, h, c0:c1] = (bag_sum(kt, col, offs[: n + 1], ds) * scale).to(dq.dtype)
                dv[b, kvh] += bag_sum(doh, trows, trow, p.view(-1).index_select(0, perm))
                dk[b, kvh] += bag_sum(qh, trows, trow, ds.index_select(0, perm)).mul_(scale)
                if dsink is not None:
                    dsink[h] -= (torch.exp(sink[h] - lc) * delta).sum()
    dsinks = None if dsink is None else dsink.to(sinks.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dsinks


def given_keys_fwd(
    q: Tensor, k: Tensor, v: Tensor, plan: SlotPlan, *, scale: float,
    sinks: Tensor | None = None, chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward of attention over the keys of ``plan``: (out [B, H, Nq, Dv], lse).

    q [B, H, Nq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv]; sinks [H] or None. ``lse``
    [B, Hkv, Rg, Nq, R2] fp32 is the log of each row's denominator (+inf for a row with
    nothing: no key, no sink). Work O(Nq * width * D) per head, memory one chunk.
    """
    g = _geometry(q, k, v, plan)
    if _shared_lists(plan, g.Nq):
        return _fwd_shared(q, k, v, plan, g, scale=scale, sinks=sinks, chunk=chunk)
    work = torch.promote_types(q.dtype, torch.float32)
    C = _chunk_rows(g, plan.width, chunk)
    kf, vf = _granules(k, g), _granules(v, g)
    qv = q.view(g.B, g.Hkv, g.Rg, g.R2, g.Nq, g.D)
    out = q.new_empty(g.B, g.Hkv, g.Rg, g.R2, g.Nq, g.Dv)
    lse = torch.empty(g.B, g.Hkv, g.Rg, g.Nq, g.R2, dtype=work, device=q.device)
    sink = _sink_view(sinks, g)
    for c0 in range(0, g.Nq, C):
        c1 = min(g.Nq, c0 + C)
        idx, valid = plan.fn(c0, c1)
        kg, _ = _gather(kf, idx, g)
        vg, _ = _gather(vf, idx, g)
        qc = qv[:, :, :, :, c0:c1].transpose(3, 4).to(work)
        s = _scores(qc, kg.to(work), valid, scale)
        m = s.amax(-1)
        if sink is not None:
            m = torch.maximum(m, sink.to(work))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m.unsqueeze(-1))
        den = p.sum(-1)
        if sink is not None:
            den = den + torch.exp(sink.to(work) - m)
        o = torch.matmul(p, vg.to(work)) / den.clamp_min(torch.finfo(work).tiny).unsqueeze(-1)
        out[:, :, :, :, c0:c1] = o.transpose(3, 4).to(out.dtype)
        lse[:, :, :, c0:c1] = torch.where(den > 0, m + torch.log(den), torch.full_like(m, float("inf")))
    return out.view(g.B, g.H, g.Nq, g.Dv), lse


def given_keys_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, plan: SlotPlan, *,
    scale: float, sinks: Tensor | None = None, chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of :func:`given_keys_fwd`: (dq, dk, dv, dsinks), in the inputs' dtypes.

    Per chunk: p = exp(s - lse) recomputed, dV += p^T dO and dK += dS^T q scattered into
    the key rows (``index_add_``), dS = p (dO . v_j - dO . o), dQ = dS K; a sink's
    gradient is -sum_i p_sink,i (dO_i . o_i). Memory: fp32 dK, dV accumulators + one chunk.
    """
    g = _geometry(q, k, v, plan)
    if _shared_lists(plan, g.Nq):
        return _bwd_shared(q, k, v, out, lse, dout, plan, g, scale=scale, sinks=sinks, chunk=chunk)
    work = torch.promote_types(q.dtype, torch.float32)
    C = _chunk_rows(g, plan.width, chunk)
    kf, vf = _granules(k, g), _granules(v, g)
    qv = q.view(g.B, g.Hkv, g.Rg, g.R2, g.Nq, g.D)
    dov = dout.reshape(g.B, g.Hkv, g.Rg, g.R2, g.Nq, g.Dv)
    ov = out.view(g.B, g.Hkv, g.Rg, g.R2, g.Nq, g.Dv)
    dq = torch.empty(g.B, g.Hkv, g.Rg, g.R2, g.Nq, g.D, dtype=q.dtype, device=q.device)
    dkf = torch.zeros(kf.shape, dtype=work, device=k.device)
    dvf = torch.zeros(vf.shape, dtype=work, device=v.device)
    sink = _sink_view(sinks, g)
    dsink = torch.zeros(g.Hkv, g.Rg, g.R2, dtype=work, device=q.device) if sink is not None else None
    for c0 in range(0, g.Nq, C):
        c1 = min(g.Nq, c0 + C)
        idx, valid = plan.fn(c0, c1)
        kg, rows = _gather(kf, idx, g)
        vg, _ = _gather(vf, idx, g)
        kg, vg = kg.to(work), vg.to(work)
        qc = qv[:, :, :, :, c0:c1].transpose(3, 4).to(work)
        doc = dov[:, :, :, :, c0:c1].transpose(3, 4).to(work)
        delta = (doc * ov[:, :, :, :, c0:c1].transpose(3, 4).to(work)).sum(-1)  # [B, Hkv, Rg, C, R2]
        lc = lse[:, :, :, c0:c1]
        p = torch.exp(_scores(qc, kg, valid, scale) - lc.unsqueeze(-1))
        ds = p * (torch.matmul(doc, vg.transpose(-1, -2)) - delta.unsqueeze(-1))
        dq[:, :, :, :, c0:c1] = (torch.matmul(ds, kg) * scale).transpose(3, 4).to(dq.dtype)
        flat = rows.reshape(-1)
        dvf.index_add_(0, flat, torch.matmul(p.transpose(-1, -2), doc).reshape(-1, g.G * g.Dv))
        dkf.index_add_(0, flat, (torch.matmul(ds.transpose(-1, -2), qc) * scale).reshape(-1, g.G * g.D))
        if sink is not None:
            psink = torch.exp(sink.to(work) - lc)
            dsink -= (psink * delta).sum((0, 3))
    dsinks = None if dsink is None else dsink.reshape(-1).to(sinks.dtype)
    dk = dkf.view(g.B, g.Hkv, g.ng * g.G, g.D)[:, :, : g.Nk]
    dv = dvf.view(g.B, g.Hkv, g.ng * g.G, g.Dv)[:, :, : g.Nk]
    return dq.view(g.B, g.H, g.Nq, g.D), dk.to(k.dtype), dv.to(v.dtype), dsinks


def lse_autograd_function(
    name: str,
    fwd: Callable[..., tuple[Tensor, Tensor]],
    bwd: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor | None]],
    option: str,
) -> type[torch.autograd.Function]:
    """A thin ``torch.autograd.Function`` over a hand-written forward/backward pair that
    saves the log-sum-exp (flash-attention style, Dao et al. 2022).

    ``Fn.apply(q, k, v, sinks, plan, scale, value)`` runs
    ``fwd(q, k, v, plan, scale=scale, sinks=sinks, <option>=value) -> (out, lse)`` and its
    backward ``bwd(q, k, v, out, lse, dout, plan, scale=..., sinks=..., <option>=value)
    -> (dq, dk, dv, dsinks)``; ``plan`` (which keys each query reads) and ``value`` are not
    differentiated. Shapes: q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] ->
    out [B, H, Nq, Dv]; memory beyond the kernels': the saved inputs, out and lse.
    """

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, sinks, plan, scale, value):  # type: ignore[override]
            out, lse = fwd(q, k, v, plan, scale=scale, sinks=sinks, **{option: value})
            ctx.save_for_backward(q, k, v, sinks, out, lse)
            ctx.plan, ctx.scale, ctx.value = plan, scale, value
            return out

        @staticmethod
        def backward(ctx, dout):  # type: ignore[override]
            q, k, v, sinks, out, lse = ctx.saved_tensors
            dq, dk, dv, ds = bwd(q, k, v, out, lse, dout, ctx.plan, scale=ctx.scale, sinks=sinks,
                                 **{option: ctx.value})
            return dq, dk, dv, ds, None, None, None

    Fn.__name__ = Fn.__qualname__ = name
    Fn.__doc__ = f"Thin autograd wrapper of :func:`{fwd.__name__}` / :func:`{bwd.__name__}`."
    return Fn


_GivenKeys = lse_autograd_function("_GivenKeys", given_keys_fwd, given_keys_bwd, "chunk")


def given_keys_apply(
    q: Tensor, k: Tensor, v: Tensor, plan: SlotPlan, *, scale: float,
    sinks: Tensor | None = None, chunk: int | None = None,
) -> Tensor:
    """Differentiable attention over the keys of ``plan`` (inputs already checked):
    [B, H, Nq, Dv]. The plan itself is not differentiated."""
    return _GivenKeys.apply(q.contiguous(), k.contiguous(), v.contiguous(), sinks, plan, scale, chunk)


def visible_slots(
    idx: Tensor, valid: Tensor, rows: Tensor, *, Nk: int, Nq: int, causal: bool,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Hide what causality and key padding hide: (idx with hidden slots at 0, valid).

    idx, valid [B, Gi, Rg, C, T]; rows [C] the query rows (row r is position
    Nk - Nq + r, bottom-right aligned); key_padding_mask bool [B, Nk], True = real.
    """
    if causal:
        valid = valid & (idx <= (rows + (Nk - Nq)).view(-1, 1))
    if key_padding_mask is not None:
        B = idx.shape[0]
        flat = (torch.arange(B, device=idx.device).view(B, 1, 1, 1, 1) * Nk + idx.clamp(0, Nk - 1))
        valid = valid & key_padding_mask.reshape(-1)[flat]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def _check_indices(indices: object, B: int, H: int, Hkv: int, Nq: int, Nk: int) -> Tensor:
    """``indices`` as a long tensor [B, Gi, Rg, Nq, T]; TypeError/ValueError naming it."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be an integer tensor [B, Nq, topk], got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    shape = tuple(indices.shape)
    ok3 = indices.dim() == 3 and shape[:2] == (B, Nq)
    ok4 = indices.dim() == 4 and shape[0] == B and shape[2] == Nq and shape[1] in (1, Hkv, H)
    if not (ok3 or ok4) or shape[-1] < 1:
        raise ValueError(
            f"indices must have shape [B, Nq, topk] = [{B}, {Nq}, topk] or [B, Hkv, Nq, topk] = "
            f"[{B}, {Hkv}, {Nq}, topk] (or [B, H={H}, Nq, topk]) with topk >= 1, got {shape}"
        )
    idx = indices.long()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1 or hi >= Nk:
        raise ValueError(f"indices must be key positions in [0, Nk={Nk}) or -1 (empty slot), "
                         f"got values in [{lo}, {hi}]")
    if idx.dim() == 3 or shape[1] == 1:
        return idx.reshape(B, 1, 1, Nq, shape[-1])
    if shape[1] == Hkv:
        return idx.view(B, Hkv, 1, Nq, shape[-1])
    return idx.view(B, Hkv, H // Hkv, Nq, shape[-1])


def check_sinks(sinks: object, H: int) -> Tensor | None:
    """``sinks`` (None or a float tensor [H]) checked; TypeError/ValueError naming it."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a floating tensor [H], got {getattr(sinks, 'dtype', type(sinks).__name__)}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape [H] = [{H}], got {tuple(sinks.shape)}")
    return sinks


def given_keys_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, causal: bool = False,
    key_padding_mask: Tensor | None = None, scale: float | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """Exact softmax attention of each query over exactly the keys ``indices`` lists.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv], H % Hkv == 0 (query
            head h reads kv head h // (H / Hkv); K/V are never repeated).
        indices: integer [B, Nq, topk] (the same keys for every head), [B, Hkv, Nq, topk]
            (per kv head; [B, 1, Nq, topk] is the shared form) or [B, H, Nq, topk]
            (per query head, e.g. per-head selections under GQA): key positions in
            [0, Nk), -1 for an empty slot. A position listed twice in one row counts
            once (duplicates are dropped, not refused).
        causal: hide keys after the query; with Nq < Nk the queries are the last Nq
            positions (query r is position Nk - Nq + r, bottom-right aligned).
        key_padding_mask: bool [B, Nk], True = a real key; padded keys get no weight.
        scale: score scale, default 1/sqrt(D).
        sinks: optional [H] logits joining each head's denominator only (learned sinks),
            differentiable.

    Returns:
        [B, H, Nq, Dv] in q's dtype (fp16/bf16 accumulate in fp32); a row with no visible
        key gives zeros. Memory O(Nq * topk) plus one bounded chunk, never Nq x Nk; time
        O(Nq * topk * D) per head.
    """
    d = check_qkv(q, k, v, key_padding_mask=key_padding_mask, gqa=True, cross=True)
    if causal and d.Nq > d.Nk:
        raise ValueError(f"causal=True needs Nq ({d.Nq}) <= Nk ({d.Nk}): queries are the last Nq positions")
    check_key_padding_mask(key_padding_mask, d.B, d.Nk)
    s = default_scale(scale, d.D)
    idx = _check_indices(indices, d.B, d.H, d.Hkv, d.Nq, d.Nk).to(q.device)
    sink = check_sinks(sinks, d.H)
    idx, _ = idx.sort(-1)  # duplicates become neighbours; -1 first
    valid = idx >= 0
    valid[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    rows = torch.arange(d.Nq, device=q.device)
    idx, valid = visible_slots(idx, valid, rows, Nk=d.Nk, Nq=d.Nq, causal=causal,
                               key_padding_mask=key_padding_mask)
    plan = SlotPlan(lambda c0, c1: (idx[..., c0:c1, :], valid[..., c0:c1, :]), idx.shape[-1],
                    per_query_head=idx.shape[2] > 1, shared=idx.shape[1] == 1 and idx.shape[2] == 1)
    return given_keys_apply(q, k, v, plan, scale=s, sinks=sink)
