"""The registry: mechanism name -> spec (callable, parameters, capabilities).

Every mechanism enters the library here, once. The functional API
(:func:`longattn.attention`), the multi-head module, the benchmark, the pictures
and the trainer all find mechanisms through this table, so adding one is one file
plus its :func:`register` call, never an edit of a switch statement.

A mechanism's callable has the signature::

    fn(q, k, v, *, causal: bool, key_padding_mask: Tensor | None,
       scale: float | None, **params) -> Tensor          # [B, H, Nq, Dv]

Learned mechanisms (they own parameters or buffers) also give ``module``: a
builder ``module(heads=H, head_dim=D, **params) -> nn.Module`` whose forward is
``forward(q, k, v, *, causal=False, key_padding_mask=None, scale=None)``.
Their functional form takes the learned tensors (or the module) as parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import Tensor, nn

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
    paper: str = ""
    summary: str = ""
    module: Callable[..., nn.Module] | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if not p.required}

    def check_params(self, params: dict[str, Any]) -> None:
        """Raise TypeError naming unknown or missing parameters."""
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise TypeError(
                f"mechanism {self.name!r} got unknown parameter(s) {unknown}; "
                f"it accepts {list(self.param_names) or 'no parameters'}"
            )
        missing = [p.name for p in self.params if p.required and p.name not in params]
        if missing:
            raise TypeError(f"mechanism {self.name!r} needs parameter(s) {missing}")

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


def get(name: str) -> Mechanism:
    """The spec of ``name``; a ValueError listing the known names otherwise."""
    _load()
    if not isinstance(name, str):
        raise TypeError(f"mechanism must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown mechanism {name!r}; registered: {sorted(_REGISTRY)}"
        ) from None


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def specs() -> Iterator[Mechanism]:
    _load()
    for n in sorted(_REGISTRY):
        yield _REGISTRY[n]


def mechanisms() -> list[dict[str, Any]]:
    """Every registered mechanism as a dict: name, family, capabilities, parameters."""
    return [s.describe() for s in specs()]


def _load() -> None:
    # importing the ops package imports every family module, which registers itself
    import longattn.ops  # noqa: F401


class FunctionalAttention(nn.Module):
    """nn.Module wrapper of a parameter-free mechanism (what ``build`` returns for it)."""

    def __init__(self, name: str, **params: Any) -> None:
        super().__init__()
        spec = get(name)
        spec.check_params(params)
        self.spec = spec
        self.params = {**spec.defaults(), **params}

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
        segment_ids: Tensor | None = None,
        sinks: Tensor | None = None,
        softcap: float | None = None,
        **extra: Any,
    ) -> Tensor:
        terms = self.spec.score_terms(sinks=sinks, softcap=softcap)

        def call(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None) -> Tensor:
            return self.spec.fn(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale,
                                **self.params, **extra, **terms)

        return run(self.spec, call, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                   segment_ids=segment_ids, params={**self.params, **extra})

    def extra_repr(self) -> str:
        return f"{self.spec.name}, " + ", ".join(f"{k}={v!r}" for k, v in self.params.items())


def build(name: str, *, heads: int, head_dim: int, **params: Any) -> nn.Module:
    """An ``nn.Module`` computing mechanism ``name`` on [B, H, N, D] tensors.

    Learned mechanisms get their own module (owning parameters/buffers); others are
    wrapped in :class:`FunctionalAttention`.
    """
    spec = get(name)
    if spec.module is not None:
        return spec.module(heads=heads, head_dim=head_dim, **params)
    return FunctionalAttention(name, **params)


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
    sinks: Tensor | None = None,
    softcap: float | None = None,
    **params: Any,
) -> Tensor:
    """Attention of ``q`` over ``k``/``v`` with the registered ``mechanism``.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. Grouped KV heads:
            H % Hkv == 0 and query head h reads kv head h // (H // Hkv) (SDPA's
            ``enable_gqa``, HF's ``repeat_kv``); mechanisms with ``gqa`` never repeat
            K/V in memory, the others get them repeated here.
        mechanism: a name from :func:`mechanisms`.
        causal: query i sees key j only if j <= i. With Nq < Nk (mechanisms with
            ``bottom_right``) the queries are the last Nq positions, so
            ``attention(q[:, :, -m:], k, v, causal=True)`` is the last m rows of the
            full call (a decode step over a KV cache).
        key_padding_mask: bool [B, Nk], True = a real token.
        scale: score scale, default 1/sqrt(D).
        segment_ids: integer [B, N]: documents packed in each row as runs of equal
            ids; each attends as if run alone (mechanisms with ``packed``).
        sinks: float [H], one learned logit per query head that joins the softmax
            denominator only: out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sinks[h]})
            (gpt-oss's ``s_aux``; differentiable). Mechanisms with ``sinks``.
        softcap: float c > 0: scores s -> c tanh(s / c) before the softmax (Gemma-2).
            Mechanisms with ``softcap``. Others raise a ValueError for either.
        **params: the mechanism's parameters; unknown ones raise TypeError.

    Returns:
        [B, H, Nq, Dv], in the dtype of ``q``.
    """
    spec = get(mechanism)
    spec.check_params(params)
    if causal and not spec.causal:
        raise ValueError(f"mechanism {mechanism!r} cannot be causal (causal=True was given)")
    full = {**spec.defaults(), **params}
    terms = spec.score_terms(sinks=sinks, softcap=softcap)

    def call(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None) -> Tensor:
        return spec.fn(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale, **full, **terms)

    return run(spec, call, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
               segment_ids=segment_ids, params=full)


#: Runner: replaces :func:`run` for the calls of some owners (same signature as run, no owner)
Runner = Callable[..., Tensor]
_ROUTES: ContextVar[Mapping[object, Runner]] = ContextVar("longattn_routes", default=MappingProxyType({}))
# route blocks open in any thread: while 0, run() reads no ContextVar (torch.compile cannot
# trace one); a compiled call inside a block takes a graph break, never the wrong route
_OPEN_ROUTES = 0


@contextmanager
def routed(owners: Iterable[object], runner: Runner) -> Iterator[None]:
    """Within the block, ``run(..., owner=o)`` for every ``o`` in ``owners`` returns
    ``runner(spec, call, q, k, v, causal=, key_padding_mask=, segment_ids=, params=)``
    instead of running ``call``; every other call of :func:`run` is unchanged.

    Scoped by a :class:`contextvars.ContextVar`: it holds in this thread (or asyncio
    task) only, until the block ends (also on error), and nests (an inner block adds
    owners or overrides theirs). Nothing is assigned to any module or object: this is
    how :class:`longattn.distributed.sequence_parallel` routes one model's attention
    layers (the owners: their :class:`longattn.layers.attention.HeadGroup` modules) to
    the sharded call while other models in the process run as usual. Cost: one dict
    copy per block, one lookup per routed call."""
    if not callable(runner):
        raise TypeError(f"runner must be callable, got {type(runner).__name__}")
    global _OPEN_ROUTES
    routes = dict(_ROUTES.get())
    routes.update(dict.fromkeys(owners, runner))
    token = _ROUTES.set(MappingProxyType(routes))
    _OPEN_ROUTES += 1
    try:
        yield
    finally:
        _OPEN_ROUTES -= 1
        _ROUTES.reset(token)


def run(
    spec: Mechanism,
    call: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    segment_ids: Tensor | None,
    params: dict[str, Any] | None = None,
    owner: object | None = None,
) -> Tensor:
    """``call(q, k, v, key_padding_mask)`` under the conventions of real models:
    grouped KV heads (repeated here for mechanisms without ``gqa``), causal with
    Nq < Nk (refused where the mechanism has no ``bottom_right``), and packed
    documents (``segment_ids``, mechanisms with ``packed``). A packed call checks its
    inputs with the same :func:`longattn.ops._checks.check_qkv` as the mechanisms
    (in :func:`longattn.ops.packing.packed_attention`, before the rows are cut into
    documents): the same errors and messages with and without ``segment_ids``.
    ``owner``: the calling layer; a :func:`routed` block may route its calls elsewhere."""
    if owner is not None and _OPEN_ROUTES:
        runner = _ROUTES.get().get(owner)
        if runner is not None:
            return runner(spec, call, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                          segment_ids=segment_ids, params=params)
    if all(isinstance(x, Tensor) and x.dim() == 4 for x in (q, k, v)):
        H, Hkv = q.shape[1], k.shape[1]
        if Hkv != H and not spec.gqa and Hkv >= 1 and H % Hkv == 0 and v.shape[1] == Hkv:
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        if causal and q.shape[2] != k.shape[2] and not spec.bottom_right:
            raise ValueError(
                f"mechanism {spec.name!r} cannot run causal with Nq ({q.shape[2]}) != Nk ({k.shape[2]}) "
                f"(a decode step over a cache): {spec.why_not_bottom_right}"
            )
    if segment_ids is None:
        return call(q, k, v, key_padding_mask)
    if not spec.packed:
        able = [s.name for s in specs() if s.packed]
        raise ValueError(f"segment_ids (packed documents) is not supported by mechanism {spec.name!r}; "
                         f"mechanisms that accept it: {able}")
    from longattn.ops.packing import packed_attention

    quantum = spec.length_quantum
    q_len = quantum(params or {}, causal) if quantum is not None else 1
    return packed_attention(call, q, k, v, segment_ids, causal=causal, key_padding_mask=key_padding_mask,
                            quantum=q_len)
