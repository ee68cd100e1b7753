"""The key-block-major tile engine of block selection: exact attention of query rows over
whole key blocks, for ``topk_blocks`` and ``nsa``'s selected branch.

Every (query row, key block) pair a selection gives (:func:`block_slots`: the selected
blocks, the own block, the sink and window blocks, each key once) is sorted by (needs a
mask, key block), and each key block's rows are cut into tiles (:func:`make_tiles`). A
batch of tiles is one call of PyTorch's fused CPU flash kernel ([M, D] queries against
one [block, D] key block each; no mask for the *plain* tiles, whose rows see the whole
block). Under causality, with whole query blocks aligned to the key blocks and no key
padding, the own blocks run apart as causal flash calls (a few query blocks per call),
and without a window the sink keys run as one dense part (in runs of rows). Each tile
row's (output, log-sum-exp) is folded into its query row by a running log-sum-exp merge
(:func:`tiles_fwd`); the backward (:func:`tiles_bwd`) runs the flash backward per batch,
given each row's merged output and log-sum-exp. :data:`TopkBlocksFunction` is the
autograd wrapper. Time O(pairs * block * D), memory one bounded batch of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.ops._softmax import additive_mask, kernels, pad_head_dim, tile_backward, tile_forward, work_dtype
from longattn.ops.given_keys import lse_autograd_function

#: scores (and gathered rows) one chunk of tiles may hold (elements)
TILE_ELEMENTS = 1 << 22


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
