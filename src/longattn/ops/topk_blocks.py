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
2. Attention, key-block-major (MoBA's layout), on the tile engine of
   :mod:`longattn.ops.block_tiles` (shared with ``nsa``'s selected branch): the (query
   row, key block) pairs sorted by key block and cut into tiles for PyTorch's fused CPU
   flash kernel, most without a mask; the own blocks and the sink keys apart where
   causality, alignment and no padding allow; the tile rows merged by log-sum-exp.
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

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.ops._checks import check_bool, check_int, check_qkv, default_scale
from longattn.ops._softmax import add_sinks, additive_mask, kernels, pad_head_dim, tile_forward, work_dtype
from longattn.ops.block_tiles import (
    TopkBlocksFunction, _attend_tiles, _extra_slots, _key_blocks, block_slots, make_tiles,
)
from longattn.ops.given_keys import SlotPlan, check_sinks, visible_slots
from longattn.registry import Mechanism, Param, register

#: gate scores one chunk of queries may hold (elements)
GATE_ELEMENTS = 1 << 22
#: at most this many queries per gate chunk (under causality, smaller chunks skip more later blocks)
GATE_ROWS = 1024
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
