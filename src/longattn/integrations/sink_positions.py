"""StreamingLLM positions for attention sinks: ``local`` + sinks past a model's trained length.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks", section
3.2, give positions *within the cache*: the ``S`` sink tokens sit at cache positions
0..S-1 and the window right after them, so no query sees a sink further than ``W + S``
positions away. For one forward over a long sequence (``local(before=W, after=0)`` with
sinks ``global_idx = (0, .., S-1)``, causal) that is, for the query at position ``i``:

- the window keys ``i - W <= j <= i`` keep their true relative distance;
- a sink ``s < i - W`` (outside the window) is scored as if the query stood at
  ``P_i = min(i, W + S)``: relative distance ``P_i - s`` instead of ``i - s``.

Hugging Face applies RoPE before the attention function runs. Rotations compose, so the
sink score is ``(R(P_i - i) q_i) . k_s``: the already-rotated query turned once more by
the (non-positive) offset ``P_i - i`` with the model's own inverse frequencies and
``rotate_half`` convention (a pure rotation: the model's ``attention_scaling`` is already
in q). :func:`local_with_cache_sinks` computes the row exactly: the window part (the
pattern engine, O(N W D)) and the shifted-sink part (dense [N, S], O(N S D)) merged by
their log-sum-exp in one softmax; never an N x N tensor; differentiable in q, the shifted
q, k and v (a hand-written backward given the merged output and lse).

Decoding over :class:`longattn.integrations.transformers.SinkWindowCache` gives the same
logits as the one forward: its keys are the sinks then the last ``W`` keys, so the query
stands at key index ``S + W`` (every sink outside its window) while its true position
``t`` (``position_ids``) sets the offset ``min(t, W + S) - t``. With the default
``DynamicCache`` the key index is the position, which is the same computation.

Use it through :func:`longattn.integrations.transformers.register`::

    register("local", before=511, after=0, global_idx=(0, 1, 2, 3), sink_positions="cache")
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from longattn.ops._checks import default_scale
from longattn.ops._softmax import acc_dtype, merge_by_lse
from longattn.ops.pattern.engine import engine_backward, engine_forward
from longattn.ops.pattern.plan import BAND_QUERY_TILE, BAND_QUERY_TILE_BWD, _cached_plan, _kv_groups
from longattn.patterns import Local

#: the values of ``register(..., sink_positions=...)``
SINK_POSITIONS = ("text", "cache")
#: model types whose RoPE is Llama's (rotate_half over two halves, q and k rotated alike)
ROTATE_HALF_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
#: rope types whose frequencies depend on the sequence length (not one fixed rotation)
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def check_choice(mechanism: Any, params: Mapping[str, Any]) -> tuple[int, int]:
    """(window ``before``, sink count ``S``) of a ``sink_positions="cache"`` registration;
    ValueError naming ``sink_positions`` for anything but causal ``local`` with leading
    sinks ``global_idx = (0, .., S-1)``."""
    if mechanism != "local":
        what = mechanism if isinstance(mechanism, str) else "a layer-type mapping"
        raise ValueError(f"sink_positions='cache' applies to mechanism 'local' with sink tokens (global_idx), "
                         f"passed by name; got {what!r}")
    sinks = params.get("global_idx", ())
    if isinstance(sinks, int) and not isinstance(sinks, bool):
        sinks = (sinks,)
    if not isinstance(sinks, (tuple, list)) or not sinks:
        raise ValueError(f"sink_positions='cache' needs sink tokens: pass global_idx=(0, .., S-1), got "
                         f"global_idx={params.get('global_idx', ())!r}")
    if list(sinks) != list(range(len(sinks))):
        raise ValueError(f"sink_positions='cache' needs the sinks to be the leading tokens global_idx=(0, .., S-1) "
                         f"(StreamingLLM), got global_idx={tuple(sinks)!r}")
    before, after = params.get("before"), params.get("after", 0)
    if after != 0:  # left out: the layers are causal anyway (a non-causal one is refused)
        raise ValueError(f"sink_positions='cache' needs a causal window: after=0, got after={after!r}")
    if not isinstance(before, int) or isinstance(before, bool) or before < 0:
        raise ValueError(f"sink_positions='cache' needs an int window before >= 0, got before={before!r}")
    extra = sorted(set(params) - {"before", "after", "global_idx"})
    if extra:
        raise ValueError(f"sink_positions='cache' takes local's before, after and global_idx only, got {extra}")
    return before, len(sinks)


# ----------------------------------------------------------------------------- the op


def _sink_part(qs: Tensor, ks: Tensor, vs: Tensor, vis: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Dense attention of the shifted queries over the sinks: (out [B, H, Nq, Dv], lse
    [B, H, Nq, 1], masked scores [B, Hkv, g, Nq, S]), in qs's dtype (the accumulation
    dtype). qs [B, H, Nq, D]; ks, vs [B, Hkv, S, .]; vis bool [Nq, S]. A row with no
    visible sink: out 0, lse -inf. Cost O(Nq S D)."""
    B, H, Nq, D = qs.shape
    Hkv = ks.shape[1]
    qg = qs.view(B, Hkv, H // Hkv, Nq, D)
    s = torch.matmul(qg, ks.unsqueeze(2).transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(torch.isneginf(lse), 0.0, torch.exp(s - lse))
    out = torch.matmul(p, vs.unsqueeze(2))
    return out.view(B, H, Nq, -1), lse.view(B, H, Nq, 1), s


def _plans(H: int, Hkv: int, before: int, nk: int, nq: int, tile: int) -> tuple[list[tuple], bool]:
    """The pattern engine's head-group plans of causal ``Local(before, 0)`` for the last
    ``nq`` of ``nk`` positions (bottom-right), and whether they write every row."""
    rows = (nk - nq, nk)
    groups = [(h0, nh, kh0, nkh, _cached_plan(p, nk, nh, True, tile, rows, None, False))
              for h0, nh, kh0, nkh, p in _kv_groups(Local(before, 0), H, Hkv)]
    return [(*g[:4], g[4][0]) for g in groups], all(g[4][1] for g in groups)


class _CacheSinks(torch.autograd.Function):
    """Window (pattern engine) + shifted sinks (dense), one softmax; backward given the
    merged (out, lse): the exact gradient of each part (inputs q, qs, k, v, before, S, scale)."""

    @staticmethod
    def forward(ctx, q, qs, k, v, before: int, S: int, scale: float):  # type: ignore[override]
        H, Hkv, nq, nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        groups, written = _plans(H, Hkv, before, nk, nq, BAND_QUERY_TILE)
        Ow, Lw, opts = engine_forward(q, k, v, groups, None, scale, written)
        rows = torch.arange(nk - nq, nk, device=q.device)
        vis = torch.arange(S, device=q.device)[None, :] < (rows - before)[:, None]
        acc = Lw.dtype
        Os, Ls, _ = _sink_part(qs.to(acc), k[:, :, :S].to(acc), v[:, :, :S].to(acc), vis, scale)
        O, L = merge_by_lse(torch.stack([Ow, Os]), torch.stack([Lw, Ls])[..., 0], 0)
        out = O.to(q.dtype)
        ctx.save_for_backward(q, qs, k, v, out, L.unsqueeze(-1), vis)
        ctx.cfg = (before, S, scale, opts)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, qs, k, v, out, L, vis = ctx.saved_tensors
        before, S, scale, opts = ctx.cfg
        groups, _ = _plans(q.shape[1], k.shape[1], before, k.shape[2], q.shape[2], BAND_QUERY_TILE_BWD)
        dq, dk, dv = engine_backward(dout, q, k, v, out, L, groups, None, scale, opts)
        acc = L.dtype
        B, H, nq, D = q.shape
        Hkv = k.shape[1]
        ks, vs, qa = k[:, :, :S].to(acc), v[:, :, :S].to(acc), qs.to(acc)
        _, _, s = _sink_part(qa, ks, vs, vis, scale)
        Lg = L.view(B, Hkv, H // Hkv, nq, 1)
        p = torch.where(torch.isneginf(s) | torch.isneginf(Lg), 0.0, torch.exp(s - Lg))
        do = dout.to(acc).view(B, Hkv, H // Hkv, nq, -1)
        delta = (do * out.to(acc).view_as(do)).sum(-1, keepdim=True)
        ds = p * (torch.matmul(do, vs.unsqueeze(2).transpose(-1, -2)) - delta)
        dqs = torch.matmul(ds, ks.unsqueeze(2)) * scale
        dk[:, :, :S] += (torch.matmul(ds.transpose(-1, -2), qa.view(B, Hkv, H // Hkv, nq, D)) * scale).sum(2)
        dv[:, :, :S] += torch.matmul(p.transpose(-1, -2), do).sum(2)
        return (dq.to(q.dtype), dqs.view(B, H, nq, D).to(qs.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None)


def local_with_cache_sinks(q: Tensor, q_shifted: Tensor, k: Tensor, v: Tensor, *, before: int, sinks: int,
                           scale: float | None = None) -> Tensor:
    """Causal ``local(before, after=0)`` with ``sinks`` leading sink keys whose scores use
    ``q_shifted`` (StreamingLLM cache positions, module docstring).

    Query row r is key index ``i = Nk - Nq + r`` (bottom-right). It sees keys
    ``i - before <= j <= i`` scored with ``q`` and sinks ``s < min(sinks, i - before)``
    scored with ``q_shifted``, all in one softmax.

    Args:
        q, q_shifted: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] (H % Hkv == 0,
            grouped heads never repeated).
        before: window keys before the query, >= 0. sinks: leading sink keys, >= 1.
        scale: score scale (default 1/sqrt(D)).

    Returns [B, H, Nq, Dv]. Cost O(Nq (before + sinks) D), memory O((Nq + Nk) D + Nq sinks);
    differentiable in q, q_shifted, k and v.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q_shifted.shape != q.shape:
        raise ValueError(f"q, q_shifted [B, H, Nq, D], k, v [B, Hkv, Nk, .]: got q {tuple(q.shape)}, q_shifted "
                         f"{tuple(q_shifted.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, nq, D = q.shape
    if k.shape[0] != B or k.shape[-1] != D or v.shape[:3] != k.shape[:3] or H % k.shape[1] or nq > k.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} (B, D, "
                         "H % Hkv == 0, Nq <= Nk)")
    if v.shape[-1] != D:
        raise ValueError(f"local_with_cache_sinks needs the value head size equal to D={D}, got {v.shape[-1]}")
    for arg, val, low in (("before", before, 0), ("sinks", sinks, 1)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {val!r}")
    s = default_scale(scale, D)
    S = min(sinks, k.shape[2])
    q, qs, k, v = (x.contiguous() for x in (q, q_shifted, k, v))
    return _CacheSinks.apply(q, qs, k, v, before, S, s)


# ----------------------------------------------------------------------------- RoPE


@dataclass(frozen=True)
class RopeShift:
    """A pure RoPE rotation by a position offset in a model's convention.

    Attributes:
        inv_freq: float64 [D / 2], the model's inverse frequencies.
        rotate_half: the model's ``rotate_half`` (Llama: (x1, x2) -> (-x2, x1)).
    """

    inv_freq: Tensor
    rotate_half: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor, delta: Tensor) -> Tensor:
        """``x`` [B, H, N, D] turned by ``delta`` positions (int [B or 1, N]), in
        ``acc_dtype(x.dtype)``: x cos + rotate_half(x) sin, angles delta * inv_freq
        repeated over both halves (no attention scaling: x already carries it). O(N D)."""
        ang = delta.to(torch.float64)[:, None, :, None] * self.inv_freq.to(x.device)
        emb = torch.cat((ang, ang), dim=-1)
        xa = x.to(acc_dtype(x.dtype))
        return xa * emb.cos().to(xa.dtype) + self.rotate_half(xa) * emb.sin().to(xa.dtype)


_SHIFTS: "weakref.WeakKeyDictionary[Any, RopeShift]" = weakref.WeakKeyDictionary()


def rope_shift(module: Any) -> RopeShift:
    """The :class:`RopeShift` of an HF attention layer's model (cached per layer);
    ValueError naming ``sink_positions`` and the model type when its RoPE is not one this
    module reproduces (Llama-style ``rotate_half`` with a fixed rope type)."""
    try:
        return _SHIFTS[module]
    except (KeyError, TypeError):  # not seen yet (or an object without weak references)
        pass
    cfg = getattr(module, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ROTATE_HALF_MODELS:
        raise ValueError(f"sink_positions='cache' re-rotates queries with the model's RoPE; model_type {kind!r} is "
                         f"not one it reproduces (Llama-style rotate_half: {sorted(ROTATE_HALF_MODELS)})")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if any(t in rope_type for t in _LENGTH_DEPENDENT):
        raise ValueError(f"sink_positions='cache': rope_type {rope_type!r} of {kind} changes its frequencies with "
                         "the sequence length; only fixed rotations are reproduced")
    modeling = sys.modules[type(module).__module__]
    rotary = [c for n, c in vars(modeling).items() if n.endswith("RotaryEmbedding") and isinstance(c, type)
              and hasattr(c, "compute_default_rope_parameters")]
    if not callable(getattr(modeling, "rotate_half", None)) or (rope_type == "default" and not rotary):
        raise ValueError(f"sink_positions='cache': {modeling.__name__} has no rotate_half / RotaryEmbedding to "
                         f"reproduce {kind}'s RoPE with")
    if rope_type == "default":
        inv_freq, _ = rotary[0].compute_default_rope_parameters(cfg)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    head_dim = getattr(module, "head_dim", None)
    if head_dim is not None and 2 * inv_freq.numel() != head_dim:
        raise ValueError(f"sink_positions='cache': {kind} rotates {2 * inv_freq.numel()} of {head_dim} head "
                         "dimensions (partial rotary); only full-head RoPE is reproduced")
    shift = RopeShift(inv_freq.to(torch.float64), getattr(modeling, "rotate_half"))
    try:
        _SHIFTS[module] = shift
    except TypeError:
        pass
    return shift
