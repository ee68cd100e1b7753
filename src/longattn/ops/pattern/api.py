"""The public entry of the pattern engine: :func:`pattern_attention`.

Argument checks (positions, sinks, softcap), the backend choice (the tile engine or
compiled FlexAttention), the head groups' cached plans, and the call of
:class:`longattn.ops.pattern.engine._BlockSparseAttention`. The overview is in
:mod:`longattn.ops.pattern`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale
from longattn.ops._softmax import pad_head_dim
from longattn.ops.pattern.engine import _BlockSparseAttention
from longattn.ops.pattern.plan import BAND_QUERY_TILE, BAND_QUERY_TILE_BWD, _cached_plan, _kv_groups
from longattn.patterns import Pattern


def pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    n: int | None = None,
    q_start: int | None = None,
    k_positions: Tensor | None = None,
    backend: str = "auto",
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Exact softmax attention restricted to ``pattern``.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. Grouped KV heads:
            H % Hkv == 0, query head h reads kv head h // (H // Hkv) (never repeated
            in memory).
        pattern: any :class:`longattn.patterns.Pattern`, per-head lists included.
        causal: intersect with j <= i (positions, see below).
        key_padding_mask: bool [B, Nk] aligned with k's rows, True = a real token.
        n: the length the pattern is laid over (default Nk).
        q_start: position of q's first row (default n - Nq: the queries are the last
            Nq positions, FlashAttention's bottom-right alignment, so a decode step
            ``q[:, :, -1:]`` over the whole cache is the last row of the full call).
        k_positions: sorted positions [Nk] of k's rows (default arange(n)); every key
            a query can see must be among them (see :func:`needed_keys`).
        backend: "engine" (the tile engine here), "flex" (compiled FlexAttention
            with a BlockMask built from the pattern's components,
            :mod:`longattn.ops.flex`: the fused GPU kernel; on the CPU forward only),
            or "auto": flex on CUDA, the engine elsewhere (on the CPU it is 1.5-2x
            faster than compiled Flex and has a backward).
        sinks: float [H] (may require grad): one logit per query head in the softmax
            denominator only, out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sinks[h]})
            (gpt-oss ``s_aux``). Folded into the merged log-sum-exp: O(Nq) extra work,
            the tile kernels unchanged; d sink_h = -sum_i P_sink,i (dO_i . O_i).
        softcap: c > 0: scores s -> c tanh(s / c) before the softmax (Gemma-2). Runs
            the plain-matmul tile kernels (no fused kernel has the cap): same
            O(visible entries * D) time and bounded workspace, ~2-4x slower than the
            flash kernel on the CPU.

    Returns:
        [B, H, Nq, Dv]. Queries with no visible key get zeros (with or without a
        sink). Differentiable in q, k, v and sinks. Cost ~ the entries the Nq queries
        see (a decode step of a window costs the window, not n); memory
        O((Nq + Nk) * D) + a bounded workspace. A row's output never depends on keys
        it cannot see, even non-finite ones (padded keys are zeroed; a non-finite
        output reruns the call on the safe kernels).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=True)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn.patterns.Pattern, got {type(pattern).__name__}")
    s = default_scale(scale, d.D)
    check_sinks(sinks, d.H)
    check_softcap(softcap)
    if _use_flex(backend, q, k_positions, sinks is not None or softcap is not None):
        from longattn.ops.pattern.flex_attention import flex_pattern_attention

        return flex_pattern_attention(q, k, v, pattern, causal=causal, key_padding_mask=key_padding_mask,
                                      scale=s, enable_gqa=d.Hkv != d.H)
    n, q0 = _positions(d, n, q_start, k_positions)
    if d.Dv != d.D:  # the kernel wants one head size: zero columns change no score or output
        q, k, v = pad_head_dim(q, k, v)
    out = _engine_call(q, k, v, pattern, d.H, d.Hkv, causal, key_padding_mask, s, n, (q0, q0 + d.Nq),
                       k_positions, sinks, softcap)
    return out[..., : d.Dv]


def _engine_call(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, H: int, Hkv: int, causal: bool,
                 key_padding_mask: Tensor | None, scale: float, n: int, rows: tuple[int, int],
                 k_positions: Tensor | None, sinks: Tensor | None, softcap: float | None) -> Tensor:
    """The tile engine on checked arguments (one head size): the head groups' cached
    plans (forward, and backward when a gradient is wanted), padded keys zeroed, then
    :class:`_BlockSparseAttention`. Returns [B, H, Nq, D]."""
    keys = None if k_positions is None else k_positions.to("cpu", torch.long)
    padded = key_padding_mask is not None
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))

    def groups(tile: int) -> list[tuple[int, int, int, int, tuple]]:
        return [(h0, nh, kh0, nkh, _cached_plan(p, n, nh, causal, tile, rows, keys, padded))
                for h0, nh, kh0, nkh, p in _kv_groups(pattern, H, Hkv)]

    fwd = groups(BAND_QUERY_TILE)
    written = all(w for *_, (_, w) in fwd)
    bwd = [(*g[:4], g[4][0]) for g in groups(BAND_QUERY_TILE_BWD)] if grad else None
    if padded:  # padded rows can hold anything (fp16 overflow): zeros reach no output
        keep = key_padding_mask[:, None, :, None]
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, [(*g[:4], g[4][0]) for g in fwd], bwd, scale, key_padding_mask,
                                       written, sinks, None if softcap is None else float(softcap))


def check_sinks(sinks: object, H: int) -> None:
    """``sinks`` must be None or a float tensor [H] (one logit per query head)."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a float tensor [H] (one logit per query head), got "
                        f"{getattr(sinks, 'dtype', type(sinks).__name__)}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape [H] = [{H}] (query heads), got {tuple(sinks.shape)}")


def check_softcap(softcap: object) -> None:
    """``softcap`` must be None or a number > 0."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float > 0, got {softcap!r}")
    if not softcap > 0 or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite float > 0, got {softcap!r}")


BACKENDS = ("auto", "engine", "flex")


def _use_flex(backend: str, q: Tensor, k_positions: Tensor | None, terms: bool = False) -> bool:
    """Does this call run on FlexAttention (see :func:`pattern_attention`'s ``backend``)?
    ``terms``: sinks or softcap are given (the engine's, not Flex's here)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "flex" and terms:
        raise ValueError("backend='flex' does not take sinks or softcap here: use backend='engine' or 'auto'")
    if backend == "engine" or terms or (backend == "auto" and q.device.type != "cuda"):
        return False
    from longattn.ops.pattern.flex_attention import flex_available

    if not flex_available():
        if backend == "flex":
            raise ValueError("backend='flex' needs FlexAttention (torch >= 2.5)")
        return False
    if k_positions is not None:
        if backend == "flex":
            raise ValueError("backend='flex' takes the whole key sequence (k_positions is the engine's)")
        return False
    return True


def _positions(d, n: int | None, q_start: int | None, k_positions: Tensor | None) -> tuple[int, int]:
    """Validate the position arguments of :func:`pattern_attention`; (n, q_start)."""
    if k_positions is None:
        n = d.Nk if n is None else n
        if n != d.Nk:
            raise ValueError(f"n ({n}) must equal the number of keys ({d.Nk}) unless k_positions is given")
    else:
        if not isinstance(k_positions, Tensor) or k_positions.dim() != 1 or k_positions.numel() != d.Nk:
            raise ValueError(f"k_positions must be a 1-D LongTensor of the {d.Nk} key positions, "
                             f"got {getattr(k_positions, 'shape', k_positions)!r}")
        if n is None:
            raise ValueError("n (the length the pattern is laid over) is required with k_positions")
        if d.Nk > 1 and bool((k_positions[1:] <= k_positions[:-1]).any()):
            raise ValueError("k_positions must be strictly increasing")
        if int(k_positions[0]) < 0 or int(k_positions[-1]) >= n:
            raise ValueError(f"k_positions must lie in [0, n={n}), got [{int(k_positions[0])}, {int(k_positions[-1])}]")
    q0 = n - d.Nq if q_start is None else q_start
    if isinstance(q0, bool) or not isinstance(q0, int) or q0 < 0 or q0 + d.Nq > n:
        raise ValueError(f"q_start must be an int with 0 <= q_start and q_start + Nq <= n; "
                         f"got q_start={q_start!r}, Nq={d.Nq}, n={n}")
    return n, q0
