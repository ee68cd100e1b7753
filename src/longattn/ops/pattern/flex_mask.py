"""FlexAttention ``BlockMask`` building: :func:`block_mask_for`,
:func:`split_block_mask_for` (the dense rows and columns taken out) and
:func:`expand_block_mask` (the dense mask, for tests).

The lists come from the visible-block records of :mod:`.flex_records` (never from
``create_block_mask``); the mask_mod is the pattern's own point predicate
(:meth:`longattn.patterns.Pattern.mask_mod`) at document-local positions, with
causal, key padding and packed documents, its tables moved to the device.
Conventions: positions 0-based; with Nq < Nk the queries are the last Nq positions.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from longattn.ops.pattern.flex_records import BIG, Grid, documents, visible_blocks
from longattn.patterns import Pattern, PointContext, point_clip, point_int

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - older torch
    BlockMask = None  # type: ignore[assignment]

__all__ = ["HEAVY_FACTOR", "HEAVY_MIN_BLOCKS", "SplitBlockMask", "block_mask_for", "expand_block_mask",
           "split_block_mask_for"]


# ----------------------------------------------------------------------------------------
# The BlockMask
# ----------------------------------------------------------------------------------------


def _lists(B: int, H: int, rows: int, key: tuple[Tensor, Tensor, Tensor], col: Tensor, width: int | None
           ) -> tuple[Tensor, Tensor]:
    """Group records by (b, h, row) -> counts [B, H, rows] and sorted column lists
    [B, H, rows, W] (W = the longest list, or ``width``)."""
    b, h, r = key
    flat = (b * H + h) * rows + r
    order = torch.argsort(flat * (BIG >> 31) + col, stable=True) if flat.numel() else flat
    flat, col = flat[order], col[order]
    num = torch.bincount(flat, minlength=B * H * rows)
    start = torch.cumsum(num, 0) - num
    rank = torch.arange(flat.numel()) - start[flat]
    W = int(num.max()) if num.numel() and flat.numel() else 0
    W = max(W, 1) if width is None else max(width, W, 1)
    idx = torch.zeros(B * H * rows, W, dtype=torch.int32)
    idx[flat, rank] = col.to(torch.int32)
    return num.view(B, H, rows).to(torch.int32), idx.view(B, H, rows, W)


def block_mask_for(
    pattern: Pattern,
    n: int,
    heads: int,
    *,
    causal: bool = False,
    block: int = 128,
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    q_len: int | None = None,
    device: torch.device | str = "cpu",
    compact: bool | None = None,
    with_q_blocks: bool = True,
    pad_to_blocks: bool = False,
):
    """A FlexAttention ``BlockMask`` for ``pattern`` over ``n`` keys and ``heads`` heads,
    built from the pattern's components (never from N x N predicate evaluations).

    Every visible block is in the lists, so a row block that sees every key block
    (a global query block) makes the lists [QB, KB] wide: see
    :func:`split_block_mask_for` for the form that keeps them narrow.

    Args:
        pattern: any :class:`longattn.patterns.Pattern` (per-head lists included).
        n: number of keys (= positions the pattern is laid over).
        heads: query heads (the mask has H = heads when the pattern differs per head,
            else H = 1, broadcast).
        causal: intersect with j <= i (positions).
        block: Flex block size (query and key).
        key_padding_mask: bool [B, n], True = real key; padded keys are never visible.
        segment_ids: [B, n] integer ids, runs of equal ids are documents; each is
            attended as if run alone (positions restart at its first token).
        q_len: number of queries Nq <= n (default n); query row r is position
            n - q_len + r (bottom-right).
        device: where the mask tensors go.
        compact: kv/q index lists only as wide as the longest list (O(visible
            blocks)); False pads them to the number of blocks, which the CPU Flex
            kernel requires. Default: compact except on the CPU.
        with_q_blocks: also build the transposed (per key block) lists Flex needs for
            the backward pass (built sparsely here, not by Flex's dense transpose).
        pad_to_blocks: lay the mask over q and k zero-padded at the end to whole
            blocks: seq_lengths (QB * block, KB * block), padded keys never visible
            (the last key block, if cut, is partial), padded query rows to be sliced
            off. The visibility among real positions is that of (q_len, n). This is
            how :func:`flex_pattern_attention` runs the CPU's compiled Flex, which
            returned wrong rows or NaN at some lengths off the block grid (issue 29).

    Returns:
        ``BlockMask`` with seq_lengths (q_len, n) (see ``pad_to_blocks``), BLOCK_SIZE (block, block), the
        partial blocks in ``kv_num_blocks/kv_indices``, the full ones in
        ``full_kv_num_blocks/full_kv_indices`` and the pattern's predicate (with
        causal, padding and documents) as ``mask_mod``. Cost: O(visible blocks +
        N) time, and the lists, O(B H QB W) with W the longest list.
    """
    return _build(pattern, n, heads, None, causal=causal, block=block, key_padding_mask=key_padding_mask,
                  segment_ids=segment_ids, q_len=q_len, device=device, compact=compact,
                  with_q_blocks=with_q_blocks, pad_to_blocks=pad_to_blocks).block_mask


HEAVY_FACTOR = 4.0
HEAVY_MIN_BLOCKS = 16


@dataclass
class SplitBlockMask:
    """A BlockMask without its few dense ("heavy") query and key blocks.

    ``block_mask`` lists only the light query blocks x light key blocks (and its
    mask_mod says so too, for Flex's eager path, which reads the mask_mod alone); the
    pairs of a heavy query block (with any key) and of any query with a heavy key
    block are left to :func:`flex_pattern_attention`'s side computation, which
    evaluates ``mask_mod`` (the pattern's whole predicate, with causal, padding and
    documents) on those pairs only. ``heavy_q_blocks`` [Rq] and ``heavy_k_blocks`` [Rk] are
    block numbers (int64, CPU); blocks are ``block`` rows/keys, the last one cut at
    ``nq``/``n``. ``light_blocks``: how many blocks the lists hold (0: Flex has
    nothing to do).
    """

    block_mask: object
    mask_mod: Callable
    heavy_q_blocks: Tensor
    heavy_k_blocks: Tensor
    block: int
    n: int
    nq: int
    light_blocks: int

    def heavy_rows(self, device: torch.device | str = "cpu") -> Tensor:
        """Query rows (0-based rows of q, [R] int64) of the heavy query blocks."""
        return _block_positions(self.heavy_q_blocks, self.block, self.nq).to(device)

    def heavy_keys(self, device: torch.device | str = "cpu") -> Tensor:
        """Key positions ([C] int64) of the heavy key blocks."""
        return _block_positions(self.heavy_k_blocks, self.block, self.n).to(device)


def _block_positions(blocks: Tensor, block: int, limit: int) -> Tensor:
    """The positions [len(blocks) * block, cut at limit] of the given blocks, sorted."""
    pos = (blocks.sort().values[:, None] * block + torch.arange(block)).flatten()
    return pos[pos < limit]


def split_block_mask_for(
    pattern: Pattern,
    n: int,
    heads: int,
    *,
    heavy_factor: float = HEAVY_FACTOR,
    heavy_min_blocks: int = HEAVY_MIN_BLOCKS,
    **options: Any,
) -> SplitBlockMask:
    """:func:`block_mask_for` with the dense rows and columns taken out of the lists.

    A query block is heavy when its list (the most key blocks it touches in any batch
    row and head) is longer than max(heavy_factor x the median list, heavy_min_blocks);
    a key block is heavy when as many query blocks touch it. Nothing depends on the
    pattern's name: BigBird's and Longformer's global rows and columns, a
    ``global`` pattern's, a per-head global head's are found by their counts. The
    lists then hold the rest: W is O(the typical row), not KB.

    Args:
        pattern, n, heads: as :func:`block_mask_for`.
        heavy_factor, heavy_min_blocks: the thresholds above.
        **options: :func:`block_mask_for`'s keywords (causal, block,
            key_padding_mask, segment_ids, q_len, device, compact, with_q_blocks,
            pad_to_blocks), same defaults; another name raises TypeError.
            ``pad_to_blocks`` pads ``block_mask`` only: ``mask_mod`` and the heavy
            rows and keys stay on the real lengths.

    Returns:
        :class:`SplitBlockMask`. Cost: O(visible blocks + N) time; lists
        O(B H QB W_light) int32 (at N = 2^20, BigBird block 64: a few MB where the
        whole mask needs 512 MB).
    """
    if not heavy_factor > 0 or isinstance(heavy_min_blocks, bool) or not isinstance(heavy_min_blocks, int):
        raise ValueError(f"heavy_factor must be > 0 and heavy_min_blocks an int, got {heavy_factor!r}, "
                         f"{heavy_min_blocks!r}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"split_block_mask_for got unknown options {unknown}: it takes heavy_factor, "
                        f"heavy_min_blocks and block_mask_for's keywords {sorted(_OPTIONS)}")
    return _build(pattern, n, heads, (heavy_factor, heavy_min_blocks), **{**_OPTIONS, **options})


_OPTIONS: dict[str, Any] = {name: p.default for name, p in inspect.signature(block_mask_for).parameters.items()
                            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _build(pattern: Pattern, n: int, heads: int, heavy: tuple[float, int] | None, *, causal: bool, block: int,
           key_padding_mask: Tensor | None, segment_ids: Tensor | None, q_len: int | None,
           device: torch.device | str, compact: bool | None, with_q_blocks: bool, pad_to_blocks: bool
           ) -> SplitBlockMask:
    """The (split) BlockMask of :func:`block_mask_for` / :func:`split_block_mask_for`:
    validate, list the visible blocks, take the heavy ones out (``heavy`` = (factor,
    min blocks); None: none), build the mask_mod and assemble the lists."""
    g, B, docs = _check_build(pattern, n, heads, block, q_len, key_padding_mask, segment_ids)
    recs, H = visible_blocks(pattern, g, heads, causal, key_padding_mask, segment_ids, docs, B)
    none = torch.zeros(0, dtype=torch.long)
    hq, hk = _heavy_blocks(recs, g, B, H, *heavy) if heavy is not None else (none, none)
    if hq.numel() or hk.numel():
        keep = ~(_block_flags(hq, g.QB)[recs[2]] | _block_flags(hk, g.KB)[recs[3]])
        recs = tuple(x[keep] for x in recs)
    dev = torch.device(device)
    mask_mod = _mask_mod(pattern, heads, causal, g, key_padding_mask, segment_ids, docs, dev, pad_to_blocks)
    light = _without_blocks(mask_mod, g, hq, hk, dev) if hq.numel() or hk.numel() else mask_mod
    bm = _assemble(g, B, H, recs, light, device, compact, with_q_blocks, pad_to_blocks)
    return SplitBlockMask(bm, mask_mod, hq, hk, block, n, g.nq, int(recs[0].numel()))


def _block_flags(blocks: Tensor, count: int) -> Tensor:
    """[count] bool, True at the given block numbers."""
    flags = torch.zeros(count, dtype=torch.bool)
    flags[blocks] = True
    return flags


def _without_blocks(mask_mod: Callable, g: Grid, hq: Tensor, hk: Tensor, device: torch.device) -> Callable:
    """mask_mod AND (query block not in hq) AND (key block not in hk): two table
    lookups, evaluated by Flex in partial blocks only."""
    qtab, ktab = _block_flags(hq, g.QB).to(device), _block_flags(hk, g.KB).to(device)
    bt, qtop, ktop = point_int(g.b).to(device), point_int(g.QB - 1).to(device), point_int(g.KB - 1).to(device)

    def light_mask_mod(b, h, q_idx, kv_idx):
        m = mask_mod(b, h, q_idx, kv_idx)
        return m & ~qtab[point_clip(q_idx // bt, qtop)] & ~ktab[point_clip(kv_idx // bt, ktop)]

    light_mask_mod.longattn_kind = ("light", mask_mod.longattn_kind)  # type: ignore[attr-defined]
    return light_mask_mod



def _heavy_blocks(recs: tuple[Tensor, ...], g: Grid, B: int, H: int, factor: float, min_blocks: int
                  ) -> tuple[Tensor, Tensor]:
    """Heavy query blocks [Rq] and key blocks [Rk] (int64, sorted) from the
    deduplicated records (b, h, qb, kb, full): a block whose count (list length, or
    query blocks touching it; the most over b and h) exceeds max(factor x the median
    nonzero count, min_blocks). O(records + B H (QB + KB))."""
    bi, hi, qb, kb = recs[:4]
    out = []
    for idx, size in ((qb, g.QB), (kb, g.KB)):
        cnt = torch.bincount((bi * H + hi) * size + idx, minlength=B * H * size).view(B * H, size).amax(0)
        nz = cnt[cnt > 0]
        if nz.numel() == 0:
            out.append(torch.zeros(0, dtype=torch.long))
            continue
        lim = max(factor * float(nz.median()), float(min_blocks))
        out.append(torch.nonzero(cnt > lim).flatten())
    return out[0], out[1]


def _check_build(pattern: Pattern, n: int, heads: int, block: int, q_len: int | None,
                 key_padding_mask: Tensor | None, segment_ids: Tensor | None
                 ) -> tuple[Grid, int, list[list[tuple[int, int]]]]:
    """Validate :func:`block_mask_for`'s arguments; (grid, batch B, documents per row)."""
    if BlockMask is None:  # pragma: no cover
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn.patterns.Pattern, got {type(pattern).__name__}")
    for name, val, lo in (("n", n, 1), ("heads", heads, 1), ("block", block, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    nq = n if q_len is None else q_len
    if isinstance(nq, bool) or not isinstance(nq, int) or not 1 <= nq <= n:
        raise ValueError(f"q_len must be an int with 1 <= q_len <= n={n}, got {q_len!r}")
    B = 1
    for name, t in (("key_padding_mask", key_padding_mask), ("segment_ids", segment_ids)):
        if t is not None:
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != n:
                raise ValueError(f"{name} must be a [B, {n}] tensor, got {getattr(t, 'shape', t)!r}")
            if B != 1 and t.shape[0] != B:
                raise ValueError(f"key_padding_mask and segment_ids disagree in batch: {B} vs {t.shape[0]}")
            B = t.shape[0]
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")
    if segment_ids is not None and (segment_ids.is_floating_point() or segment_ids.dtype == torch.bool):
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    return Grid(n, nq, block), B, documents(segment_ids, B, n)



def _assemble(g: Grid, B: int, H: int, recs: tuple[Tensor, ...], mask_mod: Callable,
              device: torch.device | str, compact: bool | None, with_q_blocks: bool, padded: bool = False):
    """The BlockMask of the records (b, h, qb, kb, full): partial and full kv lists
    [B, H, QB, W] (and the transposed q lists [B, H, KB, W'] when ``with_q_blocks``),
    moved to ``device``. O(records log records) + the lists. ``padded``: laid over q
    and k padded to whole blocks (see :func:`_pad_to_blocks`)."""
    device = torch.device(device)
    if compact is None:
        compact = device.type != "cpu"
    bi, hi, qb, kb, full = recs
    seq_lengths = (g.nq, g.n)
    if padded:
        seq_lengths = (g.QB * g.b, g.KB * g.b)
        mask_mod = _pad_to_blocks(mask_mod, g, device)
        if g.n % g.b:  # the last key block holds padded keys: never full (Flex skips mask_mod there)
            full = full & (kb != g.KB - 1)
    part = ~full
    kv_w = None if compact else g.KB
    q_w = None if compact else g.QB
    kv_num, kv_idx = _lists(B, H, g.QB, (bi[part], hi[part], qb[part]), kb[part], kv_w)
    fkv_num, fkv_idx = _lists(B, H, g.QB, (bi[full], hi[full], qb[full]), kb[full], kv_w)
    to = lambda x: x.to(device)  # noqa: E731
    bm = BlockMask.from_kv_blocks(
        to(kv_num), to(kv_idx), to(fkv_num), to(fkv_idx), BLOCK_SIZE=(g.b, g.b), mask_mod=mask_mod,
        seq_lengths=seq_lengths, compute_q_blocks=False,
    )
    if with_q_blocks:  # the transposed lists, from the same records (Flex's own transpose is dense)
        q_num, q_idx = _lists(B, H, g.KB, (bi[part], hi[part], kb[part]), qb[part], q_w)
        fq_num, fq_idx = _lists(B, H, g.KB, (bi[full], hi[full], kb[full]), qb[full], q_w)
        bm.q_num_blocks, bm.q_indices = to(q_num), to(q_idx)
        bm.full_q_num_blocks, bm.full_q_indices = to(fq_num), to(fq_idx)
    return bm


def _pad_to_blocks(mask_mod: Callable, g: Grid, device: torch.device) -> Callable:
    """``mask_mod`` for q and k padded to whole blocks (QB * block rows, KB * block
    keys): padded keys (kv_idx >= n) are never visible. (``mask_mod`` clips its own
    table lookups, as Flex evaluates it past the lengths in a cut block; padded query
    rows are sliced off by :func:`_light`.)"""
    n = point_int(g.n).to(device)

    def padded_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (kv_idx < n)

    padded_mask_mod.longattn_kind = ("padded", mask_mod.longattn_kind)  # type: ignore[attr-defined]
    return padded_mask_mod


def _mask_mod(pattern: Pattern, heads: int, causal: bool, g: Grid, kpm: Tensor | None,
              seg: Tensor | None, docs: list[list[tuple[int, int]]], device: torch.device, padded: bool = False):
    """mask_mod(b, h, q_idx, kv_idx): the predicate at (document-local) positions, with
    causal, padding and documents. ``padded``: its [B, N] tables are KB * block wide
    (lookups are clipped to n - 1 anyway), so that every length with as many blocks
    shares one static-shape compiled kernel."""
    n, q0 = g.n, g.q0
    if padded and kpm is not None:
        kpm = torch.nn.functional.pad(kpm, (0, g.KB * g.b - n), value=False)
    if seg is None:
        lengths, lidx, start = [n], None, None
    else:
        lengths = sorted({L for row in docs for _, L in row})
        where = {L: k for k, L in enumerate(lengths)}
        B = len(docs)
        width = g.KB * g.b if padded else n
        start = torch.zeros(B, width, dtype=torch.long)
        lidx = torch.zeros(B, width, dtype=torch.long)
        for bi, row in enumerate(docs):
            for s, L in row:
                start[bi, s : s + L] = s
                lidx[bi, s : s + L] = where[L]
    fn, kind = pattern.mask_mod(PointContext(heads, causal, n, tuple(lengths), lidx))
    top, q0t = point_int(n - 1).to(device), point_int(q0).to(device)
    kpm_d = kpm.to(device) if kpm is not None else None
    start_d = start.to(device) if start is not None else None
    # move the closure's tensors to the device: rebuild with device tables
    fn = _to_device(fn, device)

    if start_d is None:
        def mask_mod(b, h, q_idx, kv_idx):
            i = q_idx + q0t
            j = kv_idx
            m = fn(i, j, h, b, i)
            if causal:
                m = m & (j <= i)
            if kpm_d is not None:
                m = m & kpm_d[b, point_clip(j, top)]
            return m
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            gi = point_clip(q_idx + q0t, top)
            gj = point_clip(kv_idx, top)
            si = start_d[b, gi]
            m = (start_d[b, gj] == si) & fn(gi - si, gj - si, h, b, gi)
            if causal:
                m = m & (gj <= gi)
            if kpm_d is not None:
                m = m & kpm_d[b, gj]
            return m

    mask_mod.longattn_kind = (kind, causal, kpm is not None, seg is not None, q0 > 0)  # type: ignore[attr-defined]
    return mask_mod


def _to_device(fn, device: torch.device):
    """A copy of ``fn`` (and of the point functions it closes over) whose captured
    tensors live on ``device``."""
    if device.type == "cpu" or not isinstance(fn, types.FunctionType):
        return fn
    seen: dict[int, object] = {}

    def move(obj):
        if isinstance(obj, Tensor):
            return obj.to(device)
        if isinstance(obj, types.FunctionType):
            if id(obj) in seen:
                return seen[id(obj)]
            cells = None
            if obj.__closure__:
                cells = tuple(types.CellType(move(c.cell_contents)) if _has(c) else c for c in obj.__closure__)
            new = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, cells)
            seen[id(obj)] = new
            return new
        if isinstance(obj, list):
            return [move(x) for x in obj]
        if isinstance(obj, tuple):
            return tuple(move(x) for x in obj)
        return obj

    return move(fn)


def _has(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def expand_block_mask(bm, batch: int = 1, heads: int = 1) -> Tensor:
    """The dense bool mask [batch, heads, Nq, Nk] a BlockMask stands for: full blocks
    all visible, partial blocks AND-ed with its mask_mod, the rest invisible. For
    tests at small sizes (it is Nq x Nk by construction)."""
    nq, nk = bm.seq_lengths
    bq, bk = bm.BLOCK_SIZE
    QB, KB = -(-nq // bq), -(-nk // bk)
    part = torch.zeros(batch, heads, QB, KB, dtype=torch.bool)
    fullb = torch.zeros_like(part)
    for dst, num, idx in ((part, bm.kv_num_blocks, bm.kv_indices), (fullb, bm.full_kv_num_blocks, bm.full_kv_indices)):
        if num is None:
            continue
        num, idx = num.cpu().long(), idx.cpu().long()
        for b in range(batch):
            for h in range(heads):
                nb_, ib = num[min(b, num.shape[0] - 1), min(h, num.shape[1] - 1)], idx[min(b, idx.shape[0] - 1), min(h, idx.shape[1] - 1)]
                for t in range(QB):
                    cols = ib[t, : int(nb_[t])]
                    assert not bool(dst[b, h, t, cols].any()), "a key block listed twice"
                    dst[b, h, t, cols] = True
    assert not bool((part & fullb).any()), "a block both full and partial"
    i = torch.arange(QB * bq).clamp(max=nq - 1)[None, None, :, None]
    j = torch.arange(KB * bk).clamp(max=nk - 1)[None, None, None, :]
    bb = torch.arange(batch)[:, None, None, None]
    hh = torch.arange(heads)[None, :, None, None]
    dev = bm.kv_indices.device
    mm = bm.mask_mod(bb.to(dev), hh.to(dev), i.to(dev), j.to(dev)).cpu().expand(batch, heads, QB * bq, KB * bk)
    pb = part.repeat_interleave(bq, 2).repeat_interleave(bk, 3)
    fb = fullb.repeat_interleave(bq, 2).repeat_interleave(bk, 3)
    out = fb | (pb & mm)
    return out[:, :, :nq, :nk]
