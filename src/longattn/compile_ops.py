"""Attention as ``torch.library`` custom ops: one opaque node under ``torch.compile``.

    >>> from longattn.ops import custom
    >>> out = custom.attention(q, k, v, "local", causal=True, before=64, after=0)
    >>> model = torch.compile(model, fullgraph=True)     # no graph break in the attention

:func:`attention` has exactly the semantics of :func:`longattn.attention` (grouped KV
heads, bottom-right causal for Nq < Nk, packed documents through ``segment_ids``),
but runs the mechanism inside a custom op, so Dynamo never traces the plan building
(sorting, ``.item()``, data-dependent shapes, Python-side caches) that breaks its
graphs. Under ``torch.compile`` the multi-head layer
(:class:`longattn.layers.attention.HeadGroup`) routes through here.

The ops (namespace ``longattn``)::

    engine_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, str config)
        -> (Tensor out, Tensor lse)
    engine_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out,
        Tensor lse, Tensor? key_padding_mask, str config) -> (Tensor, Tensor, Tensor)
    attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask,
        Tensor? segment_ids, Tensor[] params, str config) -> Tensor
    attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v,
        Tensor? key_padding_mask, Tensor? segment_ids, Tensor[] params, str config,
        bool[] param_grad) -> (Tensor, Tensor, Tensor, Tensor[])

- The exact pattern mechanisms (``local``, ``bigbird``, ``pattern``... on the tile
  engine of :mod:`longattn.ops.blocksparse`: ``spec.tile_engine``) use ``engine_attention``: the forward
  returns the output and its log-sum-exp [B, H, Nq, 1] (fp32, fp64 for fp64
  inputs); the backward is the engine's own backward on the saved q, k, v, out,
  lse (no recomputation; the tile plans come from the engine's per-pattern cache).
- Every other supported mechanism (``spec.compile_recompute``: ``full``, ``linear``,
  ``performer``, ``graph``, ``nystrom``; and pattern mechanisms with ``segment_ids``, ``Dv != D`` or the flex
  backend) uses ``attention``, whose backward recomputes the forward under autograd
  and returns the gradients of q, k, v (and of floating tensor parameters that
  require grad): exact, at the cost of one more forward.
- Where Dynamo traces a mechanism's eager code without a graph break
  (``spec.dynamo_traced``: ``full`` on SDPA, causal ``linear``/``performer``; see
  :data:`NATIVE`, :func:`traced_natively`),
  :func:`attention` under ``torch.compile`` leaves it to Dynamo and inductor, which
  is faster than the op's recomputing backward (and handles dropout).
- Mechanisms with state or randomness that a recomputation would not reproduce
  (``spec.random_params`` set: dropout > 0, Performer redraws; learned modules other than Performer/linear, LSH, clustering,
  Sinkhorn...) are not routed through the ops: :func:`attention` calls
  :func:`longattn.attention` directly (under ``torch.compile`` Dynamo traces it, and
  may break the graph there).

Non-tensor parameters (ints, tuples, strings, Pattern objects, feature maps) live in
a Python-side table keyed by a deterministic string, the ``config`` argument: the
same mechanism, flags and parameters give the same key (objects other than plain
values enter by identity, and the table keeps them alive). Tensor parameters
(performer's ``projection``, graph's ``edge_index``, full's ``bias``) are op inputs.
Under ``torch.compile`` the key is computed at trace time
(``torch._dynamo.assume_constant_result``) and is a constant of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from longattn import api, registry

__all__ = ["attention", "module_attention", "supported", "config_key"]

#: mechanisms whose eager code Dynamo traces without a graph break in some settings
#: (see :func:`traced_natively`): there, under ``torch.compile``, :func:`attention`
#: lets Dynamo trace them (inductor fuses them, autograd differentiates them, dropout
#: included) instead of calling the op. Measured on the CPU (benchmarks/compile_speed.py)
#: a causal Performer LM step is ~1.2x eager this way, ~0.9x through the recomputing op.
#: Remove a name to force the op.
NATIVE: set[str] = {"full", "linear", "performer"}


def traced_natively(mechanism: str, causal: bool, nq: int, nk: int) -> bool:
    """Under ``torch.compile``, does :func:`attention` let Dynamo trace ``mechanism``?
    By its ``spec.dynamo_traced``: ``"aligned"`` (``full``: SDPA) except causal with
    Nq != Nk (the engine); ``"causal"`` (``linear``/``performer``) causal only (their
    non-causal paths break Dynamo's graph: ``out=`` into views); never where it is not
    in :data:`NATIVE`. Packed documents (``segment_ids``) always take the op: their
    length classes are data-dependent."""
    if mechanism not in NATIVE:
        return False
    traced = registry.get(mechanism).dynamo_traced
    if traced == "aligned":
        return not (causal and nq != nk)
    return traced == "causal" and bool(causal)

_PLAIN = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class _Config:
    mechanism: str
    causal: bool
    scale: float | None
    static: dict[str, Any]
    tensor_names: tuple[str, ...]
    engine: bool                       # the exact pattern engine path
    pattern: Any = None                # its Pattern object (engine path)
    check: tuple[str, Any, dict] | None = None   # (name, global_idx, kw) for position checks
    objects: list[Any] = field(default_factory=list)  # kept alive: their ids are in the key


_CONFIGS: dict[str, _Config] = {}


def _token(x: Any, objects: list[Any]) -> str:
    """A deterministic string for a parameter value: repr of plain values (and of
    tuples/lists of them), identity of anything else (kept alive in ``objects``)."""
    if isinstance(x, _PLAIN):
        return repr(x)
    if isinstance(x, (tuple, list)):
        inner = ",".join(_token(v, objects) for v in x)
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    if isinstance(x, range):
        return repr(x)
    objects.append(x)
    return f"<{type(x).__name__}@{id(x):x}>"


def _engine_eligible(spec: registry.Mechanism, params: dict[str, Any], device_type: str) -> bool:
    """Does this call run on the exact tile engine (pattern_attention's engine path)?"""
    if not spec.tile_engine:
        return False
    backend = params.get("backend", "auto")
    return backend == "engine" or (backend == "auto" and device_type != "cuda")


@torch._dynamo.assume_constant_result
def config_key(mechanism: str, causal: bool, scale: float | None, device_type: str, engine_ok: bool,
               tensor_names: tuple[str, ...], static_names: tuple[str, ...], *static_values: Any) -> str:
    """Validate a call's mechanism and parameters, store its config, return its key.

    Runs as plain Python even under ``torch.compile`` (its result is a graph constant).
    ``engine_ok``: the call's shapes allow the engine path (no segment_ids, Dv == D).
    """
    spec = registry.get(mechanism)
    static = dict(zip(static_names, static_values))
    given = {**static, **{n: None for n in tensor_names}}
    spec.resolve(given, causal=causal)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, type(None))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    full = {**spec.defaults(), **static}
    for n in tensor_names:
        full.pop(n, None)
    engine = engine_ok and not tensor_names and _engine_eligible(spec, full, device_type)
    objects: list[Any] = []
    key = "|".join([
        mechanism, f"causal={bool(causal)}", f"scale={scale!r}", "engine" if engine else "generic",
        "tensors=" + ",".join(tensor_names),
        *(f"{n}={_token(full[n], objects)}" for n in sorted(full)),
    ])
    if key not in _CONFIGS:
        pattern, check = None, None
        if engine:
            if spec.pattern_param is not None:
                pattern = full[spec.pattern_param]
            else:
                from longattn.ops.sparse import with_globals

                gidx = full.get("global_idx", ())
                kw = {n: v for n, v in full.items() if n not in ("global_idx", "backend")}
                pattern = with_globals(spec.pattern, gidx, **kw)
                check = (spec.pattern, gidx, kw)
        _CONFIGS[key] = _Config(mechanism, bool(causal), None if scale is None else float(scale), full,
                                tuple(tensor_names), engine, pattern, check, objects)
    return key


def _config(key: str) -> _Config:
    try:
        return _CONFIGS[key]
    except KeyError:
        raise ValueError(f"unknown longattn attention config {key!r} (built in another process?)") from None


# --------------------------------------------------------------------------- engine ops


def _engine_groups(cfg: _Config, H: int, Hkv: int, Nq: int, Nk: int, padded: bool, tile: int):
    from longattn.ops.blocksparse import _cached_plan, _kv_groups

    rows = (Nk - Nq, Nk)
    return [(h0, nh, kh0, nkh, _cached_plan(p, Nk, nh, cfg.causal, tile, rows, None, padded))
            for h0, nh, kh0, nkh, p in _kv_groups(cfg.pattern, H, Hkv)]


@torch.library.custom_op("longattn::engine_attention", mutates_args=())
def _engine_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                      config: str) -> tuple[Tensor, Tensor]:
    from longattn.ops._checks import check_qkv, default_scale
    from longattn.ops.blocksparse import BAND_QUERY_TILE, _BlockSparseAttention

    cfg = _config(config)
    if cfg.check is not None:
        from longattn.ops.sparse import _check_positions

        name, gidx, kw = cfg.check
        _check_positions(name, gidx, kw)
    d = check_qkv(q, k, v, causal=cfg.causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=True)
    s = default_scale(cfg.scale, d.D)
    fwd = _engine_groups(cfg, d.H, d.Hkv, d.Nq, d.Nk, key_padding_mask is not None, BAND_QUERY_TILE)
    written = all(w for *_, (_, w) in fwd)
    ctx = SimpleNamespace()
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved", t)
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = _BlockSparseAttention.forward(ctx, q, k, v, [(*g[:4], g[4][0]) for g in fwd], None, s,
                                        key_padding_mask, written)
    return out.contiguous(), ctx.saved[4]


@_engine_attention.register_fake
def _(q, k, v, key_padding_mask, config):
    B, H, Nq, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, H, Nq, v.shape[-1]), q.new_empty(B, H, Nq, 1, dtype=acc)


@torch.library.custom_op("longattn::engine_attention_backward", mutates_args=())
def _engine_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               key_padding_mask: Tensor | None, config: str) -> tuple[Tensor, Tensor, Tensor]:
    from longattn.ops._checks import default_scale
    from longattn.ops.blocksparse import BAND_QUERY_TILE_BWD, _BlockSparseAttention

    cfg = _config(config)
    B, H, Nq, D = q.shape
    bwd = _engine_groups(cfg, H, k.shape[1], Nq, k.shape[2], key_padding_mask is not None, BAND_QUERY_TILE_BWD)
    ctx = SimpleNamespace(
        saved_tensors=tuple(x.contiguous() for x in (q, k, v, out, lse)),
        groups=[(*g[:4], g[4][0]) for g in bwd], scale=default_scale(cfg.scale, D), kpm=key_padding_mask,
    )
    dq, dk, dv = _BlockSparseAttention.backward(ctx, grad.contiguous())[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_engine_attention_backward.register_fake
def _(grad, q, k, v, out, lse, key_padding_mask, config):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _engine_setup(ctx, inputs, output):
    q, k, v, kpm, config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm)
    ctx.config = config


def _engine_backward(ctx, grad, grad_lse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    dq, dk, dv = _engine_attention_backward(grad, q, k, v, out, lse, kpm, ctx.config)
    return dq, dk, dv, None, None


_engine_attention.register_autograd(_engine_backward, setup_context=_engine_setup)


# --------------------------------------------------------------------------- generic ops


def _run(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, seg: Tensor | None, params: list[Tensor],
         cfg: _Config) -> Tensor:
    """The call of :func:`longattn.attention` (:func:`longattn.api.run` around the mechanism)."""
    spec = registry.get(cfg.mechanism)
    full = {**cfg.static, **dict(zip(cfg.tensor_names, params))}
    call = api.bind(spec, full, causal=cfg.causal, scale=cfg.scale)
    return api.run(spec, call, q, k, v, causal=cfg.causal, key_padding_mask=kpm, segment_ids=seg, params=full)


@torch.library.custom_op("longattn::attention", mutates_args=())
def _generic_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                       segment_ids: Tensor | None, params: list[Tensor], config: str) -> Tensor:
    out = _run(q, k, v, key_padding_mask, segment_ids, list(params), _config(config))
    return _fresh(out, (q, k, v, *params))


def _fresh(out: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    """``out`` contiguous and sharing no storage with an input (custom-op rule)."""
    out = out.contiguous()
    ptr = out.untyped_storage().data_ptr()
    if any(x.untyped_storage().data_ptr() == ptr for x in inputs):
        out = out.clone()
    return out


@_generic_attention.register_fake
def _(q, k, v, key_padding_mask, segment_ids, params, config):
    B, H, Nq, _ = q.shape
    return q.new_empty(B, H, Nq, v.shape[-1])


def _autograd_on() -> Any:
    """Autograd back on inside an op's kernel (the dispatcher excludes its keys there),
    so the backward op can differentiate a recomputed forward."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None and exclude.has(key):
            exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("longattn::attention_backward", mutates_args=())
def _generic_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                key_padding_mask: Tensor | None, segment_ids: Tensor | None,
                                params: list[Tensor], config: str,
                                param_grad: list[bool]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    cfg = _config(config)
    with _autograd_on(), torch.enable_grad():
        qkv = [x.detach().requires_grad_(x.dtype.is_floating_point) for x in (q, k, v)]
        ps = [p.detach().requires_grad_(bool(g)) for p, g in zip(params, param_grad)]
        out = _run(*qkv, key_padding_mask, segment_ids, ps, cfg)
        wrt = qkv + [p for p in ps if p.requires_grad]
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True) if out.requires_grad else [None] * len(wrt)
    grads = [x.new_zeros(x.shape) if g is None else g.contiguous() for x, g in zip(wrt, grads)]
    dq, dk, dv, rest = grads[0], grads[1], grads[2], iter(grads[3:])
    dps = [next(rest) if g else p.new_empty(0) for p, g in zip(params, param_grad)]
    return dq, dk, dv, dps


@_generic_attention_backward.register_fake
def _(grad, q, k, v, key_padding_mask, segment_ids, params, config, param_grad):
    dps = [p.new_empty(p.shape) if g else p.new_empty(0) for p, g in zip(params, param_grad)]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dps


def _generic_setup(ctx, inputs, output):
    q, k, v, kpm, seg, params, config = inputs
    ctx.save_for_backward(q, k, v, kpm, seg, *params)
    ctx.config = config


def _generic_backward(ctx, grad):
    q, k, v, kpm, seg, *params = ctx.saved_tensors
    need = ctx.needs_input_grad[5]
    param_grad = [bool(n) and p.dtype.is_floating_point for p, n in zip(params, need)]
    dq, dk, dv, dps = _generic_attention_backward(grad, q, k, v, kpm, seg, params, ctx.config, param_grad)
    return dq, dk, dv, None, None, [d if g else None for d, g in zip(dps, param_grad)], None


_generic_attention.register_autograd(_generic_backward, setup_context=_generic_setup)


# --------------------------------------------------------------------------- public API


def supported(mechanism: str, params: dict[str, Any] | None = None) -> bool:
    """Does :func:`attention` run ``mechanism`` (with ``params``) inside a custom op?
    (False: it calls :func:`longattn.attention` directly.)"""
    spec = registry.get(mechanism)
    if spec.family == "pattern":
        return True
    # a recomputed forward would draw another dropout mask / other features
    return spec.compile_recompute and not spec.random(params or {})


def _same_size(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    """``a == b`` as a Python bool. Under ``torch.compile(dynamic=True)`` (or after an
    automatic-dynamic recompile) head sizes are SymInts and ``a == b`` a SymBool, which
    :func:`config_key` (``assume_constant_result``) cannot take; branching on it makes
    Dynamo evaluate it and guard on the answer, so the graph recompiles if it changes."""
    return True if a == b else False


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "local",
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    **params: Any,
) -> Tensor:
    """:func:`longattn.attention` through the ``longattn::*`` custom ops (same
    arguments, same result, differentiable in q, k, v); see the module doc."""
    if not supported(mechanism, params) or (
            torch.compiler.is_compiling() and segment_ids is None
            and traced_natively(mechanism, causal, q.shape[-2], k.shape[-2])):
        return api.attention(q, k, v, mechanism, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                     segment_ids=segment_ids, **params)
    tnames = tuple(sorted(n for n, x in params.items() if isinstance(x, Tensor)))
    snames = tuple(sorted(n for n in params if n not in tnames))
    # a plain bool (a shape guard under torch.compile), never a SymBool: config_key's
    # arguments must be Python constants (assume_constant_result)
    engine_ok = segment_ids is None and q.dim() == 4 and v.dim() == 4 and _same_size(q.shape[-1], v.shape[-1])
    key = config_key(mechanism, causal, scale, q.device.type, engine_ok, tnames, snames,
                     *[params[n] for n in snames])
    if "|engine|" in key:
        return _engine_attention(q, k, v, key_padding_mask, key)[0]
    return _generic_attention(q, k, v, key_padding_mask, segment_ids, [params[n] for n in tnames], key)


def module_attention(name: str, impl: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                     key_padding_mask: Tensor | None, segment_ids: Tensor | None = None,
                     params: dict[str, Any] | None = None) -> Tensor:
    """A learned mechanism's module ``impl`` (built by :func:`longattn.api.build`)
    on q, k, v as :class:`~longattn.layers.attention.HeadGroup` runs it: through the
    custom ops where the module is a pure function of its buffers (Performer without
    redraws: its ``projection``; linear attention: its feature map), else the module
    itself under :func:`longattn.api.run`."""
    from longattn.ops.kernel import LinearAttention, PerformerAttention

    if torch.compiler.is_compiling() and segment_ids is None and traced_natively(name, causal, q.shape[-2],
                                                                                  k.shape[-2]):
        pass
    elif isinstance(impl, PerformerAttention) and impl.redraw_interval is None:
        return attention(q, k, v, "performer", causal=causal, key_padding_mask=key_padding_mask,
                         segment_ids=segment_ids, projection=impl.feature_map.projection,
                         chunk_size=impl.chunk_size)
    elif type(impl) is LinearAttention:
        return attention(q, k, v, "linear", causal=causal, key_padding_mask=key_padding_mask,
                         segment_ids=segment_ids, feature_map=impl.feature_map, chunk_size=impl.chunk_size)
    spec = registry.get(name)
    return api.run(
        spec, lambda q, k, v, kpm: impl(q, k, v, causal=causal, key_padding_mask=kpm, scale=None),
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, segment_ids=segment_ids, params=params)
