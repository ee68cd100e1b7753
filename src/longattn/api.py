"""The functional API above the registry table: :func:`attention`, :func:`build`,
:func:`run` (the conventions of real models around any mechanism's call) and
:func:`routed` (the one switchboard that sends some layers' calls elsewhere).

:mod:`longattn.registry` is the table (name -> :class:`~longattn.registry.Mechanism`)
and imports nothing of longattn; this module sits above it and imports
:mod:`longattn.ops`, whose family modules register every mechanism, so the table is
complete whenever this module (or the package, ``import longattn``) is imported.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import Tensor, nn

from longattn.registry import Mechanism, get, specs

__all__ = ["attention", "build", "run", "routed", "bind", "FunctionalAttention", "Runner"]

#: a mechanism's call on (q, k, v, key_padding_mask), all else bound
Call = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def bind(spec: Mechanism, params: Mapping[str, Any], *, causal: bool, scale: float | None,
         sinks: Tensor | None = None, softcap: float | None = None, key_state: Any = None) -> Call:
    """``spec.fn`` with everything but q, k, v and the key mask bound: the ``call`` that
    :func:`run` takes. ``params`` are the full parameters (:meth:`Mechanism.resolve`);
    ``sinks``/``softcap``/``key_state`` are refused (ValueError) where ``spec`` lacks them."""
    terms = spec.score_terms(sinks=sinks, softcap=softcap)
    if key_state is not None:
        if spec.key_state is None:
            able = [s.name for s in specs() if s.key_state is not None]
            raise ValueError(f"key_state is not supported by mechanism {spec.name!r}; mechanisms that keep "
                             f"state beside a KV cache: {able}")
        terms["key_state"] = key_state

    def call(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None) -> Tensor:
        return spec.fn(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale, **params, **terms)

    return call


class FunctionalAttention(nn.Module):
    """nn.Module wrapper of a parameter-free mechanism (what ``build`` returns for it).
    ``forward`` takes :func:`attention`'s keywords; extra keywords are per-call parameters."""

    def __init__(self, name: str, **params: Any) -> None:
        super().__init__()
        spec = get(name)
        spec.check_params(params)
        self.spec = spec
        self.params = {**spec.defaults(), **params}

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                key_padding_mask: Tensor | None = None, scale: float | None = None,
                segment_ids: Tensor | None = None, sinks: Tensor | None = None,
                softcap: float | None = None, **extra: Any) -> Tensor:
        """q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv] -> [B, H, Nq, Dv] (see :func:`attention`)."""
        params = {**self.params, **extra}
        call = bind(self.spec, params, causal=causal, scale=scale, sinks=sinks, softcap=softcap)
        return run(self.spec, call, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                   segment_ids=segment_ids, params=params)

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


def attention(q: Tensor, k: Tensor, v: Tensor, mechanism: str = "local", *, causal: bool = False,
              key_padding_mask: Tensor | None = None, scale: float | None = None,
              segment_ids: Tensor | None = None, sinks: Tensor | None = None,
              softcap: float | None = None, key_state: Any = None, **params: Any) -> Tensor:
    """Attention of ``q`` over ``k``/``v`` with the registered ``mechanism``.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. Grouped KV heads:
            H % Hkv == 0 and query head h reads kv head h // (H // Hkv) (SDPA's
            ``enable_gqa``, HF's ``repeat_kv``); mechanisms with ``gqa`` never repeat
            K/V in memory, the others get them repeated here.
        mechanism: a name from :func:`longattn.mechanisms`.
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
        key_state: the state a KV cache keeps for this mechanism beside ``k``
            (``registry.get(mechanism).key_state(params)``, e.g. ``topk_blocks``' block
            summaries): k must be that cache's keys, the earlier ones unchanged; the
            state is updated with the new ones. Not with ``segment_ids``.
        **params: the mechanism's parameters; unknown ones raise TypeError.

    Returns:
        [B, H, Nq, Dv], in the dtype of ``q``. Cost: the mechanism's own.
    """
    spec = get(mechanism)
    full = spec.resolve(params, causal=causal)
    if key_state is not None and segment_ids is not None:
        raise ValueError("key_state (state kept beside one KV cache) cannot be used with segment_ids: packed "
                         "documents are separate key sequences")
    call = bind(spec, full, causal=causal, scale=scale, sinks=sinks, softcap=softcap, key_state=key_state)
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


def _model_conventions(spec: Mechanism, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """k, v with grouped KV heads repeated for mechanisms without ``gqa``; a ValueError
    for causal Nq != Nk where the mechanism has no ``bottom_right`` path."""
    if all(isinstance(x, Tensor) and x.dim() == 4 for x in (q, k, v)):
        H, Hkv = q.shape[1], k.shape[1]
        if Hkv != H and not spec.gqa and Hkv >= 1 and H % Hkv == 0 and v.shape[1] == Hkv:
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        if causal and q.shape[2] != k.shape[2] and not spec.bottom_right:
            raise ValueError(
                f"mechanism {spec.name!r} cannot run causal with Nq ({q.shape[2]}) != Nk ({k.shape[2]}) "
                f"(a decode step over a cache): {spec.why_not_bottom_right}"
            )
    return k, v


def run(spec: Mechanism, call: Call, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
        key_padding_mask: Tensor | None, segment_ids: Tensor | None,
        params: dict[str, Any] | None = None, owner: object | None = None) -> Tensor:
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
    k, v = _model_conventions(spec, q, k, v, causal)
    if segment_ids is None:
        return call(q, k, v, key_padding_mask)
    if not spec.packed:
        able = [s.name for s in specs() if s.packed]
        raise ValueError(f"segment_ids (packed documents) is not supported by mechanism {spec.name!r}; "
                         f"mechanisms that accept it: {able}")
    quantum = spec.length_quantum
    q_len = quantum(params or {}, causal) if quantum is not None else 1
    return packed_attention(call, q, k, v, segment_ids, causal=causal, key_padding_mask=key_padding_mask,
                            quantum=q_len)


# Imported last, on purpose: importing longattn.ops imports every family module, which
# registers its mechanisms in the table (and some of them import this module back, so
# its functions must exist by then).
import longattn.ops  # noqa: E402,F401  (registers every mechanism)
from longattn.ops.packing import packed_attention  # noqa: E402
