"""Feature maps of kernelized (linear) attention, and the helpers every form of it
shares (:mod:`longattn.ops.kernel`).

A map phi: [B, H, N, D] -> ``(f [B, H, N, F], s [B, H, N] | None)`` means
``phi = f * exp(s)[..., None]``, ``s`` a per-row log-scale (None for maps that need
none): ``"elu"`` (elu(x) + 1, Katharopoulos et al. 2020), ``"relu"``, ``"favor"``
(Performer's positive orthogonal random features, Choromanski et al. 2021), any
callable ``phi(x) -> [.., F]``, or a :class:`FeatureMap`.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from longattn.ops._checks import check_int

_NEG = -1e30  # finite "minus infinity" for running maxima (exp(_NEG - x) == 0, no NaN)

__all__ = [
    "CallableFeatureMap", "EluFeatureMap", "FavorFeatureMap", "FeatureMap", "FeatureMapLike", "ReluFeatureMap",
    "orthogonal_random_features", "resolve_feature_map",
]


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
