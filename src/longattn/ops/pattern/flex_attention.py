"""Attention through compiled FlexAttention: :func:`flex_pattern_attention`.

One compiled wrapper per pattern kind (cached, with dynamic shapes on CUDA; per shape
with static shapes on the CPU, on q, k, v zero-padded to whole blocks: issue 29), the
BlockMask cache, and the heavy-row split: the few dense query and key blocks of a
:class:`~longattn.ops.pattern.flex_mask.SplitBlockMask` attended outside Flex in
bounded chunks and merged by log-sum-exp (:func:`longattn.ops._softmax.merge_by_lse`).
On CUDA forward and backward; on the CPU forward only (fp32, bf16, fp16).
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

from longattn.ops._softmax import merge_by_lse
from longattn.ops.pattern.flex_mask import HEAVY_FACTOR, HEAVY_MIN_BLOCKS, SplitBlockMask, split_block_mask_for
from longattn.ops.pattern.flex_records import BIG
from longattn.patterns import Pattern

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - older torch
    flex_attention = None  # type: ignore[assignment]
try:  # torch >= 2.9: return_aux (return_lse is deprecated)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover
    AuxRequest = None  # type: ignore[assignment]

__all__ = ["flex_available", "flex_pattern_attention"]


def flex_available() -> bool:
    """True when this torch has FlexAttention (torch >= 2.5)."""
    return flex_attention is not None


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------

_COMPILED: dict[object, Callable] = {}
_MASKS: dict[tuple, tuple[Pattern, object]] = {}
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the CPU Flex template takes
_SIDE_ELEMENTS = 1 << 23  # scores per chunk of the heavy rows/columns (fp32: 32 MiB)
_SIDE_MIN_STEP = 128  # ... but at least this many keys (rows) per chunk


def _flex_call(q, k, v, block_mask, scale, enable_gqa, lse=False):
    if not lse:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if AuxRequest is not None:  # torch >= 2.9
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                                  return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)


def _compiled(kind: object, dynamic: bool = True) -> Callable:
    """torch.compile(flex_attention) (with dynamic shapes unless ``dynamic=False``), one
    wrapper per pattern kind (a code object of its own, so each kind has its own compile
    cache and recompile budget)."""
    fn = _COMPILED.get(kind)
    if fn is None:
        code = _flex_call.__code__.replace(co_name=f"_flex_call_{len(_COMPILED)}")
        wrapper = types.FunctionType(code, _flex_call.__globals__, code.co_name, _flex_call.__defaults__)
        fn = torch.compile(wrapper, dynamic=dynamic)
        _COMPILED[kind] = fn
    return fn


def _light(q: Tensor, k: Tensor, v: Tensor, bm, scale: float, enable_gqa: bool, lse: bool):
    """Compiled Flex over the BlockMask's lists: out [B, H, Nq, Dv] (q's dtype), and
    with ``lse`` also the log-sum-exp [B, H, Nq] (fp32, natural log, -inf for a row
    whose lists show it no key). The CPU has neither a backward nor the lse."""
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise NotImplementedError("FlexAttention has no CPU backward: run under torch.no_grad() or on CUDA")
        if lse:
            raise NotImplementedError("compiled Flex on the CPU returns no log-sum-exp, which split=True (heavy "
                                      "rows and columns outside Flex) needs: use split=False on the CPU")
        if q.dtype not in _CPU_DTYPES:
            raise TypeError(f"compiled Flex on the CPU takes {', '.join(map(str, _CPU_DTYPES))} inputs, got "
                            f"q of {q.dtype}: use backend='engine' (or cast)")
    kind = getattr(bm.mask_mod, "longattn_kind", None)
    if q.device.type != "cpu":
        return _compiled((kind, q.dtype, enable_gqa, lse))(q, k, v, bm, scale, enable_gqa, lse)
    nq, (pq, pk) = q.shape[2], bm.seq_lengths
    # a mask built with pad_to_blocks: q and k zero-padded to whole blocks, the padded
    # rows sliced off (the padded keys are hidden by its mask_mod)
    q, k, v = (x.detach() if x.shape[2] == n else _pad_rows(x.detach(), n) for x, n in ((q, pq), (k, pk), (v, pk)))
    # torch 2.13's CPU Flex template fails to build (C++ error "cur_kvSplitSize4 was not
    # declared") when a dynamic-shape graph is recompiled for new shapes, or when a
    # mask table's length is a size symbol other than the key length (the padded case):
    # on the CPU every shape gets a wrapper of its own, compiled with static shapes.
    kind = (kind, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype)
    out = _compiled(kind, dynamic=False)(q, k, v, bm, scale, enable_gqa, lse)
    return out if out.shape[2] == nq else out[:, :, :nq]


def _pad_rows(x: Tensor, n: int) -> Tensor:
    """[B, H, N, D] -> [B, H, n, D], zero rows appended (n >= N)."""
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


# ----------------------------------------------------------------------------------------
# Heavy rows and columns, outside Flex
# ----------------------------------------------------------------------------------------


def _chunk_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of q [B, H, R, D] over k [B, Hkv, C, D], v [B, Hkv, C, Dv]
    (H % Hkv == 0, never repeated), mask broadcastable to [B, H, R, C]: out
    [B, H, R, Dv] and lse [B, H, R]; a row with no visible key gives zeros and
    lse -inf, and gradients without NaN. Memory O(B H R C)."""
    B, H, R, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    gq = H // Hkv
    s = torch.matmul(q.reshape(B, Hkv, gq * R, D), k.transpose(-1, -2)).view(B, H, R, C) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)  # a shift: out and lse do not depend on it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1)
    out = torch.matmul(p.view(B, Hkv, gq * R, C), v).view(B, H, R, v.shape[-1])
    seen = den > 0
    den1 = torch.where(seen, den, torch.ones_like(den))
    lse = torch.where(seen, m.squeeze(-1) + torch.log(den1), torch.full_like(den, float("-inf")))
    return out / den1[..., None], lse


def _merge(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Softmax attentions over disjoint key sets as one (:func:`longattn.ops._softmax.merge_by_lse`)."""
    if len(outs) == 1:
        return outs[0], lses[0]
    return merge_by_lse(torch.stack(outs), torch.stack(lses), 0)


def _masked_chunk(q: Tensor, k: Tensor, v: Tensor, *, mask_mod: Callable, rows: Tensor, keys: Tensor,
                  scale: float, work: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_chunk_attention` of q's ``rows`` over the ``keys`` (k, v already cut to
    them), with the mask from ``mask_mod`` on these pairs only, in ``work`` precision."""
    B, H = q.shape[:2]
    dev = q.device
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    mask = mask_mod(b, h, rows[None, None, :, None], keys[None, None, None, :])
    return _chunk_attention(q.to(work), k.to(work), v.to(work), mask, scale)


def _run(fn: Callable, *xs: Tensor):
    """fn(*xs), recomputed in the backward (checkpointed) when a gradient may follow,
    so that no chunk's scores are kept."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return torch.utils.checkpoint.checkpoint(fn, *xs, use_reentrant=False)
    return fn(*xs)


def _side_part(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, keys: Tensor, mask_mod: Callable, scale: float,
               work: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_masked_chunk` of one chunk (q cut to ``rows``, k and v to ``keys``),
    recomputed in the backward: (out, lse)."""
    fn = functools.partial(_masked_chunk, mask_mod=mask_mod, rows=rows, keys=keys, scale=scale, work=work)
    return _run(fn, q, k, v)


def _side_spans(n: int, B: int, H: int, width: int) -> list[tuple[int, int]]:
    """[0, n) cut into spans of ~_SIDE_ELEMENTS / (B H width) (at least _SIDE_MIN_STEP)."""
    step = max(_SIDE_MIN_STEP, _SIDE_ELEMENTS // (B * H * width))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _heavy_rows_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, mask_mod: Callable, scale: float,
                          work: torch.dtype) -> tuple[Tensor, Tensor]:
    """The query ``rows`` [R] (rows of q) over every key, in key chunks of
    ~_SIDE_ELEMENTS scores merged by their lse: out [B, H, R, Dv], lse [B, H, R].
    Time O(B H R Nk D); memory O(B H R (chunk + Nk / chunk x Dv))."""
    B, H = q.shape[:2]
    qr = q.index_select(2, rows)
    parts = [_side_part(qr, k[:, :, a:b], v[:, :, a:b], rows, torch.arange(a, b, device=q.device), mask_mod, scale,
                        work) for a, b in _side_spans(k.shape[2], B, H, rows.numel())]
    return _merge([o for o, _ in parts], [lse for _, lse in parts])


def _heavy_keys_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, mask_mod: Callable, scale: float,
                          work: torch.dtype) -> tuple[Tensor, Tensor]:
    """Every query over the ``keys`` [C] only, in query chunks of ~_SIDE_ELEMENTS
    scores: out [B, H, Nq, Dv], lse [B, H, Nq] (-inf where none is visible).
    Time O(B H Nq C D); memory O(B H (chunk + Nq Dv))."""
    B, H, Nq = q.shape[:3]
    kc, vc = k.index_select(2, keys), v.index_select(2, keys)
    parts = [_side_part(q[:, :, a:b], kc, vc, torch.arange(a, b, device=q.device), keys, mask_mod, scale, work)
             for a, b in _side_spans(Nq, B, H, keys.numel())]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _split_attention(q: Tensor, k: Tensor, v: Tensor, sbm: SplitBlockMask, scale: float, enable_gqa: bool,
                     light: Callable | None = None) -> Tensor:
    """Attention through a :class:`SplitBlockMask`: Flex over the light lists
    (``light``, default :func:`_light`), merged by lse with every query over the heavy
    key blocks; the heavy query blocks' rows then replaced by those rows over every
    key. Each pair is counted once: Flex sees light x light, the column part
    light-or-heavy rows x heavy keys, the row part overwrites heavy rows.
    Returns [B, H, Nq, Dv] in q's dtype; differentiable where ``light`` is."""
    light = _light if light is None else light
    rows, keys = sbm.heavy_rows(q.device), sbm.heavy_keys(q.device)
    if not rows.numel() and not keys.numel():
        return light(q, k, v, sbm.block_mask, scale, enable_gqa, False)
    work = torch.promote_types(q.dtype, torch.float32)
    B, H, Nq = q.shape[:3]
    if sbm.light_blocks:
        out, lse = light(q, k, v, sbm.block_mask, scale, enable_gqa, True)
        out, lse = out.to(work), lse.to(work)
    else:
        out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=work)
        lse = q.new_full((B, H, Nq), float("-inf"), dtype=work)
    if keys.numel():
        out_k, lse_k = _heavy_keys_attention(q, k, v, keys, sbm.mask_mod, scale, work)
        out, lse = _merge([out, out_k], [lse, lse_k])
    if rows.numel():
        out_r, _ = _heavy_rows_attention(q, k, v, rows, sbm.mask_mod, scale, work)
        out = out.index_copy(2, rows, out_r)
    return out.to(q.dtype)


def flex_pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    enable_gqa: bool = False,
    block: int = 128,
    compact: bool | None = None,
    split: bool | None = None,
    heavy_factor: float = HEAVY_FACTOR,
    heavy_min_blocks: int = HEAVY_MIN_BLOCKS,
) -> Tensor:
    """Exact attention restricted to ``pattern`` through compiled FlexAttention.

    With ``split`` (the default on CUDA), the few heavy query and key blocks (a
    global row or column: see :func:`split_block_mask_for`) are not in the BlockMask:
    Flex runs the rest and returns its log-sum-exp, every query is attended over the
    heavy key blocks in chunks (the pattern's predicate evaluated on those Nq x C
    pairs only) and merged with it by the lse, and the heavy rows are attended over
    every key in chunks (R x Nk pairs) and overwrite Flex's rows. The lists stay
    O(typical row) wide; the side work is O(B H (R Nk + Nq C) D) time and
    O(B H (Nq + R) Dv) memory plus a bounded chunk (recomputed in the backward).

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. Hkv < H needs
            ``enable_gqa=True`` and H % Hkv == 0 (query head h reads kv head
            h // (H // Hkv)).
        pattern, causal, key_padding_mask, segment_ids: as :func:`block_mask_for`;
            with Nq < Nk the queries are the last Nq positions.
        scale: default 1/sqrt(D).
        block, compact: as :func:`block_mask_for`.
        split: take heavy blocks out of Flex (default: on CUDA; the CPU's compiled
            Flex returns no lse, and its lists are padded to KB wide anyway).
        heavy_factor, heavy_min_blocks: as :func:`split_block_mask_for`.

    Returns:
        [B, H, Nq, Dv]; queries with no visible key give zeros. On CUDA
        differentiable; on the CPU forward only (compiled Flex has no CPU backward),
        fp32/bf16/fp16 only (TypeError otherwise), computed on q, k, v zero-padded to
        whole blocks (the padded keys masked, the padded rows sliced off).
    """
    if flex_attention is None:  # pragma: no cover
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    _check_qkv(q, k, v, enable_gqa)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    s = D ** -0.5 if scale is None else float(scale)
    split = _split_default(q.device) if split is None else bool(split)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # the CPU's compiled Flex (which runs unsplit: it returns no lse) gets whole blocks
    # only: at some lengths off the block grid (N = 8 mod 16 below one block) it
    # returned wrong rows or NaN (issue 29)
    pad = q.device.type == "cpu" and not split
    key = (id(pattern), Nk, H, causal, block, Nq, q.device, compact, grad, split, heavy_factor, heavy_min_blocks)
    cacheable = key_padding_mask is None and segment_ids is None
    hit = _MASKS.get(key) if cacheable else None
    sbm = hit[1] if hit is not None and hit[0] is pattern else None
    if sbm is None:
        sbm = split_block_mask_for(pattern, Nk, H, causal=causal, block=block, key_padding_mask=key_padding_mask,
                                   segment_ids=segment_ids, q_len=Nq, device=q.device, compact=compact,
                                   with_q_blocks=grad or q.device.type != "cpu",
                                   heavy_factor=heavy_factor, heavy_min_blocks=heavy_min_blocks if split else BIG,
                                   pad_to_blocks=pad)
        if cacheable:
            if len(_MASKS) > 64:
                _MASKS.clear()
            _MASKS[key] = (pattern, sbm)
    return _split_attention(q, k, v, sbm, s, enable_gqa)


def _split_default(device: torch.device) -> bool:
    """Split heavy blocks out of Flex by default? Not on the CPU: its compiled Flex
    returns no log-sum-exp, and its lists are padded to KB wide anyway."""
    return device.type != "cpu"


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> None:
    """Ranks, shapes, dtypes and GQA of :func:`flex_pattern_attention`'s inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, N, D] tensor, got {getattr(t, 'shape', t)!r}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    B, H, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != Hkv or k.shape[-1] != D or v.shape[2] != Nk:
        raise ValueError(f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if Hkv != H and not (enable_gqa and H % Hkv == 0):
        raise ValueError(f"k/v have {Hkv} heads and q {H}: pass enable_gqa=True with H % Hkv == 0")
    if Nq > Nk:
        raise ValueError(f"Nq ({Nq}) must be <= Nk ({Nk}): queries are the last Nq positions")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
