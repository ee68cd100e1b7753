"""Hugging Face transformers: any longattn mechanism as a model's ``attn_implementation``.

    >>> from transformers import AutoModelForCausalLM
    >>> from longattn.integrations.transformers import register
    >>> name = register("local", before=4095)                # or register("bigbird", block=64)
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

:func:`register` adds two functions to transformers (5.x):

- an attention function (``AttentionInterface``): it receives the tensors as the
  model's attention layer gives them (``query [B, H, Nq, D]``, ``key/value [B, Hkv,
  Nk, D]`` after RoPE and the cache update), runs the mechanism with grouped KV heads
  (never repeated), the layer's ``scaling``, causality from the layer, bottom-right
  alignment for decode steps (Nq < Nk, over HF's own cache), key padding from the 2-D
  mask, and packed documents where ``position_ids`` restart inside a row (HF's
  packing convention); it returns ``[B, Nq, H, D]``.
- a mask function (``AttentionMaskInterface``): it never builds an Nq x Nk mask. It
  hands the attention the 2-D padding mask (its last ``kv_length`` columns), or
  nothing when no token is padded: the mechanism applies causality, its pattern and
  the padding itself.

``local`` without ``before`` follows the layer's sliding window (HF: key visible when
``q_idx - sliding_window < kv_idx <= q_idx``, i.e. ``before = sliding_window - 1``);
an explicit ``before`` wins. Attention dropout in training is passed to mechanisms
that have a ``dropout`` parameter and refused (ValueError) by the others;
``output_attentions=True`` is refused: no mechanism here forms the attention matrix.

transformers is an optional dependency: ``pip install 'longattn[hf]'``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch import Tensor

from longattn import registry
from longattn.ops import custom

try:  # only when used: longattn itself never needs transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "longattn.integrations.transformers needs transformers >= 5.0 (AttentionInterface and "
        "AttentionMaskInterface): pip install 'longattn[hf]'"
    ) from e

_REGISTERED: dict[str, tuple[str, dict[str, Any]]] = {}


def _key(value: Any) -> str:
    """A stable text form of a parameter value (tensors by content)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        return f"tensor{tuple(t.shape)}:{t.dtype}:" + hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12]
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_key(v) for v in value) + ")"
    return repr(value)


def implementation_name(mechanism: str, **params: Any) -> str:
    """The ``attn_implementation`` name of ``mechanism`` with ``params``: the same
    mechanism and parameters always give the same name."""
    if not params:
        return f"longattn_{mechanism}"
    text = ";".join(f"{k}={_key(v)}" for k, v in sorted(params.items()))
    return f"longattn_{mechanism}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def register(mechanism: str, **params: Any) -> str:
    """Register ``mechanism`` (with ``params``) as a transformers attention implementation
    and its mask builder; return the name for ``attn_implementation=`` (or
    ``model.set_attn_implementation``). Idempotent.

    Raises ValueError/TypeError for an unknown mechanism or parameters (checked here,
    not at the first forward)."""
    spec = registry.get(mechanism)
    unknown = sorted(set(params) - set(spec.param_names))
    if unknown:
        raise TypeError(f"mechanism {mechanism!r} got unknown parameter(s) {unknown}; "
                        f"it accepts {list(spec.param_names) or 'no parameters'}")
    follows_window = mechanism == "local" and "before" not in params
    needed = [p.name for p in spec.params if p.required and p.name not in params]
    if needed:
        raise TypeError(f"mechanism {mechanism!r} needs parameter(s) {needed} to be registered")
    name = implementation_name(mechanism, **params)
    if name not in _REGISTERED:
        AttentionInterface.register(name, _attention_function(spec, dict(params), follows_window))
        AttentionMaskInterface.register(name, padding_mask)
        _REGISTERED[name] = (mechanism, dict(params))
    return name


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                 use_vmap: bool = False, **kwargs: Any) -> Tensor | None:
    """The mask builder: the 2-D padding mask [B, kv_length] (True = real), or None when
    nothing is padded. Never an Nq x Nk mask: the mechanism applies causality and its
    pattern itself. A model that composes its own mask functions (``use_vmap``: extra
    masks for image tokens and the like) is refused rather than silently ignored."""
    if use_vmap:
        raise ValueError(
            "this model adds its own mask function to the causal mask (or_mask/and_mask); a longattn "
            "mechanism applies causality and its pattern itself and cannot honour it"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [B, N], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    # a data-dependent check: under torch.compile the mask is always passed (as HF does)
    if not torch.compiler.is_compiling() and mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def packed_segments(position_ids: Tensor | None, n: int) -> Tensor | None:
    """Documents packed in a row (HF's convention: ``position_ids`` restart inside the
    row): segment ids [B, n], or None when every row is one sequence. Under
    ``torch.compile`` that last check is data-dependent, so the segment ids are always
    returned (transformers' own ``find_packed_sequence_indices`` does the same)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != n:
        return None
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    seg = (step != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and bool((seg[:, -1] == seg[:, 0]).all()):
        return None
    return seg


def _wants_attentions(module: Any, kwargs: dict[str, Any]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers 5 records outputs through a collector instead of a kwarg
        from transformers.utils.output_capturing import _active_collector

        active = _active_collector.get()
        return bool(active) and "attentions" in active
    except (ImportError, AttributeError, LookupError):
        return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _attention_function(spec: registry.Mechanism, params: dict[str, Any], follows_window: bool) -> Callable:
    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sliding_window: int | None = None, position_ids: Tensor | None = None,
                  **kwargs: Any) -> tuple[Tensor, None]:
        if _wants_attentions(module, kwargs):
            raise ValueError(
                f"output_attentions=True: longattn mechanism {spec.name!r} never forms the attention "
                "matrix; use attn_implementation='eager' to inspect weights"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"longattn attention got a {attention_mask.dim()}-D mask; it expects the 2-D padding mask "
                "its own mask builder gives (was the model built with this attn_implementation?)"
            )
        causal = bool(getattr(module, "is_causal", True))
        call = dict(params)
        if follows_window:
            window = sliding_window or getattr(getattr(module, "config", None), "sliding_window", None)
            if not window:
                raise ValueError(
                    "mechanism 'local' was registered without before= and this layer has no sliding_window: "
                    "register('local', before=...)"
                )
            call["before"] = int(window) - 1
            call.setdefault("after", 0)
        if dropout and module.training:
            if "dropout" not in spec.param_names:
                raise ValueError(f"attention dropout {dropout} in training: mechanism {spec.name!r} has no dropout; "
                                 "set the model config's attention_dropout to 0")
            call["dropout"] = dropout
        nq, nk = query.shape[2], key.shape[2]
        segments = packed_segments(position_ids, nq) if attention_mask is None and nq == nk else None
        if segments is not None:  # position_ids may come unexpanded, [1, N]
            segments = segments.expand(query.shape[0], -1)
        # under torch.compile: one custom op per layer, no graph break (longattn.ops.custom)
        run = custom.attention if torch.compiler.is_compiling() else registry.attention
        out = run(query, key, value, spec.name, causal=causal, key_padding_mask=attention_mask,
                  scale=scaling, segment_ids=segments, **call)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"longattn_{spec.name}_attention"
    return attention
