"""Clustered (routing) attention against independent dense references."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.clustered import (
    ClusteredAttention, assign_clusters, clustered_attention, random_centroids, routing_vectors,
)
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

F64 = torch.float64


def rand(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def clustered_reference(q, k, v, clusters, chunk, causal, look_back, kpm):
    """Dense attention with the routing visibility, built by loops.

    Real tokens sorted by (cluster, position), padded ones after. Non-causal: i sees
    j if chunk(j) == chunk(i) (or the one before with look_back). Causal: j <= i,
    same cluster, slot(i) - slot(j) <= chunk. Padded tokens see and are seen by none.
    """
    B, H, N, _ = q.shape
    real = torch.ones(B, N, dtype=torch.bool) if kpm is None else kpm
    mask = torch.zeros(B, H, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            cl = clusters[b, h].tolist()
            reals = sorted((t for t in range(N) if real[b, t]), key=lambda t: (cl[t], t))
            order = reals + [t for t in range(N) if not real[b, t]]
            slot = {t: s for s, t in enumerate(order)}
            for i in range(N):
                for j in range(N):
                    if not (real[b, i] and real[b, j]):
                        continue
                    if causal:
                        vis = j <= i and cl[i] == cl[j] and slot[i] - slot[j] <= chunk
                    else:
                        vis = slot[i] // chunk - slot[j] // chunk in ((0, 1) if look_back else (0,))
                    mask[b, h, i, j] = vis
    return dense_attention(q, k, v, mask)


def _check_against_reference(q, k, v, kpm, causal: bool, look_back: bool):
    """clustered_attention (3 clusters, chunks of 4) equals the routing reference over the
    same clusters, outputs and gradients (float64); returns the output."""
    H, D = q.shape[1], q.shape[-1]
    cent = random_centroids(H, 3, D, seed=7).to(F64)
    x1 = [t.clone().requires_grad_() for t in (q, k, v)]
    out = clustered_attention(*x1, causal=causal, key_padding_mask=kpm, n_clusters=3,
                              chunk_size=4, look_back=look_back, centroids=cent)
    clusters = assign_clusters(routing_vectors(q, k), cent)
    x2 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = clustered_reference(*x2, clusters, 4, causal, look_back, kpm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = rand(*out.shape, seed=9)
    for a, b in zip(torch.autograd.grad(out, x1, g), torch.autograd.grad(ref, x2, g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    return out


@pytest.mark.parametrize("causal,look_back", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_routing_reference(causal, look_back, padded):
    B, H, N, D = 2, 2, 31, 8
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    kpm = (rand(B, N, seed=4) > -0.8) if padded else None
    _check_against_reference(q, k, v, kpm, causal, look_back)


@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_whole_chunk_is_dense(causal):
    B, H, N, D = 2, 3, 40, 16
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    kpm = rand(B, N, seed=4) > -1.0
    out = longattn.attention(q, k, v, "clustered", causal=causal, key_padding_mask=kpm,
                             n_clusters=1, chunk_size=64)
    ref = dense_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    real_q = kpm[:, None, :, None]  # padded positions are absent tokens: their output is 0
    torch.testing.assert_close(out, ref * real_q, atol=1e-12, rtol=0)


def test_one_cluster_small_chunks_is_block_local():
    q, k, v = (rand(1, 2, 30, 8, seed=s) for s in (1, 2, 3))
    i = torch.arange(30)
    for look_back, lo in ((False, 0), (True, 1)):
        out = clustered_attention(q, k, v, n_clusters=1, chunk_size=8, look_back=look_back)
        d = i[:, None] // 8 - i[None, :] // 8
        ref = dense_attention(q, k, v, (d >= 0) & (d <= lo))
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("t", [0, 9, 25, 38])
def test_no_causal_leak(t):
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in (1, 2, 3))
    fn = lambda q, k, v: clustered_attention(q, k, v, causal=True, n_clusters=3, chunk_size=4)
    assert_no_causal_leak(fn, q, k, v, t, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_no_leak(causal):
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in (1, 2, 3))
    kpm = rand(2, 40, seed=4) > 0
    fn = lambda q, k, v, m: clustered_attention(q, k, v, causal=causal, key_padding_mask=m,
                                                n_clusters=3, chunk_size=4)
    assert_padding_no_leak(fn, q, k, v, kpm)


def test_every_real_query_has_a_key_and_no_key_gives_zeros():
    q, k, v = (rand(1, 2, 50, 8, seed=s) for s in (1, 2, 3))
    out = clustered_attention(q, k, v, causal=True, n_clusters=4, chunk_size=4)
    assert (out.abs().sum(-1) > 0).all()
    none = clustered_attention(q, k, v, key_padding_mask=torch.zeros(1, 50, dtype=torch.bool))
    assert (none == 0).all()


def test_gradients_reach_q_k_v_not_centroids():
    m = longattn.build("clustered", heads=2, head_dim=8, n_clusters=3, chunk_size=8)
    assert isinstance(m, ClusteredAttention)
    q, k, v = (rand(2, 2, 50, 8, dtype=torch.float32, seed=s).requires_grad_() for s in (1, 2, 3))
    out = m(q, k, v, causal=True)
    out.square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not m.centroids.requires_grad and "centroids" in m.state_dict()


def test_kmeans_ema_learns_the_clusters():
    """Tokens from two directions: the EMA updates pull the centroids onto them."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    lab = torch.randint(0, 2, (4, 1, 200), generator=g)
    x = dirs[lab] * 3 + 0.05 * torch.randn(4, 1, 200, 16, generator=g)
    m = ClusteredAttention(1, 16, n_clusters=2, chunk_size=16, decay=0.5, seed=3).train()
    before = m.centroids.clone()
    for _ in range(10):
        m(x, x, x)
    c = m.centroids[0]
    assert not torch.equal(c, before[0])
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(2))
    cos = (c @ dirs.T).abs()
    assert cos.max(0).values.min() > 0.95, cos
    m.eval()
    frozen = m.centroids.clone()
    m(x, x, x)
    assert torch.equal(frozen, m.centroids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = (rand(1, 2, 64, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    ref = clustered_attention(q, k, v, chunk_size=8, n_clusters=1)
    out = clustered_attention(q.to(dtype), k.to(dtype), v.to(dtype), chunk_size=8, n_clusters=1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05


def test_reproducible_under_seed():
    q, k, v = (rand(1, 2, 64, 8, seed=s) for s in (1, 2, 3))
    a = clustered_attention(q, k, v, chunk_size=8, seed=1)
    assert torch.equal(a, clustered_attention(q, k, v, chunk_size=8, seed=1))
    assert not torch.equal(a, clustered_attention(q, k, v, chunk_size=8, seed=2))


def test_bad_inputs():
    q = rand(1, 2, 16, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        clustered_attention(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="n_clusters"):
        clustered_attention(q, q, q, n_clusters=0)
    with pytest.raises(ValueError, match="centroids"):
        clustered_attention(q, q, q, centroids=torch.randn(3, 3, 4))
    with pytest.raises(TypeError, match="centroids"):
        clustered_attention(q, q, q, centroids=[[1.0]])
    with pytest.raises(ValueError, match="decay"):
        ClusteredAttention(2, 4, decay=1.5)
    with pytest.raises(TypeError, match="unknown"):
        longattn.attention(q, q, q, "clustered", clusters=4)


def _peak(N: int) -> float:
    setup = f"""
from longattn.ops.clustered import clustered_attention
w = torch.randn(1, 2, 256, 32, requires_grad=True)
clustered_attention(w, w, w, causal=True).sum().backward()  # warm-up (lazy init)
q, k, v = (torch.randn(1, 2, {N}, 32, requires_grad=True) for _ in range(3))
"""
    run = "out = clustered_attention(q, k, v, causal=True, chunk_size=64); out.sum().backward()"
    return peak_memory_mb(setup, run)


def test_memory_is_linear_not_quadratic():
    small, big = _peak(4096), _peak(16384)
    dense_scores_mb = 2 * 16384 * 16384 * 4 / 2**20  # one N x N fp32 matrix per head: 2 GiB
    assert big < dense_scores_mb / 6, f"peak {big:.0f} MiB at N=16384"
    assert big < 7 * max(small, 8.0), f"peak grew {big / max(small, 8.0):.1f}x from 4K to 16K"


@pytest.mark.parametrize("dv", [5, 13])
@pytest.mark.parametrize("causal", [False, True])
def test_value_head_size_differs(dv, causal):
    """docs/design.md section 3 allows Dv != D (was: 'Q/K/V should have the same head size')."""
    B, H, N, D = 1, 2, 27, 8
    q, k = rand(B, H, N, D, seed=1), rand(B, H, N, D, seed=2)
    v = rand(B, H, N, dv, seed=3)
    kpm = rand(B, N, seed=4) > -0.8
    out = _check_against_reference(q, k, v, kpm, causal, True)
    assert out.shape == (B, H, N, dv)
