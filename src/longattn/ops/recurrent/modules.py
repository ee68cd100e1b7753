"""Registry entries of the recurrent family, and the modules that learn their gates.

A mechanism sees only the per-head q, k, v [B, H, N, D], so the module form computes
its gates from the head's key vector k_t with small learned projections:

- beta_t = sigmoid(w_beta . k_t + b_beta)                          (delta members)
- scalar decay (gated_delta, ssd): dt_t = softplus(w_dt . k_t + dt_bias),
  g_t = -exp(A_log) dt_t (Mamba-2 / Gated DeltaNet); ssd also writes v_t dt_t;
- per-channel decay: kda g_t = -exp(A_log) softplus(W_g k_t + b_g) (Kimi Linear);
  gla g_t = logsigmoid(W_g k_t + b_g) / 16 (GLA's normaliser).

The functional forms take the gates as tensors (``g``, ``beta``); without them the
delta members run with beta = 1 and no decay (DeltaNet), ssd/gla without decay.
All are causal only: a recurrence reads the past; ``causal=False`` is refused.
Padded keys (``key_padding_mask``) are skipped: k = v = 0, g = 0, beta = 0 there.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_qkv
from longattn.ops.recurrent.api import KINDS, _run, _retention_g
from longattn.registry import Param, register

__all__ = ["RecurrentGates", "RecurrentAttention"]

_PAPERS = {
    "gated_delta": "Yang, Kautz & Hatamizadeh 2025, Gated Delta Networks: Improving Mamba2 with Delta Rule",
    "kda": "Kimi Team 2025, Kimi Linear: An Expressive, Efficient Attention Architecture (KDA)",
    "ssd": "Dao & Gu 2024, Transformers are SSMs (Mamba-2, state space duality)",
    "gla": "Yang et al. 2024, Gated Linear Attention Transformers with Hardware-Efficient Training",
    "retention": "Sun et al. 2023, Retentive Network: A Successor to Transformer for Large Language Models",
}
_SUMMARIES = {
    "gated_delta": "S = exp(g) S + k (beta (v - S^T k))^T, o = S^T q; chunked WY form, O(N D^2)",
    "kda": "gated delta rule with a per-channel decay diag(exp(g)); chunked WY form, O(N D^2)",
    "ssd": "S = exp(g) S + k v^T (scalar decay per token), o = S^T q; chunked, O(N D^2)",
    "gla": "S = diag(exp(g)) S + k v^T (per-channel decay), o = S^T q; chunked, O(N D^2)",
    "retention": "S = gamma_h S + k v^T, fixed decay per head, o = S^T q; chunked, O(N D^2)",
}


_SILU_ONE = 1.2785  # silu(1.2785) = 1.0000


def _need_causal(name: str, causal: bool) -> None:
    if not causal:
        raise ValueError(f"mechanism {name!r} is causal only (a recurrence over the past): "
                         f"call it with causal=True, got causal={causal!r}")


def _gate_or(x: Tensor | None, fill: float, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return like.new_full(shape, fill) if x is None else x


def _call(kind: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, *,
          causal: bool, key_padding_mask: Tensor | None, scale: float | None, chunk_size: int,
          use_qk_l2norm: bool) -> Tensor:
    """Registry form: q, k, v [B, H, N, D] (same heads), gates or their defaults; -> [B, H, N, Dv]."""
    _need_causal(kind, causal)
    d = check_qkv(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    spec = KINDS[kind]
    gshape = (d.B, d.H, d.Nq, d.D) if spec.per_channel else (d.B, d.H, d.Nq)
    g = _gate_or(g, 0.0, gshape, q) if spec.gate != "fixed" else g
    beta = _gate_or(beta, 1.0, (d.B, d.H, d.Nq), q) if spec.delta else None
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        k, v = k * real[..., None], v * real[..., None]
        g = g * (real[..., None] if spec.per_channel else real)  # type: ignore[operator]
        beta = None if beta is None else beta * real
    o, _ = _run(spec, q, k, v, g, beta, scale=scale, initial_state=None, output_final_state=False,  # type: ignore[arg-type]
                use_qk_l2norm=use_qk_l2norm, segment_ids=None, chunk_size=chunk_size)
    return o


class RecurrentGates(nn.Module):
    """Learned gates of one recurrent member from the head's keys k [B, H, N, D].

    forward(k) -> (g, beta or None, dt or None): g [B, H, N] or [B, H, N, D] (log decay,
    <= 0), beta [B, H, N] in (0, 1), dt [B, H, N] (ssd's step, to scale v). O(N D) per
    head (O(N D^2) for the per-channel decays).
    """

    def __init__(self, heads: int, head_dim: int, kind: str) -> None:
        super().__init__()
        learned = [n for n, s in KINDS.items() if s.gate != "fixed"]
        if kind not in learned:
            raise ValueError(f"kind must be one of {learned}, got {kind!r}")
        H, D = check_int("heads", heads, minimum=1), check_int("head_dim", head_dim, minimum=1)
        self.kind, spec = kind, KINDS[kind]
        self.w_beta = nn.Parameter(torch.randn(H, D) * 0.02) if spec.delta else None
        self.b_beta = nn.Parameter(torch.zeros(H)) if spec.delta else None
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
        if spec.per_channel:
            self.w_g = nn.Parameter(torch.randn(H, D, D) * D ** -0.5 * 0.1)
            self.b_g = nn.Parameter((dt + torch.log(-torch.expm1(-dt)))[:, None].repeat(1, D)
                                    if spec.gate == "kda" else torch.full((H, D), 4.0))
        else:
            self.w_dt = nn.Parameter(torch.randn(H, D) * 0.02)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0))) if spec.gate != "gla" else None

    def forward(self, k: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        spec = KINDS[self.kind]
        w = {n: p.to(k.dtype) for n, p in self.named_parameters()}  # a half module gets float keys
        beta = None
        if spec.delta:
            beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, w["w_beta"]) + w["b_beta"][:, None])
        if spec.per_channel:
            a = torch.einsum("bhnd,hde->bhne", k, w["w_g"]) + w["b_g"][:, None, :]
            if spec.gate == "gla":
                return Fn.logsigmoid(a) / 16.0, beta, None
            return -torch.exp(w["A_log"])[:, None, None] * Fn.softplus(a), beta, None
        dt = Fn.softplus(torch.einsum("bhnd,hd->bhn", k, w["w_dt"]) + w["dt_bias"][:, None])
        return -torch.exp(w["A_log"])[:, None] * dt, beta, (dt if spec.dt_scales_v else None)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time of each head channel, then SiLU: the short
    convolution that Mamba-2 and Gated DeltaNet put on q, k and v before the recurrence
    (it lets a token's key carry its predecessors, which associative recall needs).

    x [B, H, N, D] -> [B, H, N, D], y_t = silu(sum_{i < K} w_i x_{t-i}) per channel (x before
    position 0 is zero). ``history`` [B, H, K-1, D]: the K-1 tokens before x (decoding).
    O(N D K). Initialised near the identity (w_0 = 1, the rest small).
    """

    def __init__(self, heads: int, head_dim: int, size: int) -> None:
        super().__init__()
        self.size = check_int("short_conv", size, minimum=1)
        w = torch.randn(heads, head_dim, size) * 0.02
        w[..., -1] += 1.0  # the current token (the last tap of the causal window)
        self.weight = nn.Parameter(w)

    def forward(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        B, H, N, D = x.shape
        K = self.size
        if history is None:
            history = x.new_zeros(B, H, K - 1, D)
        xs = torch.cat([history.to(x.dtype), x], dim=2).permute(0, 1, 3, 2).reshape(B, H * D, N + K - 1)
        y = Fn.conv1d(xs, self.weight.reshape(H * D, 1, K).to(x.dtype), groups=H * D)
        return Fn.silu(y).reshape(B, H, D, N).permute(0, 1, 3, 2)


class RecurrentAttention(nn.Module):
    """A recurrent member with learned gates (:class:`RecurrentGates`), as a mechanism module:
    forward(q, k, v, *, causal=True, key_padding_mask=None, scale=None) on [B, H, N, D].
    ``short_conv`` = K > 0 adds a :class:`ShortConv` of width K on each of q, k and v (the
    gates read the key before it, as Gated DeltaNet's read the hidden state);
    ``output_norm`` an RMS norm of each head's output with a learned scale (Gated DeltaNet's
    output norm); ``output_gate`` multiplies the output by silu(W q_t + b), a learned
    [D, Dv] projection per head of the query before the convolution (Gated DeltaNet's
    output gate reads the hidden state, which a mechanism does not see: the head's query
    is its projection). It starts as the identity (W = 0, silu(b) = 1): suite recall 97.5
    / 96.9 with it (seeds 0 / 1; 96.95 / 96.5 without), copy 99.6 / 99.4 (99.9 without);
    from a random W, copy fell to 83.5."""

    def __init__(self, heads: int, head_dim: int, kind: str = "gated_delta", chunk_size: int = 64,
                 use_qk_l2norm: bool | None = None, short_conv: int = 0, output_norm: bool = False,
                 output_gate: bool = False) -> None:
        super().__init__()
        self.gates = RecurrentGates(heads, head_dim, kind)
        self.kind = kind
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.use_qk_l2norm = KINDS[kind].delta if use_qk_l2norm is None else bool(use_qk_l2norm)
        self.short_conv = check_int("short_conv", short_conv, minimum=0)
        self.convs = (nn.ModuleList(ShortConv(heads, head_dim, short_conv) for _ in range(3))
                      if short_conv else None)
        if not isinstance(output_norm, bool):
            raise TypeError(f"output_norm must be a bool, got {output_norm!r}")
        self.o_scale = nn.Parameter(torch.ones(heads, 1, head_dim)) if output_norm else None
        if not isinstance(output_gate, bool):
            raise TypeError(f"output_gate must be a bool, got {output_gate!r}")
        # W = 0 and silu(b) = 1: the gate starts as the identity (the plain layer) and learns from there
        self.w_gate = nn.Parameter(torch.zeros(heads, head_dim, head_dim)) if output_gate else None
        self.b_gate = nn.Parameter(torch.full((heads, 1, head_dim), _SILU_ONE)) if output_gate else None

    def finish(self, o: Tensor, q: Tensor) -> Tensor:
        """The output [B, H, N, Dv] through the per-head RMS norm and the output gate read
        from the raw queries q [B, H, N, D] (unchanged without ``output_norm``/``output_gate``)."""
        if self.o_scale is None and self.w_gate is None:
            return o
        work = torch.promote_types(o.dtype, torch.float32)
        of = o.to(work)
        if self.o_scale is not None:
            of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-6) * self.o_scale.to(work)
        if self.w_gate is not None:
            gate = torch.einsum("bhnd,hde->bhne", q.to(work), self.w_gate.to(work)) + self.b_gate.to(work)
            of = of * Fn.silu(gate)
        return of.to(o.dtype)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, history: tuple[Tensor, Tensor, Tensor] | None = None,
            ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v through the short convolutions (unchanged when ``short_conv`` = 0);
        ``history``: the raw q, k, v of the K-1 tokens before these (decoding)."""
        if self.convs is None:
            return q, k, v
        h = (None, None, None) if history is None else history
        return tuple(c(x, hx) for c, x, hx in zip(self.convs, (q, k, v), h))  # type: ignore[return-value]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
        _need_causal(self.kind, causal)
        check_qkv(q, k, v, causal=True, key_padding_mask=key_padding_mask)  # before the convolutions
        if key_padding_mask is not None and self.convs is not None:
            real = key_padding_mask[:, None, :, None].to(q.dtype)
            q, k, v = q * real, k * real, v * real  # padded tokens feed nothing into the convolution
        g, beta, dt = self.gates(k.float() if k.dtype in (torch.float16, torch.bfloat16) else k)
        raw_q = q
        q, k, v = self.mix(q, k, v)
        if dt is not None:
            v = v * dt[..., None].to(v.dtype)
        return self.finish(_call(self.kind, q, k, v, g, beta, causal=causal, key_padding_mask=key_padding_mask,
                                 scale=scale, chunk_size=self.chunk_size, use_qk_l2norm=self.use_qk_l2norm), raw_q)


def _builder(kind: str) -> Callable[..., nn.Module]:
    def build(heads: int, head_dim: int, chunk_size: int = 64, use_qk_l2norm: bool | None = None,
              short_conv: int = 0, output_norm: bool = False, output_gate: bool = False,
              **given: Any) -> nn.Module:
        set_ = sorted(n for n, x in given.items() if x is not None)
        if set_:
            raise TypeError(f"mechanism {kind!r}: {set_} are learned by the module form; give them only "
                            "to the functional form")
        return RecurrentAttention(heads, head_dim, kind, chunk_size, use_qk_l2norm, short_conv, output_norm,
                                  output_gate)

    return build


def _functional(kind: str) -> Callable[..., Tensor]:
    def fn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, key_padding_mask: Tensor | None = None,
           scale: float | None = None, g: Tensor | None = None, beta: Tensor | None = None,
           chunk_size: int = 64, use_qk_l2norm: bool | None = None, short_conv: int = 0,
           output_norm: bool = False, output_gate: bool = False) -> Tensor:
        for name, val in (("short_conv", short_conv), ("output_norm", output_norm), ("output_gate", output_gate)):
            if val:
                raise ValueError(f"mechanism {kind!r}: {name}={val!r} is learned; the functional form has no "
                                 "weights for it (use the module form)")
        norm = KINDS[kind].delta if use_qk_l2norm is None else bool(use_qk_l2norm)
        return _call(kind, q, k, v, g, beta, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                     chunk_size=chunk_size, use_qk_l2norm=norm)

    fn.__name__ = f"{kind}_attention"
    fn.__doc__ = f"{_SUMMARIES[kind]}. q, k, v [B, H, N, D] -> [B, H, N, Dv]; causal only. {_PAPERS[kind]}."
    return fn


def retention_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                        key_padding_mask: Tensor | None = None, scale: float | None = None,
                        gamma: Tensor | None = None, chunk_size: int = 64) -> Tensor:
    """RetNet retention as a mechanism: q, k, v [B, H, N, D] -> [B, H, N, Dv], causal only;
    gamma [H] per-head decays (RetNet's 1 - 2^(-5-h) if None). O(N C D + N D^2)."""
    _need_causal("retention", causal)
    d = check_qkv(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    g = _retention_g(gamma, d.B, d.H, d.Nq, q)
    return _call("retention", q, k, v, g, None, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                 chunk_size=chunk_size, use_qk_l2norm=False)


_COMMON = dict(family="recurrent", exact=False, causal=True, cross=False, subquadratic=True, packed=True,
               causal_only=True, why_not_bottom_right="a recurrence needs every position's keys",
               sequence_parallel="recurrent_state")
_GATES = (Param("g", None, "log decays [B, H, N] (per channel: [B, H, N, D]); None: no decay; "
                           "the module form learns them"),
          Param("beta", None, "delta-rule strengths [B, H, N] (delta members); None: 1"),
          Param("chunk_size", 64, "chunk length of the chunked engine"),
          Param("use_qk_l2norm", None, "L2-normalise q and k (None: on for the delta members)"),
          Param("short_conv", 0, "width of the learned causal convolution on q, k, v (module form; 0: none)"),
          Param("output_norm", False, "learned per-head RMS norm of the output (module form)"),
          Param("output_gate", False, "learned output gate silu(W q + b) per head (module form)"))

for _kind in ("gated_delta", "kda", "ssd", "gla"):
    _params = _GATES if KINDS[_kind].delta else tuple(p for p in _GATES if p.name != "beta")
    register(_kind, params=_params, learned=True, module=_builder(_kind), paper=_PAPERS[_kind],
             summary=_SUMMARIES[_kind], **_COMMON)(_functional(_kind))

register("retention", params=(Param("gamma", None, "per-head decays [H] in (0, 1]; None: RetNet's 1 - 2^(-5-h)"),
                              Param("chunk_size", 64, "chunk length of the chunked engine")),
         paper=_PAPERS["retention"], summary=_SUMMARIES["retention"], **_COMMON)(retention_attention)
