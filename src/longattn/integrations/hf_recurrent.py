"""Hugging Face hybrid models (Qwen3-Next, Qwen3.5, Kimi-Linear...) on longattn's recurrent kernels.

    >>> from longattn.integrations.hf_recurrent import use_longattn_kernels
    >>> routed = use_longattn_kernels(model)     # ['model.layers.0.linear_attn', ...]
    >>> model(input_ids, position_ids=pos, cu_seq_lens_q=cu, labels=labels)  # packed training

How transformers (5.x) picks the kernel of a linear-attention layer. The layer class
(``Qwen3_5GatedDeltaNet``, ``KimiLinearDeltaAttention``...) is decorated with
``use_kernelized_func([...])`` (from the ``kernels`` package): every instance gets a
private wrapper per kernel function in ``layer._kernel_funcs`` (keys
``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``, ``chunk_kda``,
``fused_recurrent_kda``, ``causal_conv1d_fn``...) and, while the layer runs, the
module-level calls (``torch_chunk_gated_delta_rule(...)``) go to that wrapper's
``forward``. ``kernels.kernelize`` swaps a kernel in by setting that instance's
``forward``; :func:`use_longattn_kernels` does the same for each layer of one model
(nothing module-wide is patched; other models keep their kernels) and
:func:`restore_hf_kernels` undoes it.

The replacements have fla's signatures and HF's layout, [B, T, H, D]:

- ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` ->
  :func:`longattn.ops.recurrent.gated_delta_rule` (its ``*_step`` for one token);
- ``chunk_kda`` / ``fused_recurrent_kda`` -> :func:`longattn.ops.recurrent.kda`;
- ``causal_conv1d_fn`` -> :func:`causal_conv1d` (depthwise causal convolution that
  does not reach across packed documents).

Conventions kept: q, k L2-normalised inside when ``use_qk_l2norm_in_kernel``
(x / sqrt(|x|^2 + 1e-6)), scale 1/sqrt(Dk) unless given, ``initial_state`` /
``output_final_state`` [B, Hv, Dk, Dv] (float32; float64 for float64 inputs, where
HF's torch path rounds to float32). Packed documents: ``cu_seqlens`` (fla's name) or
``cu_seq_lens_q`` (what HF's data collator passes, which Kimi-Linear forwards only in
``**kwargs``) [docs + 1] become longattn ``segment_ids``, so the state and the
convolution restart at each document; batch 1, as in fla. With several documents
``initial_state`` continues the first one and the final state is the last one's (one
state per row, not fla's one per document). Other keyword arguments HF forwards
(``position_ids``, ``max_length_q``...) do not change the result and are ignored, as
fla's wrapper in transformers filters them.

Without fla, transformers' torch path refuses packed sequences (``cu_seqlens``); this
one trains on them. Cost: O(N C (Dk + Dv) + N Dk Dv) per head, chunk C (``chunk_size``,
64), memory O(N (C + Dk + Dv)); papers: Yang et al. 2025 (Gated DeltaNet), Kimi Team
2025 (Kimi Linear).

Needs transformers >= 5 and its ``kernels`` dependency (the hook above is absent
without it; transformers 5.25 requires it): ``pip install 'longattn[hf]'``.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.ops._checks import check_int
from longattn.ops.recurrent import (
    gated_delta_rule, gated_delta_rule_step, kda, kda_step, segment_ids_from_cu_seqlens,
)

__all__ = [
    "use_longattn_kernels", "restore_hf_kernels", "chunk_gated_delta_rule", "chunk_kda", "causal_conv1d",
    "HOOKED_FUNCTIONS",
]


# ----------------------------------------------------------------------------- packed documents


def _cu_seqlens(cu_seqlens: Tensor | None, kwargs: dict[str, Any]) -> Tensor | None:
    """fla's ``cu_seqlens`` or, failing that, HF's ``cu_seq_lens_q`` from the forwarded kwargs."""
    return cu_seqlens if cu_seqlens is not None else kwargs.get("cu_seq_lens_q")


def _segments(cu_seqlens: Tensor | None, batch: int, n: int) -> Tensor | None:
    """segment_ids [1, n] of ``cu_seqlens`` (None without it, or with a single document)."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"cu_seqlens packs documents into one row: the batch must be 1, got batch={batch}")
    seg = segment_ids_from_cu_seqlens(cu_seqlens, total=n)
    return None if cu_seqlens.numel() <= 2 else seg


# ----------------------------------------------------------------------------- the delta rules


def _delta_rule(step: Callable, chunked: Callable, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                scale: float | None, initial_state: Tensor | None, output_final_state: bool, l2: bool,
                cu_seqlens: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """Shared body of the two members: [B, T, H, D] in and out, longattn's [B, H, T, D] inside."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a [B, T, H, D] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    B, T = q.shape[0], q.shape[1]
    seg = _segments(cu_seqlens, B, T)
    qh, kh, vh, gh, bh = (x.transpose(1, 2) for x in (q, k, v, g, beta))
    if T == 1 and seg is None:
        o, state = step(qh, kh, vh, gh, bh, initial_state, scale=scale, use_qk_l2norm=l2)
    else:
        o, state = chunked(qh, kh, vh, gh, bh, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, use_qk_l2norm=l2, segment_ids=seg,
                           chunk_size=chunk_size)
    return o.transpose(1, 2).contiguous(), (state if output_final_state else None)


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
                           initial_state: Tensor | None = None, output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False, cu_seqlens: Tensor | None = None,
                           chunk_size: int = 64, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` on :func:`longattn.ops.recurrent.gated_delta_rule`.

    Args:
        q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv], Hv a multiple of Hk (each q/k head
            serves Hv/Hk consecutive value heads); g: [B, T, Hv] log decay (<= 0);
            beta: [B, T, Hv].
        scale: multiplies q (1/sqrt(Dk) if None).
        initial_state: [B, Hv, Dk, Dv] or None; output_final_state: also return the state.
        use_qk_l2norm_in_kernel: L2-normalise q and k first.
        cu_seqlens: int [docs + 1] packed documents (batch 1); ``cu_seq_lens_q`` in kwargs also read.
        chunk_size: the engine's chunk (any T).
        kwargs: other arguments HF forwards (ignored).

    Returns:
        (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] or None).
    """
    check_int("chunk_size", chunk_size, minimum=1)
    return _delta_rule(gated_delta_rule_step, gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, _cu_seqlens(cu_seqlens, kwargs), chunk_size)


def chunk_kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False,
              use_qk_l2norm_in_kernel: bool = False, cu_seqlens: Tensor | None = None,
              chunk_size: int = 64, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """fla's ``chunk_kda`` (Kimi Delta Attention) on :func:`longattn.ops.recurrent.kda`:
    as :func:`chunk_gated_delta_rule` with a per-channel decay g [B, T, Hv, Dk]."""
    check_int("chunk_size", chunk_size, minimum=1)
    return _delta_rule(kda_step, kda, q, k, v, g, beta, scale, initial_state, output_final_state,
                       use_qk_l2norm_in_kernel, _cu_seqlens(cu_seqlens, kwargs), chunk_size)


# ----------------------------------------------------------------------------- the convolution


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  cu_seqlens: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Depthwise causal convolution (HF's ``causal_conv1d_fn`` signature) that restarts at
    each packed document: out[c, t] = act(bias[c] + sum_j weight[c, K-1-j] x[c, t-j]) over
    the j < K with t - j in t's document.

    Args:
        x: [B, C, T]; weight: [C, K]; bias: [C] or None; activation: an HF name ("silu") or None.
        cu_seqlens: int [docs + 1] (``cu_seq_lens_q`` in kwargs also read), batch 1.

    Returns:
        [B, C, T] in x's dtype. Cost O(B C T K), no T x T tensor.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, C, T] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [C, K] with C = {x.shape[1]}, got {getattr(weight, 'shape', weight)}")
    seg = _segments(_cu_seqlens(cu_seqlens, kwargs), x.shape[0], x.shape[-1])
    K, T = weight.shape[1], x.shape[-1]
    xw = x.to(weight.dtype)
    if seg is None:
        out = F.conv1d(xw, weight[:, None], bias, padding=K - 1, groups=x.shape[1])[..., :T]
    else:
        seg = seg[0].to(x.device)
        out = xw * weight[:, K - 1, None]
        for j in range(1, min(K, T)):
            same = (seg[j:] == seg[:-j]).to(xw.dtype)
            out[..., j:] = out[..., j:] + xw[..., :-j] * same * weight[:, K - 1 - j, None]
        if bias is not None:
            out = out + bias[:, None]
    if activation is not None:
        from transformers.activations import ACT2FN
        out = ACT2FN[activation](out)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- the hook


def _hooked(fn: Callable, chunk_size: int) -> Callable:
    """``fn`` as the ``forward`` of a kernels wrapper module (self first, as kernelize sets it)."""
    takes_chunk = fn is not causal_conv1d

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if takes_chunk:
            kwargs.setdefault("chunk_size", chunk_size)
        return fn(*args, **kwargs)

    forward.__doc__ = fn.__doc__
    return forward


HOOKED_FUNCTIONS: dict[str, Callable] = {
    "chunk_gated_delta_rule": chunk_gated_delta_rule,
    "fused_recurrent_gated_delta_rule": chunk_gated_delta_rule,
    "chunk_kda": chunk_kda,
    "fused_recurrent_kda": chunk_kda,
    "causal_conv1d_fn": causal_conv1d,
}
"""Kernel names (keys of a layer's ``_kernel_funcs``) -> the longattn function put there."""

_DELTA = ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_kda", "fused_recurrent_kda")


def _linear_layers(model: nn.Module) -> list[tuple[str, dict[str, nn.Module]]]:
    """(name, kernel wrappers) of every module whose wrappers include a delta rule."""
    found = []
    for name, module in model.named_modules():
        funcs = module.__dict__.get("_kernel_funcs")
        if isinstance(funcs, dict) and any(k in funcs for k in _DELTA):
            found.append((name, funcs))
    return found


def use_longattn_kernels(model: nn.Module, *, chunk_size: int = 64) -> list[str]:
    """Route every linear-attention layer of ``model`` (a transformers Qwen3-Next, Qwen3.5,
    Kimi-Linear... model) to longattn's recurrent kernels, through each layer's kernel
    wrappers (module docstring). Idempotent; :func:`restore_hf_kernels` undoes it.

    Args:
        model: an ``nn.Module`` holding the layers.
        chunk_size: the chunk of longattn's engine.

    Returns:
        The names of the layers routed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no layer of ``model`` exposes a delta-rule kernel hook (not a hybrid
            linear-attention model, or the ``kernels`` package is missing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_int("chunk_size", chunk_size, minimum=1)
    layers = _linear_layers(model)
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no linear-attention layer with transformers' kernel hook "
            f"({', '.join(_DELTA)} in a layer's _kernel_funcs); it needs a Qwen3-Next/Qwen3.5/Kimi-Linear-style "
            "model and the `kernels` package (pip install kernels)")
    for _, funcs in layers:
        for key, fn in HOOKED_FUNCTIONS.items():
            if key in funcs:
                funcs[key].forward = types.MethodType(_hooked(fn, chunk_size), funcs[key])
    return [name for name, _ in layers]


def restore_hf_kernels(model: nn.Module) -> int:
    """Give the layers routed by :func:`use_longattn_kernels` their own kernels back.
    Returns the number of layers restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _linear_layers(model)
    for _, funcs in layers:
        for key in HOOKED_FUNCTIONS:
            if key in funcs:
                funcs[key].__dict__.pop("forward", None)
    return len(layers)
