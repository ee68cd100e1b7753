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
   key block) pair is sorted by (needs a mask, key block), and each key block's rows are
   cut into tiles of 256 rows; a batch of tiles is one call of PyTorch's fused CPU flash
   kernel ([256, D] queries against one [block, D] key block each, no mask for the
   *plain* tiles, whose rows see the whole block; a mask for sink and window keys). Under
   causality, with whole query blocks aligned to the key blocks and no key padding, the
   own blocks run apart as causal flash calls (the R query heads' rows of a query block
   against their own key block, one broadcast mask, a few query blocks per call), and
   without a window the sink keys of blocks a row does not count whole run as one dense
   [Nq, sink_tokens] part (in runs of rows); otherwise they are masked tiles.
   Each tile row's (output, log-sum-exp) is
   folded into its query row by a running log-sum-exp merge (:func:`tiles_fwd`); the
   backward (:func:`tiles_bwd`) runs the flash backward per batch, given each row's
   merged output and log-sum-exp, and scatters dQ into rows and dK, dV into key blocks.
   Without autograd (:func:`_infer`) the rows run in runs of about :data:`CALL_PAIRS`
   pairs over one copy of the key blocks, which bounds the temporaries. Time
   O(Nq * (topk + 1) * block * D) per head, memory O(Nq * topk) indices plus one bounded
   batch of tiles.
3. Decode steps (at most :data:`GATHER_ROWS` rows, no autograd, :func:`_gathered`): each
   row's keys are gathered from k and v in place (:func:`_row_keys`), one softmax over
   them. With ``key_state=`` a :class:`KeySummaries` that the KV cache keeps (HF's
   :class:`~longattn.integrations.transformers.KeyStateCache`,
   :class:`longattn.decoding.PatternCache`), only the blocks the new keys touch are
   summarised: a step costs O(Nk / block * D) for the gate plus O((topk + 1) * block * D),
   not O(Nk * D).

:func:`block_plan` gives the same key set as whole-block slots for
:func:`longattn.ops.given_keys.given_keys_apply` (query-major sparse kernels: the path
other selection mechanisms build on; 1.4x slower here, forward at N = 4096 with 9 query
heads over 3 kv heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.ops._checks import check_bool, check_int, check_qkv, default_scale
from longattn.ops._softmax import (
    add_sinks, additive_mask, kernels, pad_head_dim, tile_backward, tile_forward, work_dtype,
)
from longattn.ops.given_keys import SlotPlan, check_sinks, lse_autograd_function, visible_slots
from longattn.registry import Mechanism, Param, register

#: gate scores one chunk of queries may hold (elements)
GATE_ELEMENTS = 1 << 22
#: at most this many queries per gate chunk (under causality, smaller chunks skip more later blocks)
GATE_ROWS = 1024
#: scores (and gathered rows) one chunk of tiles may hold (elements)
TILE_ELEMENTS = 1 << 22
#: at most this many query rows (decode steps) gather their keys instead of running tiles
GATHER_ROWS = 16

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
    pad = nb * block - Nk
    kp = k.detach().to(work)
    kp = (F.pad(kp, (0, 0, 0, pad)) if pad else kp).view(B, Hkv, nb, block, D)
    if key_padding_mask is None and (gate == "mean" or pad == 0):  # no mask needed (padded keys are 0)
        nonempty = torch.ones(B, 1, nb, dtype=torch.bool, device=k.device)
        if gate == "bound":
            return kp.amax(3), kp.amin(3), nonempty
        count = torch.full((nb, 1), float(block), dtype=work, device=k.device)
        count[-1] = block - pad
        return kp.sum(3) / count, nonempty
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


class KeySummaries:
    """The block summaries of a growing key sequence, kept beside a KV cache (decode).

    ``update(k, key_padding_mask)`` takes the cache's keys so far, k [B, Hkv, Nk, D]
    (the keys of the last call unchanged, new ones appended), and returns what
    :func:`block_summaries` returns for them. Only the blocks the new keys touch are
    computed (the last, partial block again and the new ones): O((new keys + block) * D)
    per call instead of O(Nk * D), and O(Nk / block * D) memory. It starts over when the
    keys are not a continuation of the last call's: fewer keys, another shape, dtype or
    device, or a last summarised key that changed (one [B, Hkv, D] comparison: a cache
    that was reset or reordered). The padding of earlier keys must not change.

    A ``topk_blocks`` call takes it as ``key_state=`` (the registry's ``key_state``
    builds one from the call's parameters); a decode step then costs
    O(Nk / block * D) for the gate plus O((topk + 1) * block * D) for the attention.
    """

    def __init__(self, block: int, gate: str = "mean") -> None:
        check_int("block", block, minimum=1)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.block, self.gate = block, gate
        self.length = 0  # keys summarised
        self._bufs: list[Tensor] = []  # each summary [B, Hkv | 1, capacity, ...] (blocks on dim 2)
        self._last: Tensor | None = None  # the last summarised key [B, Hkv, D]

    def reset(self) -> None:
        """Forget everything (the next update summarises all its keys)."""
        self.length, self._bufs, self._last = 0, [], None

    def _continues(self, k: Tensor) -> bool:
        if self._last is None or k.shape[2] < self.length:
            return False
        last = self._last
        same_heads = k.shape[:2] + k.shape[3:] == last.shape
        if (k.dtype, k.device) != (last.dtype, last.device) or not same_heads:
            return False
        return bool(torch.equal(k[:, :, self.length - 1], last))

    def update(self, k: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """Summaries of k (see the class docstring): views of the kept buffers."""
        if not isinstance(k, Tensor) or k.dim() != 4:
            raise ValueError(f"k must be a tensor [B, Hkv, Nk, D], got {getattr(k, 'shape', type(k).__name__)}")
        Nk = k.shape[2]
        if not self._continues(k):
            self.reset()
        elif Nk == self.length:  # no new key
            return tuple(buf[:, :, : -(-Nk // self.block)] for buf in self._bufs)
        b0 = self.length // self.block  # the first block the new keys touch
        start = b0 * self.block
        kpm = None if key_padding_mask is None else key_padding_mask[:, start:]
        tail = block_summaries(k[:, :, start:], self.block, kpm, self.gate)
        nb = b0 + tail[-1].shape[-1]
        if not self._bufs or self._bufs[0].shape[2] < nb:  # grow (doubling: amortised O(D) per key)
            cap = max(nb, 2 * (self._bufs[0].shape[2] if self._bufs else 0))
            grown = [t.new_empty(*t.shape[:2], cap, *t.shape[3:]) for t in tail]
            for new, old in zip(grown, self._bufs):
                new[:, :, :b0] = old[:, :, :b0]
            self._bufs = grown
        for buf, t in zip(self._bufs, tail):
            buf[:, :, b0:nb] = t
        self.length = Nk
        self._last = k[:, :, Nk - 1].detach().clone() if Nk else None
        return tuple(buf[:, :, :nb] for buf in self._bufs)


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
    vals, idx = s.topk(min(K + 1, nb), -1)
    if K < nb and bool((vals[..., K - 1] == vals[..., K]).any()):
        # a tie at the k-th score (rare with real scores): the lowest-indexed blocks equal to it
        thr = vals[..., K - 1 : K]
        above = (s > thr) & candidate
        tie = (s == thr) & candidate
        tie = tie & (tie.cumsum(-1) <= K - above.sum(-1, keepdim=True))
        ar = torch.arange(nb, device=s.device)
        idx = torch.where(above | tie, ar, ar + nb).topk(K, -1, largest=False).values
    else:  # topk's first K blocks are the chosen ones; non-candidates among them go last
        idx = torch.where(vals[..., :K] == float("-inf"), idx[..., :K] + nb, idx[..., :K]).sort(-1).values
    return torch.where(idx < nb, idx, torch.full_like(idx, -1))


def select_blocks(
    q: Tensor, k: Tensor, *, block: int, topk: int, gate: str, shared: bool, causal: bool,
    key_padding_mask: Tensor | None, offset: int | None = None, summaries: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """Selected key blocks per query: long [B, Hkv, Rg, Nq, min(topk, nb)], -1 = none.

    Rg = 1 when ``shared`` (or H == Hkv) else H / Hkv. Gate scores are computed in
    chunks of queries ([chunk, nb] per head, never Nq x Nk), no gradient; under
    causality a chunk scores only the blocks before its last query's block (about half
    the gate work). ``offset``: the position of q's first row (default Nk - Nq, the last
    rows); ``summaries``: :func:`block_summaries` of k, when the caller keeps them.
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    R = H // Hkv
    offset = Nk - Nq if offset is None else offset
    *summ, nonempty = summaries or block_summaries(k, block, key_padding_mask, gate)
    nb = nonempty.shape[-1]
    Rg = 1 if shared else R
    K = min(topk, nb)
    out = torch.full((B, Hkv, Rg, Nq, K), -1, dtype=torch.long, device=q.device)
    C = max(1, min(GATE_ROWS, GATE_ELEMENTS // max(1, B * H * nb)))
    work = summ[0].dtype
    qv = q.detach().view(B, Hkv, R, Nq, D)
    for c0 in range(0, Nq, C):
        c1 = min(Nq, c0 + C)
        own = (torch.arange(c0, c1, device=q.device) + offset) // block
        cols = min(nb, (c1 - 1 + offset) // block) if causal else nb  # blocks any row of the chunk may pick
        if cols == 0 or K == 0:
            continue
        sc = _gate_scores(qv[:, :, :, c0:c1].to(work), tuple(s[:, :, :cols] for s in summ), gate)
        if shared:
            sc = sc.sum(2, keepdim=True)
        blocks = torch.arange(cols, device=q.device)
        cand = blocks < own[:, None] if causal else blocks != own[:, None]
        cand = cand & nonempty[..., :cols].view(B, 1, 1, 1, cols)
        top = top_blocks(sc, cand, topk)
        out[:, :, :, c0:c1, : top.shape[-1]] = top
    return out


def _extra_slots(Nk: int, block: int, sink_tokens: int, window: int) -> tuple[int, int]:
    """(sink blocks, window blocks before the own one) of :func:`block_slots`."""
    return -(-min(sink_tokens, Nk) // block), -(-max(min(window, Nk) - 1, 0) // block)


def block_slots(
    sel: Tensor, rows: Tensor, *, Nq: int, Nk: int, block: int, sink_tokens: int, window: int,
    offset: int | None = None,
) -> tuple[Tensor, Tensor, int]:
    """The key blocks query rows ``rows`` [C] read: (blk, keep) [B, Hkv, Rg, C, T], and K + 1.

    Slots: the selected blocks ``sel`` [B, Hkv, Rg, C, K] and the own block (every key
    of them counts; causality clips the own block), then the blocks holding the first
    ``sink_tokens`` positions and the query's last ``window`` positions (only those keys
    count). A block an earlier slot holds is dropped (``keep`` False), so each key counts
    once. T = K + 1 + ceil(sink_tokens / block) + ceil((window - 1) / block).
    """
    B, Hkv, Rg, C, K = sel.shape
    ns, nw = _extra_slots(Nk, block, sink_tokens, window)
    dev = sel.device
    own = (rows + (Nk - Nq if offset is None else offset)) // block  # row r is position offset + r
    extra = torch.cat([own[:, None], torch.arange(ns, device=dev).expand(C, ns),
                       own[:, None] - torch.arange(1, nw + 1, device=dev)], -1)
    blk = torch.cat([sel, extra.expand(B, Hkv, Rg, C, 1 + ns + nw)], -1)
    T = blk.shape[-1]
    # the selected blocks differ from each other and from the own block (never a candidate):
    # only the sink and window slots can repeat an earlier slot
    earlier = torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)[K + 1:]  # [t, u]: u < t
    again = ((blk[..., K + 1:, None] == blk.unsqueeze(-2)) & earlier).any(-1)
    keep = blk >= 0
    keep[..., K + 1:] &= ~again
    return blk, keep, K + 1


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

    width = K + 1 + sum(_extra_slots(Nk, block, sink_tokens, window))
    return SlotPlan(fn, width, per_query_head=Rg > 1, granule=block, shared=sel.shape[1] == 1 and Rg == 1)


def _sink_rows(sinks: Tensor | None, B: int, Nq: int, work: torch.dtype) -> Tensor | None:
    return None if sinks is None else sinks.to(work).view(1, -1, 1).expand(B, -1, Nq).reshape(-1)


@dataclass(frozen=True)
class Tiles:
    """Work grouped by key block: tile t is up to M query rows against key block kb[t].

    qrow [n, M]: rows of q as [B * H * Nq, D] (0 where not ``live``); pos [n, M]: their
    positions; whole [n, M]: every key of the block counts (else only sink and window
    keys); kb [n]: rows of the key blocks [B * Hkv * nb, block * D]; batch [n]. The first
    ``n_plain`` tiles are *plain*: each live row sees every key of the block, so they run
    without a mask; the rest (own blocks under causality, sink and window keys, the last
    block past Nk) carry one. With ``own_first >= 0`` the own blocks are not in the tiles
    (:func:`_own_queries`), and with ``sink_vis`` the partial sink blocks are not either
    (:func:`_sink_operands`). Both assume no padded key.
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
    n_plain: int = 0
    own_first: int = -1  # >= 0: the own blocks are left out of the tiles and run as causal calls;
    # query row r (a multiple of ``block`` rows from position own_first * block) owns block own_first + r // block
    sink_vis: Tensor | None = None  # [B, Hkv, Rg, Nq, S]: the sink keys run apart (dense), which each row sees there
    padding_checked: bool = False  # the plain tiles hold no padded key (make_tiles had the key padding)


def _pairs(sel: Tensor, *, H: int, Nq: int, Nk: int, block: int, sink_tokens: int,
           window: int, offset: int, own: bool = True, sinks: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every (query row, key block) pair of :func:`block_slots`, each [P]: the row of q as
    [B * H * Nq, D], the row of the key blocks [B * Hkv * nb, block * D], the query's
    position, and whether the whole block counts (else only its sink and window keys)."""
    B, Hkv, Rg = sel.shape[:3]
    R2 = H // (Hkv * Rg)
    dev = sel.device
    blk, keep, n_whole = block_slots(sel, torch.arange(Nq, device=dev), Nq=Nq, Nk=Nk, block=block,
                                     sink_tokens=sink_tokens, window=window, offset=offset)
    T = blk.shape[-1]
    if not own:  # the own blocks run apart
        keep[..., n_whole - 1] = False
    if not sinks:  # the sink blocks that no row counts whole run apart (no window: only sink keys)
        keep[..., n_whole : n_whole + _extra_slots(Nk, block, sink_tokens, window)[0]] = False
    at = keep.reshape(-1).nonzero().squeeze(1)  # kept slots of [B, Hkv, Rg, Nq, T], in order
    s_, i_, unit = at % T, (at // T) % Nq, at // (T * Nq)  # unit: (b, g, rg)
    b_, g_ = unit // (Hkv * Rg), (unit // Rg) % Hkv
    head0 = (b_ * Hkv * Rg + (unit % (Hkv * Rg))) * R2  # first query head of the unit, batch included
    qrow = ((head0[:, None] + torch.arange(R2, device=dev)) * Nq + i_[:, None]).reshape(-1)
    kb = ((b_ * Hkv + g_) * -(-Nk // block) + blk.reshape(-1)[at]).repeat_interleave(R2)
    return qrow, kb, (i_ + offset).repeat_interleave(R2), (s_ < n_whole).repeat_interleave(R2)


def make_tiles(sel: Tensor, *, H: int, Nq: int, Nk: int, block: int, sink_tokens: int, window: int,
               causal: bool, rows_per_tile: int = 256, elements: int = 0, offset: int | None = None,
               own_apart: bool = False, key_padding_mask: Tensor | None = None) -> Tiles:
    """The pairs of :func:`_pairs` sorted by (needs a mask, key block), each run of one key
    block cut into tiles of ``rows_per_tile`` rows (fewer, a multiple of 8, when no key
    block has that many: decode steps) (no Python loop). O(P log P) for P
    pairs. A pair needs no mask when the whole block counts, lies inside Nk and (causal)
    ends at or before the query. ``elements``: the work one batch of tiles may hold (0:
    :data:`TILE_ELEMENTS`); a caller that keeps more of its own tensors alive (``nsa``)
    asks for less. ``offset``: the position of the first query row (default Nk - Nq).
    ``own_apart`` (the caller knows no key is padded): under causality, with whole query
    blocks aligned to the key blocks, leave the own blocks out of the tiles, to run as one
    causal call (:func:`_own_queries`); without a window, leave out the sink keys of the
    blocks a row does not count whole, to run as one dense part (:func:`_sink_operands`).
    ``key_padding_mask`` (the padding the tiles will run with): a pair over a key block
    that holds a padded key needs a mask, the others stay plain (else, with padding,
    every tile takes a mask)."""
    B, Hkv = sel.shape[:2]
    nb, dev = -(-Nk // block), sel.device
    nkb = B * Hkv * nb
    offset = Nk - Nq if offset is None else offset
    apart = own_apart and causal and offset % block == 0 and Nq % block == 0 and Nq > 0
    sinks_apart = own_apart and window == 0 and sink_tokens > 0
    qrow, kb, pos, whole = _pairs(sel, H=H, Nq=Nq, Nk=Nk, block=block, sink_tokens=sink_tokens, window=window,
                                  offset=offset, own=not apart, sinks=not sinks_apart)
    end = (kb % nb + 1) * block  # one past the block's last key
    plain = whole & (end <= Nk) & ((end <= pos + 1) if causal else True)
    if key_padding_mask is not None:  # only blocks of real keys stay plain
        real = F.pad(key_padding_mask, (0, nb * block - Nk), value=True).view(B, 1, nb, block).all(-1)
        plain = plain & real.expand(B, Hkv, nb).reshape(-1)[kb]
    seg, order = torch.sort(kb + nkb * (~plain).long(), stable=True)
    counts = torch.bincount(seg, minlength=2 * nkb)
    rows_per_tile = max(1, min(rows_per_tile, -(-int(counts.max()) // 8) * 8)) if seg.numel() else 1
    per = (counts + rows_per_tile - 1) // rows_per_tile  # tiles per (class, key block)
    rank = torch.arange(seg.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[seg]
    where = ((torch.cumsum(per, 0) - per)[seg] + rank // rows_per_tile, rank % rows_per_tile)
    n = int(per.sum())

    def grid(x: Tensor, fill: int | bool) -> Tensor:
        return torch.full((n, rows_per_tile), fill, dtype=x.dtype, device=dev).index_put_(where, x)

    tile_kb = torch.repeat_interleave(torch.arange(2 * nkb, device=dev), per) % nkb
    return Tiles(qrow=grid(qrow[order], 0), live=grid(torch.ones_like(whole), False),
                 pos=grid(pos[order], 0), whole=grid(whole[order], False), kb=tile_kb,
                 batch=tile_kb // (Hkv * nb), nb=nb, block=block, Nk=Nk, sink_tokens=sink_tokens,
                 window=window, causal=causal, elements=elements, n_plain=int(per[:nkb].sum()),
                 own_first=offset // block if apart else -1, padding_checked=key_padding_mask is not None,
                 sink_vis=_sink_visibility(sel, Nk, block, sink_tokens, offset, causal) if sinks_apart else None)


def _tile_visibility(tl: Tiles, sl: slice, kpm: Tensor | None) -> Tensor:
    """bool [n, M, block]: which keys of its block each row of tiles ``sl`` sees."""
    kb, pos, whole, live = tl.kb[sl], tl.pos[sl], tl.whole[sl], tl.live[sl]
    t = ((kb % tl.nb) * tl.block)[:, None] + torch.arange(tl.block, device=kb.device)  # [n, block]
    # last visible key of each row: itself (causal), else the last key (whole blocks) or
    # the last sink or window key (partial blocks)
    last = pos if tl.causal else torch.where(whole, tl.Nk - 1, pos.clamp(min=tl.sink_tokens - 1))
    t3 = t.unsqueeze(1)
    vis = t3 <= torch.where(live, torch.clamp(last, max=tl.Nk - 1), -1).unsqueeze(-1)
    if not bool(whole[live].all()):  # sink and window keys of the partial rows
        p3 = pos.unsqueeze(-1)
        vis = vis & (whole.unsqueeze(-1) | (t3 < tl.sink_tokens) | (t3 > p3 - tl.window))
    if kpm is not None:
        real = F.pad(kpm, (0, tl.nb * tl.block - tl.Nk)).reshape(-1)
        vis = vis & real[tl.batch[sl, None] * (tl.nb * tl.block) + t].unsqueeze(1)
    return vis


def _key_blocks(x: Tensor, nb: int, block: int, dtype: torch.dtype) -> Tensor:
    """[B, Hkv, Nk, d] -> [B * Hkv * nb, block * d] in ``dtype`` (zero-padded to nb * block
    keys; a view of ``x`` when it needs neither padding nor a cast)."""
    x = x.to(dtype)
    if nb * block != x.shape[2]:
        x = F.pad(x, (0, 0, 0, nb * block - x.shape[2]))
    return x.reshape(-1, block * x.shape[-1])


def _pad_last(x: Tensor, size: int) -> Tensor:
    """x zero-padded along its last dim to ``size`` (x itself when it has that size)."""
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _tile_batches(tl: Tiles, D: int, kpm: Tensor | None, work: torch.dtype,
                  ) -> Iterator[tuple[slice, Tensor | None, Tensor | None]]:
    """(slice of tiles, additive mask [n, 1, M, block] or None, alive [n, M] or None) per
    batch: the plain tiles without a mask (unless keys are padded), then the others."""
    n, M = tl.qrow.shape
    C = max(1, (tl.elements or TILE_ELEMENTS) // (M * (6 * D + 2 * tl.block) + 4 * tl.block * D))  # backward: 6 [M, D]
    n_plain = 0 if kpm is not None and not tl.padding_checked else tl.n_plain
    for a, b, masked in ((0, n_plain, False), (n_plain, n, True)):
        for c in range(a, b, C):
            sl = slice(c, min(b, c + C))
            if not masked:
                yield sl, None, None
                continue
            vis = _tile_visibility(tl, sl, kpm)
            yield sl, additive_mask(vis, work).unsqueeze(1), vis.any(-1)


def _fold_pairs(O: Tensor, Mx: Tensor, Tot: Tensor, rows: Tensor, o: Tensor, lse: Tensor) -> None:
    """Fold softmax parts (o [P, Dv], lse [P]) of rows ``rows`` [P] (a row may repeat) into
    the running maximum Mx [R], weight total Tot [R] and weighted sum O [R, Dv] (in place):
    only the rows whose maximum grows are rescaled."""
    new = Mx.scatter_reduce(0, rows, lse, "amax")
    grown = torch.nonzero((new > Mx) & torch.isfinite(Mx)).flatten()
    if grown.numel():
        f = torch.exp(Mx[grown] - new[grown])
        Tot[grown] *= f
        O.index_copy_(0, grown, O.index_select(0, grown) * f[:, None])
    Mx.copy_(new)
    ref = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w = torch.exp(lse - ref[rows])
    Tot.index_add_(0, rows, w)
    O.index_add_(0, rows, o * w[:, None])


def _own_queries(x: Tensor, B: int, Hkv: int, block: int) -> Tensor:
    """Rows [B, H, Nq, d] -> [B * Hkv * nqb, 1, R * block, d]: per kv head and query block,
    the block's rows of the kv head's R query heads (a copy; :func:`_own_rows` undoes it)."""
    _, H, Nq, d = x.shape
    x = x.reshape(B, Hkv, H // Hkv, Nq // block, block, d).transpose(2, 3)
    return x.reshape(-1, 1, (H // Hkv) * block, d)


def _own_rows(x: Tensor, B: int, Hkv: int, H: int, block: int) -> Tensor:
    """Inverse of :func:`_own_queries`: [B * Hkv * nqb, 1, R * block, ...] -> rows
    [B * H * Nq, ...] in query-row order."""
    tail = x.shape[3:]
    x = x.reshape(B, Hkv, -1, H // Hkv, block, *tail).transpose(2, 3)
    return x.reshape(-1, *tail)


def _own_keys(blocks: Tensor, tl: Tiles, B: int, Hkv: int, c0: int, c1: int) -> Tensor:
    """Key blocks [B * Hkv * nb, block * d] -> the own blocks of query blocks c0 .. c1 - 1,
    [B * Hkv * (c1 - c0), 1, block, d] (a view when it can be)."""
    x = blocks.view(B, Hkv, tl.nb, tl.block, -1)[:, :, tl.own_first + c0 : tl.own_first + c1]
    return x.reshape(-1, 1, tl.block, x.shape[-1])


def _own_chunks(tl: Tiles, B: int, H: int, Nq: int, D: int) -> Iterator[tuple[int, int, slice]]:
    """(c0, c1, their query rows) for runs of whole query blocks of the own-block part,
    each holding about a batch of tiles' elements (the backward gathers five [rows, D]
    operands in its layout), so that the part's temporaries stay bounded."""
    nqb = Nq // tl.block
    C = max(1, (tl.elements or TILE_ELEMENTS) // (6 * B * H * tl.block * D))
    for c0 in range(0, nqb, C):
        c1 = min(nqb, c0 + C)
        yield c0, c1, slice(c0 * tl.block, c1 * tl.block)


def _own_mask(R: int, block: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The causal mask of a query block's R heads against its own key block, additive,
    [1, 1, R * block, block] (broadcast over the batch of blocks)."""
    vis = torch.ones(block, block, dtype=torch.bool, device=device).tril().repeat(R, 1)
    return additive_mask(vis, dtype).view(1, 1, R * block, block)


def _sink_visibility(sel: Tensor, Nk: int, block: int, sink_tokens: int, offset: int, causal: bool) -> Tensor:
    """bool [B, Hkv, Rg, Nq, S]: which of the first S = min(sink_tokens, Nk) keys each row
    sees as a sink key: those of blocks it does not count whole (neither selected nor its
    own), and under causality none after it."""
    Nq, S = sel.shape[3], min(sink_tokens, Nk)
    t = torch.arange(S, device=sel.device)
    pos = torch.arange(Nq, device=sel.device) + offset
    whole = (sel.unsqueeze(-1) == (t // block)).any(-2) | ((pos // block)[:, None] == t // block)
    vis = ~whole
    if causal:
        vis = vis & (t <= pos[:, None])
    return vis


def _sink_operands(q: Tensor, kblk: Tensor, vblk: Tensor, tl: Tiles) -> tuple[Tensor, Tensor, Tensor]:
    """The sink part as tile-kernel operands: q [B, H, Nq, D] viewed [B, Hkv, R, Nq, D],
    the first S keys and values [B, Hkv, 1, S, D] (views of the blocks)."""
    B, H, Nq, D = q.shape
    S = tl.sink_vis.shape[-1]
    Hkv = kblk.shape[0] // (B * tl.nb)
    ks, vs = (x.view(B, Hkv, 1, tl.nb * tl.block, D)[..., :S, :] for x in (kblk, vblk))
    return q.view(B, Hkv, H // Hkv, Nq, D), ks, vs


def _sink_row_chunks(tl: Tiles, R: int) -> Iterator[slice]:
    """Query-row ranges of the dense sink part (R = B * H * Nq rows in all), each with
    about a batch of tiles' elements of scores, so that the part's temporaries (the
    backward keeps several [rows, S] tensors) stay as bounded as the tiles'."""
    Nq, S = tl.sink_vis.shape[-2:]
    C = max(1, (tl.elements or TILE_ELEMENTS) // (2 * max(1, R // max(1, Nq)) * max(1, S)))
    return (slice(r0, min(Nq, r0 + C)) for r0 in range(0, Nq, C))


def _check_unpadded(tl: Tiles, kpm: Tensor | None) -> None:
    """The own-block and sink parts run apart only for unpadded keys (``own_apart``)."""
    if kpm is not None and (tl.own_first >= 0 or tl.sink_vis is not None):
        raise ValueError("key_padding_mask given for tiles made with own_apart=True, which assumes no padded key")


def tiles_fwd(q: Tensor, k: Tensor, v: Tensor, tl: Tiles, *, scale: float, sinks: Tensor | None,
              key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Forward over the tiles: (out [B, H, Nq, Dv], lse [B * H * Nq] fp32+, +inf for a row
    that sees nothing).

    One fused flash call per batch of tiles ([M, D] queries against one [block, D] key
    block each, no mask for the plain tiles), each tile row's (output, log-sum-exp)
    folded into its query row by a running log-sum-exp merge, then the sink."""
    Dv = v.shape[-1]
    _check_unpadded(tl, key_padding_mask)
    q, k, v = pad_head_dim(q, k, v)  # the flash kernel takes one head size
    work = work_dtype(q.dtype)
    kblk, vblk = _key_blocks(k, tl.nb, tl.block, work), _key_blocks(v, tl.nb, tl.block, work)
    return _attend_tiles(q, kblk, vblk, tl, Dv, scale=scale, sinks=sinks, key_padding_mask=key_padding_mask)


def _attend_tiles(q: Tensor, kblk: Tensor, vblk: Tensor, tl: Tiles, Dv: int, *, scale: float,
                  sinks: Tensor | None, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`tiles_fwd` given the key and value blocks (:func:`_key_blocks`, work dtype,
    head size D of q): (out [B, H, Nq, Dv] in q's dtype, lse [B * H * Nq])."""
    B, H, Nq, D = q.shape
    work = kblk.dtype
    fwd, _ = kernels(q.device)
    R = B * H * Nq  # row R: where the tiles' empty rows go
    qf = q.reshape(-1, D)
    O = torch.zeros(R + 1, D, dtype=work, device=q.device)
    Mx = torch.full((R + 1,), float("-inf"), dtype=work, device=q.device)
    Tot = torch.zeros(R + 1, dtype=work, device=q.device)
    if tl.own_first >= 0:  # the own blocks first: every row's first part, so nothing to merge yet
        Hkv = kblk.shape[0] // (B * tl.nb)
        mask = _own_mask(H // Hkv, tl.block, work, q.device)
        O4, M3 = O[:R].view(B, H, Nq, D), Mx[:R].view(B, H, Nq)
        for c0, c1, r in _own_chunks(tl, B, H, Nq, D):
            ko, vo = (_own_keys(x, tl, B, Hkv, c0, c1) for x in (kblk, vblk))
            o, lse = fwd(_own_queries(q[:, :, r], B, Hkv, tl.block).to(work), ko, vo, 0.0, False, attn_mask=mask,
                         scale=scale)
            O4[:, :, r] = _own_rows(o, B, Hkv, H, tl.block).view(B, H, -1, D)
            M3[:, :, r] = _own_rows(lse.unsqueeze(-1), B, Hkv, H, tl.block).view(B, H, -1)
        Tot[:R] = 1.0
    if tl.sink_vis is not None:  # one softmax over each row's sink keys (lse -inf where it sees none)
        qs, ks, vs = _sink_operands(q.to(work), kblk, vblk, tl)
        at = torch.arange(R, device=q.device).view(qs.shape[:-1])
        for sl in _sink_row_chunks(tl, R):
            o, lse = tile_forward(qs[..., sl, :], ks, vs, 0.0, False, attn_mask=tl.sink_vis[..., sl, :], scale=scale)
            _fold_pairs(O, Mx, Tot, at[..., sl].reshape(-1), o.reshape(-1, D), lse.reshape(-1))
    M = tl.qrow.shape[1]
    for sl, mask, alive in _tile_batches(tl, D, key_padding_mask, work):
        qrow, kb = tl.qrow[sl], tl.kb[sl]
        n = len(kb)
        qt = qf.index_select(0, qrow.reshape(-1)).to(work).view(n, 1, M, D)
        kt, vt = kblk.index_select(0, kb).view(n, 1, tl.block, D), vblk.index_select(0, kb).view(n, 1, tl.block, D)
        o, lse = fwd(qt, kt, vt, 0.0, False, attn_mask=mask, scale=scale)
        lse = lse.view(n, M).to(work)
        if alive is not None:
            lse = lse.masked_fill(~alive, float("-inf"))
        rows = torch.where(tl.live[sl], qrow, R).reshape(-1)
        _fold_pairs(O, Mx, Tot, rows, o.reshape(-1, D).to(work), lse.reshape(-1))
    mx, tot, O = Mx[:R], Tot[:R], O[:R, :Dv]
    sink = _sink_rows(sinks, B, Nq, work)
    if sink is not None:
        new = torch.maximum(mx, sink)
        f = torch.where(torch.isfinite(mx), torch.exp(mx - new), torch.zeros_like(mx))
        O, tot, mx = O * f[:, None], tot * f + torch.exp(sink - new), new
    lse = torch.where(tot > 0, mx + torch.log(tot), torch.full_like(mx, float("inf")))
    out = O / torch.where(tot > 0, tot, torch.ones_like(tot))[:, None]
    return out.view(B, H, Nq, Dv).to(q.dtype), lse


def tiles_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, tl: Tiles, *,
              scale: float, sinks: Tensor | None, key_padding_mask: Tensor | None,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of :func:`tiles_fwd`: (dq, dk, dv, dsinks). One fused flash backward per
    batch of tiles, given each row's merged output and log-sum-exp (so each tile's
    gradient is that of the one softmax over all of the row's keys); dQ is scattered into
    query rows and dK, dV into key blocks with ``index_add_``."""
    B, H, Nq, D0 = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    _check_unpadded(tl, key_padding_mask)
    work = work_dtype(q.dtype)
    _, bwd = kernels(q.device)
    R = B * H * Nq
    q, k, v = pad_head_dim(q, k, v)  # the flash kernel takes one head size
    D = q.shape[-1]
    qf = q.reshape(-1, D)
    kblk, vblk = _key_blocks(k, tl.nb, tl.block, work), _key_blocks(v, tl.nb, tl.block, work)
    of = _pad_last(out.reshape(-1, Dv).to(work), D)
    dof = _pad_last(dout.reshape(-1, Dv).to(work), D)
    lb = lse.to(work)
    dq = torch.zeros(R, D, dtype=work, device=q.device)
    dkb, dvb = torch.zeros_like(kblk), torch.zeros_like(vblk)
    if tl.own_first >= 0:
        mask = _own_mask(H // Hkv, tl.block, work, q.device)
        dq4, do4, o4, l4 = dq.view(B, H, Nq, D), dof.view(B, H, Nq, D), of.view(B, H, Nq, D), lb.view(B, H, Nq, 1)
        for c0, c1, r in _own_chunks(tl, B, H, Nq, D):

            def own(x: Tensor) -> Tensor:  # rows r of x [B, H, Nq, d] in the own-block layout
                return _own_queries(x[:, :, r], B, Hkv, tl.block)

            gq, gk, gv = bwd(own(do4), own(q).to(work), _own_keys(kblk, tl, B, Hkv, c0, c1),
                             _own_keys(vblk, tl, B, Hkv, c0, c1), own(o4), own(l4)[..., 0], 0.0, False,
                             attn_mask=mask, scale=scale)
            dq4[:, :, r] += _own_rows(gq, B, Hkv, H, tl.block).view(B, H, -1, D).to(work)
            for acc, g in ((dkb, gk), (dvb, gv)):
                acc.view(B, Hkv, tl.nb, -1)[:, :, tl.own_first + c0 : tl.own_first + c1] += g.to(work).view(
                    B, Hkv, c1 - c0, -1)
    if tl.sink_vis is not None:
        qs, ks, vs = _sink_operands(q.to(work), kblk, vblk, tl)
        shape, S = qs.shape, ks.shape[-2]
        do_, o_, l_, dq_ = dof.view(shape), of.view(shape), lb.view(shape[:-1]), dq.view(shape)
        for sl in _sink_row_chunks(tl, R):
            gq, gk, gv = tile_backward(do_[..., sl, :], qs[..., sl, :], ks, vs, o_[..., sl, :], l_[..., sl], 0.0,
                                       False, attn_mask=tl.sink_vis[..., sl, :], scale=scale)
            dq_[..., sl, :] += gq
            dkb.view(B, Hkv, -1, D)[:, :, :S] += gk.sum(2)
            dvb.view(B, Hkv, -1, D)[:, :, :S] += gv.sum(2)
    M = tl.qrow.shape[1]
    for sl, mask, _ in _tile_batches(tl, D, key_padding_mask, work):
        qrow, kb, live = tl.qrow[sl], tl.kb[sl], tl.live[sl]
        n, r = len(kb), qrow.reshape(-1)
        qt = qf.index_select(0, r).to(work).view(n, 1, M, D)
        gt = (dof.index_select(0, r) * live.reshape(-1, 1)).view(n, 1, M, D)  # empty rows: no gradient
        ot = of.index_select(0, r).view(n, 1, M, D)
        lt = lb.index_select(0, r).view(n, 1, M)
        kt, vt = kblk.index_select(0, kb).view(n, 1, tl.block, D), vblk.index_select(0, kb).view(n, 1, tl.block, D)
        gq, gk, gv = bwd(gt, qt, kt, vt, ot, lt, 0.0, False, attn_mask=mask, scale=scale)
        dq.index_add_(0, r, gq.reshape(-1, D).to(work))
        dkb.index_add_(0, kb, gk.reshape(n, -1).to(work))
        dvb.index_add_(0, kb, gv.reshape(n, -1).to(work))
    dsinks = None
    sink = _sink_rows(sinks, B, Nq, work)
    if sink is not None:
        delta = (dof * of).sum(-1)
        dsinks = (-(torch.exp(sink - lb) * delta)).view(B, H, Nq).sum((0, 2)).to(sinks.dtype)
    dk = dkb.view(B, Hkv, -1, D)[:, :, :Nk, :D0].to(k.dtype)
    dv = dvb.view(B, Hkv, -1, D)[:, :, :Nk, :Dv].to(v.dtype)
    return dq[:, :D0].reshape(B, H, Nq, D0).to(q.dtype), dk, dv, dsinks


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


def _kept_summaries(key_state: object, k: Tensor, kpm: Tensor | None, block: int, gate: str,
                    ) -> tuple[Tensor, ...] | None:
    """The summaries of k from a caller's :class:`KeySummaries` (None: none given)."""
    if key_state is None:
        return None
    if not isinstance(key_state, KeySummaries):
        raise TypeError(f"key_state must be a KeySummaries, got {type(key_state).__name__}")
    if (key_state.block, key_state.gate) != (block, gate):
        raise ValueError(f"key_state keeps summaries of block={key_state.block}, gate={key_state.gate!r}; "
                         f"this call has block={block}, gate={gate!r}")
    return key_state.update(k, kpm)


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
    family="select", exact=False, causal=True, cross=False, subquadratic=True,
    gqa=True, bottom_right=True, packed=True, **_LEARNED_SINKS,
    key_state=lambda params: KeySummaries(params["block"], params["gate"]), compile_recompute=True,
    paper="Lu et al. 2025, MoBA; Tang et al. 2024, Quest; Yuan et al. 2025, NSA (shared selection)",
    summary="own block + top-k gated earlier key blocks (+ sinks, window), one exact softmax",
)
def topk_blocks_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, block: int = 64, topk: int = 8, gate: str = "mean", sink_tokens: int = 0,
    window: int = 0, shared: bool = False, sinks: Tensor | None = None, key_state: KeySummaries | None = None,
) -> Tensor:
    """Top-k block selection attention (see the module docstring).

    q [B, H, Nq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv], H % Hkv == 0, Nq <= Nk (the
    queries are the last Nq positions); sinks: optional learned-sink logits [H]
    (denominator only, differentiable); key_state: the :class:`KeySummaries` a KV cache
    keeps for k (same ``block`` and ``gate``), updated here with k's new keys instead of
    summarising every key again. Returns [B, H, Nq, Dv] in q's dtype. Memory
    O(Nq * topk + chunk), time O(Nq * (topk + 1) * block * D) per head; a decode step
    (Nq <= :data:`GATHER_ROWS`) with a ``key_state`` O(Nk / block * D + (topk + 1) *
    block * D).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False, gqa=True,
                  bottom_right=True)
    _check_params(block, topk, gate, sink_tokens, window, shared)
    sink = check_sinks(sinks, d.H)
    s = default_scale(scale, d.D)
    summ = _kept_summaries(key_state, k, key_padding_mask, block, gate)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    if not grad:
        return _infer(q, k, v, key_padding_mask, sink, s, causal, block, topk, gate, sink_tokens, window, shared,
                      summ)
    sel = select_blocks(q, k, block=block, topk=topk, gate=gate, shared=shared or d.H == d.Hkv, causal=causal,
                        key_padding_mask=key_padding_mask, summaries=summ)
    tiles = make_tiles(sel, H=d.H, Nq=d.Nq, Nk=d.Nk, block=block, sink_tokens=sink_tokens, window=window,
                       causal=causal, own_apart=key_padding_mask is None, key_padding_mask=key_padding_mask)
    return TopkBlocksFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), sink, tiles, s, key_padding_mask)


#: (query row, key block) pairs one inference call handles at a time (see _rows_per_call)
CALL_PAIRS = 1 << 18


def _rows_per_call(H: int, Nk: int, block: int, topk: int, sink_tokens: int, window: int) -> int:
    """Query rows per inference run: about :data:`CALL_PAIRS` pairs over the H heads, a
    multiple of ``block``."""
    slots = min(topk, -(-Nk // block)) + 1 + sum(_extra_slots(Nk, block, sink_tokens, window))
    return max(block, CALL_PAIRS // (H * slots) // block * block)


def _infer(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, sinks: Tensor | None, scale: float, causal: bool,
           block: int, topk: int, gate: str, sink_tokens: int, window: int, shared: bool,
           summ: tuple[Tensor, ...] | None = None) -> Tensor:
    """The forward without autograd (checked inputs): [B, H, Nq, Dv]. A few rows (decode
    steps) gather their keys (:func:`_gathered`); otherwise the query rows run in runs of
    :func:`_rows_per_call` rows against one copy of the key blocks and their summaries
    (``summ``, or computed here), which bounds the selection's and the tiles' temporaries."""
    B, H, Nq, _ = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    summ = summ or block_summaries(k, block, kpm, gate)
    if Nq <= GATHER_ROWS:
        sel = select_blocks(q, k, block=block, topk=topk, gate=gate, shared=shared or H == Hkv, causal=causal,
                            key_padding_mask=kpm, summaries=summ)
        return _gathered(q, k, v, sel, kpm, sinks, scale, causal, block, sink_tokens, window)
    qs = q  # the gate reads the queries at their own head size (as the summaries have it)
    q, k, v = pad_head_dim(q, k, v)  # the flash kernel takes one head size
    work, nb = work_dtype(q.dtype), -(-Nk // block)
    kblk, vblk = _key_blocks(k, nb, block, work), _key_blocks(v, nb, block, work)
    out = torch.empty(B, H, Nq, Dv, dtype=q.dtype, device=q.device)
    rows = _rows_per_call(H, Nk, block, topk, sink_tokens, window)
    for r0 in range(0, Nq, rows):
        r1, offset = min(Nq, r0 + rows), Nk - Nq + r0
        qr = q[:, :, r0:r1].contiguous()
        sel = select_blocks(qs[:, :, r0:r1], k, block=block, topk=topk, gate=gate, shared=shared or H == Hkv,
                            causal=causal, key_padding_mask=kpm, offset=offset, summaries=summ)
        tiles = make_tiles(sel, H=H, Nq=r1 - r0, Nk=Nk, block=block, sink_tokens=sink_tokens, window=window,
                           causal=causal, offset=offset, own_apart=kpm is None, key_padding_mask=kpm)
        out[:, :, r0:r1] = _attend_tiles(qr, kblk, vblk, tiles, Dv, scale=scale, sinks=sinks,
                                         key_padding_mask=kpm)[0]
    return out


def _row_table(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """x [B, Hkv, N, d] as a table of rows [M, d], the table row of each head's position 0
    [B, Hkv], and the row distance between positions: position t of head (b, g) is row
    at[b, g] + t * step. In place (a strided view of x's storage, no copy) when every
    stride is a multiple of d, as in a KV cache; else a copy (step 1)."""
    B, Hkv, N, d = x.shape
    dev = x.device
    if x.stride(3) != 1 or any(x.stride(i) % d and x.shape[i] > 1 for i in range(3)):
        at = (torch.arange(B, device=dev)[:, None] * Hkv + torch.arange(Hkv, device=dev)) * N
        return x.reshape(-1, d), at, 1
    s0, s1, s2 = (x.stride(i) // d if x.shape[i] > 1 else 0 for i in range(3))
    rows = (B - 1) * s0 + (Hkv - 1) * s1 + (N - 1) * s2 + 1
    at = torch.arange(B, device=dev)[:, None] * s0 + torch.arange(Hkv, device=dev) * s1
    return x.as_strided((rows, d), (d, 1)), at, s2


def _causal_row_keys(sel: Tensor, *, Nq: int, Nk: int, block: int, sink_tokens: int, window: int,
                     ) -> tuple[Tensor, Tensor]:
    """The keys of causal rows (the last Nq positions) as positions tok [B, Hkv, Rg, Nq, L]
    and valid, each key once: the selected blocks ``sel`` whole (all before the row's own
    block), the run from the start of its own block, or of its window if that is
    earlier, to itself, and the sink tokens before that run; a token of a selected block
    is listed with its block only. Hidden slots point at key 0."""
    B, Hkv, Rg, _, K = sel.shape
    dev = sel.device
    pos = torch.arange(Nk - Nq, Nk, device=dev).view(Nq, 1)
    lo = pos // block * block
    if window:
        lo = torch.minimum(lo, (pos - window + 1).clamp(min=0))
    recent = pos - torch.arange(max(block, window), device=dev)  # [Nq, Lr], itself first
    sink = torch.arange(min(sink_tokens, Nk), device=dev).expand(Nq, -1)
    extra = torch.cat([recent, sink], -1)
    ok = torch.cat([recent >= lo, sink < lo], -1)
    ok = ok & ~(extra.div(block, rounding_mode="floor").unsqueeze(-1) == sel.unsqueeze(-2)).any(-1)
    whole = (sel.unsqueeze(-1) * block + torch.arange(block, device=dev)).flatten(-2)
    tok = torch.cat([whole, extra.expand(B, Hkv, Rg, Nq, -1)], -1)
    valid = torch.cat([(sel >= 0).repeat_interleave(block, -1), ok], -1)
    return torch.where(valid, tok, torch.zeros_like(tok)), valid


def _row_keys(sel: Tensor, *, Nq: int, Nk: int, block: int, sink_tokens: int, window: int, causal: bool,
              kpm: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every key each query row sees, as positions tok [B, Hkv, Rg, Nq, L] and valid (key
    padding applied): :func:`_causal_row_keys`, or :func:`block_plan`'s slots."""
    if causal:
        tok, valid = _causal_row_keys(sel, Nq=Nq, Nk=Nk, block=block, sink_tokens=sink_tokens, window=window)
    else:
        blk, valid = block_plan(sel, Nq=Nq, Nk=Nk, block=block, sink_tokens=sink_tokens, window=window,
                                causal=False, key_padding_mask=None).fn(0, Nq)
        tok = (blk.unsqueeze(-1) * block + torch.arange(block, device=sel.device)).flatten(-2).clamp(max=Nk - 1)
    if kpm is not None:
        valid = valid & kpm[torch.arange(kpm.shape[0], device=kpm.device).view(-1, 1, 1, 1, 1), tok]
    return tok, valid


def _gathered(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, kpm: Tensor | None, sinks: Tensor | None, scale: float,
              causal: bool, block: int, sink_tokens: int, window: int) -> Tensor:
    """A few query rows (decode steps), no autograd: each row's keys (:func:`_row_keys`:
    the selected blocks ``sel``, its own block, sinks, window) gathered, one softmax over
    them. [B, H, Nq, Dv]; reads O(Nq * (topk + 1) * block * D) of k and v, never all."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    Rg = sel.shape[2]
    R2 = H // (Hkv * Rg)
    tok, valid = _row_keys(sel, Nq=Nq, Nk=Nk, block=block, sink_tokens=sink_tokens, window=window, causal=causal,
                           kpm=kpm)
    L = tok.shape[-1]
    work = work_dtype(q.dtype)
    qg = q.reshape(B, Hkv, Rg, R2, Nq, D).transpose(3, 4).to(work)  # [B, Hkv, Rg, Nq, R2, D]

    def gather(x: Tensor) -> Tensor:  # the rows of x at tok: [B * Hkv * Rg * Nq * L, d]
        table, at, step = _row_table(x)
        rows = (at.view(B, Hkv, 1, 1, 1) + tok * step).reshape(-1)
        return table.index_select(0, rows).to(work)

    n = B * Hkv * Rg * Nq
    qg, kg, vg, vis = qg.reshape(n, 1, R2, D), gather(k).view(n, 1, L, D), gather(v).view(n, 1, L, -1), valid
    if vg.shape[-1] == D:  # the fused kernel (one head size); a row that sees nothing gets 0 and lse -inf
        o, lse = kernels(q.device)[0](qg, kg, vg, 0.0, False, attn_mask=additive_mask(vis, work).view(n, 1, 1, L),
                                      scale=scale)
        alive = vis.any(-1).view(n, 1, 1)
        o, lse = o.masked_fill(~alive[..., None], 0.0), lse.to(work).masked_fill(~alive, float("-inf"))
    else:
        o, lse = tile_forward(qg, kg, vg, 0.0, False, attn_mask=vis.view(n, 1, 1, L), scale=scale)
    o = o.view(B, Hkv, Rg, Nq, R2, -1).transpose(3, 4).reshape(B, H, Nq, -1)
    if sinks is not None:
        o, _ = add_sinks(o, lse.view(B, Hkv, Rg, Nq, R2).transpose(3, 4).reshape(B, H, Nq, 1), sinks)
    return o.to(q.dtype)
