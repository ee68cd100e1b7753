"""Hugging Face transformers: any longattn mechanism as a model's ``attn_implementation``.

    >>> from transformers import AutoModelForCausalLM
    >>> from longattn.integrations.transformers import register
    >>> name = register("bigbird", block=64)                  # full-attention layers
    >>> name = register({"full_attention": ("bigbird", {"block": 64}),
    ...                  "sliding_attention": "local"})       # the same, spelled out
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

:func:`register` adds two functions to transformers (5.x):

- an attention function (``AttentionInterface``): it receives the tensors as the
  model's attention layer gives them (``query [B, H, Nq, D]``, ``key/value [B, Hkv,
  Nk, D]`` after RoPE and the cache update), runs the layer's mechanism with grouped KV
  heads (never repeated), the layer's ``scaling``, causality from the layer, bottom-right
  alignment for decode steps (Nq < Nk, over HF's own cache), key padding and packed
  documents from its mask builder; it returns ``[B, Nq, H, D]``.
- a mask function (``AttentionMaskInterface``): it never builds an Nq x Nk mask. It
  reads the model's mask function and accepts only those it reproduces (causal,
  bidirectional, HF's causal and symmetric sliding windows, packed documents, and
  bidirectional blocks over a causal full-attention mask: PaliGemma's prefix-LM
  ``token_type_ids``, HF's ``block_sequence_ids``); every other (blocks over a window,
  chunked attention, a user's ``or_mask``/``and_mask``) is refused. It hands the
  attention the 2-D padding mask, integer segment ids for packed rows, the block ids
  as an integer [B, 1, 1, N] tensor (a 4-D mask passes through the model untouched;
  -2 marks padding), or nothing.

Prefix-LM blocks are honoured exactly: the rows of a block run [s, e) (the image +
prompt prefix) come from exact non-causal attention over keys [0, e) (O(e^2)), the
causal rows after it run the layer's mechanism bottom-right aligned over the keys
before them; decode steps need nothing (one query sees every earlier key). The
vision tower of such a model (SigLIP, non-causal) also runs the registered mechanism
unless ``set_attn_implementation({"text_config": name, "vision_config": "sdpa"})``.

Layer types. Each attention layer is one of ``full_attention``, ``sliding_attention``
(the layer passes a ``sliding_window`` or its config's ``layer_types`` says so),
``cross_attention`` (decoder over encoder states) or ``indexed_attention`` (the layer
passes the keys an indexer selected, ``indices`` [B, Nq, topk]: DeepSeek-V3.2's and
GLM-5's DSA). ``register(mechanism, **params)`` puts the mechanism on the
full-attention layers; every other layer keeps the model's own semantics (``"model"``):
a sliding layer runs exact ``local`` with that layer's window (HF's causal window, key
visible when ``q - w < k <= q``, is ``before = w - 1, after = 0``; a non-causal layer
(ModernBERT) sees ``|q - k| <= w``, ``before = after = w``), a cross-attention layer
runs exact ``full`` over any encoder length, an indexed layer runs
:func:`longattn.ops.given_keys.given_keys_attention` over exactly the given keys. A
mapping ``{layer_type: mechanism | (mechanism, params) | "model"}`` chooses otherwise;
``local`` without ``before`` there follows the layer's window. A window is never
dropped silently: a sliding layer changes only when the mapping names it.

Every argument the model passes that changes the result is honoured or refused with a
ValueError naming it: ``softcap`` (Gemma-2) and learned sinks ``s_aux`` (gpt-oss, with
their gradient) go to mechanisms whose registry entry has ``softcap`` / ``sinks``;
attention dropout in training to mechanisms with a ``dropout`` parameter;
``output_attentions=True``, ``position_bias`` and flash-attention varlen arguments are
refused; so is any argument this module does not know.

:class:`SinkWindowCache` is a bounded KV cache for ``local`` with leading sink tokens
(StreamingLLM): generation keeps the first ``sinks`` and the last ``window`` keys per
layer and equals recomputation without a cache.

transformers is an optional dependency: ``pip install 'longattn[hf]'``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from longattn import api, registry
from longattn.integrations.sink_positions import SINK_POSITIONS, check_choice, local_with_cache_sinks, rope_shift
from longattn import compile_ops as custom

try:  # only when used: longattn itself never needs transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "longattn.integrations.transformers needs transformers >= 5.0 (AttentionInterface and "
        "AttentionMaskInterface): pip install 'longattn[hf]'"
    ) from e

#: the attention layer types :func:`register` maps to mechanisms
LAYER_TYPES = ("full_attention", "sliding_attention", "cross_attention", "indexed_attention")
#: the mapping value that keeps a layer type as the model defines it
MODEL = "model"
#: a padded key in the prefix-LM group ids the mask builder hands the attention
PADDED = -2

#: arguments models pass to attention functions that never change the result here
_INERT = frozenset({"use_cache", "cache_position", "output_router_logits", "deterministic",
                    "return_dict", "output_hidden_states", "output_attentions"})
#: arguments that change the result, each honoured below
_TERMS = frozenset({"softcap", "s_aux", "indices", "is_causal", "position_ids"})
#: arguments refused with a reason
_REFUSED = {
    "position_bias": "an additive relative-position bias (T5-style)",
    "cu_seq_lens_q": "flash-attention varlen packing; pass position_ids that restart per document instead",
    "cu_seq_lens_k": "flash-attention varlen packing; pass position_ids that restart per document instead",
    "max_length_q": "flash-attention varlen packing; pass position_ids that restart per document instead",
    "max_length_k": "flash-attention varlen packing; pass position_ids that restart per document instead",
}


@dataclass(frozen=True)
class _Choice:
    """What runs on one layer type: a registered mechanism and its parameters, or
    :data:`MODEL` (the model's own semantics)."""

    name: str
    params: dict[str, Any]


_REGISTERED: dict[str, dict[str, _Choice]] = {}


def _key(value: Any) -> str:
    """A stable text form of a parameter value (tensors by content)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        return f"tensor{tuple(t.shape)}:{t.dtype}:" + hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12]
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_key(v) for v in value) + ")"
    return repr(value)


def implementation_name(mechanism: str | Mapping[str, Any], **params: Any) -> str:
    """The ``attn_implementation`` name of ``mechanism`` with ``params`` (or of a
    layer-type mapping): the same registration always gives the same name."""
    if not isinstance(mechanism, str):
        choices = _choices(mechanism, params)
        text = ";".join(f"{t}={c.name}:" + ",".join(f"{k}={_key(v)}" for k, v in sorted(c.params.items()))
                        for t, c in sorted(choices.items()))
        return f"longattn_layers_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    if not params:
        return f"longattn_{mechanism}"
    text = ";".join(f"{k}={_key(v)}" for k, v in sorted(params.items()))
    return f"longattn_{mechanism}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _choice(layer_type: str, entry: Any) -> _Choice:
    """One mapping entry (``"name"``, ``("name", {params})`` or ``"model"``), checked."""
    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], Mapping):
        name, params = entry[0], dict(entry[1])
    else:
        raise TypeError(f"layers[{layer_type!r}] must be a mechanism name, (name, params) or 'model', got {entry!r}")
    if name == MODEL:
        if params:
            raise TypeError(f"layers[{layer_type!r}] = 'model' takes no parameters, got {sorted(params)}")
        return _Choice(MODEL, {})
    if layer_type == "indexed_attention":
        raise ValueError(f"layers['indexed_attention'] = {name!r}: an indexed layer attends over exactly the keys the "
                         "model's indexer selected (DeepSeek-V3.2, GLM-5); another mechanism would drop them. "
                         "Use 'model'")
    spec = registry.get(name)
    spec.check_params(params)
    if layer_type == "cross_attention" and not spec.cross:
        able = [s.name for s in registry.specs() if s.cross]
        raise ValueError(f"layers['cross_attention'] = {name!r}: it cannot attend over encoder states of another "
                         f"length (Nq != Nk); cross-capable mechanisms: {able}, or 'model' (exact full)")
    return _Choice(name, params)


def _choices(mechanism: str | Mapping[str, Any], params: dict[str, Any]) -> dict[str, _Choice]:
    """Every layer type's choice: ``mechanism`` on the full-attention layers (or the
    mapping's entries), :data:`MODEL` on the rest."""
    if isinstance(mechanism, str):
        mapping: dict[str, Any] = {"full_attention": (mechanism, params)}
    elif isinstance(mechanism, Mapping):
        if params:
            raise TypeError(f"register(mapping) takes each mechanism's parameters in the mapping, e.g. "
                            f"{{'full_attention': ('bigbird', {{'block': 64}})}}; got keyword arguments "
                            f"{sorted(params)}")
        mapping = dict(mechanism)
    else:
        raise TypeError(f"mechanism must be a name or a mapping layer type -> mechanism, "
                        f"got {type(mechanism).__name__}")
    unknown = sorted(set(mapping) - set(LAYER_TYPES))
    if unknown:
        raise TypeError(f"unknown layer type(s) {unknown}; layer types: {list(LAYER_TYPES)}")
    out = {t: _Choice(MODEL, {}) for t in LAYER_TYPES}
    out.update({t: _choice(t, entry) for t, entry in mapping.items()})
    return out


def register(mechanism: str | Mapping[str, Any], *, sink_positions: str = "text", **params: Any) -> str:
    """Register a transformers attention implementation and its mask builder; return the
    name for ``attn_implementation=`` (or ``model.set_attn_implementation``). Idempotent.

    Args:
        mechanism: a mechanism name, run on the model's full-attention layers with
            ``params`` (sliding, cross-attention and indexed layers keep the model's own
            semantics); or a mapping ``{layer_type: name | (name, params) | "model"}``
            over :data:`LAYER_TYPES` (missing types stay ``"model"``).
        sink_positions: ``"text"`` (default): sink tokens keep their true positions.
            ``"cache"``: StreamingLLM's positions in the cache (Xiao et al. 2024, sec. 3.2;
            :mod:`longattn.integrations.sink_positions`): with ``"local"``, ``after=0`` and
            leading sinks ``global_idx=(0, .., S-1)`` only, query i scores the sinks outside
            its window as if it stood at ``min(i, before + S)``, so a RoPE model keeps its
            perplexity past its trained length; Llama-style RoPE models only (checked at
            the first forward), unpadded rows.
        **params: the mechanism's parameters (with a name only).

    Raises ValueError/TypeError for an unknown mechanism, layer type or parameter, a
    missing required parameter, or a mechanism that cannot serve its layer type
    (checked here, not at the first forward)."""
    if sink_positions not in SINK_POSITIONS:
        raise ValueError(f"sink_positions must be one of {SINK_POSITIONS}, got {sink_positions!r}")
    cache_sinks = check_choice(mechanism, params) if sink_positions == "cache" else None
    choices = _choices(mechanism, params)
    name = implementation_name(mechanism, **params) + ("_cachepos" if cache_sinks else "")
    if name not in _REGISTERED:
        fn = _attention_function(choices)
        AttentionInterface.register(name, fn if cache_sinks is None else _cache_sinks_attention(*cache_sinks, fn))
        AttentionMaskInterface.register(name, padding_mask)
        _REGISTERED[name] = choices
    return name


@dataclass(frozen=True)
class MaskShape:
    """What a transformers mask function computes, as far as longattn reproduces it.

    Attributes:
        causal: causal (``kv <= q``) or bidirectional base.
        window: HF's sliding window ``w``, or None: causal ``q - w < kv``,
            bidirectional ``|q - kv| <= w``.
        segments: packed documents, integer [B, N] (equal ids: one document), or None.
        blocks: HF's ``block_sequence_ids`` [B, N] OR-ed over a causal mask (a prefix-LM's
            image + prompt prefix, PaliGemma): query and key of the same id >= 0 see each
            other both ways; -1 = plain causal token. None when absent.
    """

    causal: bool
    window: int | None = None
    segments: Tensor | None = None
    blocks: Tensor | None = None


def _cells(fn: Callable) -> dict[str, Any]:
    """The closure variables of ``fn`` by name."""
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))


def _parts(fn: Callable, out: list[Callable]) -> list[Callable]:
    """``fn`` flattened through ``and_masks`` and packed-position remapping."""
    name, cells = getattr(fn, "__qualname__", ""), _cells(fn)
    if name == "and_masks.<locals>.and_mask" and "mask_functions" in cells:
        for part in cells["mask_functions"]:
            _parts(part, out)
    elif name == "remap_positions_for_packed_sequence.<locals>.inner_mask" and "mask_function" in cells:
        _parts(cells["mask_function"], out)  # segment ids restart positions per document
    else:
        out.append(fn)
    return out


_WHY = ("it reproduces only causal / bidirectional masks, HF's sliding windows and packed documents. A longattn "
        "mechanism applies causality and its pattern itself (no Nq x Nk mask); this model's extra mask term (a "
        "hand-written prefix-LM or image mask, chunked attention, an or_mask/and_mask) would be dropped. "
        "Use attn_implementation='sdpa' or 'eager' for this model")


def _split_blocks(fn: Callable) -> tuple[Callable, Tensor | None]:
    """(the rest, block ids) when ``fn`` is transformers' ``or_masks(rest,
    blockwise_overlay(block_sequence_ids))`` (the prefix-LM / image-block term), else
    (``fn``, None)."""
    if getattr(fn, "__qualname__", "") != "or_masks.<locals>.or_mask":
        return fn, None
    parts = list(_cells(fn).get("mask_functions", ()))
    blocks = [p for p in parts if getattr(p, "__qualname__", "") == "blockwise_overlay.<locals>.inner_mask"
              and "block_sequence_ids" in _cells(p)]
    if len(parts) != 2 or len(blocks) != 1:
        return fn, None  # refused by the caller, naming the or_mask
    rest = parts[1] if parts[0] is blocks[0] else parts[0]
    return rest, _cells(blocks[0])["block_sequence_ids"]


def read_mask_function(fn: Callable) -> MaskShape:
    """Decode a transformers mask function into a :class:`MaskShape`; ValueError naming
    any part longattn does not reproduce (never ignored). O(1): nothing is evaluated."""
    fn, blocks = _split_blocks(fn)
    base: bool | None = None
    window: tuple[bool, int] | None = None
    segments = None
    for part in _parts(fn, []):
        name, cells = getattr(part, "__qualname__", repr(part)), _cells(part)
        if part is causal_mask_function or part is bidirectional_mask_function:
            causal = part is causal_mask_function
            if base is not None and base != causal:
                raise ValueError(f"the mask function is both causal and bidirectional: {_WHY}")
            base = causal
        elif name in ("sliding_window_overlay.<locals>.inner_mask",
                      "sliding_window_bidirectional_overlay.<locals>.inner_mask") and "sliding_window" in cells:
            window = (name.startswith("sliding_window_overlay"), int(cells["sliding_window"]))
        elif name == "packed_sequence_mask_function.<locals>.inner_mask" and "packed_sequence_mask" in cells:
            segments = cells["packed_sequence_mask"]
        else:
            raise ValueError(f"the model's mask contains {name!r}, which longattn does not reproduce: {_WHY}")
    if base is None:
        raise ValueError(f"the mask function has neither a causal nor a bidirectional base: {_WHY}")
    if window is not None and window[0] != base:
        raise ValueError(f"a {'causal' if window[0] else 'symmetric'} sliding window over a "
                         f"{'causal' if base else 'bidirectional'} mask: {_WHY}")
    if blocks is not None and (not base or window is not None or segments is not None):
        what = "a bidirectional mask" if not base else "a sliding window" if window is not None else "packed rows"
        raise ValueError(f"the model's mask ORs prefix-LM / image blocks (block_sequence_ids, e.g. PaliGemma's "
                         f"token_type_ids) over {what}; longattn honours them only over a plain causal full-"
                         "attention mask. Use attn_implementation='sdpa' or 'eager' for this model")
    return MaskShape(base, None if window is None else window[1], segments, blocks)


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                 use_vmap: bool = False, config: Any = None, **kwargs: Any) -> Tensor | None:
    """The mask builder (``AttentionMaskInterface``): the 2-D padding mask [B, kv_length]
    (True = real), integer segment ids [B, N] for packed rows, or None when nothing is
    padded. Never an Nq x Nk mask, except for models whose indexer reads the 4-D mask
    itself (``config.index_topk``: DeepSeek-V3.2, GLM-5), which get HF's own.

    The mask function is read (:func:`read_mask_function`): anything longattn does not
    reproduce is refused; a sliding window must be the config's (the attention takes
    the window from there); a causal mask must be bottom-right aligned over the keys
    (dynamic caches; a static cache with unfilled slots is refused)."""
    shape = read_mask_function(mask_function if mask_function is not None else causal_mask_function)
    if shape.window is not None and shape.window != getattr(config, "sliding_window", None):
        raise ValueError(f"the mask's sliding window ({shape.window}) is not the config's sliding_window "
                         f"({getattr(config, 'sliding_window', None)}), which the attention layers follow")
    if shape.causal and (isinstance(q_offset, Tensor) or q_offset + q_length != kv_offset + kv_length):
        raise ValueError(f"queries at offset {q_offset} ({q_length}) are not the last of the {kv_length} keys at "
                         f"offset {kv_offset}: a static cache with unfilled slots; longattn runs over dynamic caches "
                         "(the default DynamicCache, SinkWindowCache)")
    if getattr(config, "index_topk", None) is not None:  # the model's indexer reads this mask itself
        device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, device=device)
    if shape.segments is not None:
        return shape.segments.to(torch.long)
    mask = _key_padding(attention_mask, kv_offset, kv_length)
    blocks = shape.blocks
    if blocks is None and shape.causal and q_length > 1 and getattr(config, "use_bidirectional_attention", False):
        # PaliGemma: its layers say non-causal (use_bidirectional_attention) but its mask is causal
        blocks = torch.full((batch_size, kv_length), -1, dtype=torch.long, device=kwargs.get("device", "cpu"))
    if blocks is not None:
        if q_offset != 0 or kv_offset != 0 or q_length != kv_length:
            raise ValueError(f"prefix-LM / image blocks (block_sequence_ids), or a causal mask over layers that say "
                             f"non-causal (use_bidirectional_attention, PaliGemma), for {q_length} queries at offset "
                             f"{q_offset} over {kv_length} keys: longattn honours them in a forward over the whole "
                             "sequence (prefill or no cache) or one query at a time only")
        groups = blocks[:, :kv_length].to(torch.long).expand(batch_size, -1)
        if mask is not None:
            groups = groups.masked_fill(~mask, PADDED)
        return groups.reshape(batch_size, 1, 1, kv_length)  # 4-D: the model passes it on as built
    # a data-dependent check: under torch.compile the mask is always passed (as HF does)
    if mask is None or (not torch.compiler.is_compiling() and bool(mask.all())):
        return None
    return mask


def _key_padding(attention_mask: Tensor | None, kv_offset: int, kv_length: int) -> Tensor | None:
    """The model's 2-D padding mask cut to the keys [B, kv_length] (bool, True = real)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [B, N], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if mask.shape[1] < kv_length:  # as transformers' prepare_padding_mask: missing columns are padding
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[1]), value=False)
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


def _family(module: Any) -> str:
    """The model family of an attention layer, for messages."""
    return str(getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__)


def _wants_attentions(module: Any, kwargs: dict[str, Any]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers 5 records outputs through a collector instead of a kwarg
        from transformers.utils.output_capturing import _active_collector

        active = _active_collector.get()
        return bool(active) and "attentions" in active
    except (ImportError, AttributeError, LookupError):
        return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _read_kwargs(module: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The result-changing arguments among ``kwargs`` (``softcap``, ``s_aux``, ``indices``,
    ``is_causal``); ValueError for any other non-None argument not known to be inert."""
    terms: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _TERMS:
            terms[name] = value
        elif value is not None and name not in _INERT:
            what = _REFUSED.get(name, "an argument longattn does not know, so it cannot tell whether it changes "
                                      "the result")
            raise ValueError(f"the {_family(module)} attention layer passed {name}= ({what}); longattn cannot "
                             f"honour it: use attn_implementation='eager' or 'sdpa' for this model")
    return terms


def _layer(module: Any, sliding_window: int | None, causal: bool, nq: int, nk: int) -> tuple[str, int | None]:
    """(layer type, HF window or None) of the calling attention layer."""
    cfg = getattr(module, "config", None)
    types, idx = getattr(cfg, "layer_types", None), getattr(module, "layer_idx", None)
    known = isinstance(idx, int) and isinstance(types, (list, tuple)) and 0 <= idx < len(types)
    declared = types[idx] if known else None
    crossing = not causal and (nq != nk or getattr(module, "is_decoder", False))
    if getattr(module, "is_cross_attention", False) or crossing:
        return "cross_attention", None
    if sliding_window is not None or declared == "sliding_attention":
        window = getattr(cfg, "sliding_window", None) or sliding_window  # the masks' window: the config's
        if not window:
            raise ValueError(f"a sliding layer of {_family(module)} without a sliding_window in its config")
        return "sliding_attention", int(window)
    if declared not in (None, "full_attention"):
        raise ValueError(f"layer {idx} of {_family(module)} is a {declared!r} layer; longattn runs full, sliding, "
                         f"cross-attention and indexed layers only: use attn_implementation='sdpa' for this model")
    return "full_attention", None


def _window_params(window: int, causal: bool, names: tuple[str, str] = ("before", "after")) -> dict[str, int]:
    """A window mechanism's (before, after) parameters ``names`` (``spec.window_params``;
    ``local``'s by default) for HF's window ``w``: causal ``q - w < k <= q``,
    bidirectional ``|q - k| <= w``."""
    before, after = names
    return {before: window - 1, after: 0} if causal else {before: window, after: window}


def _resolve(choice: _Choice, kind: str, window: int | None, causal: bool, nk: int, needs: list[str],
             family: str) -> tuple[str, dict[str, Any]]:
    """The mechanism and parameters that run on this layer."""
    if choice.name == MODEL:
        if window is not None:
            return "local", _window_params(window, causal)
        full = registry.get("full")
        if kind == "cross_attention" or all(getattr(full, t, False) for t in needs):
            return "full", {}
        return "local", {"before": nk, "after": nk}  # every key, with the score terms 'full' lacks
    params = dict(choice.params)
    names = registry.get(choice.name).window_params
    if names is not None and names[0] not in params:
        if window is None:
            raise ValueError(f"mechanism {choice.name!r} was registered without {names[0]}= and this {kind} layer "
                             f"of {family} has no sliding_window: register({choice.name!r}, {names[0]}=...)")
        params = {**_window_params(window, causal, names), **params}
    return choice.name, params


def _check_terms(spec: registry.Mechanism, needs: list[str], kind: str, family: str) -> None:
    """ValueError when the model passes a score term the mechanism lacks."""
    for arg in needs:
        if not getattr(spec, arg, False):
            able = [s.name for s in registry.specs() if getattr(s, arg, False)]
            hf = {"sinks": "learned sinks (s_aux)", "softcap": "a score softcap"}[arg]
            raise ValueError(f"{family} passes {hf} on its {kind} layers and mechanism {spec.name!r} has no {arg}: "
                             f"map {kind!r} to one that has ({able}) or to 'model'")


def _split_mask(mask: Tensor | None, nq: int, nk: int) -> tuple[Tensor | None, Tensor | None]:
    """(key padding [B, Nk], segment ids [B, N]) from what :func:`padding_mask` gave."""
    if mask is None:
        return None, None
    if mask.dim() != 2:
        raise ValueError(f"longattn attention got a {mask.dim()}-D mask; it expects the 2-D padding mask its own "
                         "mask builder gives (was the model built with this attn_implementation?)")
    if mask.dtype != torch.bool:
        if nq != nk or mask.shape[1] != nk:
            raise ValueError(f"segment ids {tuple(mask.shape)} for Nq={nq}, Nk={nk}: packed rows need Nq == Nk")
        return None, mask
    if mask.shape[1] != nk:
        raise ValueError(f"the padding mask covers {mask.shape[1]} keys but the layer has {nk}: a cache that drops "
                         "keys (SinkWindowCache) cannot take a padded batch; generate unpadded rows")
    return mask, None


def _indexed(module: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, terms: dict[str, Any],
             scaling: float | None, causal: bool) -> Tensor:
    """DeepSeek-V3.2 / GLM-5 DSA: exact attention over the indexer's keys, with the
    causality and padding of the model's mask (the last query row of HF's causal mask
    sees every real key)."""
    from longattn.ops.given_keys import given_keys_attention  # lazy: only indexed models need it

    if terms.get("softcap") is not None:
        raise ValueError(f"{_family(module)} passes softcap with indices; given-keys attention has no softcap")
    kpm = None
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
        kpm = mask[:, 0, -1, :]
    elif mask is not None and mask.dim() == 2 and mask.dtype == torch.bool:
        kpm = mask
    elif mask is not None:
        raise ValueError(f"indices with a {mask.dim()}-D {mask.dtype} mask: expected longattn's own mask builder")
    return given_keys_attention(q, k, v, terms["indices"], causal=causal, key_padding_mask=kpm, scale=scaling,
                                sinks=terms.get("s_aux"))


def _block_runs(row: list[int], family: str) -> tuple[tuple[int, int, bool], ...]:
    """One row of prefix-LM group ids as maximal runs ``(start, end, is_block)``: a run of
    one id >= 0 is a bidirectional block; everything else (-1, padding) is causal. An id
    split over two runs (a block that sees across other tokens) is refused."""
    runs: list[tuple[int, int, bool]] = []
    seen: set[int] = set()
    start = 0
    for i in range(1, len(row) + 1):
        if i < len(row) and (row[i] == row[start] or (row[i] < 0 and row[start] < 0)):
            continue
        gid = row[start]
        if gid >= 0:
            if gid in seen:
                raise ValueError(f"{family}: prefix-LM / image block id {gid} (block_sequence_ids) spans two "
                                 "separate runs of tokens; longattn honours contiguous blocks only: use "
                                 "attn_implementation='sdpa' or 'eager'")
            seen.add(gid)
        runs.append((start, i, gid >= 0))
        start = i
    return tuple(runs)


def _prefix_lm(run: Callable, q: Tensor, k: Tensor, v: Tensor, groups: Tensor, name: str, call: dict[str, Any],
               scores: dict[str, Any], scale: float | None, family: str) -> Tensor:
    """Causal attention with bidirectional blocks (HF's ``block_sequence_ids``: PaliGemma's
    image + prompt prefix), exactly: query i of a block run [s, e) sees every real key
    before e, so that run's rows come from one exact non-causal attention over keys [0, e)
    (O(e^2), e = the prefix end); a causal run [s, e) runs the layer's mechanism over keys
    [0, e), bottom-right aligned (its queries are the last e - s positions). Rows whose
    runs differ are computed one at a time. q [B, H, N, D], groups [B, N] -> [B, H, N, Dv]."""
    kpm_all = groups != PADDED
    plans = [_block_runs(r, family) for r in groups.tolist()]
    batches = [(slice(None), plans[0])] if all(p == plans[0] for p in plans) else \
        [(slice(b, b + 1), p) for b, p in enumerate(plans)]
    dense, dense_call = _resolve(_Choice(MODEL, {}), "full_attention", None, False, q.shape[2], list(scores), family)
    if "dropout" in call:
        dense_call = {**dense_call, "dropout": call["dropout"]}
    if any(s > 0 and not blk for _, p in batches for s, _, blk in p) and not registry.get(name).bottom_right:
        raise ValueError(f"{family}: the tokens after a prefix-LM block attend causally over the keys before them "
                         f"(Nq < Nk, bottom-right); mechanism {name!r} cannot: map 'full_attention' to one that can "
                         f"({[m.name for m in registry.specs() if m.bottom_right]})")
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for rows, plan in batches:
        kpm = kpm_all[rows]
        for s, e, blk in plan:
            mech, extra, causal, q0 = (dense, dense_call, False, 0) if blk else (name, call, True, s)
            piece = run(q[rows, :, q0:e], k[rows, :, :e], v[rows, :, :e], mech, causal=causal,
                        key_padding_mask=kpm[:, :e], scale=scale, **extra, **scores)
            out[rows, :, s:e] = piece[:, :, s - q0:]
    return out


def _groups(mask: Tensor | None) -> Tensor | None:
    """The prefix-LM group ids [B, N] when ``mask`` is what :func:`padding_mask` builds for
    them (integer [B, 1, 1, N]), else None."""
    if mask is None or mask.dim() != 4 or mask.dtype not in (torch.int64, torch.int32) or mask.shape[1:3] != (1, 1):
        return None
    return mask[:, 0, 0]


def _attention_function(choices: dict[str, _Choice]) -> Callable:
    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sliding_window: int | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        family = _family(module)
        if _wants_attentions(module, kwargs):
            raise ValueError("output_attentions=True: longattn mechanisms never form the attention matrix; use "
                             "attn_implementation='eager' to inspect weights")
        terms = _read_kwargs(module, kwargs)
        causal = bool(getattr(module, "is_causal", True) if terms.get("is_causal") is None else terms["is_causal"])
        training_dropout = dropout if module.training else 0.0
        if terms.get("indices") is not None:
            if training_dropout:
                raise ValueError(f"attention dropout {dropout} in training with indices ({family}): set the config's "
                                 "attention_dropout to 0")
            out = _indexed(module, query, key, value, attention_mask, terms, scaling, causal)
            return out.transpose(1, 2).contiguous(), None
        nq, nk = query.shape[2], key.shape[2]
        groups = _groups(attention_mask)  # prefix-LM blocks over a causal mask, whatever the layer says
        causal = causal or groups is not None
        kpm, segments = _split_mask(None if groups is not None else attention_mask, nq, nk)
        if attention_mask is None and nq == nk:  # packed rows the mask builder did not see (a cache was passed)
            segments = packed_segments(terms.get("position_ids"), nq)
            segments = None if segments is None else segments.expand(query.shape[0], -1)
        kind, window = _layer(module, sliding_window, causal, nq, nk)
        scores = {t: v for t, v in (("sinks", terms.get("s_aux")), ("softcap", terms.get("softcap"))) if v is not None}
        name, call = _resolve(choices[kind], kind, window, causal, nk, list(scores), family)
        spec = registry.get(name)
        _check_terms(spec, list(scores), kind, family)
        if training_dropout:
            if "dropout" not in spec.param_names:
                raise ValueError(f"attention dropout {dropout} in training: mechanism {name!r} has no dropout; "
                                 "set the model config's attention_dropout to 0")
            call["dropout"] = dropout
        # under torch.compile: one custom op per layer, no graph break (longattn.ops.custom)
        run = custom.attention if torch.compiler.is_compiling() and not scores else api.attention
        if groups is not None:
            if kind != "full_attention" or groups.shape[1] != nq or nq != nk:
                raise ValueError(f"prefix-LM / image blocks reached a {kind} layer of {family} with Nq={nq}, "
                                 f"Nk={nk}: longattn honours them on causal full-attention layers only")
            out = _prefix_lm(run, query, key, value, groups, name, call, scores, scaling, family)
            return out.transpose(1, 2).contiguous(), None
        state = None if run is not api.attention or segments is not None else _key_state(key, spec, call)
        extra = {} if state is None else {"key_state": state}
        out = run(query, key, value, name, causal=causal, key_padding_mask=kpm, scale=scaling,
                  segment_ids=segments, **call, **scores, **extra)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = "longattn_attention"
    return attention


#: keys tensor a :class:`KeyStateLayer` returned -> that layer's mechanism states (by the
#: tensor's identity, held weakly: an entry goes with the tensor)
_KEY_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _key_state(key: Tensor, spec: registry.Mechanism, call: dict[str, Any]) -> Any:
    """The state the cache layer behind ``key`` keeps for this mechanism and parameters
    (made on first use), or None: the mechanism keeps none, or ``key`` did not come
    from a :class:`KeyStateLayer` (then the mechanism recomputes what it needs)."""
    states = _KEY_STATES.get(key) if spec.key_state is not None else None
    if states is None:
        return None
    sig = (spec.name, _key(tuple(sorted(call.items()))))
    if sig not in states:
        states[sig] = spec.key_state({**spec.defaults(), **call})
    return states[sig]


def _cache_sinks_attention(before: int, sinks: int, base: Callable) -> Callable:
    """The attention function of ``register("local", ..., sink_positions="cache")``: on
    full-attention layers :func:`longattn.integrations.sink_positions.local_with_cache_sinks`
    with the queries re-rotated by ``min(t, before + sinks) - t`` (t: ``position_ids``, or
    the bottom-right positions); every other layer runs ``base``. ValueError naming
    ``sink_positions`` for what it cannot honour (padding, packed rows, learned sinks,
    softcap, non-causal layers, dropout in training, ``output_attentions``)."""

    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sliding_window: int | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        nq, nk = query.shape[2], key.shape[2]
        causal = bool(getattr(module, "is_causal", True) if kwargs.get("is_causal") is None else kwargs["is_causal"])
        kind, _ = _layer(module, sliding_window, causal, nq, nk)
        if kind != "full_attention" or kwargs.get("indices") is not None:
            return base(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
        family, terms = _family(module), _read_kwargs(module, kwargs)
        pos = terms.get("position_ids")
        why = ("output_attentions=True" if _wants_attentions(module, kwargs) else
               "a padding mask, packed rows or prefix-LM blocks" if attention_mask is not None else
               "packed documents (position_ids restart)" if not torch.compiler.is_compiling()
               and packed_segments(pos, nq) is not None else
               "learned sinks (s_aux)" if terms.get("s_aux") is not None else
               "a score softcap" if terms.get("softcap") is not None else
               "a non-causal layer" if not causal else
               f"attention dropout {dropout} in training" if module.training and dropout else None)
        if why is not None:
            raise ValueError(f"sink_positions='cache' ({family}) cannot honour {why}: use sink_positions='text' "
                             "or attn_implementation='sdpa'")
        if pos is None:
            pos = torch.arange(nk - nq, nk, device=query.device)[None]
        if pos.dim() != 2 or pos.shape[-1] != nq:
            raise ValueError(f"sink_positions='cache': position_ids {tuple(pos.shape)} for {nq} queries")
        delta = pos.clamp(max=before + sinks) - pos
        q_shifted = rope_shift(module)(query, delta)
        out = local_with_cache_sinks(query, q_shifted, key, value, before=before, sinks=sinks, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = "longattn_cache_sinks_attention"
    return attention


class SinkWindowLayer(DynamicLayer):
    """One layer of :class:`SinkWindowCache`: keeps the first ``sinks`` and the last
    ``window`` keys/values (as the attention layer stored them: after RoPE), and counts
    every token seen (``get_seq_length``), so positions stay the true ones."""

    is_sliding = False
    is_croppable = False

    def __init__(self, sinks: int, window: int, **kwargs: Any) -> None:
        super().__init__()
        self.sinks, self.window = sinks, window
        self.cumulative_length = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append the new keys/values; return all that the current queries may read
        (what is stored plus the new ones), then keep only the sinks and the window."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if keys.shape[-2] > self.sinks + self.window:
            self.keys = torch.cat([keys[..., :self.sinks, :], keys[..., -self.window:, :]], dim=-2)
            self.values = torch.cat([values[..., :self.sinks, :], values[..., -self.window:, :]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen so far (not the number stored)."""
        return self.cumulative_length

    def stored_length(self) -> int:
        """Keys held now: at most ``sinks + window``."""
        return 0 if not self.is_initialized else int(self.keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """As if nothing were dropped: no padding gives no mask; a padded batch gets a
        mask longer than the keys, which the attention refuses (never a wrong slice)."""
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("SinkWindowCache cannot be cropped: it has dropped the keys a crop would need")


class SinkWindowCache(Cache):
    """A bounded KV cache for windowed mechanisms with leading sink tokens (StreamingLLM,
    Xiao et al. 2023): per layer only the first ``sinks`` and the last ``window`` keys
    are kept, so memory stays O(sinks + window) however long the generation.

    Pass it as ``cache`` (``past_key_values`` before transformers 5.40) to ``model.generate``
    with a model registered as

        register("local", before=window, after=0, global_idx=tuple(range(sinks)))

    (query t sees keys t - window .. t and the first ``sinks`` tokens): the kept keys are
    exactly those the query can see, stored after RoPE with their true positions, so
    the tokens equal recomputation without a cache. A mechanism that reads further back
    than ``window`` (or other than the sinks) would get the wrong keys: only pair it
    with such a ``local``. Batches must be unpadded (a padded one is refused).

    Args:
        config: the model's config (its text config's ``num_hidden_layers``).
        sinks: leading tokens kept, >= 0.
        window: most recent tokens kept, >= 1.
    """

    def __init__(self, config: Any, sinks: int, window: int) -> None:
        for arg, value, low in (("sinks", sinks, 0), ("window", window, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SinkWindowCache: {arg} must be an int >= {low}, got {value!r}")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = int(getattr(text, "num_hidden_layers"))
        super().__init__(layers=[SinkWindowLayer(sinks, window) for _ in range(layers)])
        self.sinks, self.window = sinks, window

    def stored_length(self, layer_idx: int = 0) -> int:
        """Keys held by layer ``layer_idx`` now (<= sinks + window)."""
        return self.layers[layer_idx].stored_length()


class KeyStateLayer(DynamicLayer):
    """One full-attention layer of :class:`KeyStateCache`: HF's growing KV cache, plus
    the state each mechanism keeps beside its keys (the registry's ``key_state``), one
    per mechanism and parameters, dropped whenever the keys change other than by growth
    (reset, crop, beam reorder, batch changes)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.states: dict[tuple[str, str], Any] = {}

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append the new keys/values (as :class:`DynamicLayer`) and mark the returned keys
        as this layer's, so the attention finds the states."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if not torch.compiler.is_compiling():  # a compiled model's attention recomputes (one custom op)
            _KEY_STATES[keys] = self.states
        return keys, values

    def reset(self) -> None:
        self.states.clear()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self.states.clear()
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states.clear()
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states.clear()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.states.clear()
        super().batch_select_indices(indices)


class KeyStateCache(DynamicCache):
    """HF's ``DynamicCache`` whose full-attention layers also keep each mechanism's state
    beside the keys (:class:`KeyStateLayer`), updated with every new token instead of
    recomputed from all keys: for ``topk_blocks``, the block summaries of its gate
    (:class:`longattn.ops.topk_blocks.KeySummaries`), so a decode step costs
    O(N / block * D) for the gate plus O((topk + 1) * block * D) for the attention, not
    O(N * D). The keys and values themselves are HF's; tokens equal those generated with a
    plain ``DynamicCache`` (tested).

        >>> cache = KeyStateCache(config=model.config)
        >>> model.generate(**inputs, cache=cache)   # ``past_key_values=`` before transformers 5.40

    Sliding-window layers keep HF's own layer. Args: ``config`` (optional, as
    ``DynamicCache``: without it every layer is a :class:`KeyStateLayer`)."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        if config is None:
            self.layer_class_to_replicate = KeyStateLayer
        self.layers = [KeyStateLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]

    def key_states(self, layer_idx: int = 0) -> dict[tuple[str, str], Any]:
        """The mechanism states layer ``layer_idx`` keeps now (empty before its first use)."""
        layer = self.layers[layer_idx]
        return layer.states if isinstance(layer, KeyStateLayer) else {}
