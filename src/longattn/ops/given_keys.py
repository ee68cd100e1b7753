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

How it runs: queries are taken in chunks of about ``CSR_EDGES`` slots. A chunk's key
lists (one for every head, one per kv head, or one per query head) are CSR patterns with
the same number of slots in every row (a slot that is not valid points at key 0 with
weight 0). Per query head, the scores are one sampled product
(``torch.sparse.sampled_addmm``: q_i . k_j only at the listed pairs) against the head's
key table, the softmax runs over [chunk, slots] in fp32, and the output is one weighted
bag sum of value rows (``embedding_bag``): no gathered [chunk, topk, D] copy is written
and one head's key table stays in the cache (:mod:`longattn.ops._csr`, shared with
``graph``). The backward (written by hand, :func:`given_keys_bwd`) recomputes the scores
from the saved log-sum-exp; dQ is a bag sum of key rows, dK and dV bag sums of query and
dO rows over the same slots in key-major order. Memory O(Nq * topk) (plus a bounded
chunk), never Nq x Nk; time O(Nq * topk * D) per head. Grouped KV heads read kv head
h // (H / Hkv) directly: K and V are never repeated. :mod:`longattn.ops.graph` is the
alternative for arbitrary edge lists (any number of edges per query).

Selection mechanisms that describe their keys chunk by chunk (no [Nq, topk] index
tensor at all), possibly as whole key blocks (``granule``, e.g.
:func:`longattn.ops.topk_blocks.block_plan`), use :class:`SlotPlan` and
:func:`given_keys_apply` directly. Where many queries read the same key blocks, the
key-block-major engine of :mod:`longattn.ops.topk_blocks` is faster (a [64, D] x
[D, block] matmul per tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from longattn.ops._checks import check_key_padding_mask, check_qkv, default_scale
from longattn.ops._csr import bag_sum, key_major, sddmm_into

#: slots (query, key) one chunk holds (its CSR pattern and per-head scores: ~16 MiB of
#: int64 indices and 8 MiB per float buffer)
CSR_EDGES = 1 << 21


@dataclass(frozen=True)
class SlotPlan:
    """Which keys the queries see, produced chunk by chunk (recomputed in the backward).

    ``fn(c0, c1) -> (idx, valid)`` for query rows c0 <= r < c1: ``idx`` long
    [B, Gi, Rg, c1 - c0, width] of granules (runs of ``granule`` consecutive keys:
    granule g is keys g * granule ... g * granule + granule - 1; granule 1: key
    positions) in [0, ceil(Nk / granule)), ``valid`` bool [B, Gi, Rg, c1 - c0,
    width * granule], one flag per key of each slot (False: ignored; keys past Nk must
    be False). A granule's keys become granule consecutive slots. Gi is 1 (one list for every kv head) or Hkv;
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
    #: shared lists only: the forward adds each slot's attention weight, summed over the
    #: heads, into this [B, Nq, width * granule] tensor (what DSA's indexer loss learns from)
    weights: Tensor | None = None


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


def _check_weights(plan: SlotPlan) -> None:
    if plan.weights is not None and not (plan.shared and not plan.per_query_head):
        raise ValueError("SlotPlan.weights is recorded for shared lists only (shared=True)")


def _csr_rows(g: _Geom, width: int, chunk: int | None) -> int:
    """Query rows per chunk of the shared-list path: about ``CSR_EDGES`` edges."""
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, min(g.Nq, CSR_EDGES // max(1, width * g.G)))


def _slot_keys(idx: Tensor, valid: Tensor, b: int, gi: int, rg: int, g: _Geom) -> tuple[Tensor, Tensor]:
    """List (b, gi, rg) of a plan's chunk (idx [B, Gi, Rg, C, T] granules, valid [B, Gi, Rg,
    C, T G]) as key positions col [C * T * G] (0 where the slot is not valid) and ok [C, T G]."""
    i = idx[b, gi, rg]
    if g.G > 1:
        i = (i.unsqueeze(-1) * g.G + torch.arange(g.G, device=i.device)).flatten(-2)
    ok = valid[b, gi, rg]
    return torch.where(ok, i, torch.zeros_like(i)).reshape(-1), ok


def _lists(idx: Tensor, g: _Geom) -> list[tuple[int, int, list[int]]]:
    """(gi, rg, query heads reading that list) for the lists of a plan's chunk: one list for
    every head (Gi = 1), one per kv head (its R query heads), or one per query head."""
    Gi = idx.shape[1]
    if Gi == 1 and idx.shape[2] == 1:
        return [(0, 0, list(range(g.H)))]
    R = g.Rg * g.R2
    return [(gi, rg, [gi * R + rg * g.R2 + r2 for r2 in range(g.R2)]) for gi in range(Gi) for rg in range(g.Rg)]


def _lse_at(h: int, g: _Geom) -> tuple[int, int, int]:
    """(kv head, rg, r2) of query head h in the ``lse`` layout [B, Hkv, Rg, Nq, R2]."""
    return h // (g.Rg * g.R2), (h // g.R2) % g.Rg, h % g.R2


def _csr_fwd(q: Tensor, k: Tensor, v: Tensor, plan: SlotPlan, g: _Geom, *, scale: float,
             sinks: Tensor | None, chunk: int | None) -> tuple[Tensor, Tensor]:
    """:func:`given_keys_fwd` as sparse kernels.

    Each list of a chunk (one for every head, per kv head, or per query head) becomes one
    CSR pattern with W = width * G slots in every row (a slot that is not valid points at
    key 0 and gets weight 0); per query head, the scores are one sampled product
    (:func:`~longattn.ops._csr.sddmm_into`) against its kv head's key table, the softmax
    runs over [C, W], and the output is one weighted bag sum of value rows
    (:func:`~longattn.ops._csr.bag_sum`). No gathered [C, W, D] copy is made and one
    head's key table stays in the cache.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    W = plan.width * g.G
    C = _csr_rows(g, plan.width, chunk)
    out = q.new_empty(g.B, g.H, g.Nq, g.Dv)
    lse = torch.empty(g.B, g.Hkv, g.Rg, g.Nq, g.R2, dtype=work, device=q.device)
    sink = None if sinks is None else sinks.to(work)
    offs = torch.arange(0, C * W + 1, W, device=q.device)
    s = torch.empty(C * W, dtype=work, device=q.device)
    kw, vw = k.to(work), v.to(work)  # (no copy in float32: the tables are read in place)
    for b, c0, c1, heads, col, ok in _chunk_lists(plan, g, C):
        n = c1 - c0
        for h in heads:
            kvh, hr, r2 = _lse_at(h, g)
            sh = _masked_scores(s, offs, col, ok, q[b, h, c0:c1].to(work), kw[b, kvh], scale)
            m = sh.amax(-1)
            if sink is not None:
                m = torch.maximum(m, sink[h])
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(sh.sub_(m[:, None]))
            den = p.sum(-1)
            if sink is not None:
                den = den + torch.exp(sink[h] - m)
            p.div_(den.clamp_min(torch.finfo(work).tiny)[:, None])
            if plan.weights is not None:
                plan.weights[b, c0:c1] += p
            out[b, h, c0:c1] = bag_sum(vw[b, kvh], col, offs[: n + 1], p.view(-1))
            lse[b, kvh, hr, c0:c1, r2] = torch.where(den > 0, m + torch.log(den), torch.full_like(m, float("inf")))
    return out, lse


def _chunk_lists(plan: SlotPlan, g: _Geom, C: int) -> Iterator[tuple[int, int, int, list[int], Tensor, Tensor]]:
    """(b, c0, c1, query heads, col, ok) for every chunk of C query rows, batch row and key
    list of ``plan`` (see :func:`_slot_keys`, :func:`_lists`)."""
    for c0 in range(0, g.Nq, C):
        c1 = min(g.Nq, c0 + C)
        idx, valid = plan.fn(c0, c1)
        for b in range(g.B):
            for gi, rg, heads in _lists(idx, g):
                yield (b, c0, c1, heads, *_slot_keys(idx, valid, b, gi, rg, g))


def _masked_scores(buf: Tensor, offs: Tensor, col: Tensor, ok: Tensor, qh: Tensor, kt: Tensor,
                   scale: float) -> Tensor:
    """scale * q_i . k_j at the chunk's slots (one sampled product into ``buf``), -inf where a
    slot is not valid: [n, W]."""
    n, W = ok.shape
    sh = sddmm_into(buf[: n * W], offs[: n + 1], col, qh, kt, scale).view(n, W)
    return sh.masked_fill_(~ok, float("-inf"))


def _csr_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, plan: SlotPlan,
             g: _Geom, *, scale: float, sinks: Tensor | None, chunk: int | None,
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`given_keys_bwd` as sparse kernels (see :func:`_csr_fwd`): per chunk and head,
    p = exp(s - lse) from the sampled product again, dP = dO . v_j another, dQ a bag sum of
    key rows; dK and dV bag sums of query and dO rows over the list's edges in key-major
    order (one argsort per list and chunk, shared by the heads that read it)."""
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
    kw, vw = k.to(work), v.to(work)  # (no copy in float32)
    for b, c0, c1, heads, col, ok in _chunk_lists(plan, g, C):
        n = c1 - c0
        perm, trows, trow = key_major(col, g.Nk, W)  # one sort per list, for every head reading it
        for h in heads:
            kvh, hr, r2 = _lse_at(h, g)
            qh = q[b, h, c0:c1].to(work)
            doh = dout[b, h, c0:c1].to(work).contiguous()  # (an expanded dO would take the slow bag path)
            delta = (doh * out[b, h, c0:c1].to(work)).sum(-1)
            lc = lse[b, kvh, hr, c0:c1, r2]
            p = torch.exp(_masked_scores(s, offs, col, ok, qh, kw[b, kvh], scale).sub_(lc[:, None]))
            dph = sddmm_into(dp[: n * W], offs[: n + 1], col, doh, vw[b, kvh], 1.0).view(n, W)
            ds = dph.sub_(delta[:, None]).mul_(p).view(-1)
            dq[b, h, c0:c1] = (bag_sum(kw[b, kvh], col, offs[: n + 1], ds) * scale).to(dq.dtype)
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
    nothing: no key, no sink). Work O(Nq * width * D) per head, memory one chunk
    (``chunk`` query rows; None: about ``CSR_EDGES`` slots). See :func:`_csr_fwd`.
    """
    g = _geometry(q, k, v, plan)
    _check_weights(plan)
    return _csr_fwd(q, k, v, plan, g, scale=scale, sinks=sinks, chunk=chunk)


def given_keys_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, plan: SlotPlan, *,
    scale: float, sinks: Tensor | None = None, chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of :func:`given_keys_fwd`: (dq, dk, dv, dsinks), in the inputs' dtypes.

    Per chunk: p = exp(s - lse) recomputed, dV += p^T dO and dK += dS^T q as bag sums
    over the key-major edges, dS = p (dO . v_j - dO . o), dQ = dS K; a sink's gradient
    is -sum_i p_sink,i (dO_i . o_i). Memory: fp32 dK, dV accumulators + one chunk.
    """
    g = _geometry(q, k, v, plan)
    return _csr_bwd(q, k, v, out, lse, dout, plan, g, scale=scale, sinks=sinks, chunk=chunk)


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
