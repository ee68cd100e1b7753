"""``topk_blocks``: training-free block selection (MoBA / Quest), then exact attention.

Keys are cut into blocks of ``block`` positions. A cheap gate scores every block for
every query:

- ``gate="mean"`` (MoBA, Lu et al. 2025): q . mean of the block's keys;
- ``gate="bound"`` (Quest, Tang et al. 2024): sum_d max(q_d * max_d, q_d * min_d) over
  the block's per-channel key maximum and minimum (an upper bound of q . k_j in it).

Each query then sees, in one exact softmax over the union (each key counted once):
its own block (causally), the ``topk`` highest-gated strictly earlier blocks (ties go
to the lower block index), the first ``sink_tokens`` positions and its last ``window``
positions (itself included). ``shared=True`` selects once per kv-head group from the
gate scores summed over the group's query heads (NSA, Yuan et al. 2025); otherwise
every query head selects. Without ``causal`` every other block is a candidate.

Naming: the issue calls ``sink_tokens`` "sinks", but ``sinks=`` of
:func:`longattn.attention` is the learned-sink logits [H] (one per head, in the
denominator only, differentiable); this mechanism takes those too.

The selection is not differentiated; the attention over what was selected is
(outputs and gradients through the selected keys and values). Key padding: padded
keys are never selected, averaged or seen; a block of padding only is never a
candidate. Decode (Nq < Nk): query r is position Nk - Nq + r, so a decode step equals
the last row of the full call.

How it runs, never building Nq x Nk:

1. Selection (:func:`select_blocks`): block summaries (mean, or max/min), gate scores
   [chunk, Nk / block] per head for chunks of queries, :func:`top_blocks` ->
   [Nq, topk] block numbers per head (or per kv-head group).
2. Attention, key-block-major (MoBA's layout, :func:`make_tiles`): every (query row,
   key block) pair is sorted by key block and each block's queries are cut into tiles
   of 64 rows; a tile is one [64, D] x [D, block] matmul against a key block read in
   place (no per-query key gather). Forward in two passes over the tiles (each pair's
   log-sum-exp merged per row, then exp(s - lse) v added into the rows); the backward,
   written by hand (:func:`tiles_bwd`), scatters dQ into rows and dK, dV into key
   blocks. Time O(Nq * (topk + 1) * block * D) per head, memory O(Nq * topk) indices
   plus one bounded chunk of tiles.

:func:`block_plan` gives the same key set as whole-block slots for
:func:`longattn.ops.given_keys.given_keys_apply` (query-major sparse kernels: the path
other selection mechanisms build on; 1.4x slower here, forward at N = 4096 with 9 query
heads over 3 kv heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.ops._checks import check_bool, check_int, check_qkv, default_scale
from longattn.ops.given_keys import SlotPlan, check_sinks, lse_autograd_function, visible_slots
from longattn.registry import Mechanism, Param, register

#: gate scores one chunk of queries may hold (elements)
GATE_ELEMENTS = 1 << 22
#: scores (and gathered rows) one chunk of tiles may hold (elements)
TILE_ELEMENTS = 1 << 22

GATES = ("mean", "bound")

#: the learned-sinks capability, where the registry has that field (added beside this module)
_LEARNED_SINKS = {"sinks": True} if "sinks" in Mechanism.__dataclass_fields__ else {}


def block_summaries(k: Tensor, block: int, key_padding_mask: Tensor | None, gate: str) -> tuple[Tensor, ...]:
    """Per-block key summaries over real keys, in at least fp32, no gradient.

    k [B, Hkv, Nk, D] -> (``mean`` [B, Hkv, nb, D],) or (``max``, ``min``) for
    ``gate="bound"``, and ``nonempty`` bool [B, 1, nb] (the block holds a real key).
    Cost O(Nk * D).
    """
    B, Hkv, Nk, D = k.shape
    nb = -(-Nk // block)
    work = torch.promote_types(k.dtype, torch.float32)
    kp = F.pad(k.detach().to(work), (0, 0, 0, nb * block - Nk)).view(B, Hkv, nb, block, D)
    real = torch.arange(nb * block, device=k.device) < Nk
    real = real.view(1, nb * block).expand(B, nb * block)
    if key_padding_mask is not None:
        real = real & F.pad(key_padding_mask, (0, nb * block - Nk))
    real = real.view(B, 1, nb, block, 1)
    count = real.sum(3)  # [B, 1, nb, 1]
    nonempty = count[..., 0] > 0
    if gate == "mean":
        return (kp * real).sum(3) / count.clamp_min(1), nonempty
    mx = kp.masked_fill(~real, float("-inf")).amax(3)
    mn = kp.masked_fill(~real, float("inf")).amin(3)
    empty = ~nonempty[..., None]
    return mx.masked_fill(empty, 0.0), mn.masked_fill(empty, 0.0), nonempty


def _gate_scores(qc: Tensor, summ: tuple[Tensor, ...], gate: str) -> Tensor:
    """qc [B, Hkv, R, C, D] against block summaries [B, Hkv, nb, D] -> [B, Hkv, R, C, nb]."""
    if gate == "mean":
        return torch.matmul(qc, summ[0].unsqueeze(2).transpose(-1, -2))
    mx, mn = (s.unsqueeze(2).transpose(-1, -2) for s in summ[:2])
    return torch.matmul(qc.clamp(min=0), mx) + torch.matmul(qc.clamp(max=0), mn)


def top_blocks(scores: Tensor, candidate: Tensor, topk: int) -> Tensor:
    """The ``topk`` highest-scoring candidate blocks, ties to the lower index.

    scores [..., nb] float; candidate bool broadcastable to it. Returns long
    [..., min(topk, nb)] block numbers in increasing order, -1 for missing ones (fewer
    candidates than ``topk``). Exact tie rule: every block above the k-th score, then
    the lowest-indexed blocks equal to it. O(nb) per row.
    """
    nb = scores.shape[-1]
    K = min(topk, nb)
    if K == 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    s = scores.masked_fill(~candidate, float("-inf"))
    thr = s.topk(K, -1).values[..., -1:]
    above = (s > thr) & candidate
    tie = (s == thr) & candidate
    need = K - above.sum(-1, keepdim=True)
    if bool((tie.sum(-1, keepdim=True) > need).any()):  # more equal to the k-th than places left
        tie = tie & (tie.cumsum(-1) <= need)
    chosen = above | tie
    ar = torch.arange(nb, device=s.device)
    order = torch.where(chosen, ar, ar + nb).topk(K, -1, largest=False).values
    return torch.where(order < nb, order, torch.full_like(order, -1))


def select_blocks(
    q: Tensor, k: Tensor, *, block: int, topk: int, gate: str, shared: bool, causal: bool,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """Selected key blocks per query: long [B, Hkv, Rg, Nq, min(topk, nb)], -1 = none.

    Rg = 1 when ``shared`` (or H == Hkv) else H / Hkv. Gate scores are computed in
    chunks of queries ([chunk, nb] per head, never Nq x Nk), no gradient.
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    R = H // Hkv
    *summ, nonempty = block_summaries(k, block, key_padding_mask, gate)
    nb = nonempty.shape[-1]
    Rg = 1 if shared else R
    out = torch.empty(B, Hkv, Rg, Nq, min(topk, nb), dtype=torch.long, device=q.device)
    C = max(1, GATE_ELEMENTS // max(1, B * H * nb))
    work = summ[0].dtype
    qv = q.detach().view(B, Hkv, R, Nq, D)
    blocks = torch.arange(nb, device=q.device)
    for c0 in range(0, Nq, C):
        c1 = min(Nq, c0 + C)
        sc = _gate_scores(qv[:, :, :, c0:c1].to(work), tuple(summ), gate)
        if shared:
            sc = sc.sum(2, keepdim=True)
        own = (torch.arange(c0, c1, device=q.device) + (Nk - Nq)) // block
        cand = blocks < own[:, None] if causal else blocks != own[:, None]
        cand = cand & nonempty.view(B, 1, 1, 1, nb)
        out[:, :, :, c0:c1] = top_blocks(sc, cand, topk)
    return out


def block_slots(
    sel: Tensor, rows: Tensor, *, Nq: int, Nk: int, block: int, sink_tokens: int, window: int,
) -> tuple[Tensor, Tensor, int]:
    """The key blocks query rows ``rows`` [C] read: (blk, keep) [B, Hkv, Rg, C, T], and K + 1.

    Slots: the selected blocks ``sel`` [B, Hkv, Rg, C, K] and the own block (every key
    of them counts; causality clips the own block), then the blocks holding the first
    ``sink_tokens`` positions and the query's last ``window`` positions (only those keys
    count). A block an earlier slot holds is dropped (``keep`` False), so each key counts
    once. T = K + 1 + ceil(sink_tokens / block) + ceil((window - 1) / block).
    """
    B, Hkv, Rg, C, K = sel.shape
    S, W = min(sink_tokens, Nk), min(window, Nk)
    ns, nw = -(-S // block), -(-max(W - 1, 0) // block)
    dev = sel.device
    own = (rows + (Nk - Nq)) // block
    extra = torch.cat([own[:, None], torch.arange(ns, device=dev).expand(C, ns),
                       own[:, None] - torch.arange(1, nw + 1, device=dev)], -1)
    blk = torch.cat([sel, extra.expand(B, Hkv, Rg, C, 1 + ns + nw)], -1)
    T = blk.shape[-1]
    earlier = torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)  # [t, u]: u < t
    first = ~((blk.unsqueeze(-1) == blk.unsqueeze(-2)) & earlier).any(-1)
    return blk, (blk >= 0) & first, K + 1


def block_plan(
    sel: Tensor, *, Nq: int, Nk: int, block: int, sink_tokens: int, window: int, causal: bool,
    key_padding_mask: Tensor | None,
) -> SlotPlan:
    """A :class:`~longattn.ops.given_keys.SlotPlan` of whole key blocks (granule
    ``block``) from the slots of :func:`block_slots`, made chunk by chunk, for
    :func:`~longattn.ops.given_keys.given_keys_apply`: each query's selected blocks
    ``sel`` [B, Hkv, Rg, Nq, K], its own block, its sink and window keys, each key once.
    (``topk_blocks`` itself runs the faster key-block-major :func:`tiles_fwd`.)"""
    _, _, Rg, _, K = sel.shape
    S, W = min(sink_tokens, Nk), min(window, Nk)
    dev = sel.device
    ar_b = torch.arange(block, device=dev)

    def fn(c0: int, c1: int) -> tuple[Tensor, Tensor]:
        rows = torch.arange(c0, c1, device=dev)
        blk, keep, n_whole = block_slots(sel[:, :, :, c0:c1], rows, Nq=Nq, Nk=Nk, block=block,
                                         sink_tokens=sink_tokens, window=window)
        tok = blk.unsqueeze(-1) * block + ar_b  # [B, Hkv, Rg, C, T, block]
        p = (rows + (Nk - Nq)).view(-1, 1, 1)
        part = (tok < S) | ((tok > p - W) & (tok <= p))  # sink and window keys
        whole = (torch.arange(blk.shape[-1], device=dev) < n_whole).view(-1, 1)  # selected / own
        valid = (keep.unsqueeze(-1) & (whole | part) & (tok < Nk)).flatten(-2)
        _, valid = visible_slots(tok.flatten(-2), valid, rows, Nk=Nk, Nq=Nq, causal=causal,
                                 key_padding_mask=key_padding_mask)
        return blk.clamp(min=0), valid

    width = K + 1 + -(-S // block) + -(-max(W - 1, 0) // block)
    return SlotPlan(fn, width, per_query_head=Rg > 1, granule=block, shared=sel.shape[1] == 1 and Rg == 1)


@dataclass(frozen=True)
class Tiles:
    """Work grouped by key block: tile t is up to M query rows against key block kb[t].

    qrow [n, M]: rows of q as [B * H * Nq, D] (0 where not ``live``); pos [n, M]: their
    positions; whole [n, M]: every key of the block counts (else only sink and window
    keys); kb [n]: rows of the key blocks [B * Hkv * nb, block * D]; batch [n].
    """

    qrow: Tensor
    live: Tensor
    pos: Tensor
    whole: Tensor
    kb: Tensor
    batch: Tensor
    nb: int
    block: int
    Nk: int
    sink_tokens: int
    window: int
    causal: bool
    elements: int = 0  # work elements one batch of tiles may hold (0: TILE_ELEMENTS)


def _pairs(sel: Tensor, *, H: int, Nq: int, Nk: int, block: int, sink_tokens: int,
           window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every (query row, key block) pair of :func:`block_slots`, each [P]: the row of q as
    [B * H * Nq, D], the row of the key blocks [B * Hkv * nb, block * D], the query's
    position, and whether the whole block counts (else only its sink and window keys)."""
    B, Hkv, Rg = sel.shape[:3]
    R2 = H // (Hkv * Rg)
    dev = sel.device
    blk, keep, n_whole = block_slots(sel, torch.arange(Nq, device=dev), Nq=Nq, Nk=Nk, block=block,
                                     sink_tokens=sink_tokens, window=window)
    ar = [torch.arange(n, device=dev) for n in (B, Hkv, Rg, Nq, blk.shape[-1], R2)]
    b_, g_, rg_, i_, s_, r2_ = torch.meshgrid(*ar, indexing="ij")  # views, nothing allocated
    m = keep.unsqueeze(-1).expand_as(b_)
    b_, g_, i_ = b_[m], g_[m], i_[m]
    qrow = (b_ * H + (g_ * Rg + rg_[m]) * R2 + r2_[m]) * Nq + i_
    kb = (b_ * Hkv + g_) * -(-Nk // block) + blk.unsqueeze(-1).expand(*blk.shape, R2)[m]
    return qrow, kb, i_ + (Nk - Nq), s_[m] < n_whole


def make_tiles(sel: Tensor, *, H: int, Nq: int, Nk: int, block: int, sink_tokens: int, window: int,
               causal: bool, rows_per_tile: int = 64, elements: int = 0) -> Tiles:
    """The pairs of :func:`_pairs` sorted by key block, each block's queries cut into
    tiles of ``rows_per_tile`` rows (no Python loop). O(P log P) for P pairs.
    ``elements``: the work one batch of tiles may hold (0: :data:`TILE_ELEMENTS`); a caller
    that keeps more of its own tensors alive (``nsa``) asks for less."""
    B, Hkv = sel.shape[:2]
    nb, dev = -(-Nk // block), sel.device
    qrow, kb, pos, whole = _pairs(sel, H=H, Nq=Nq, Nk=Nk, block=block, sink_tokens=sink_tokens, window=window)
    kb, order = torch.sort(kb, stable=True)
    counts = torch.bincount(kb, minlength=B * Hkv * nb)
    per = (counts + rows_per_tile - 1) // rows_per_tile  # tiles per key block
    rank = torch.arange(kb.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[kb]
    where = ((torch.cumsum(per, 0) - per)[kb] + rank // rows_per_tile, rank % rows_per_tile)
    n = int(per.sum())

    def grid(x: Tensor, fill: int | bool) -> Tensor:
        return torch.full((n, rows_per_tile), fill, dtype=x.dtype, device=dev).index_put_(where, x)

    tile_kb = torch.repeat_interleave(torch.arange(B * Hkv * nb, device=dev), per)
    return Tiles(qrow=grid(qrow[order], 0), live=grid(torch.ones_like(whole), False),
                 pos=grid(pos[order], 0), whole=grid(whole[order], False), kb=tile_kb,
                 batch=tile_kb // (Hkv * nb), nb=nb, block=block, Nk=Nk, sink_tokens=sink_tokens,
                 window=window, causal=causal, elements=elements)


def _tile_scores(tl: Tiles, sl: slice, qf: Tensor, kblk: Tensor, kpm: Tensor | None, scale: float,
                 work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Masked scores [n, M, block] of tiles ``sl``, their queries [n, M, D] and key blocks
    [n, block, D] (work dtype)."""
    qrow, kb = tl.qrow[sl], tl.kb[sl]
    n, M = qrow.shape
    qt = qf.index_select(0, qrow.reshape(-1)).view(n, M, -1).to(work)
    kt = kblk.index_select(0, kb).view(n, tl.block, -1).to(work)
    t = ((kb % tl.nb) * tl.block)[:, None] + torch.arange(tl.block, device=kb.device)  # [n, block]
    pos, whole = tl.pos[sl], tl.whole[sl]
    # last visible key of each row: itself (causal), else the last key (whole blocks) or
    # the last sink or window key (partial blocks)
    last = pos if tl.causal else torch.where(whole, tl.Nk - 1, pos.clamp(min=tl.sink_tokens - 1))
    t3 = t.unsqueeze(1)
    vis = t3 <= torch.where(tl.live[sl], torch.clamp(last, max=tl.Nk - 1), -1).unsqueeze(-1)
    if not bool(whole[tl.live[sl]].all()):  # sink and window keys of the partial rows
        p3 = pos.unsqueeze(-1)
        vis = vis & (whole.unsqueeze(-1) | (t3 < tl.sink_tokens) | (t3 > p3 - tl.window))
    if kpm is not None:
        real = F.pad(kpm, (0, tl.nb * tl.block - tl.Nk)).reshape(-1)
        vis = vis & real[tl.batch[sl, None] * (tl.nb * tl.block) + t].unsqueeze(1)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    return s.masked_fill(~vis, float("-inf")), qt, kt


def _key_blocks(x: Tensor, nb: int, block: int) -> Tensor:
    """[B, Hkv, Nk, d] -> [B * Hkv * nb, block * d] (zero-padded to nb * block keys)."""
    x = F.pad(x, (0, 0, 0, nb * block - x.shape[2]))
    return x.reshape(-1, block * x.shape[-1])


def _tile_chunk(tl: Tiles, D: int, Dv: int) -> int:
    M = tl.qrow.shape[1]
    return max(1, (tl.elements or TILE_ELEMENTS) // (4 * M * tl.block + (M + 2 * tl.block) * (D + Dv)))


def _sink_rows(sinks: Tensor | None, B: int, Nq: int, work: torch.dtype) -> Tensor | None:
    return None if sinks is None else sinks.to(work).view(1, -1, 1).expand(B, -1, Nq).reshape(-1)


def tiles_fwd(q: Tensor, k: Tensor, v: Tensor, tl: Tiles, *, scale: float, sinks: Tensor | None,
              key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Forward over the tiles: (out [B, H, Nq, Dv], lse [B * H * Nq] fp32+).

    Two passes over the tiles (flash-style, batched [M, D] x [D, block] matmuls): the
    first gives each (query row, key block) pair its log-sum-exp, merged per row with
    the sink; the second adds exp(s - lse) v into the rows (``index_add_``)."""
    B, H, Nq, D = q.shape
    Dv, work = v.shape[-1], torch.promote_types(q.dtype, torch.float32)
    qf, kblk, vblk = q.reshape(-1, D), _key_blocks(k, tl.nb, tl.block), _key_blocks(v, tl.nb, tl.block)
    n, M = tl.qrow.shape
    C = _tile_chunk(tl, D, Dv)
    item = torch.empty(n, M, dtype=work, device=q.device)
    for c in range(0, n, C):
        s, _, _ = _tile_scores(tl, slice(c, c + C), qf, kblk, key_padding_mask, scale, work)
        mx = s.amax(-1)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        item[c : c + C] = mx + torch.log(torch.exp(s - mx.unsqueeze(-1)).sum(-1))
    rows, il = tl.qrow.reshape(-1), item.reshape(-1)
    mx = torch.full((B * H * Nq,), float("-inf"), dtype=work, device=q.device).scatter_reduce_(0, rows, il, "amax")
    sink = _sink_rows(sinks, B, Nq, work)
    if sink is not None:
        mx = torch.maximum(mx, sink)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    tot = torch.zeros_like(mx).index_add_(0, rows, torch.exp(il - mx[rows]))
    if sink is not None:
        tot = tot + torch.exp(sink - mx)
    lse = torch.where(tot > 0, mx + torch.log(tot), torch.full_like(mx, float("inf")))
    out = torch.zeros(B * H * Nq, Dv, dtype=work, device=q.device)
    for c in range(0, n, C):
        sl = slice(c, c + C)
        s, _, _ = _tile_scores(tl, sl, qf, kblk, key_padding_mask, scale, work)
        r = tl.qrow[sl].reshape(-1)
        p = torch.exp(s - lse[r].view(*s.shape[:2], 1))
        vt = vblk.index_select(0, tl.kb[sl]).view(s.shape[0], tl.block, Dv).to(work)
        out.index_add_(0, r, torch.matmul(p, vt).reshape(-1, Dv))
    return out.view(B, H, Nq, Dv).to(q.dtype), lse


def tiles_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, tl: Tiles, *,
              scale: float, sinks: Tensor | None, key_padding_mask: Tensor | None,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of :func:`tiles_fwd`: (dq, dk, dv, dsinks). One pass over the tiles:
    p = exp(s - lse), dV += p^T dO, dS = p (dO v^T - dO . o), dQ += dS K, dK += dS^T Q
    (scattered into query rows and key blocks with ``index_add_``)."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    work = torch.promote_types(q.dtype, torch.float32)
    qf, kblk, vblk = q.reshape(-1, D), _key_blocks(k, tl.nb, tl.block), _key_blocks(v, tl.nb, tl.block)
    dof = dout.reshape(-1, Dv).to(work)
    delta = (dof * out.reshape(-1, Dv).to(work)).sum(-1)
    dq = torch.zeros(B * H * Nq, D, dtype=work, device=q.device)
    dkb = torch.zeros(kblk.shape, dtype=work, device=k.device)
    dvb = torch.zeros(vblk.shape, dtype=work, device=v.device)
    n, C = tl.qrow.shape[0], _tile_chunk(tl, D, Dv)
    for c in range(0, n, C):
        sl = slice(c, c + C)
        s, qt, kt = _tile_scores(tl, sl, qf, kblk, key_padding_mask, scale, work)
        r, kb = tl.qrow[sl].reshape(-1), tl.kb[sl]
        shape = (*s.shape[:2], 1)
        p = torch.exp(s - lse[r].view(shape))
        dot = dof.index_select(0, r).view(*s.shape[:2], Dv)
        vt = vblk.index_select(0, kb).view(s.shape[0], tl.block, Dv).to(work)
        dvb.index_add_(0, kb, torch.matmul(p.transpose(-1, -2), dot).reshape(len(kb), -1))
        ds = p * (torch.matmul(dot, vt.transpose(-1, -2)) - delta[r].view(shape))
        dq.index_add_(0, r, (torch.matmul(ds, kt) * scale).reshape(-1, D))
        dkb.index_add_(0, kb, (torch.matmul(ds.transpose(-1, -2), qt) * scale).reshape(len(kb), -1))
    dsinks = None
    sink = _sink_rows(sinks, B, Nq, work)
    if sink is not None:
        dsinks = (-(torch.exp(sink - lse) * delta)).view(B, H, Nq).sum((0, 2)).to(sinks.dtype)
    dk = dkb.view(B, Hkv, -1, D)[:, :, :Nk].to(k.dtype)
    dv = dvb.view(B, Hkv, -1, Dv)[:, :, :Nk].to(v.dtype)
    return dq.view(B, H, Nq, D).to(q.dtype), dk, dv, dsinks


#: the autograd wrapper of :func:`tiles_fwd` / :func:`tiles_bwd` (tiles not differentiated):
#: ``TopkBlocksFunction.apply(q, k, v, sinks, tiles, scale, key_padding_mask)``
TopkBlocksFunction = lse_autograd_function("TopkBlocksFunction", tiles_fwd, tiles_bwd, "key_padding_mask")


#: the old private name (kept for callers that imported it)
_TopkBlocks = TopkBlocksFunction


def _check_params(block: object, topk: object, gate: object, sink_tokens: object, window: object,
                  shared: object) -> None:
    check_int("block", block, minimum=1)
    check_int("topk", topk, minimum=0)
    check_int("sink_tokens", sink_tokens, minimum=0)
    check_int("window", window, minimum=0)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    check_bool("shared", shared)


@register(
    "topk_blocks",
    params=(
        Param("block", 64, "key block length"),
        Param("topk", 8, "earlier blocks selected per query (besides its own block)"),
        Param("gate", "mean", "'mean' (MoBA: q . block mean key) or 'bound' (Quest: per-channel max/min bound)"),
        Param("sink_tokens", 0, "first positions always visible (attention-sink tokens)"),
        Param("window", 0, "the query's last positions (itself included) always visible"),
        Param("shared", False, "one selection per kv-head group (gate summed over its query heads, NSA)"),
    ),
    family="selection", exact=False, causal=True, cross=False, subquadratic=True,
    gqa=True, bottom_right=True, packed=True, **_LEARNED_SINKS,
    paper="Lu et al. 2025, MoBA; Tang et al. 2024, Quest; Yuan et al. 2025, NSA (shared selection)",
    summary="own block + top-k gated earlier key blocks (+ sinks, window), one exact softmax",
)
def topk_blocks_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, block: int = 64, topk: int = 8, gate: str = "mean", sink_tokens: int = 0,
    window: int = 0, shared: bool = False, sinks: Tensor | None = None,
) -> Tensor:
    """Top-k block selection attention (see the module docstring).

    q [B, H, Nq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv], H % Hkv == 0, Nq <= Nk (the
    queries are the last Nq positions); sinks: optional learned-sink logits [H]
    (denominator only, differentiable). Returns [B, H, Nq, Dv] in q's dtype. Memory
    O(Nq * topk + chunk), time O(Nq * (topk + 1) * block * D) per head.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False, gqa=True,
                  bottom_right=True)
    _check_params(block, topk, gate, sink_tokens, window, shared)
    sink = check_sinks(sinks, d.H)
    s = default_scale(scale, d.D)
    sel = select_blocks(q, k, block=block, topk=topk, gate=gate, shared=shared or d.H == d.Hkv,
                        causal=causal, key_padding_mask=key_padding_mask)
    tiles = make_tiles(sel, H=d.H, Nq=d.Nq, Nk=d.Nk, block=block, sink_tokens=sink_tokens, window=window,
                       causal=causal)
    return TopkBlocksFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), sink, tiles, s, key_padding_mask)
