"""The registry: mechanism name -> spec (callable, parameters, capabilities).

Every mechanism enters the library here, once. The functional API
(:mod:`longattn.api`: :func:`longattn.attention`, ``build``, ``run``, ``routed``), the
multi-head module, the benchmark, the pictures and the trainer all find mechanisms
through this table, so adding one is one file plus its :func:`register` call, never
an edit of a switch statement: code outside this module reads a spec's typed fields
(``sequence_parallel``, ``tile_engine``, ``window_params``...), never its name.

This module is a pure table: it imports no other longattn module. The table is
filled when :mod:`longattn.ops` is imported (its family modules call :func:`register`),
which :mod:`longattn.api` does. ``import longattn`` stays light (it loads neither), so
the package hands this module a loader (:func:`fill_with`) that :func:`get`,
:func:`names` and :func:`specs` run on first use: they are complete after a plain
``import longattn``. The old names ``registry.attention/run/build/routed/...`` are
forwarded to :mod:`longattn.api` on attribute access (:func:`__getattr__`).

A mechanism's callable has the signature::

    fn(q, k, v, *, causal: bool, key_padding_mask: Tensor | None,
       scale: float | None, **params) -> Tensor          # [B, H, Nq, Dv]

Learned mechanisms (they own parameters or buffers) also give ``module``: a
builder ``module(heads=H, head_dim=D, **params) -> nn.Module`` whose forward is
``forward(q, k, v, *, causal=False, key_padding_mask=None, scale=None)``.
Their functional form takes the learned tensors (or the module) as parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from torch import Tensor, nn

T = TypeVar("T")

#: names that moved to :mod:`longattn.api`, still reachable as ``registry.<name>``
MOVED_TO_API = frozenset({"attention", "build", "run", "routed", "FunctionalAttention", "Runner"})


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
"""Marker for a parameter without a default (the caller must give it)."""


@dataclass(frozen=True)
class Param:
    """One parameter of a mechanism: its name, default and a one-line meaning."""

    name: str
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Mechanism:
    """What the registry knows of a mechanism.

    Attributes:
        name: registry key, e.g. ``"local"``.
        fn: the functional form (see module docstring).
        params: the parameters ``fn`` accepts beyond q, k, v, causal,
            key_padding_mask and scale.
        family: the module/family it belongs to (``"pattern"``, ``"kernel"``...).
        exact: equals softmax attention over its pattern to rounding error.
        causal: can be asked for ``causal=True``.
        learned: owns parameters or buffers (use ``module``).
        cross: accepts Nq != Nk (cross-attention).
        subquadratic: never builds an Nq x Nk tensor (section 1 of docs/design.md).
        bias: accepts an additive score bias (e.g. ALiBi) as ``bias=``.
        gqa: computes grouped KV heads (k, v with H / g heads) without repeating
            them; other mechanisms get K/V repeated by :func:`attention`.
        bottom_right: accepts ``causal=True`` with Nq < Nk, the queries being the last
            Nq positions (FlashAttention's bottom-right alignment: a decode step).
        packed: accepts ``segment_ids`` (documents packed in one row).
        sinks: accepts ``sinks=`` (a learned logit per query head [H] in the softmax
            denominator only, gpt-oss's ``s_aux``; docs/design.md section 9).
        softcap: accepts ``softcap=`` (scores s -> c tanh(s / c) before the softmax,
            Gemma-2).
        causal_only: runs only with ``causal=True`` (a recurrence reads the past only).
        all_keys: every query weighs every key (projected keys, kernel features):
            tokens a layer prepends as global are global without being named.
        global_param: the parameter holding global positions (``"global_idx"``), which
            a layer extends with the tokens it prepends; None: none.
        pattern: the pattern name behind a fixed-pattern mechanism (for the
            sequence-parallel halo); None: not a named pattern.
        length_quantum: ``(params, causal) -> int``: packed documents are padded to a
            multiple of it (a pattern whose blocks must line up); None: 1.
        why_not_bottom_right: for mechanisms without ``bottom_right``, the reason given
            when a decode step is asked of them.
        pattern_param: the parameter holding a ready ``longattn.patterns.Pattern``
            (mechanism ``"pattern"``: ``"pattern"``); None: the pattern is built from
            ``pattern`` and the parameters.
        tile_engine: runs on the exact tile engine of :mod:`longattn.ops.blocksparse`
            (its custom op saves the log-sum-exp and reuses the engine's backward).
        compile_recompute: the forward is a deterministic function of q, k, v and the
            parameters, so :mod:`longattn.ops.custom` may recompute it for the backward.
        random_params: parameters that, when set (not None, False or 0), make the
            forward draw random numbers (dropout, feature redraws): no recomputation.
        dynamo_traced: when Dynamo traces the eager code without a graph break:
            ``""`` never, ``"causal"`` causal calls only, ``"aligned"`` all but causal
            with Nq != Nk (:func:`longattn.ops.custom.traced_natively`).
        sequence_parallel: how :func:`longattn.distributed.attention` shards it:
            ``"halo"`` (fetch the key rows a shard sees), ``"ring"`` (K/V blocks round
            a ring), ``"kernel_state"`` (O(F Dv) state sums), ``"recurrent_state"``
            (affine state maps per rank); ``""``: not sharded.
        window_params: the (before, after) parameters of a sliding window, which a
            model's ``sliding_window`` fills in when not given; None: no window.
        key_state: ``(params) -> state``: builds the state a KV cache keeps beside its
            keys for this mechanism (``topk_blocks``: :class:`~longattn.ops.topk_blocks.KeySummaries`,
            the block summaries), which ``fn`` takes as ``key_state=`` on calls over that
            cache's keys and updates with the new ones; None: nothing to keep.
        paper: the reference, e.g. ``"Beltagy et al. 2020, Longformer"``.
        summary: one line for tables.
        module: builder of an ``nn.Module`` for learned mechanisms.
    """

    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...] = ()
    family: str = ""
    exact: bool = True
    causal: bool = True
    learned: bool = False
    cross: bool = False
    subquadratic: bool = True
    bias: bool = False
    gqa: bool = False
    bottom_right: bool = False
    packed: bool = False
    sinks: bool = False
    softcap: bool = False
    causal_only: bool = False
    all_keys: bool = False
    global_param: str | None = None
    pattern: str | None = None
    length_quantum: Callable[[dict[str, Any], bool], int] | None = None
    why_not_bottom_right: str = "it has no bottom-right causal path"
    pattern_param: str | None = None
    tile_engine: bool = False
    compile_recompute: bool = False
    random_params: tuple[str, ...] = ()
    dynamo_traced: str = ""
    sequence_parallel: str = ""
    window_params: tuple[str, str] | None = None
    key_state: Callable[[Mapping[str, Any]], Any] | None = None
    paper: str = ""
    summary: str = ""
    module: Callable[..., nn.Module] | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if not p.required}

    def check_params(self, params: Mapping[str, Any], *, complete: bool = True) -> None:
        """Raise TypeError naming unknown parameters, and (``complete``) missing required
        ones. The one parameter check of the library: the functional API, the layers,
        the custom ops, the distributed calls and the HF integration all call it.
        ``complete=False``: the required ones may still come later (per call)."""
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise TypeError(
                f"mechanism {self.name!r} got unknown parameter(s) {unknown}; "
                f"it accepts {list(self.param_names) or 'no parameters'}"
            )
        missing = [p.name for p in self.params if p.required and p.name not in params]
        if complete and missing:
            raise TypeError(f"mechanism {self.name!r} needs parameter(s) {missing}")

    def resolve(self, params: Mapping[str, Any], *, causal: bool = False) -> dict[str, Any]:
        """The full parameters of a call: ``params`` checked (:meth:`check_params`),
        ``causal=True`` refused (ValueError) where the mechanism cannot be causal, then
        laid over the defaults."""
        self.check_params(params)
        if causal and not self.causal:
            raise ValueError(f"mechanism {self.name!r} cannot be causal (causal=True was given)")
        return {**self.defaults(), **params}

    def random(self, params: Mapping[str, Any]) -> bool:
        """Does a call with ``params`` draw random numbers (a ``random_params`` set)?"""
        return any(_is_set(params.get(n)) for n in self.random_params)

    def score_terms(self, *, sinks: Any = None, softcap: Any = None) -> dict[str, Any]:
        """``sinks`` / ``softcap`` as keyword arguments for ``fn`` (only those given, so a
        call without them passes nothing); a ValueError naming the argument and the
        mechanisms that accept it where this one lacks the capability. The values are
        checked by the mechanism (sinks [H], softcap > 0)."""
        out: dict[str, Any] = {}
        for arg, value in (("sinks", sinks), ("softcap", softcap)):
            if value is None:
                continue
            if not getattr(self, arg):
                able = [s.name for s in specs() if getattr(s, arg)]
                raise ValueError(f"{arg} is not supported by mechanism {self.name!r}; "
                                 f"mechanisms that accept it: {able}")
            out[arg] = value
        return out

    def describe(self) -> dict[str, Any]:
        """A plain dict, for tables and JSON."""
        return {
            "name": self.name,
            "family": self.family,
            "exact": self.exact,
            "causal": self.causal,
            "learned": self.learned,
            "cross": self.cross,
            "subquadratic": self.subquadratic,
            "gqa": self.gqa,
            "bottom_right": self.bottom_right,
            "packed": self.packed,
            "sinks": self.sinks,
            "softcap": self.softcap,
            "causal_only": self.causal_only,
            "params": {
                p.name: (None if p.required else _jsonable(p.default)) for p in self.params
            },
            "paper": self.paper,
            "summary": self.summary,
        }


def _is_set(x: Any) -> bool:
    """A parameter value that switches something on: not None, False or a zero number."""
    return x is not None and x is not False and not (isinstance(x, (int, float)) and x == 0)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return repr(x)


_REGISTRY: dict[str, Mechanism] = {}


def register(
    name: str,
    *,
    params: tuple[Param, ...] | list[Param] = (),
    **caps: Any,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering ``fn`` under ``name``.

    Example::

        @register("local", params=(Param("before", 64), Param("after", 64)),
                  family="pattern", exact=True, causal=True)
        def local_attention(q, k, v, *, causal, key_padding_mask, scale, before, after):
            ...
    """

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"mechanism {name!r} is already registered")
        _REGISTRY[name] = Mechanism(name=name, fn=fn, params=tuple(params), **caps)
        return fn

    return deco


def add(spec: Mechanism) -> Mechanism:
    """Register a ready-made :class:`Mechanism`."""
    if spec.name in _REGISTRY:
        raise ValueError(f"mechanism {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def lookup(table: Mapping[str, T], name: object, what: str) -> T:
    """``table[name]``; a TypeError when ``name`` is not a str, a ValueError naming it
    and listing the registered names when absent (the registries' one lookup)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; registered: {sorted(table)}") from None


_FILLERS: list[Callable[[], object]] = []


def fill_with(loader: Callable[[], object]) -> None:
    """Run ``loader`` (it registers mechanisms, e.g. by importing :mod:`longattn.ops`)
    before the first :func:`get` / :func:`names` / :func:`specs`. The package sets it;
    this keeps the table free of imports of the modules that fill it."""
    if not callable(loader):
        raise TypeError(f"loader must be callable, got {type(loader).__name__}")
    _FILLERS.append(loader)


def _filled() -> None:
    while _FILLERS:
        _FILLERS.pop()()  # popped first: a lookup made while it runs sees the table so far


def get(name: str) -> Mechanism:
    """The spec of ``name``; a ValueError listing the known names otherwise."""
    _filled()
    return lookup(_REGISTRY, name, "mechanism")


def names() -> list[str]:
    """The registered names, sorted."""
    _filled()
    return sorted(_REGISTRY)


def specs() -> Iterator[Mechanism]:
    """Every registered spec, by name."""
    _filled()
    for n in sorted(_REGISTRY):
        yield _REGISTRY[n]


def mechanisms() -> list[dict[str, Any]]:
    """Every registered mechanism as a dict: name, family, capabilities, parameters."""
    return [s.describe() for s in specs()]


def __getattr__(name: str) -> Any:
    """PEP 562: the names that moved to :mod:`longattn.api` (``attention``, ``run``,
    ``build``, ``routed``, ``FunctionalAttention``, ``Runner``), for old callers.
    The import happens here, at attribute-access time only: this module has no import
    of any longattn module at import time (it stays a pure table below the API)."""
    if name in MOVED_TO_API:
        return getattr(importlib.import_module("longattn.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
