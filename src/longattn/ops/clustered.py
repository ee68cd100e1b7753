"""Clustered (routing) attention (Routing Transformer; Roy, Saffar, Vaswani & Grangier 2021,
"Efficient Content-Based Sparse Attention with Routing Transformers").

Queries and keys share one set of k-means centroids per head (unit vectors,
``centroids [H, n_clusters, D]``). Each token is routed to the centroid nearest to
u_t = q_t/|q_t| + k_t/|k_t| (its query and key directions together; with shared QK
this is just the query), tokens are ordered by (cluster, position), and the order is
cut into equal chunks of ``chunk_size``: every chunk attends to itself and, with
``look_back``, to the chunk before it. Equal chunks (rather than the paper's
top-k per cluster) keep the work balanced and give every query keys (itself at
least).

Causal (strictly): query i sees its own cluster's keys j <= i whose slot in the
sorted order is at most ``chunk_size`` before its own (its most recent same-cluster
predecessors and itself). Equal chunks alone would let future tokens shift chunk
boundaries, a leak; this window depends on tokens <= i only.

Centroids are learned by k-means, not by gradients: the module form
(:class:`ClusteredAttention`) keeps them in a buffer and, in training, moves each
centroid towards the mean direction of the tokens routed to it by an exponential
moving average (``decay``), then renormalises (spherical k-means, as in the paper).
The functional form takes them as ``centroids=`` (or draws random ones from
``seed``). Padded tokens (``key_padding_mask``) are absent: never keys, never routed.

Cost per head: O(N * chunk_size * D) time with look-back 2x, O(N * n_clusters) for
routing; memory O(N * chunk_size). Never an N x N tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.ops._chunked import sorted_chunk_attention, unit
from longattn.ops._softmax import pad_head_dim, work_dtype
from longattn.registry import Param, register


def random_centroids(heads: int, n_clusters: int, dim: int, seed: int | None = 0) -> Tensor:
    """Random unit centroids [heads, n_clusters, dim] (reproducible from ``seed``)."""
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    return unit(torch.randn(heads, n_clusters, dim, generator=g))


def routing_vectors(q: Tensor, k: Tensor) -> Tensor:
    """u_t = q_t/|q_t| + k_t/|k_t|: [B, H, N, D] (what tokens are clustered by)."""
    return unit(q) + unit(k)


@torch.no_grad()
def assign_clusters(u: Tensor, centroids: Tensor) -> Tensor:
    """Nearest (max cosine) centroid: u [B, H, N, D], centroids [H, K, D] -> int64 [B, H, N]."""
    return torch.einsum("bhnd,hkd->bhnk", u, centroids.to(u.dtype)).argmax(-1)


@torch.no_grad()
def kmeans_ema_update(
    centroids: Tensor, u: Tensor, clusters: Tensor, decay: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """One mini-batch spherical k-means step by EMA; returns the new centroids [H, K, D].

    mu_c <- normalise(decay * mu_c + (1 - decay) * mean of unit(u_t) over tokens t in c);
    clusters that got no token keep their centroid.
    """
    H, K, D = centroids.shape
    x = unit(u.float())  # [B, H, N, D]
    if key_padding_mask is not None:
        x = x * key_padding_mask[:, None, :, None]
    one_hot = torch.nn.functional.one_hot(clusters, K).to(x.dtype)  # [B, H, N, K]
    if key_padding_mask is not None:
        one_hot = one_hot * key_padding_mask[:, None, :, None]
    sums = torch.einsum("bhnk,bhnd->hkd", one_hot, x)
    counts = one_hot.sum((0, 2))[..., None]  # [H, K, 1]
    mean = sums / counts.clamp_min(1.0)
    c = centroids.float()
    new = unit(decay * c + (1.0 - decay) * mean)
    return torch.where(counts > 0, new, c).to(centroids.dtype)


def _check_centroids(centroids: Tensor, H: int, D: int) -> Tensor:
    if not isinstance(centroids, Tensor):
        raise TypeError(f"centroids must be a Tensor [H, n_clusters, D], got {type(centroids).__name__}")
    if centroids.dim() == 2:
        centroids = centroids.expand(H, *centroids.shape)
    if centroids.dim() != 3 or centroids.shape[0] != H or centroids.shape[2] != D:
        raise ValueError(
            f"centroids must have shape [H, n_clusters, D] = [{H}, K, {D}] (or [K, {D}]), "
            f"got {tuple(centroids.shape)}"
        )
    return centroids


class ClusteredAttention(nn.Module):
    """Module form of :func:`clustered_attention`; owns the centroids (a buffer).

    In training every forward routes the tokens, attends, then updates the centroids
    by one EMA k-means step (``decay``); no gradient reaches them. In eval they stay.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        n_clusters: int = 8,
        chunk_size: int = 64,
        look_back: bool = True,
        centroids: Tensor | None = None,
        seed: int | None = 0,
        decay: float = 0.999,
    ) -> None:
        super().__init__()
        check_int("n_clusters", n_clusters, minimum=1)
        check_int("chunk_size", chunk_size, minimum=1)
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if centroids is None:
            centroids = random_centroids(heads, n_clusters, head_dim, seed)
        else:
            centroids = unit(_check_centroids(centroids, heads, head_dim).detach().clone().float())
            if centroids.shape[1] != n_clusters:
                n_clusters = centroids.shape[1]
        self.heads, self.head_dim = heads, head_dim
        self.n_clusters, self.chunk_size, self.look_back = n_clusters, chunk_size, look_back
        self.decay = float(decay)
        self.register_buffer("centroids", centroids)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
        key_padding_mask: Tensor | None = None, scale: float | None = None,
    ) -> Tensor:
        out = clustered_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            n_clusters=self.n_clusters, chunk_size=self.chunk_size, look_back=self.look_back,
            centroids=self.centroids,
        )
        if self.training:
            with torch.no_grad():
                u = routing_vectors(q.detach().float(), k.detach().float())
                cl = assign_clusters(u, self.centroids)
                self.centroids.copy_(
                    kmeans_ema_update(self.centroids, u, cl, self.decay, key_padding_mask)
                )
        return out

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, n_clusters={self.n_clusters}, "
                f"chunk_size={self.chunk_size}, look_back={self.look_back}, decay={self.decay}")


@register(
    "clustered",
    params=(
        Param("n_clusters", 8, "k-means clusters (centroids per head)"),
        Param("chunk_size", 64, "chunk length of the (cluster, position) order"),
        Param("look_back", True, "non-causal: also attend to the previous chunk"),
        Param("centroids", None, "centroids [H, K, D] (default: random from seed; K overrides n_clusters)"),
        Param("seed", 0, "seed of the random centroids when none are given"),
    ),
    family="clustered",
    exact=False,
    causal=True,
    learned=True,
    cross=False,
    subquadratic=True,
    paper="Roy et al. 2021, Efficient Content-Based Sparse Attention with Routing Transformers",
    summary="tokens routed to shared k-means centroids (EMA), sorted equal chunks + look-back",
    module=ClusteredAttention,
)
def clustered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    n_clusters: int = 8,
    chunk_size: int = 64,
    look_back: bool = True,
    centroids: Tensor | None = None,
    seed: int | None = 0,
) -> Tensor:
    """Routing attention. q, k [B,H,N,D], v [B,H,N,Dv] -> [B,H,N,Dv]. See the module docstring."""
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    s = default_scale(scale, d.D)
    check_int("n_clusters", n_clusters, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    if centroids is None:
        centroids = random_centroids(d.H, n_clusters, d.D, seed).to(q.device)
    else:
        centroids = _check_centroids(centroids, d.H, d.D)
    work = work_dtype(q.dtype)
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    clusters = assign_clusters(routing_vectors(qw.detach(), kw.detach()), centroids)
    qp, kp, vp = pad_head_dim(qw, kw, vw)  # Dv != D: zero columns (docs/design.md section 3)
    out, _ = sorted_chunk_attention(
        qp, kp, vp, clusters[:, :, None], chunk=chunk_size, scale=s,
        key_valid=key_padding_mask, causal=causal, look_back=look_back, exclude_self=False,
    )
    return out[..., : d.Dv].to(q.dtype)
