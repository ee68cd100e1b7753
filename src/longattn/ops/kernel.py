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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as Fn
import torch.utils.checkpoint
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_qkv, default_scale
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

_NEG = -1e30  # finite "minus infinity" for running maxima (exp(_NEG - x) == 0, no NaN)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- feature maps


class FeatureMap(nn.Module):
    """phi: [B, H, N, D] -> features ``(f [B, H, N, F], s [B, H, N] | None)``, phi = f * exp(s).

    Subclasses implement :meth:`forward` and :meth:`num_features`.
    ``default_scale(D)`` is the score scale used when the caller gives ``scale=None``
    (``None`` = use q and k unscaled).
    """

    def forward(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        raise NotImplementedError

    def num_features(self, head_dim: int) -> int:  # noqa: D102
        raise NotImplementedError

    def default_scale(self, head_dim: int) -> float | None:  # noqa: D102
        return None

    def scaled(self, x: Tensor, r: float | None, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        """Features of ``x * r`` (maps may fold r into their parameters)."""
        return self(x * r if r is not None else x, is_query=is_query)


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020). F = D."""

    def forward(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        return Fn.elu(x) + 1.0, None

    def num_features(self, head_dim: int) -> int:
        return head_dim


class ReluFeatureMap(FeatureMap):
    """phi(x) = relu(x). F = D. A query whose features are all zero returns zeros."""

    def forward(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        return torch.relu(x), None

    def num_features(self, head_dim: int) -> int:
        return head_dim


class CallableFeatureMap(FeatureMap):
    """Wraps a user function ``phi(x: [B, H, N, D]) -> [B, H, N, F]``.

    phi should be non-negative (so the normaliser is a sum of non-negative weights);
    a query whose normaliser is exactly 0 returns zeros.
    """

    def __init__(self, phi: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.phi = phi
        self._f: int | None = None

    def forward(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        f = self.phi(x)
        if not isinstance(f, Tensor) or f.dim() != x.dim() or f.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"feature_map callable must map [.., N, D] to [.., N, F]; got "
                f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__} "
                f"from input {tuple(x.shape)}"
            )
        self._f = f.shape[-1]
        return f, None

    def num_features(self, head_dim: int) -> int:
        if self._f is None:
            with torch.no_grad():
                self.forward(torch.zeros(1, 1, 1, head_dim), is_query=True)
        assert self._f is not None
        return self._f


def orthogonal_random_features(
    num_features: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A [num_features, head_dim] matrix of Gaussian random features.

    ``orthogonal=True`` (FAVOR+): rows come in blocks of ``head_dim`` exactly
    orthogonal directions (QR of a Gaussian matrix), each row rescaled by the norm
    of an independent Gaussian vector, so every row is marginally N(0, I) but rows
    within a block are orthogonal (lower variance, Choromanski et al. 2021, sec. 2.4).
    """
    check_int("num_features", num_features, minimum=1)
    check_int("head_dim", head_dim, minimum=1)
    if not orthogonal:
        return torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).to(dtype)
    nb = math.ceil(num_features / head_dim)
    g = torch.randn(nb, head_dim, head_dim, generator=generator, dtype=torch.float64)
    qm, r = torch.linalg.qr(g)  # batched
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed
    w = qm.transpose(-1, -2).reshape(nb * head_dim, head_dim)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).to(dtype)


class FavorFeatureMap(FeatureMap):
    """Performer FAVOR+ positive random features (Choromanski et al. 2021).

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(F), W [F, D] (orthogonal) random, so that
    E[phi(q)^T phi(k)] = exp(q^T k). Returned stabilised: ``f = exp(a - max_f a)`` and
    ``s = max_f a`` (detached) per row, a = W x - |x|^2/2 (the constant 1/sqrt(F)
    cancels in the ratio and is dropped). Cost O(N D F).

    Args:
        head_dim: D.
        num_features: F.
        orthogonal: orthogonal blocks (FAVOR+) or i.i.d. Gaussian rows.
        seed: seed of the draw (None: torch's global RNG).
        projection: use this [F, D] matrix instead of drawing one.

    :meth:`redraw` draws a fresh W (on demand, e.g. every k training steps).
    """

    def __init__(
        self,
        head_dim: int,
        num_features: int = 256,
        *,
        orthogonal: bool = True,
        seed: int | None = None,
        projection: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.orthogonal = bool(orthogonal)
        if projection is not None:
            if not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[1] != head_dim:
                raise ValueError(
                    f"projection must be a [F, D={head_dim}] tensor, got "
                    f"{tuple(projection.shape) if isinstance(projection, Tensor) else projection!r}"
                )
            self.register_buffer("projection", projection.detach().clone())
        else:
            check_int("num_features", num_features, minimum=1)
            self.register_buffer("projection", torch.empty(num_features, head_dim))
            self.redraw(seed)

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Draw a new projection (seeded when ``seed`` is an int)."""
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(check_int("seed", seed))
        w = orthogonal_random_features(
            self.projection.shape[0], self.head_dim, orthogonal=self.orthogonal, generator=gen
        )
        self.projection.copy_(w.to(self.projection))

    def num_features(self, head_dim: int) -> int:
        return self.projection.shape[0]

    def default_scale(self, head_dim: int) -> float | None:
        return head_dim ** -0.5

    def forward(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        return self.scaled(x, None, is_query=is_query)

    def scaled(self, x: Tensor, r: float | None, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        """Features of x * r, with r folded into W (no pass over x)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"FAVOR+ features were drawn for D={self.head_dim}, got D={x.shape[-1]}")
        w = self.projection.to(device=x.device, dtype=x.dtype)
        if r is not None:
            w = w * r
        # phi = exp(W x - |x|^2/2): the |x|^2/2 term only shifts the row's log-scale
        a = torch.matmul(x, w.T)  # [.., N, F]
        m = a.detach().amax(-1, keepdim=True)
        f = a.sub_(m).exp_()  # in place: the matmul saved its inputs, not its output
        if is_query:
            return f, None  # a per-query scale cancels in the ratio
        half = 0.5 if r is None else 0.5 * r * r
        s = m.squeeze(-1) - half * (x * x).sum(-1)  # carries the gradient of -|x r|^2/2
        return f, s


_FMAP_CACHE: dict[tuple, FeatureMap] = {}


def _favor_cached(head_dim: int, num_features: int, seed: int, orthogonal: bool) -> FavorFeatureMap:
    key = ("favor", head_dim, num_features, seed, orthogonal)
    fm = _FMAP_CACHE.get(key)
    if fm is None:
        if len(_FMAP_CACHE) > 64:
            _FMAP_CACHE.clear()
        fm = FavorFeatureMap(head_dim, num_features, orthogonal=orthogonal, seed=seed)
        _FMAP_CACHE[key] = fm
    return fm  # type: ignore[return-value]


FeatureMapLike = Union[str, Callable[[Tensor], Tensor], FeatureMap]


def resolve_feature_map(feature_map: FeatureMapLike, head_dim: int) -> FeatureMap:
    """``"elu"``, ``"relu"``, ``"favor"`` (256 features, seed 0), a callable or a FeatureMap."""
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map == "elu":
            return EluFeatureMap()
        if feature_map == "relu":
            return ReluFeatureMap()
        if feature_map in ("favor", "performer"):
            return _favor_cached(head_dim, 256, 0, True)
        raise ValueError(
            f"feature_map must be 'elu', 'relu', 'favor', a callable or a FeatureMap; got {feature_map!r}"
        )
    if callable(feature_map):
        return CallableFeatureMap(feature_map)
    raise TypeError(f"feature_map must be a str, a callable or a FeatureMap, got {type(feature_map).__name__}")


# --------------------------------------------------------------------------- helpers


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _features(
    fmap: FeatureMap, q: Tensor, k: Tensor, scale: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(f_q, f_k, s_k) in the working dtype; q, k scaled by sqrt(scale) first."""
    s = scale if scale is not None else fmap.default_scale(q.shape[-1])
    if s is not None and s != 1.0:
        r = math.sqrt(s)
        q, k = q * r, k * r
    fq, _ = fmap(q, is_query=True)
    fk, sk = fmap(k, is_query=False)
    return fq, fk, sk


def _ratio(o: Tensor, out: Tensor | None = None) -> Tensor:
    """[.., Dv + 1] (numerator, normaliser) -> numerator / normaliser; 0 where it is 0.
    ``out``: write the result there (no autograd)."""
    num, den = o[..., :-1], o[..., -1:]
    zero = den == 0
    if out is None:
        return (num / den.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)
    return torch.div(num, den.masked_fill(zero, 1.0), out=out).masked_fill_(zero, 0.0)


def _mask_keys(
    fk: Tensor, sk: Tensor | None, v: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Zero padded keys' features, send their log-scale to _NEG, append the ones column to v."""
    va = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        fk = fk.masked_fill(~real[..., None], 0.0)
        va = va.masked_fill(~real[..., None], 0.0)
        if sk is not None:
            sk = sk.masked_fill(~real, _NEG)
    return fk, sk, va


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


def _causal_chunked(
    fq: Tensor,
    fk: Tensor,
    sk: Tensor | None,
    va: Tensor,
    chunk: int,
    state: Tensor | None = None,
    m0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Causal linear attention by chunks. Returns (out [*, N, E], final state [*k, F, E], final m).

    fq: [*q, N, F]; fk, va, sk: [*k, N, .] with leading dims that broadcast against
    fq's (grouped KV heads: fq [B, Hkv, g, N, F], keys [B, Hkv, 1, N, .]: the keys'
    state is computed once per kv head). Inside a chunk of C positions: the masked
    C x C product (phi(q) phi(k)^T) V; across chunks: a state of phi(k)^T V per chunk,
    prefix-summed over chunks only (a [N/C, F, E] tensor, never [N, F, E]).
    O(N (C (F + E) + F E)) time. With log-scales ``sk``, every term of query i is
    referenced to M_i, the max of the log-scales of the keys j <= i (and of the
    state's m0), so nothing overflows and nothing from the future, not even a
    rounding, reaches query i.
    """
    *lq, N, Fd = fq.shape
    lk = list(fk.shape[:-2])
    E = va.shape[-1]
    C = max(1, min(chunk, N))
    nc = -(-N // C)
    pad = nc * C - N
    if pad:
        fq = Fn.pad(fq, (0, 0, 0, pad))
        fk = Fn.pad(fk, (0, 0, 0, pad))
        va = Fn.pad(va, (0, 0, 0, pad))
        if sk is not None:
            sk = Fn.pad(sk, (0, pad), value=_NEG)
    fq_c = fq.view(*lq, nc, C, Fd)
    fk_c = fk.view(*lk, nc, C, Fd)
    va_c = va.view(*lk, nc, C, E)
    if state is None:
        state = fq.new_zeros(*lk, Fd, E)
    tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    p = torch.matmul(fq_c, fk_c.transpose(-1, -2))  # [*q, nc, C, C]

    if sk is None:
        p = p.masked_fill(~tril, 0.0)
        u = torch.matmul(fk_c.transpose(-1, -2), va_c)  # [*k, nc, F, E]
        before = torch.cat([state[..., None, :, :], state[..., None, :, :] + torch.cumsum(u[..., :-1, :, :], -3)], -3)
        out = torch.matmul(p, va_c) + torch.matmul(fq_c, before)
        final = before[..., -1, :, :] + u[..., -1, :, :]
        return out.reshape(*lq, nc * C, E)[..., :N, :], final, None

    if m0 is None:
        m0 = fq.new_full(lk, _NEG)
    sk_c = sk.view(*lk, nc, C)
    anchor = sk.detach()  # anchors cancel in the ratio: no gradient through them
    m_i = torch.maximum(torch.cummax(anchor, -1).values, m0[..., None]).view(*lk, nc, C)
    # intra-chunk: weight exp(s_j - M_i) (<= 1) for j <= i, 0 above the diagonal
    arg = (sk_c[..., None, :] - m_i[..., None]).masked_fill(~tril, float("-inf"))
    out = torch.matmul(p * torch.exp(arg), va_c)
    # inter-chunk: chunk c's state is referenced to m_after[c], the max over chunks <= c
    m_loc = anchor.view(*lk, nc, C).amax(-1)  # [*k, nc]
    m_after = torch.maximum(torch.cummax(m_loc, -1).values, m0[..., None])
    m_before = torch.cat([m0[..., None], m_after[..., :-1]], -1)
    alpha = torch.exp(m_before - m_after)[..., None, None]  # rescale of the running state
    u = torch.matmul(fk_c.transpose(-1, -2), va_c * torch.exp(sk_c - m_after[..., None])[..., None])
    befores = []
    s_run = state
    # O(nc) cheap [F, E] updates; the heavy work is batched above. unbind (not u[..., c]):
    # one backward node for all chunks instead of a full-size zero gradient per chunk
    for u_c, a_c in zip(u.unbind(-3), alpha.unbind(-3)):
        befores.append(s_run)
        s_run = torch.addcmul(u_c, s_run, a_c)
    before = torch.stack(befores, -3)  # [*k, nc, F, E]
    inter = torch.matmul(fq_c, before) * torch.exp(m_before[..., None] - m_i)[..., None]
    out = out + inter
    return out.reshape(*lq, nc * C, E)[..., :N, :], s_run, m_after[..., -1]


@register(
    "linear",
    params=(
        Param("feature_map", "elu", "'elu' | 'relu' | 'favor' | callable phi(x)->[..,F] | FeatureMap"),
        Param("chunk_size", 64, "chunk length of the causal prefix sums"),
    ),
    family="kernel",
    all_keys=True,  # every query weighs every key: prepended global tokens are global
    gqa=True,
    bottom_right=True,
    packed=True,
    exact=False,
    causal=True,
    cross=True,
    subquadratic=True,
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


class LinearAttention(nn.Module):
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

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        return linear_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            feature_map=self.feature_map, chunk_size=self.chunk_size,
        )

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
    family="kernel",
    all_keys=True,  # every query weighs every key: prepended global tokens are global
    gqa=True,
    bottom_right=True,
    packed=True,
    exact=False,
    causal=True,
    learned=True,
    cross=True,
    subquadratic=True,
    paper="Choromanski et al. 2021, Rethinking Attention with Performers",
    summary="FAVOR+: positive orthogonal random features approximating softmax, O(N F)",
    module=PerformerAttention,
)(performer_attention)
