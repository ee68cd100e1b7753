"""Public functions of the recurrent family (chunked forms and one-token decode steps).

Layout (longattn's): q, k [B, Hk, N, Dk]; v [B, Hv, N, Dv] with Hv a multiple of
Hk (q/k head h serves the Hv/Hk consecutive value heads h*Hv/Hk..., as in Qwen3.5's
Gated DeltaNet); decays and beta per value head; the state is [B, Hv, Dk, Dv],
kept in float32 (float64 for float64 inputs) whatever the input dtype.

=================  ============================  ========  =====================================
member             decay g (log, <= 0)           delta     paper
=================  ============================  ========  =====================================
gated_delta_rule   [B, Hv, N] scalar             beta      Yang et al. 2025, Gated Delta Networks
kda                [B, Hv, N, Dk] per channel    beta      Kimi Team 2025, Kimi Linear (KDA)
ssd                [B, Hv, N] scalar             no        Dao & Gu 2024, Mamba-2 (SSD)
gla                [B, Hv, N, Dk] per channel    no        Yang et al. 2024, Gated Linear Attention
retention          fixed gamma [Hv] per head     no        Sun et al. 2023, RetNet
=================  ============================  ========  =====================================

Every member computes S_t = diag(exp(g_t)) S_{t-1}; then S_t += k_t (beta_t (v_t -
S_tᵀ k_t))ᵀ (delta) or S_t += k_t v_tᵀ; o_t = S_tᵀ (scale q_t), scale = 1/sqrt(Dk)
by default, q and k L2-normalised first with ``use_qk_l2norm`` (x / sqrt(|x|^2 +
1e-6), FLA's convention). Mamba-2's dt (x dt) is the caller's: fold it into v.
``segment_ids`` [B, N]: documents packed as runs of equal ids; the state is reset
at each document start after position 0 (``initial_state`` continues the first
document of each row).

The chunked forms are :mod:`.engine` under one autograd.Function
(:mod:`.function`: a few heads at a time, hand-written backward for q, k, v, g, beta,
initial_state, nothing saved but the inputs). Cost O(N C (Dk + Dv) + N Dk Dv),
memory O(N (C + Dk + Dv) + N/C Dk Dv); the ``*_step`` functions are O(Dk Dv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from longattn.ops._checks import FLOAT_DTYPES, check_int, default_scale
from longattn.ops._chunked import work_dtype
from longattn.ops.packing import check_segment_ids
from longattn.ops.recurrent.function import ChunkedRecurrence, QKPrep
from longattn.ops.recurrent.reference import recurrent_step_core

__all__ = [
    "gated_delta_rule", "kda", "ssd", "gla", "retention",
    "gated_delta_rule_step", "kda_step", "ssd_step", "gla_step", "retention_step",
    "retention_gammas", "segment_ids_from_cu_seqlens", "l2norm", "KINDS",
]


@dataclass(frozen=True)
class Kind:
    """A member of the family: the width of its decay, whether it has the delta rule, and how
    its learned module makes the decay (``gate``): "mamba" g = -exp(A) softplus(w.k + dt_bias)
    (scalar), "kda" g = -exp(A) softplus(W k + b) (per channel), "gla" g = logsigmoid(W k + b)
    / 16, "fixed" (no learned gate: retention's per-head gamma); ``dt_scales_v``: v is
    multiplied by the step dt (Mamba-2's SSD)."""

    name: str
    per_channel: bool
    delta: bool
    gate: str = "mamba"
    dt_scales_v: bool = False


KINDS = {
    "gated_delta": Kind("gated_delta", False, True, "mamba"),
    "kda": Kind("kda", True, True, "kda"),
    "ssd": Kind("ssd", False, False, "mamba", dt_scales_v=True),
    "gla": Kind("gla", True, False, "gla"),
    "retention": Kind("retention", False, False, "fixed"),
}


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(|x|^2 + eps) along the last dim (FLA's and HF Qwen3-Next's convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------- checks


def _tensor(name: str, x: object, dims: int | tuple[int, ...]) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    want = (dims,) if isinstance(dims, int) else dims
    if x.dim() not in want:
        raise ValueError(f"{name} must have {' or '.join(map(str, want))} dims, got shape {tuple(x.shape)}")
    return x


def _check_shape(name: str, x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(x.shape)}")


def _check_qkv(q: object, k: object, v: object, dims: int = 4) -> tuple[int, ...]:
    """(B, Hk, N, Dk, Hv, Dv) of q, k [B, Hk, N, Dk], v [B, Hv, N, Dv] (N absent when dims=3)."""
    q, k, v = _tensor("q", q, dims), _tensor("k", k, dims), _tensor("v", v, dims)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {list(q.shape)} and {list(k.shape)}")
    B, Hk, Dk = q.shape[0], q.shape[1], q.shape[-1]
    N = q.shape[2] if dims == 4 else 1
    Hv, Dv = v.shape[1], v.shape[-1]
    if v.shape[0] != B or (dims == 4 and v.shape[2] != N):
        raise ValueError(f"v must match q in batch and length: q {list(q.shape)}, v {list(v.shape)}")
    if Hv % Hk:
        raise ValueError(f"v's heads ({Hv}) must be a multiple of q/k's heads ({Hk})")
    if N < 1 or Dk < 1 or Dv < 1:
        raise ValueError(f"q, k, v must be non-empty, got q {list(q.shape)}, v {list(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, Hk, N, Dk, Hv, Dv


def _check_gates(kind: Kind, g: object, beta: object, B: int, Hv: int, N: int | None, Dk: int) -> None:
    """g: [B, Hv, (N,)] or [B, Hv, (N,) Dk]; beta like the scalar g (delta members only)."""
    tok = () if N is None else (N,)
    gshape = (B, Hv, *tok, Dk) if kind.per_channel else (B, Hv, *tok)
    gwhat = "[B, Hv" + (", N" if tok else "") + (", Dk]" if kind.per_channel else "]")
    _check_shape("g", _tensor("g", g, len(gshape)), gshape, gwhat)
    if kind.delta:
        bwhat = "[B, Hv" + (", N]" if tok else "]")
        _check_shape("beta", _tensor("beta", beta, 2 + len(tok)), (B, Hv, *tok), bwhat)


def _check_state(name: str, s: object, B: int, Hv: int, Dk: int, Dv: int) -> Tensor | None:
    if s is None:
        return None
    _check_shape(name, _tensor(name, s, 4), (B, Hv, Dk, Dv), "[B, Hv, Dk, Dv]")
    return s  # type: ignore[return-value]


def _runs(segment_ids: Tensor) -> Tensor:
    """A run index per position [B, N] (0, 0, 1, 1, 1, 2...): +1 at every id change."""
    new = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.cat([new.new_zeros(new.shape[0], 1), new], 1).long().cumsum(1)


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """HF/FlashAttention varlen ``cu_seqlens`` [docs + 1] (0, n0, n0 + n1, ...) -> segment_ids [1, N].

    ``total``: N, checked against the last offset when given.
    """
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens!r}")
    cu = cu_seqlens.long()
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu.tolist()}")
    if total is not None and int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])}, but the sequence has total={total} tokens")
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)[None]


# ----------------------------------------------------------------------------- shared driver


def _prepare_qk(q: Tensor, k: Tensor, Hv: int, scale: float, use_qk_l2norm: bool,
                work: torch.dtype) -> tuple[Tensor, Tensor]:
    """q, k in the working dtype, normalised if asked, q scaled, heads expanded to Hv."""
    return QKPrep(scale, use_qk_l2norm, Hv // q.shape[1], work).forward(q, k)


def _run(kind: Kind, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, *,
         scale: float | None, initial_state: Tensor | None, output_final_state: bool, use_qk_l2norm: bool,
         segment_ids: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """Validate, then run the chunked engine: (o [B, Hv, N, Dv] in v's dtype, final state or None)."""
    B, Hk, N, Dk, Hv, Dv = _check_qkv(q, k, v)
    _check_gates(kind, g, beta, B, Hv, N, Dk)
    s0 = _check_state("initial_state", initial_state, B, Hv, Dk, Dv)
    check_int("chunk_size", chunk_size, minimum=1)
    run = None if segment_ids is None else _runs(check_segment_ids(segment_ids, B, N).to(q.device))
    work = work_dtype(q.dtype)
    prep = QKPrep(default_scale(scale, Dk), use_qk_l2norm, Hv // Hk, work)
    gd = g.to(work) if kind.per_channel else g.to(work)[..., None]
    bw = beta.to(work) if kind.delta else None  # type: ignore[union-attr]
    sw = None if s0 is None else s0.to(work)
    o, sN = ChunkedRecurrence.apply(q, k, v, gd, bw, sw, run, chunk_size, prep)
    return o, (sN if output_final_state else None)


# ----------------------------------------------------------------------------- members

_ARGS_DOC = """
    Args:
        q, k: [B, Hk, N, Dk]; v: [B, Hv, N, Dv], Hv a multiple of Hk.
        scale: multiplies q (default 1/sqrt(Dk)).
        initial_state: [B, Hv, Dk, Dv], the state before position 0 (zeros if None).
        output_final_state: also return the state after position N - 1 (float32).
        use_qk_l2norm: L2-normalise q and k first.
        segment_ids: int [B, N], packed documents (the state resets at each start).
        chunk_size: C of the chunked engine (any N; padded inside).

    Returns:
        (o [B, Hv, N, Dv] in v's dtype, final state [B, Hv, Dk, Dv] or None).
"""


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     use_qk_l2norm: bool = False, segment_ids: Tensor | None = None,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks"; Qwen3-Next/3.5):
    S_t = exp(g_t) S_{t-1}, S_t += k_t (beta_t (v_t - S_tᵀ k_t))ᵀ, o_t = S_tᵀ q_t scale.
    g [B, Hv, N] log decays (<= 0), beta [B, Hv, N] (in (0, 1) usually)."""
    return _run(KINDS["gated_delta"], q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, segment_ids=segment_ids,
                chunk_size=chunk_size)


def kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
        initial_state: Tensor | None = None, output_final_state: bool = False, use_qk_l2norm: bool = False,
        segment_ids: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Kimi Delta Attention (Kimi Team 2025, "Kimi Linear"): the gated delta rule with a
    per-channel decay, S_t = diag(exp(g_t)) S_{t-1}; g [B, Hv, N, Dk], beta [B, Hv, N]."""
    return _run(KINDS["kda"], q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, segment_ids=segment_ids,
                chunk_size=chunk_size)


def ssd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
        initial_state: Tensor | None = None, output_final_state: bool = False, use_qk_l2norm: bool = False,
        segment_ids: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Mamba-2's state space dual (Dao & Gu 2024, "Transformers are SSMs"): scalar decay,
    no delta: S_t = exp(g_t) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t scale (q = C, k = B,
    v = x dt, g = A dt). g [B, Hv, N]."""
    return _run(KINDS["ssd"], q, k, v, g, None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, segment_ids=segment_ids,
                chunk_size=chunk_size)


def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
        initial_state: Tensor | None = None, output_final_state: bool = False, use_qk_l2norm: bool = False,
        segment_ids: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with
    Hardware-Efficient Training"): S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ; g [B, Hv, N, Dk]."""
    return _run(KINDS["gla"], q, k, v, g, None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, segment_ids=segment_ids,
                chunk_size=chunk_size)


def retention_gammas(heads: int, *, device: torch.device | str | None = None) -> Tensor:
    """RetNet's per-head decays gamma_h = 1 - 2^(-5 - h), h = 0..heads-1 (float64 [heads])."""
    check_int("heads", heads, minimum=1)
    return 1.0 - torch.pow(2.0, -5.0 - torch.arange(heads, dtype=torch.float64, device=device))


def _retention_g(gamma: Tensor | None, B: int, Hv: int, N: int | None, like: Tensor) -> Tensor:
    """log(gamma) broadcast to [B, Hv, (N)]; gamma [Hv] in (0, 1], RetNet's if None."""
    if gamma is None:
        gamma = retention_gammas(Hv, device=like.device)
    gamma = _tensor("gamma", gamma, 1)
    _check_shape("gamma", gamma, (Hv,), "[Hv]")
    if bool(((gamma <= 0) | (gamma > 1)).any()):
        raise ValueError(f"gamma must lie in (0, 1], got {gamma.tolist()}")
    lg = torch.log(gamma.to(work_dtype(like.dtype)))
    return lg[None, :, None].expand(B, Hv, N) if N is not None else lg[None, :].expand(B, Hv)


def retention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor | None = None, *, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False,
              use_qk_l2norm: bool = False, segment_ids: Tensor | None = None,
              chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Retention (Sun et al. 2023, "Retentive Network"), recurrent form without the
    xPos rotation and group norm: S_t = gamma_h S_{t-1} + k_t v_tᵀ. gamma [Hv] (default
    :func:`retention_gammas`)."""
    B, _, N, _, Hv, _ = _check_qkv(q, k, v)
    g = _retention_g(gamma, B, Hv, N, q)
    return _run(KINDS["retention"], q, k, v, g, None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, segment_ids=segment_ids,
                chunk_size=chunk_size)


for _f in (gated_delta_rule, kda, ssd, gla, retention):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _ARGS_DOC


# ----------------------------------------------------------------------------- decode steps


def _step(kind: Kind, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, state: Tensor | None,
          scale: float | None, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    """One token of ``kind``: q, k [B, Hk, (1,) Dk], v [B, Hv, (1,) Dv]; O(Hv Dk Dv)."""
    tok = isinstance(q, Tensor) and q.dim() == 4
    if tok:
        if q.shape[2] != 1:
            raise ValueError(f"a step takes one token: q must be [B, Hk, 1, Dk] or [B, Hk, Dk], got {list(q.shape)}")
        _check_qkv(q, k, v)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if isinstance(g, Tensor) and g.dim() == (4 if kind.per_channel else 3):
            g = g[:, :, 0]
        if isinstance(beta, Tensor) and beta.dim() == 3:
            beta = beta[:, :, 0]
    B, Hk, _, Dk, Hv, Dv = _check_qkv(q, k, v, dims=3)
    _check_gates(kind, g, beta, B, Hv, None, Dk)
    s0 = _check_state("state", state, B, Hv, Dk, Dv)
    work = work_dtype(q.dtype)
    qe, ke = _prepare_qk(q, k, Hv, default_scale(scale, Dk), use_qk_l2norm, work)
    S = q.new_zeros(B, Hv, Dk, Dv, dtype=work) if s0 is None else s0.to(work)
    gd = g.to(work) if kind.per_channel else g.to(work)[..., None]
    o, S = recurrent_step_core(qe, ke, v.to(work), gd, beta.to(work) if kind.delta else None, S)  # type: ignore[union-attr]
    o = o.to(v.dtype)
    return (o[:, :, None] if tok else o), S


def gated_delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
                          *, scale: float | None = None, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """One decode step of :func:`gated_delta_rule`: q, k [B, Hk, (1,) Dk], v [B, Hv, (1,) Dv],
    g, beta [B, Hv, (1)], state [B, Hv, Dk, Dv] or None -> (o [B, Hv, (1,) Dv], new state). O(Dk Dv)."""
    return _step(KINDS["gated_delta"], q, k, v, g, beta, state, scale, use_qk_l2norm)


def kda_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
             *, scale: float | None = None, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """One decode step of :func:`kda` (g [B, Hv, (1,) Dk])."""
    return _step(KINDS["kda"], q, k, v, g, beta, state, scale, use_qk_l2norm)


def ssd_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor | None = None,
             *, scale: float | None = None, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """One decode step of :func:`ssd` (g [B, Hv, (1)])."""
    return _step(KINDS["ssd"], q, k, v, g, None, state, scale, use_qk_l2norm)


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor | None = None,
             *, scale: float | None = None, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """One decode step of :func:`gla` (g [B, Hv, (1,) Dk])."""
    return _step(KINDS["gla"], q, k, v, g, None, state, scale, use_qk_l2norm)


def retention_step(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor | None = None, state: Tensor | None = None,
                   *, scale: float | None = None, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """One decode step of :func:`retention` (gamma [Hv], RetNet's if None)."""
    B, Hv = v.shape[0], v.shape[1]
    return _step(KINDS["retention"], q, k, v, _retention_g(gamma, B, Hv, None, q), None, state, scale,
                 use_qk_l2norm)
