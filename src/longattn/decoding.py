"""Incremental (token-by-token) decoding for causal LM Transformers, and ``generate``.

Each self-attention head group of each layer keeps a decoding state, chosen by the
group's mechanism name in :data:`DECODE_STATES` (add one with
:func:`register_state`; no switch over names), else by its registry family in
:data:`FAMILY_STATES` (:func:`state_class`). :func:`prefill` feeds a whole prompt
(each state's :meth:`DecodeState.prefill`: the recurrent family's chunked forward,
token-by-token steps for the others), :func:`decode_step` one token:

=============  ==========================  ===========================  ==============
mechanism      state                       per-step cost                memory
=============  ==========================  ===========================  ==============
``full``       KV cache (:class:`KVCache`) O(t * D)                     O(t * D)
``local``      rolling window of the last  O(W * D), W = before + 1     O(W * D)
               ``before + 1`` keys, and    (+ sinks)                    (+ sinks)
               the ``global_idx`` (sink)
               keys (:class:`LocalWindowCache`)
``linear``     recurrent S = sum phi(k)v^T, O(D * Dv)                   O(D * Dv),
               z = sum phi(k)                                           constant in N
               (:class:`LinearState`, Katharopoulos et al. 2020)
``performer``  the module's own recurrent  O(F * Dv)                    O(F * Dv)
               step (:class:`ModuleStepState`
               over ``init_state``/``step``)
recurrent      S [B, h, Dk, Dv] per layer  O(Dk * Dv)                   O(Dk * Dv),
family         (:class:`RecurrentState`,                                constant in N
(by            chosen by ``spec.family``
``family``)    in :data:`FAMILY_STATES`);
               the prompt's final state
               from the chunked forward
every other    KV cache, the new query     O(keys it sees * D): a       O(t * D)
exact pattern; through the mechanism's     window or a few blocks,
select family  bottom-right causal path    not t; ``topk_blocks``
(nsa, dsa,     (:class:`PatternCache`),    adds O(t / block * D)
topk_blocks)   with ``topk_blocks``'       for its gate
               block summaries kept
               beside it
=============  ==========================  ===========================  ==============

Grouped KV heads (``kv_heads``) are cached at their own count: the caches hold
H / g heads and the query heads read them through SDPA's ``enable_gqa`` or the
engine, never a repeated copy.

Every state computes the same numbers as the parallel causal forward (tests hold
token-by-token logits equal to ``model(x)``). Models whose mechanisms have no
decoding state are still served by :func:`generate`: it falls back to re-running
the whole prefix every step (O(T) forwards; documented, never silent about
``use_cache=True``, which then raises ValueError).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.layers.attention import HeadGroup
from longattn.ops._checks import check_int

DECODE_STATES: dict[str, type["DecodeState"]] = {}
"""mechanism name -> decoding-state class."""


def register_state(name: str) -> Callable[[type["DecodeState"]], type["DecodeState"]]:
    """Class decorator: ``@register_state("local") class LocalWindowCache(DecodeState): ...``."""

    def deco(cls: type[DecodeState]) -> type[DecodeState]:
        if name in DECODE_STATES:
            raise ValueError(f"a decoding state for {name!r} is already registered")
        DECODE_STATES[name] = cls
        return cls

    return deco


class DecodeState(ABC):
    """Decoding state of one head group: ``step`` takes the new q, k, v [B, h, 1, D]
    at position ``pos`` and returns the new query's output [B, h, 1, Dv]."""

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        self.params = {**group.spec.defaults(), **group.params}
        self.scale = group.head_dim ** -0.5
        self.slopes = None if alibi_slopes is None else alibi_slopes[group.start:group.stop]

    @abstractmethod
    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor: ...

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, pos: int = 0) -> Tensor:
        """A prompt's q, k, v [B, h, T, D] at positions pos..pos+T-1 -> outputs [B, h, T, Dv],
        leaving the state after its last token. Default: :meth:`step` token by token;
        a state with a parallel form (the recurrent family's chunked forward) overrides it."""
        return torch.cat([self.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pos + t)
                          for t in range(q.shape[2])], dim=2)

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the state (for the O(window) / O(1) memory checks)."""


def _softmax_attend(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """The new queries q [B, h, 1, D] over every cached key (k, v may have fewer heads)."""
    work = torch.promote_types(q.dtype, torch.float32)
    mask = None if bias is None else bias.to(work)
    out = F.scaled_dot_product_attention(q.to(work), k.to(work), v.to(work), attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.to(q.dtype)


def _repeat_kv(x: Tensor, heads: int) -> Tensor:
    """One step's k or v [B, h_kv, 1, .] for each of ``heads`` query heads (a copy of
    one token: what the recurrent states need)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def _alibi_row(slopes: Tensor | None, pos: int, key_pos: Tensor) -> Tensor | None:
    if slopes is None:
        return None
    dist = (pos - key_pos).abs().to(torch.float32)            # [Nk]
    return -(slopes.to(key_pos.device)[None, :, None, None] * dist[None, None, None, :])


@register_state("full")
class KVCache(DecodeState):
    """All keys and values so far; exact causal softmax attention of the new query."""

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        super().__init__(group, alibi_slopes)
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        key_pos = torch.arange(pos + 1 - self.k.shape[2], pos + 1, device=k.device)
        return _softmax_attend(q, self.k, self.v, self.scale, _alibi_row(self.slopes, pos, key_pos))

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


def _global_positions(value: Any) -> frozenset[int]:
    """``global_idx`` (an int, a sequence, a range or a tensor of positions) as a set."""
    if isinstance(value, int):
        return frozenset((value,))
    return frozenset(int(i) for i in (value.tolist() if hasattr(value, "tolist") else value))


@register_state("local")
class LocalWindowCache(DecodeState):
    """Causal local window with optional global tokens (``global_idx``): query i sees
    j in [i - before, i], every global j <= i, and every j <= i when i is global.

    Kept per head group: the last ``before + 1`` keys and the global ones, plus any key
    a global query still to come will read (none once the last global position has
    passed). With leading sink tokens, ``global_idx = range(sinks)`` (StreamingLLM, Xiao
    et al. 2023; HF's :class:`longattn.integrations.transformers.SinkWindowCache`), that
    is the first ``sinks`` and the last ``before + 1`` keys from the first step on:
    memory O((sinks + before) * D), flat however long the generation; a step costs
    O((sinks + before) * D). Exact: equals the parallel forward.
    """

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        super().__init__(group, alibi_slopes)
        self.window = int(self.params["before"]) + 1
        self.globals = _global_positions(self.params.get("global_idx", ()))
        self.last_global = max(self.globals, default=-1)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.key_pos: Tensor | None = None

    def _window_or_global(self, key_pos: Tensor, pos: int) -> Tensor:
        """bool [n]: key in the window of a query at ``pos``, or a global token."""
        seen = key_pos > pos - self.window
        if self.globals:
            seen |= torch.isin(key_pos, torch.tensor(sorted(self.globals), device=key_pos.device))
        return seen

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        new_pos = torch.tensor([pos], device=k.device)
        k_all = k if self.k is None else torch.cat((self.k, k), dim=2)
        v_all = v if self.v is None else torch.cat((self.v, v), dim=2)
        key_pos = new_pos if self.key_pos is None else torch.cat((self.key_pos, new_pos))
        bias = _alibi_row(self.slopes, pos, key_pos)
        near = self._window_or_global(key_pos, pos)
        if pos not in self.globals and not bool(near.all()):  # keys held for a global query to come
            hide = torch.zeros(near.shape, dtype=torch.float32, device=k.device).masked_fill(~near, -math.inf)
            hide = hide[None, None, None]
            bias = hide if bias is None else bias + hide
        out = _softmax_attend(q, k_all, v_all, self.scale, bias)
        if self.last_global <= pos:   # no global query to come: keep what this query could read
            # clone: drop the larger buffer
            k_all, v_all, key_pos = k_all[:, :, near].clone(), v_all[:, :, near].clone(), key_pos[near]
        self.k, self.v, self.key_pos = k_all, v_all, key_pos
        return out

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": lambda x: F.elu(x) + 1.0,
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}
"""Deterministic feature maps phi of causal linear attention, by name."""


@register_state("linear")
class LinearState(DecodeState):
    """Recurrent causal linear attention: S += phi(k) v^T, z += phi(k);
    out = phi(q)^T S / phi(q)^T z (0 where the normaliser is 0), with q, k unscaled as in
    the parallel form (``scale=None``). Memory O(D * Dv), independent of N."""

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        super().__init__(group, alibi_slopes)
        fm = self.params.get("feature_map", "elu")
        if fm not in FEATURE_MAPS:
            raise ValueError(f"no decoding state for linear attention with feature_map={fm!r}; "
                             f"known: {sorted(FEATURE_MAPS)}")
        self.phi = FEATURE_MAPS[fm]
        self.S: Tensor | None = None
        self.z: Tensor | None = None

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        work = torch.promote_types(q.dtype, torch.float32)
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        fq, fk = self.phi(q.to(work)), self.phi(k.to(work))          # [B, h, 1, D]
        kv = fk.transpose(-1, -2) @ v.to(work)                         # [B, h, D, Dv]
        self.S = kv if self.S is None else self.S + kv
        self.z = fk[:, :, 0] if self.z is None else self.z + fk[:, :, 0]
        num = fq @ self.S                                              # [B, h, 1, Dv]
        den = (fq[:, :, 0] * self.z).sum(-1)[..., None, None]          # [B, h, 1, 1]
        safe = torch.where(den == 0, torch.ones_like(den), den)
        return torch.where(den == 0, torch.zeros_like(num), num / safe).to(q.dtype)

    def nbytes(self) -> int:
        return 0 if self.S is None else self.S.nbytes + self.z.nbytes


@register_state("performer")
class ModuleStepState(DecodeState):
    """State of a learned mechanism whose module offers ``init_state(batch)`` and
    ``step(state, q, k, v) -> (out, state)`` (the kernel family's recurrent form:
    Performer keeps S, z and a running log-scale; memory O(F * Dv))."""

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        super().__init__(group, alibi_slopes)
        if group.impl is None or not hasattr(group.impl, "step") or not hasattr(group.impl, "init_state"):
            raise ValueError(f"mechanism {group.name!r} has no module with init_state/step for decoding")
        self.module = group.impl
        self.state: Any = None

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        if self.state is None:
            self.state = self.module.init_state(q.shape[0], v.shape[-1], device=q.device)
        out, self.state = self.module.step(self.state, q, _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1]))
        return out

    def nbytes(self) -> int:
        if self.state is None:
            return 0
        return sum(t.nbytes for t in vars(self.state).values() if isinstance(t, Tensor))


def _recurrent_gates(group: HeadGroup) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]:
    """``gates(k, v) -> (v, g, beta)`` of a recurrent head group on [B, h, T, .] tokens:
    the learned module's gates (ssd's dt folded into v, as its forward does), or the
    functional form's fixed ones (retention's gamma; no decay and beta = 1 otherwise)."""
    from longattn.ops.recurrent.api import KINDS, _retention_g

    impl, params = group.impl, {**group.spec.defaults(), **group.params}
    if impl is not None:
        def learned(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            g, beta, dt = impl.gates(k.float() if k.dtype in (torch.float16, torch.bfloat16) else k)
            return (v if dt is None else v * dt[..., None].to(v.dtype)), g, beta
        return learned
    kind = KINDS[group.name]
    given = sorted(n for n in ("g", "beta") if params.get(n) is not None)
    if given:
        raise ValueError(f"mechanism {group.name!r}: per-token gates {given} given as tensors cannot "
                         "continue past the prompt; use the learned module form to decode")

    def fixed(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        B, H, T = v.shape[:3]
        if "gamma" in params:
            g = _retention_g(params["gamma"], B, H, T, k)
        else:
            g = k.new_zeros((B, H, T, k.shape[-1]) if kind.per_channel else (B, H, T))
        return v, g, (k.new_ones(B, H, T) if kind.delta else None)
    return fixed


class RecurrentState(DecodeState):
    """The recurrent family's state (Gated DeltaNet, KDA, Mamba-2 SSD, GLA, RetNet: see
    :mod:`longattn.ops.recurrent`): one S [B, h, Dk, Dv] per head group, no KV cache.

    :meth:`prefill` runs the chunked forward over the prompt with
    ``output_final_state=True`` (O(T C D + T D^2)) and keeps its final state;
    :meth:`step` is the one-token recurrence, O(Dk Dv) time and memory whatever the
    position. Exact: equals the parallel forward (tests hold the logits equal)."""

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        super().__init__(group, alibi_slopes)
        from longattn.ops.recurrent.api import KINDS

        if alibi_slopes is not None:
            raise ValueError(f"mechanism {group.name!r} takes no ALiBi bias; no decoding state with alibi")
        impl = group.impl
        self.kind = KINDS[impl.kind if impl is not None else group.name]
        self.chunk_size = int(impl.chunk_size if impl is not None else self.params.get("chunk_size", 64))
        l2 = impl.use_qk_l2norm if impl is not None else self.params.get("use_qk_l2norm")
        self.use_qk_l2norm = self.kind.delta if l2 is None else bool(l2)
        self.gates = _recurrent_gates(group)
        self.S: Tensor | None = None
        self.mix = getattr(impl, "mix", None)  # the module's short convolutions (learned form)
        self.conv_width = int(getattr(impl, "short_conv", 0) or 0)
        self.finish = getattr(impl, "finish", lambda o, q: o)  # the module's output norm and gate (learned form)
        self.history: tuple[Tensor, Tensor, Tensor] | None = None  # raw q, k, v of the last K-1 tokens

    def _convolve(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v through the module's short convolutions, continuing from the tokens before
        (their raw q, k, v kept in ``history``: O(K D) per head, whatever the position)."""
        K = self.conv_width
        if self.mix is None or not K:
            return q, k, v
        raw = (q, k, v)
        out = self.mix(q, k, v, self.history)
        seen = raw if self.history is None else tuple(torch.cat([h, x], 2) for h, x in zip(self.history, raw))
        pad = [torch.nn.functional.pad(x, (0, 0, max(0, K - 1 - x.shape[2]), 0)) for x in seen]
        self.history = tuple(x[:, :, x.shape[2] - (K - 1):] for x in pad)  # type: ignore[assignment]
        return out

    def _inputs(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """(q, k, v, g, beta) of new tokens as the module's forward makes them: kv heads
        repeated, the gates read from the key before the short convolution."""
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        raw_k = k
        q, k, v = self._convolve(q, k, v)
        v, g, beta = self.gates(raw_k, v)
        return q, k, v, g, beta

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, pos: int = 0) -> Tensor:
        from longattn.ops.recurrent.api import _run

        raw_q = q
        q, k, v, g, beta = self._inputs(q, k, v)
        out, self.S = _run(self.kind, q, k, v, g, beta, scale=None, initial_state=self.S, output_final_state=True,
                           use_qk_l2norm=self.use_qk_l2norm, segment_ids=None, chunk_size=self.chunk_size)
        return self.finish(out, raw_q)

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        from longattn.ops.recurrent.api import _step

        raw_q = q
        q, k, v, g, beta = self._inputs(q, k, v)
        out, self.S = _step(self.kind, q, k, v, g, beta, self.S, None, self.use_qk_l2norm)
        return self.finish(out, raw_q)

    def nbytes(self) -> int:
        hist = 0 if self.history is None else sum(h.nbytes for h in self.history)
        return hist + (0 if self.S is None else self.S.nbytes)


FAMILY_STATES: dict[str, type[DecodeState]] = {"recurrent": RecurrentState}
"""registry family -> decoding-state class, for mechanisms without an entry in
:data:`DECODE_STATES` (the choice comes from ``spec.family``, never from the name)."""


def state_class(group: HeadGroup) -> type[DecodeState] | None:
    """The decoding state of a head group: its name's entry in :data:`DECODE_STATES`,
    else its family's in :data:`FAMILY_STATES`, else None (no state: ``generate``
    re-runs the prefix)."""
    return DECODE_STATES.get(group.name) or FAMILY_STATES.get(group.spec.family)


class PatternCache(DecodeState):
    """Every key and value so far; the new query goes through the mechanism's own
    bottom-right causal path (query = the last position), which touches only the keys
    that query can see: a step of a 512-key window costs the window at any t. Exact:
    the same pattern as the parallel forward (random blocks are prefix-stable). The keys
    and values live in buffers that double when full (amortised O(D) per appended
    token, not a copy of the whole cache per step); a mechanism with a registry
    ``key_state`` (``topk_blocks``: its block summaries) also keeps that state here and
    gets it on every step."""

    def __init__(self, group: HeadGroup, alibi_slopes: Tensor | None = None) -> None:
        super().__init__(group, alibi_slopes)
        if alibi_slopes is not None:
            raise ValueError(f"mechanism {group.name!r} takes no ALiBi bias; no decoding state with alibi")
        self.group = group
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.t = 0
        make = group.spec.key_state
        self.key_state = None if make is None else make(self.params)

    @property
    def k(self) -> Tensor | None:
        """The keys so far [B, h_kv, t, D] (a view of the buffer)."""
        return None if self._k is None else self._k[:, :, : self.t]

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.t]

    def _append(self, k: Tensor, v: Tensor) -> None:
        n = k.shape[2]
        if self._k is None or self.t + n > self._k.shape[2]:
            cap = max(self.t + n, 2 * (0 if self._k is None else self._k.shape[2]), 16)
            grown = [x.new_empty(*x.shape[:2], cap, x.shape[3]) for x in (k, v)]
            if self._k is not None:
                grown[0][:, :, : self.t] = self.k
                grown[1][:, :, : self.t] = self.v
            self._k, self._v = grown
        self._k[:, :, self.t : self.t + n] = k
        self._v[:, :, self.t : self.t + n] = v
        self.t += n

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        self._append(k, v)
        extra = {} if self.key_state is None else {"key_state": self.key_state}
        return self.group(q, self.k, self.v, causal=True, key_padding_mask=None, **extra)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, pos: int = 0) -> Tensor:
        """The whole prompt in one bottom-right causal call (its rows are those token by
        token would give), not T steps."""
        return self.step(q, k, v, pos)

    def nbytes(self) -> int:
        return 0 if self._k is None else self._k[:, :, : self.t].nbytes + self._v[:, :, : self.t].nbytes


#: registry families whose mechanisms decode over a :class:`PatternCache` (those with a
#: bottom-right causal path): the exact patterns, and select-then-attend (``topk_blocks``
#: with its kept block summaries, ``nsa``, ``dsa``)
CACHE_FAMILIES = ("pattern", "select")


def _register_pattern_states() -> None:
    """A :class:`PatternCache` for every mechanism of :data:`CACHE_FAMILIES` with a
    bottom-right path and without its own state."""
    from longattn import registry

    for spec in registry.specs():
        if spec.family in CACHE_FAMILIES and spec.bottom_right and spec.name not in DECODE_STATES:
            DECODE_STATES[spec.name] = PatternCache


_register_pattern_states()


# --------------------------------------------------------------------------------------
def _attn_modules(model: nn.Module) -> list:
    return [blk.attn for blk in model.blocks]


def _stateless(model: nn.Module) -> list[str]:
    """Names of the mechanisms of ``model`` that have no decoding state (sorted, unique)."""
    return sorted({g.name for a in _attn_modules(model) for g in a.groups if state_class(g) is None})


def supports_cache(model: nn.Module) -> bool:
    """True when every head group of every layer has a decoding state."""
    return not _stateless(model)


def _check_lm(model: nn.Module) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise TypeError(f"generate needs a longattn.model.Transformer, got {type(model).__name__}")
    if cfg.head != "lm" or not cfg.is_causal or cfg.input != "tokens":
        raise ValueError("generate needs a causal token LM: ModelConfig(head='lm', causal=True, input='tokens')")


def init_cache(model: nn.Module) -> list[list[DecodeState]]:
    """Fresh decoding states: one list per layer, one state per head group."""
    _check_lm(model)
    cache = []
    for attn in _attn_modules(model):
        missing = [g.name for g in attn.groups if state_class(g) is None]
        if missing:
            raise ValueError(f"no decoding state for mechanism(s) {missing}; known: {sorted(DECODE_STATES)} "
                             f"and the families {sorted(FAMILY_STATES)}")
        slopes = attn.alibi_slopes if attn.use_alibi else None
        cache.append([state_class(g)(g, slopes) for g in attn.groups])  # type: ignore[misc]
    return cache


@torch.no_grad()
def decode_step(model: nn.Module, tokens: Tensor, cache: list[list[DecodeState]], pos: int) -> Tensor:
    """Feed tokens [B] at position ``pos``; return next-token logits [B, vocab]. Eval mode expected."""
    h = model.embed(tokens.reshape(-1, 1), offset=pos)
    for blk, states in zip(model.blocks, cache):
        h = blk.step(h, states, pos)
    if model.final_norm is not None:
        h = model.final_norm(h)
    return model.head(h)[:, 0]


class _Prefilling:
    """Routes a block's per-group ``step`` calls to the state's :meth:`DecodeState.prefill`
    (the blocks' step path then carries a whole prompt [B, T, dim])."""

    def __init__(self, state: DecodeState) -> None:
        self.state = state

    def step(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        return self.state.prefill(q, k, v, pos)


@torch.no_grad()
def prefill(model: nn.Module, tokens: Tensor, cache: list[list[DecodeState]], pos: int = 0) -> Tensor:
    """Feed a prompt ``tokens`` [B, T] at positions pos..pos+T-1 through the states, layer
    by layer; return the logits [B, T, vocab]. A recurrent state runs its chunked
    forward and keeps the final state (no per-token loop); the others step token by
    token inside each layer. Eval mode expected."""
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
    h = model.embed(tokens, offset=pos)
    for blk, states in zip(model.blocks, cache):
        h = blk.step(h, [_Prefilling(s) for s in states], pos)
    if model.final_norm is not None:
        h = model.final_norm(h)
    return model.head(h)


def _sample(logits: Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> Tensor:
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_generate_args(prompt: object, max_new_tokens: object, temperature: object, top_k: object,
                         use_cache: object, generator: object) -> None:
    """TypeError/ValueError naming the argument of :func:`generate` that is wrong."""
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be an int64 tensor [B, T], got {type(prompt).__name__}")
    if prompt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt must be an integer (int64) tensor [B, T], got dtype {prompt.dtype}")
    if prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int64 [B, T] with B, T >= 1, got shape {tuple(prompt.shape)}")
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
    if top_k is not None:
        check_int("top_k", top_k, minimum=1)
    if use_cache is not None and not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be None, True or False, got {use_cache!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, *, use_cache: bool | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Continue ``prompt`` [B, T] (int64) by ``max_new_tokens`` tokens -> [B, T + new].

    ``temperature=0`` is greedy; ``top_k`` keeps the k likeliest tokens. With
    ``use_cache`` None (default) the per-layer decoding states are used when every
    mechanism has one, else the prefix is re-run each step; ``use_cache=True`` on a
    model without states raises ValueError; with states the prompt goes through
    :func:`prefill` (a recurrent state: one chunked forward). The model runs in eval mode (restored after).
    """
    _check_lm(model)
    _check_generate_args(prompt, max_new_tokens, temperature, top_k, use_cache, generator)
    cached = supports_cache(model) if use_cache is None else use_cache
    if cached and not supports_cache(model):
        missing = _stateless(model)
        raise ValueError(f"use_cache=True but mechanism(s) {missing} have no decoding state")
    was_training = model.training
    model.eval()
    try:
        out = prompt
        if cached:
            cache = init_cache(model)
            logits = prefill(model, prompt, cache)[:, -1]
            for i in range(max_new_tokens):
                nxt = _sample(logits, temperature, top_k, generator)
                out = torch.cat((out, nxt[:, None]), dim=1)
                if i + 1 < max_new_tokens:
                    logits = decode_step(model, nxt, cache, out.shape[1] - 1)
        else:
            for _ in range(max_new_tokens):
                logits = model(out)[:, -1]
                out = torch.cat((out, _sample(logits, temperature, top_k, generator)[:, None]), dim=1)
        return out
    finally:
        model.train(was_training)


def incremental_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits [B, T, vocab] of ``x`` [B, T] computed token by token through the states
    (what ``generate`` sees); equals ``model(x)`` in eval mode."""
    _check_lm(model)
    cache = init_cache(model)
    return torch.stack([decode_step(model, x[:, t], cache, t) for t in range(x.shape[1])], dim=1)
