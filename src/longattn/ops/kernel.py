"""Kernelized (linear) attention: softmax(q k^T) replaced by phi(q)^T phi(k).

    out_i = phi(q_i)^T S / phi(q_i)^T z,   S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

computed in the (phi(K)^T V) phi(Q) order, so no Nq x Nk tensor exists: O(N F Dv)
time and O((N + F) (F + Dv)) memory, F = number of features.
Katharopoulos et al. 2020 ("Transformers are RNNs"), Choromanski et al. 2021
(Performer, FAVOR+).

Feature maps (``feature_map=``): ``"elu"`` (elu(x) + 1), ``"relu"``, ``"favor"``
(Performer positive orthogonal random features), any callable ``phi(x) -> [.., F]``,
or a :class:`FeatureMap`. A map returns its features as a pair ``(f, s)`` meaning
``phi = f * exp(s)[..., None]`` with ``s`` a per-row log-scale (``None`` for maps
that need none). FAVOR+ uses it as its numerical stabiliser: ``f <= 1`` and the
scales of the keys are re-referenced to a running maximum of the *visible past*
keys only (so the stabiliser can neither overflow, nor leak the future, nor leak
padded keys); the per-query scale cancels in the ratio and is dropped.

Three ways to compute the same thing (tests hold them equal):

- :func:`linear_attention_naive`: (phi(Q) phi(K)^T) V with row normalisation,
  masked: the O(N^2) reference;
- :func:`linear_attention`: the fast form; causal by chunked prefix sums (chunk-local
  masked quadratic + an inter-chunk state, never an [N, F, Dv] cumsum);
- :func:`linear_attention_init_state` / :func:`linear_attention_step`: the recurrent
  form with an O(F Dv) state, for token-by-token decoding.

Scale: if ``scale`` is given, q and k are multiplied by sqrt(scale) before the map.
With ``scale=None`` FAVOR+ uses 1/sqrt(D) (it approximates softmax(q k^T / sqrt(D)))
and the deterministic maps use the raw q, k (as in Katharopoulos et al.).
All sums accumulate in float32 at least (fp16/bf16 inputs are promoted inside).

Modules: the feature maps and shared helpers are :mod:`longattn.ops.kernel_features`,
the chunked causal engine :mod:`longattn.ops.kernel_chunked`; their names are
importable from here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.ops._module import MechanismModule
from longattn.ops.kernel_chunked import _causal_chunked
from longattn.ops.kernel_features import (  # noqa: F401 (re-exported: longattn.ops.kernel's names)
    _NEG,
    CallableFeatureMap,
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    FeatureMapLike,
    ReluFeatureMap,
    _favor_cached,
    _features,
    _mask_keys,
    _ratio,
    _work_dtype,
    orthogonal_random_features,
    resolve_feature_map,
)
from longattn.registry import Param, register

__all__ = [
    "FeatureMap",
    "EluFeatureMap",
    "ReluFeatureMap",
    "CallableFeatureMap",
    "FavorFeatureMap",
    "resolve_feature_map",
    "orthogonal_random_features",
    "linear_attention",
    "linear_attention_naive",
    "performer_attention",
    "LinearAttentionState",
    "linear_attention_init_state",
    "linear_attention_step",
    "LinearAttention",
    "PerformerAttention",
]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- naive reference


def linear_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: FeatureMapLike = "elu",
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """(phi(Q) phi(K)^T) V with row normalisation: the O(Nq Nk) reference.

    Uses the un-stabilised features phi = f * exp(s); run it in float64.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    fmap = resolve_feature_map(feature_map, d.D)
    work = _work_dtype(q.dtype)
    fq, fk, sk = _features(fmap, q.to(work), k.to(work), scale)
    if sk is not None:
        fk = fk * torch.exp(sk)[..., None]
    a = torch.matmul(fq, fk.transpose(-1, -2))  # [B, H, Nq, Nk]
    visible = torch.ones(d.Nq, d.Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    visible = visible.expand(d.B, d.H, d.Nq, d.Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    a = a.masked_fill(~visible, 0.0)
    den = a.sum(-1, keepdim=True)
    num = torch.matmul(a, v.to(work))
    return _ratio(torch.cat([num, den], -1)).to(q.dtype)


# --------------------------------------------------------------------------- fast forms


_SEG_ELEMS = 1 << 22
_SEG_ELEMS_GRAD = 1 << 20  # causal training: checkpointed segments (see _linear_fast)
"""Elements of one segment's feature tensor [B, H, L, F] (16 MiB in fp32). The fast
forms compute features segment by segment: the same arithmetic, with bounded
buffers instead of fresh N x F ones (first-touch page faults of huge buffers cost as
much as the matmuls on CPU), and few enough segments that per-op overhead stays small."""


def _segments(n: int, rows: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _segment_rows(B: int, H: int, F: int, chunk: int, elements: int | None = None) -> int:
    """Rows per feature segment: about ``elements`` (default :data:`_SEG_ELEMS`) per
    [B, H, rows, F] tensor, a multiple of ``chunk``."""
    rows = max(chunk, (elements or _SEG_ELEMS) // max(1, B * H * F))
    return max(chunk, rows // chunk * chunk)


def _linear_fast(
    fmap: FeatureMap,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    scale: float | None,
    causal: bool,
    chunk: int,
) -> Tensor:
    """Linear attention on working-dtype inputs, segment by segment; returns [B,H,Nq,Dv].

    Non-causal: pass 1 over key segments accumulates S|z = sum phi(k) [v, 1]^T
    (re-referenced to the running max of the keys' log-scales), pass 2 maps each
    query segment through it. Causal: one pass, each segment continuing the state
    of the previous one (:func:`_causal_chunked`); with Nq < Nk the queries are the
    last Nq positions and the keys before them are the initial state. O(N F Dv) time
    either way. k, v may have fewer heads (grouped KV heads, never repeated).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    s = scale if scale is not None else fmap.default_scale(D)
    r = math.sqrt(s) if s is not None and s != 1.0 else None
    F = D if isinstance(fmap, CallableFeatureMap) else fmap.num_features(D)
    rows = _segment_rows(B, H, F, chunk)

    def feats(x: Tensor, is_query: bool) -> tuple[Tensor, Tensor | None]:
        return fmap.scaled(x, r, is_query=is_query)

    def keys(a: int, b: int) -> tuple[Tensor, Tensor | None, Tensor]:
        fk, sk = feats(k[:, :, a:b], False)
        mask = None if key_padding_mask is None else key_padding_mask[:, a:b]
        return _mask_keys(fk, sk, v[:, :, a:b], mask)

    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not causal and not grad and q.device.type == "cpu":
        if isinstance(fmap, FavorFeatureMap):
            return _favor_inference(fmap, q, k, v, key_padding_mask, r)
        if type(fmap) in _IN_PLACE:
            return _map_inference(_IN_PLACE[type(fmap)], q, k, v, key_padding_mask, r)
    Hkv = k.shape[1]
    g = H // Hkv
    # grouped KV heads: queries as [B, Hkv, g, ., .], the keys' tensors and states
    # with a broadcast group axis: every key-side quantity is computed once per kv head
    qg = (lambda x: x) if g == 1 else (lambda x: x.view(B, Hkv, g, *x.shape[2:]))
    kg = (lambda x: x) if g == 1 else (lambda x: None if x is None else x.unsqueeze(2))
    ungroup = (lambda x: x) if g == 1 else (lambda x: x.reshape(B, H, *x.shape[3:]))
    outs = []
    if causal:
        # bottom-right: queries are the last Nq positions; keys before them form the
        # initial state (every query sees them)
        off = Nk - Nq
        state, m0 = _key_state(keys, 0, off, rows) if off else (None, None)
        state, m0 = kg(state), kg(m0)

        def segment(a: int, b: int, state: Tensor | None, m0: Tensor | None):
            fq, _ = feats(q[:, :, a:b], True)
            fk, sk, va = keys(off + a, off + b)
            o, state, m0 = _causal_chunked(qg(fq), kg(fk), kg(sk), kg(va), chunk, state, m0)
            return ungroup(_ratio(o)), state, m0

        segments = _segments(Nq, rows if not grad else _segment_rows(B, H, F, chunk, _SEG_ELEMS_GRAD))
        # training over several segments: each runs under activation checkpointing, so
        # the backward keeps one segment's features and chunk products at a time (its
        # input state and output only in between), for one more forward of compute
        ckpt = grad and len(segments) > 1
        for a, b in segments:
            if ckpt:
                o, state, m0 = torch.utils.checkpoint.checkpoint(segment, a, b, state, m0, use_reentrant=False)
            else:
                o, state, m0 = segment(a, b, state, m0)
            outs.append(o)
    else:
        state, _ = _key_state(keys, 0, Nk, rows)
        for a, b in _segments(Nq, rows):
            fq, _ = feats(q[:, :, a:b], True)
            outs.append(ungroup(_ratio(torch.matmul(qg(fq), kg(state)))))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _key_state(keys, a: int, b: int, rows: int) -> tuple[Tensor, Tensor | None]:
    """S|z = sum over keys [a, b) of phi(k) [v, 1]^T, segment by segment, and (for maps
    with log-scales) the running max m of the keys' log-scales it is referenced to:
    state = sum_j phi(k_j) [v_j, 1]^T exp(s_j - m). ``keys(a, b)`` gives (phi(k), s, [v, 1])."""
    state, m_run = None, None
    for s0, s1 in _segments(b - a, rows):
        fk, sk, va = keys(a + s0, a + s1)
        if sk is None:
            part = torch.matmul(fk.transpose(-1, -2), va)  # [B, H, F, Dv + 1]
            state = part if state is None else state + part
            continue
        m_seg = sk.detach().amax(-1)  # [B, H]; padded keys are _NEG
        m_new = m_seg if m_run is None else torch.maximum(m_run, m_seg)
        part = torch.matmul(fk.transpose(-1, -2), va * torch.exp(sk - m_new[..., None])[..., None])
        state = part if state is None else state * torch.exp(m_run - m_new)[..., None, None] + part
        m_run = m_new
    assert state is not None
    return state, m_run


_INFER_ROWS = 1 << 20
"""Feature elements per block of the inference path (4 MiB in fp32): one buffer,
reused by every block."""


@torch.no_grad()
def _favor_inference(
    fmap: "FavorFeatureMap", q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
    r: float | None,
) -> Tensor:
    """Non-causal FAVOR+ without autograd: the arithmetic of the segmented form, head
    by head over contiguous row blocks, every feature block written into one reused
    buffer (``torch.mm(out=)``). Fresh N x F feature tensors would be mapped and
    page-faulted on every call, which costs as much as the matmuls on the CPU.

    The projections are taken in base 2 (W scaled by log2 e, features exp2(a - max a)):
    the same features, and exp2 runs ~1.8x faster than exp on the CPU."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    w = fmap.projection.to(device=q.device, dtype=q.dtype) * _LOG2E
    wt = (w if r is None else w * r).T.contiguous()  # [D, F]
    F = wt.shape[1]
    half = 0.5 if r is None else 0.5 * r * r
    rows = max(1, _INFER_ROWS // F)
    buf = q.new_empty(rows, F)
    va = q.new_empty(rows, Dv + 1)  # [v e, e]: values and the normaliser's column
    ob = q.new_empty(rows, Dv + 1)
    Hkv = k.shape[1]
    g = H // Hkv  # query heads per kv head: the keys' state is built once for all g
    qf = q.reshape(B * H, Nq, D)
    kf, vf = (x.reshape(B * Hkv, x.shape[2], x.shape[3]) for x in (k, v))
    out = q.new_empty(B, H, Nq, Dv)
    of = out.view(B * H, Nq, Dv)

    def query_feats(x: Tensor) -> Tensor:
        f = buf[: x.shape[0]]
        torch.mm(x, wt, out=f)
        return f.sub_(f.amax(-1, keepdim=True)).exp2_()  # a per-query scale cancels in the ratio

    for bh in range(B * Hkv):
        real = None if key_padding_mask is None else key_padding_mask[bh // Hkv]
        state, m_run = None, None  # state [F, Dv + 1] = sum_j phi(k_j) [v_j, 1] exp(s_j - m_run)
        for a in range(0, Nk, rows):
            b = min(Nk, a + rows)
            x, f = kf[bh, a:b], buf[: b - a]
            torch.mm(x, wt, out=f)
            m = f.amax(-1, keepdim=True)
            f.sub_(m).exp2_()
            s = m[:, 0] * _LN2 - half * (x * x).sum(-1)  # the keys' log-scales (base e)
            if real is not None:
                s.masked_fill_(~real[a:b], _NEG)
            m_new = s.max() if m_run is None else torch.maximum(m_run, s.max())
            e = s.sub_(m_new).exp_()
            if real is not None:  # (exp(_NEG - m_new) is 1, not 0, when every key is padded)
                e.masked_fill_(~real[a:b], 0.0)
            vb = va[: b - a]
            torch.mul(vf[bh, a:b], e[:, None], out=vb[:, :Dv])
            vb[:, Dv] = e
            if state is None:
                state = f.T @ vb
            else:
                state.mul_(torch.exp(m_run - m_new)).addmm_(f.T, vb)
            m_run = m_new
        _read_state(state, qf, of, ob, range(bh * g, (bh + 1) * g), rows, query_feats)
    return out


def _read_state(state: Tensor, qf: Tensor, of: Tensor, ob: Tensor, heads: range, rows: int,
                feats: Callable[[Tensor], Tensor]) -> None:
    """of[h] = ratio(phi(q) [S | z]) for the query heads ``heads`` that read one kv head's
    state [F, Dv + 1], ``rows`` queries at a time (``ob``: the reused [rows, Dv + 1] buffer;
    ``feats``: the query rows' features, written into a reused buffer)."""
    Nq = qf.shape[1]
    for qh in heads:
        for a in range(0, Nq, rows):
            b = min(Nq, a + rows)
            _ratio(torch.mm(feats(qf[qh, a:b]), state, out=ob[: b - a]), out=of[qh, a:b])


def _elu1_(f: Tensor, tmp: Tensor) -> Tensor:
    """f <- elu(f) + 1 = max(f, 0) + exp(min(f, 0)), in place (``tmp``: scratch of f's
    shape). ~1.5x faster than ``elu_(f).add_(1)`` on the CPU (elu's expm1 is slow)."""
    torch.clamp(f, max=0.0, out=tmp).exp_()
    return f.clamp_(min=0.0).add_(tmp)


#: the deterministic feature maps, applied in place to a reused buffer (f, scratch)
_IN_PLACE: dict[type, Callable[[Tensor, Tensor], Tensor]] = {
    EluFeatureMap: _elu1_,
    ReluFeatureMap: lambda f, tmp: f.relu_(),
}


@torch.no_grad()
def _map_inference(
    phi_: Callable[[Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
    r: float | None,
) -> Tensor:
    """Non-causal linear attention for a feature map without log-scales (elu+1, relu),
    without autograd: S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) per kv head, then
    phi(q) [S | z] per query block, head by head over contiguous row blocks. Every
    feature block is written into one reused buffer (``phi_`` in place), the outputs
    straight into the result: no fresh N x F tensors, whose page faults cost as much as
    the matmuls on the CPU (see :func:`_favor_inference`)."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    rows = max(1, _INFER_ROWS // D)
    buf, tmp = q.new_empty(rows, D), q.new_empty(rows, D)
    ob = q.new_empty(rows, Dv + 1)
    Hkv = k.shape[1]
    g = H // Hkv
    qf = q.reshape(B * H, Nq, D)
    kf, vf = (x.reshape(B * Hkv, x.shape[2], x.shape[3]) for x in (k, v))
    out = q.new_empty(B, H, Nq, Dv)
    of = out.view(B * H, Nq, Dv)

    def feats(x: Tensor) -> Tensor:
        n = x.shape[0]
        f = buf[:n]
        f.copy_(x) if r is None else torch.mul(x, r, out=f)
        return phi_(f, tmp[:n])

    for bh in range(B * Hkv):
        real = None if key_padding_mask is None else key_padding_mask[bh // Hkv]
        S = q.new_zeros(D, Dv)
        z = q.new_zeros(D)
        for a in range(0, Nk, rows):
            b = min(Nk, a + rows)
            f = feats(kf[bh, a:b])
            if real is not None:
                f.masked_fill_(~real[a:b, None], 0.0)
            S.addmm_(f.T, vf[bh, a:b])
            z.add_(f.sum(0))
        state = torch.cat([S, z[:, None]], 1)  # [D, Dv + 1]
        _read_state(state, qf, of, ob, range(bh * g, (bh + 1) * g), rows, feats)
    return out


@dataclass
class LinearAttentionState:
    """Recurrent state of causal linear attention, per (batch, head). O(F Dv) memory.

    Attributes:
        S: [B, H, F, Dv] sum of phi(k_j) v_j^T (times exp(-m) for FAVOR+).
        z: [B, H, F] sum of phi(k_j) (same scale).
        m: [B, H] running max of the keys' log-scales (None for maps without one).
        length: tokens seen so far.
    """

    S: Tensor
    z: Tensor
    m: Tensor | None = None
    length: int = 0

    def _joint(self) -> Tensor:
        return torch.cat([self.S, self.z[..., None]], -1)


# what the registry knows of both kernel mechanisms (linear, performer)
_KERNEL_CAPABILITIES: dict[str, Any] = dict(
    family="kernel",
    all_keys=True,  # every query weighs every key: prepended global tokens are global
    compile_recompute=True, dynamo_traced="causal", sequence_parallel="kernel_state",
    gqa=True, bottom_right=True, packed=True, exact=False, causal=True, cross=True, subquadratic=True,
)


@register(
    "linear",
    params=(
        Param("feature_map", "elu", "'elu' | 'relu' | 'favor' | callable phi(x)->[..,F] | FeatureMap"),
        Param("chunk_size", 64, "chunk length of the causal prefix sums"),
    ),
    **_KERNEL_CAPABILITIES,
    paper="Katharopoulos et al. 2020, Transformers are RNNs",
    summary="phi(Q) (phi(K)^T V) / phi(Q) phi(K)^T 1, O(N); causal by chunked prefix sums; "
            "scale=None: phi of the raw q, k (elu/relu), not 1/sqrt(D)",
)
def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    feature_map: FeatureMapLike = "elu",
    chunk_size: int = 64,
) -> Tensor:
    """Linear attention. q [B,H,Nq,F], k [B,H,Nk,D], v [B,H,Nk,Dv] -> [B,H,Nq,Dv].

    Non-causal: O((Nq + Nk) F Dv). Causal: chunked prefix sums, O(N C (F + Dv) +
    N F Dv) time, O(N (F + C) + N/C F Dv) memory. Padded keys enter neither the
    numerator nor the normaliser; a query with normaliser 0 returns zeros.

    ``scale``: q and k are multiplied by sqrt(scale) before the feature map. The
    default differs from docs/design.md section 3 on purpose: for the deterministic maps
    (elu+1, relu) ``scale=None`` feeds the raw q, k, as the Linear Transformer does
    (Katharopoulos et al. 2020; the 1/sqrt(D) of softmax has no role in a feature
    map); FAVOR+ defaults to 1/sqrt(D), since it approximates the softmax kernel.
    Grouped KV heads (k, v with H / g heads) are read without repeating them; causal
    with Nq < Nk is bottom-right aligned (the keys before the queries form the state).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=causal)
    check_int("chunk_size", chunk_size, minimum=1)
    if scale is not None:
        default_scale(scale, d.D)
    fmap = resolve_feature_map(feature_map, d.D)
    work = _work_dtype(q.dtype)
    out = _linear_fast(fmap, q.to(work), k.to(work), v.to(work), key_padding_mask, scale, causal, chunk_size)
    return out.to(q.dtype)


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    num_features: int = 256,
    seed: int = 0,
    orthogonal: bool = True,
    projection: Tensor | None = None,
    chunk_size: int = 64,
    redraw_interval: int | None = None,
) -> Tensor:
    """Performer (FAVOR+) attention: linear attention with :class:`FavorFeatureMap`.

    Approximates softmax(q k^T * scale) v; the error falls as num_features grows.
    The functional form draws the features from ``seed`` (cached); the module
    (:class:`PerformerAttention`) owns them and can :meth:`~PerformerAttention.redraw`.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gqa=True, bottom_right=causal)
    if redraw_interval is not None:
        raise ValueError(
            f"redraw_interval={redraw_interval!r} needs the module form "
            "(longattn.build('performer', ...)); the functional form draws from seed"
        )
    if projection is not None:
        fmap: FeatureMap = FavorFeatureMap(d.D, projection=projection)
    else:
        check_int("num_features", num_features, minimum=1)
        check_int("seed", seed)
        fmap = _favor_cached(d.D, num_features, seed, bool(orthogonal))
    return linear_attention(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        feature_map=fmap, chunk_size=chunk_size,
    )


# --------------------------------------------------------------------------- recurrent form


def linear_attention_init_state(
    batch: int,
    heads: int,
    head_dim: int,
    value_dim: int,
    feature_map: FeatureMapLike = "elu",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearAttentionState:
    """An empty decoding state (no token seen): S [B,H,F,Dv] = 0, z [B,H,F] = 0."""
    check_int("batch", batch, minimum=1)
    check_int("heads", heads, minimum=1)
    fmap = resolve_feature_map(feature_map, head_dim)
    f = fmap.num_features(head_dim)
    work = _work_dtype(dtype)
    S = torch.zeros(batch, heads, f, value_dim, device=device, dtype=work)
    z = torch.zeros(batch, heads, f, device=device, dtype=work)
    m = None
    if isinstance(fmap, FavorFeatureMap):
        m = torch.full((batch, heads), _NEG, device=device, dtype=work)
    return LinearAttentionState(S, z, m, 0)


def linear_attention_step(
    state: LinearAttentionState,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: FeatureMapLike = "elu",
    *,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, LinearAttentionState]:
    """Feed T new tokens (T = 1 for decoding) and get their causal outputs.

    Args:
        state: from :func:`linear_attention_init_state` or a previous step.
        q, k: [B, H, T, D]; v: [B, H, T, Dv] (the next T positions).
        feature_map: the same map as the parallel form (for FAVOR+ the same
            :class:`FavorFeatureMap` object, or the same string).
        key_padding_mask: bool [B, T], True = real token (padded ones are skipped).

    Returns:
        (out [B, H, T, Dv], new state). Equals the parallel causal form on the
        concatenated sequence. O(T (F Dv + chunk_size F)) time, O(F Dv) state.
    """
    d = check_qkv(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a LinearAttentionState, got {type(state).__name__}")
    fmap = resolve_feature_map(feature_map, d.D)
    work = state.S.dtype
    joint = state._joint()
    if joint.shape[:2] != (d.B, d.H) or joint.shape[-1] != d.Dv + 1:
        raise ValueError(
            f"state S {tuple(state.S.shape)} does not fit q/v with B={d.B}, H={d.H}, Dv={d.Dv}"
        )
    fq, fk, sk = _features(fmap, q.to(work), k.to(work), scale)
    if fk.shape[-1] != joint.shape[2]:
        raise ValueError(f"state has {joint.shape[2]} features, the feature map gives {fk.shape[-1]}")
    fk, sk, va = _mask_keys(fk, sk, v.to(work), key_padding_mask)
    if (sk is None) != (state.m is None):
        raise ValueError("state and feature_map disagree on log-scales (init the state with the same map)")
    o, new, m = _causal_chunked(fq, fk, sk, va, chunk_size, joint, state.m)
    out = _ratio(o).to(q.dtype)
    return out, LinearAttentionState(new[..., :-1], new[..., -1], m, state.length + d.Nq)


# --------------------------------------------------------------------------- modules


class LinearAttention(MechanismModule):
    """Linear attention as a module owning its feature map (buffers included).

    forward(q, k, v, *, causal=False, key_padding_mask=None, scale=None) on
    [B, H, N, D]; :meth:`init_state` / :meth:`step` for decoding.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        feature_map: FeatureMapLike = "elu",
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        self.heads = check_int("heads", heads, minimum=1)
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.feature_map = resolve_feature_map(feature_map, head_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **call: Any) -> Tensor:
        return linear_attention(q, k, v, **call, feature_map=self.feature_map, chunk_size=self.chunk_size)

    def init_state(self, batch: int, value_dim: int | None = None, *, device=None) -> LinearAttentionState:
        """Empty decoding state for ``batch`` sequences (value_dim defaults to head_dim)."""
        if device is None:
            bufs = list(self.buffers())
            device = bufs[0].device if bufs else None
        return linear_attention_init_state(
            batch, self.heads, self.head_dim, value_dim or self.head_dim, self.feature_map, device=device
        )

    def step(
        self,
        state: LinearAttentionState,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        scale: float | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, LinearAttentionState]:
        """See :func:`linear_attention_step`."""
        return linear_attention_step(
            state, q, k, v, self.feature_map, scale=scale, key_padding_mask=key_padding_mask
        )


class PerformerAttention(LinearAttention):
    """Performer (FAVOR+) module: owns the [F, D] random features as a buffer.

    :meth:`redraw` draws new features on demand; with ``redraw_interval=n`` they are
    also redrawn every n training-mode forward calls.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        num_features: int = 256,
        seed: int | None = None,
        orthogonal: bool = True,
        chunk_size: int = 64,
        redraw_interval: int | None = None,
        projection: Tensor | None = None,
    ) -> None:
        fmap = FavorFeatureMap(head_dim, num_features, orthogonal=orthogonal, seed=seed, projection=projection)
        super().__init__(heads, head_dim, fmap, chunk_size)
        if redraw_interval is not None:
            check_int("redraw_interval", redraw_interval, minimum=1)
        self.redraw_interval = redraw_interval
        self._calls = 0

    def redraw(self, seed: int | None = None) -> None:
        """Draw new random features."""
        self.feature_map.redraw(seed)  # type: ignore[operator]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:  # type: ignore[override]
        if self.training and self.redraw_interval is not None:
            if self._calls and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1
        return super().forward(q, k, v, **kw)


# registered here, after the module class it builds
register(
    "performer",
    params=(
        Param("num_features", 256, "number of random features F"),
        Param("seed", 0, "seed of the random features (functional form)"),
        Param("orthogonal", True, "orthogonal random features (FAVOR+)"),
        Param("projection", None, "[F, D] features to use instead of drawing (overrides seed)"),
        Param("chunk_size", 64, "chunk length of the causal prefix sums"),
        Param("redraw_interval", None, "module form: redraw the features every n training forwards"),
    ),
    **_KERNEL_CAPABILITIES,
    random_params=("redraw_interval",),
    learned=True,
    paper="Choromanski et al. 2021, Rethinking Attention with Performers",
    summary="FAVOR+: positive orthogonal random features approximating softmax, O(N F)",
    module=PerformerAttention,
)(performer_attention)
