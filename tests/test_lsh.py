"""LSH (Reformer) attention against an independent dense reference."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.lsh import LSHAttention, lsh_attention, lsh_buckets, random_rotations
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

F64 = torch.float64


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def lsh_reference(q, v, buckets, chunk, causal, kpm, dedup=True):
    """Dense shared-QK attention over the union of the rounds' visible sets, by loops.

    Per round: real tokens sorted by (bucket, position), padded ones after them.
    Non-causal: i sees j if chunk(j) is chunk(i) or the one before. Causal: j < i,
    same bucket, slot(i) - slot(j) <= chunk. Never self, unless nothing else at all.
    ``dedup=False``: a pair visible in n rounds has n times its weight (score + log n).
    """
    B, H, N, _ = q.shape
    R = buckets.shape[2]
    real = torch.ones(B, N, dtype=torch.bool) if kpm is None else kpm
    count = torch.zeros(B, H, N, N, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for r in range(R):
                bk = buckets[b, h, r].tolist()
                reals = sorted((t for t in range(N) if real[b, t]), key=lambda t: (bk[t], t))
                order = reals + [t for t in range(N) if not real[b, t]]
                slot = {t: s for s, t in enumerate(order)}
                for i in range(N):
                    for j in range(N):
                        if i == j or not real[b, i] or not real[b, j]:
                            continue
                        if causal:
                            vis = j < i and bk[i] == bk[j] and slot[i] - slot[j] <= chunk
                        else:
                            vis = slot[i] // chunk - slot[j] // chunk in (0, 1)
                        count[b, h, i, j] += vis
    mask = count > 0
    alone = ~mask.any(-1)
    eye = torch.eye(N, dtype=torch.bool)
    mask = mask | (eye & alone[..., None] & real[:, None, None, :])
    bias = None if dedup else count.clamp_min(1).log()
    return dense_attention(q, unit(q), v, mask, bias=bias)


def rand(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n_buckets,n_hashes", [(4, 2), (2, 3), (6, 1)])
def test_equals_union_reference(causal, padded, n_buckets, n_hashes):
    B, H, N, D = 2, 2, 29, 8
    q, v = rand(B, H, N, D, seed=1), rand(B, H, N, D, seed=2)
    kpm = (rand(B, N, seed=3) > -0.8) if padded else None
    q1, v1 = q.clone().requires_grad_(), v.clone().requires_grad_()
    out = lsh_attention(q1, q1, v1, causal=causal, key_padding_mask=kpm, bucket_size=4,
                        n_buckets=n_buckets, n_hashes=n_hashes, seed=5)
    buckets = lsh_buckets(q, random_rotations(n_hashes, D, n_buckets, 5, dtype=F64), n_buckets)
    q2, v2 = q.clone().requires_grad_(), v.clone().requires_grad_()
    ref = lsh_reference(q2, v2, buckets, 4, causal, kpm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = rand(*out.shape, seed=9)
    ga = torch.autograd.grad(out, (q1, v1), g)
    gb = torch.autograd.grad(ref, (q2, v2), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("dedup,n_hashes", [(True, 1), (False, 2), (False, 3)])
def test_unpadded_uniform_mask_path_equals_reference(monkeypatch, dedup, n_hashes, sliced):
    """N a multiple of the chunk, no padding, not causal: every chunk shares one mask
    (the engine builds no visibility tensor); also with duplicates counted n times,
    and in slices whose first chunk of a sequence falls mid-slice."""
    import longattn.ops._chunked as chunked

    if sliced:
        monkeypatch.setattr(chunked, "_FLASH_SLICE", 4 * 8 * 3)  # 3 chunks per call
    B, H, N, D = 2, 2, 32, 8
    q, v = rand(B, H, N, D, seed=11), rand(B, H, N, D, seed=12)
    q1, v1 = q.clone().requires_grad_(), v.clone().requires_grad_()
    out = lsh_attention(q1, q1, v1, bucket_size=4, n_buckets=4, n_hashes=n_hashes, seed=7, dedup=dedup)
    buckets = lsh_buckets(q, random_rotations(n_hashes, D, 4, 7, dtype=F64), 4)
    q2, v2 = q.clone().requires_grad_(), v.clone().requires_grad_()
    ref = lsh_reference(q2, v2, buckets, 4, False, None, dedup=dedup)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = rand(*out.shape, seed=13)
    for a, b in zip(torch.autograd.grad(out, (q1, v1), g), torch.autograd.grad(ref, (q2, v2), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_whole_chunk_is_dense_shared_qk(causal):
    B, H, N, D = 2, 3, 33, 16
    q, v = rand(B, H, N, D, seed=1), rand(B, H, N, D, seed=2)
    kpm = rand(B, N, seed=3) > -1.0
    kpm[:, 0] = True
    out = longattn.attention(q, q, v, "lsh", causal=causal, key_padding_mask=kpm,
                             n_buckets=1, bucket_size=64, n_hashes=2)
    # dense shared-QK: keys = unit queries, no self unless nothing else is visible
    i = torch.arange(N)
    vis = (i[:, None] != i[None, :]) & kpm[:, None, None, :] & kpm[:, None, :, None]
    if causal:
        vis = vis & (i[None, :] <= i[:, None])
    alone = ~vis.any(-1, keepdim=True)
    vis = vis | (alone & (i[:, None] == i[None, :]) & kpm[:, None, None, :])
    ref = dense_attention(q, unit(q), v, vis)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_dedup_counts_duplicates_once():
    """Without the correction a key seen in two rounds weighs double: results differ."""
    q, v = rand(1, 1, 32, 8, seed=1), rand(1, 1, 32, 8, seed=2)
    kw = dict(bucket_size=4, n_buckets=4, seed=1)
    a = lsh_attention(q, q, v, n_hashes=1, **kw)
    # the same rotation twice: every visible pair is duplicated, dedup must undo it
    rot = random_rotations(1, 8, 4, 1, dtype=F64).expand(2, -1, -1)
    b = lsh_attention(q, q, v, n_hashes=2, rotations=rot, bucket_size=4, n_buckets=4)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("t", [0, 7, 20, 38])
def test_no_causal_leak(t):
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in (1, 2, 3))
    fn = lambda q, k, v: lsh_attention(q, k, v, causal=True, bucket_size=4, n_buckets=4, n_hashes=2)
    assert_no_causal_leak(fn, q, k, v, t, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_no_leak(causal):
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in (1, 2, 3))
    kpm = rand(2, 40, seed=4) > 0
    fn = lambda q, k, v, m: lsh_attention(q, k, v, causal=causal, key_padding_mask=m,
                                          bucket_size=4, n_buckets=4)
    assert_padding_no_leak(fn, q, k, v, kpm)


def test_padding_positions_are_absent():
    """Tokens marked as padding change nothing for the real ones, wherever they are."""
    q, v = rand(1, 2, 24, 8, seed=1), rand(1, 2, 24, 8, seed=2)
    kpm = torch.ones(1, 24, dtype=torch.bool)
    kpm[0, 5:9] = False
    q2 = q.clone()
    q2[:, :, 5:9] = rand(1, 2, 4, 8, seed=7) * 10  # padded queries hash elsewhere: no effect
    a = lsh_attention(q, q, v, key_padding_mask=kpm, bucket_size=4, n_buckets=4)
    b = lsh_attention(q2, q2, v, key_padding_mask=kpm, bucket_size=4, n_buckets=4)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (a[:, :, 5:9] == 0).all()


def test_no_visible_key_gives_zeros():
    q, v = rand(1, 1, 10, 4, seed=1), rand(1, 1, 10, 4, seed=2)
    out = lsh_attention(q, q, v, key_padding_mask=torch.zeros(1, 10, dtype=torch.bool),
                        bucket_size=4, n_buckets=2)
    assert (out == 0).all()


def test_gradients_finite_and_reach_q_v():
    q, k, v = (rand(2, 2, 50, 8, dtype=torch.float32, seed=s).requires_grad_() for s in (1, 2, 3))
    kpm = torch.ones(2, 50, dtype=torch.bool)
    kpm[1, 40:] = False
    out = lsh_attention(q, k, v, causal=True, key_padding_mask=kpm, bucket_size=8)
    out.square().sum().backward()
    for x in (q, v):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert k.grad is None  # shared QK: k is not used (documented)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, v = rand(1, 2, 64, 16, dtype=torch.float32, seed=1), rand(1, 2, 64, 16, dtype=torch.float32, seed=2)
    ref = lsh_attention(q, q, v, bucket_size=8)
    out = lsh_attention(q.to(dtype), q.to(dtype), v.to(dtype), bucket_size=8)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05


def test_reproducible_under_seed_and_module_redraws():
    q, v = rand(1, 2, 64, 8, seed=1), rand(1, 2, 64, 8, seed=2)
    a = lsh_attention(q, q, v, bucket_size=8, seed=3)
    b = lsh_attention(q, q, v, bucket_size=8, seed=3)
    c = lsh_attention(q, q, v, bucket_size=8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    m = longattn.build("lsh", heads=2, head_dim=8, bucket_size=8, seed=3)
    assert isinstance(m, LSHAttention)
    m.eval()
    assert torch.equal(m(q, q, v), a) and torch.equal(m(q, q, v), a)
    m.train()
    t1, t2 = m(q, q, v), m(q, q, v)
    assert not torch.equal(t1, t2)  # redrawn per call in training
    m2 = LSHAttention(2, 8, bucket_size=8, seed=3).train()
    assert torch.equal(m2(q, q, v), t1) and torch.equal(m2(q, q, v), t2)  # and reproducible
    m3 = LSHAttention(2, 8, bucket_size=8, seed=3, redraw=False).train()
    assert torch.equal(m3(q, q, v), a)


def test_hash_is_angular_and_in_range():
    x = rand(1, 2, 100, 8, seed=1)
    rot = random_rotations(3, 8, 6, seed=0, dtype=F64)
    h = lsh_buckets(x, rot, 6)
    assert h.shape == (1, 2, 3, 100) and h.min() >= 0 and h.max() < 6
    assert torch.equal(lsh_buckets(x * 7.5, rot, 6), h)  # depends on direction only


def test_bad_inputs():
    q = rand(1, 1, 16, 4)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_attention(q, q, q, n_buckets=3)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_attention(q, q, q, n_buckets=0)
    with pytest.raises(ValueError, match="bucket_size"):
        lsh_attention(q, q, q, bucket_size=0)
    with pytest.raises(ValueError, match="n_hashes"):
        lsh_attention(q, q, q, n_hashes=0)
    with pytest.raises(TypeError, match="bucket_size"):
        lsh_attention(q, q, q, bucket_size=2.5)
    with pytest.raises(ValueError, match="rotations"):
        lsh_attention(q, q, q, n_buckets=4, n_hashes=2, rotations=torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="self-attention"):
        lsh_attention(q, rand(1, 1, 8, 4), rand(1, 1, 8, 4))
    with pytest.raises(TypeError, match="unknown"):
        longattn.attention(q, q, q, "lsh", buckets=4)


def _peak(N: int, causal: bool = True, dedup: bool = True) -> float:
    setup = f"""
from longattn.ops.lsh import lsh_attention
w = torch.randn(1, 2, 256, 32, requires_grad=True)
lsh_attention(w, w, w, causal={causal}, bucket_size=64, dedup={dedup}).sum().backward()  # warm-up (lazy init)
q = torch.randn(1, 2, {N}, 32, requires_grad=True); v = torch.randn(1, 2, {N}, 32, requires_grad=True)
"""
    run = (f"out = lsh_attention(q, q, v, causal={causal}, bucket_size=64, n_hashes=2, dedup={dedup}); "
           "out.sum().backward()")
    return peak_memory_mb(setup, run)


@pytest.mark.parametrize("causal,dedup", [(True, True), pytest.param(False, False, marks=pytest.mark.slow)],
                         ids=["causal", "shared_mask"])
def test_memory_is_linear_not_quadratic(causal, dedup):
    small, big = _peak(4096, causal, dedup), _peak(16384, causal, dedup)
    dense_scores_mb = 2 * 16384 * 16384 * 4 / 2**20  # one N x N fp32 matrix per head: 2 GiB
    assert big < dense_scores_mb / 6, f"peak {big:.0f} MiB at N=16384"
    # linear would be 4x, an N x N tensor 16x (hashing adds a little N * n_buckets)
    assert big < 8 * max(small, 8.0), f"peak grew {big / max(small, 8.0):.1f}x from 4K to 16K"


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_portable_engine_equals_flash_engine(monkeypatch, causal, sliced):
    """The matmul engine (used off CPU) and the fused CPU flash engine agree, with grads
    (also when the flash engine runs in many slices: look-back keys across slices)."""
    import longattn.ops._chunked as chunked

    if sliced:
        monkeypatch.setattr(chunked, "_FLASH_SLICE", 4 * 8 * 3)  # 3 chunks per call
    q, v = rand(1, 2, 45, 8, seed=1), rand(1, 2, 45, 8, seed=2)
    kpm = rand(1, 45, seed=3) > -0.8

    def run():
        q1, v1 = q.clone().requires_grad_(), v.clone().requires_grad_()
        out = lsh_attention(q1, q1, v1, causal=causal, key_padding_mask=kpm, bucket_size=4,
                            n_buckets=4, n_hashes=3)
        out.backward(rand(*out.shape, seed=4))
        return out.detach(), q1.grad, v1.grad

    fast = run()
    monkeypatch.setattr(chunked, "_flash_ok", lambda x: False)
    slow = run()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_unit_has_the_gradient_of_the_plain_formula():
    """The keys' normalisation has a hand-written backward: equal to autograd's through
    x / max(|x|, eps), also on a row whose norm is clamped."""
    from longattn.ops._chunked import unit as fast_unit

    x = rand(3, 5, 7, seed=21)
    x[0, 0] = 1e-9
    g = rand(3, 5, 7, seed=22)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast_unit(a), b / b.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    torch.testing.assert_close(ya, yb, atol=1e-15, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(ya, a, g)[0], torch.autograd.grad(yb, b, g)[0],
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dv", [5, 13])
@pytest.mark.parametrize("causal", [False, True])
def test_value_head_size_differs(dv, causal):
    """docs/design.md section 3 allows Dv != D (was: 'Q/K/V should have the same head size')."""
    B, H, N, D = 1, 2, 27, 8
    q, v = rand(B, H, N, D, seed=1), rand(B, H, N, dv, seed=2)
    kpm = rand(B, N, seed=3) > -0.8
    q1, v1 = q.clone().requires_grad_(), v.clone().requires_grad_()
    out = lsh_attention(q1, q1, v1, causal=causal, key_padding_mask=kpm, bucket_size=4,
                        n_buckets=4, n_hashes=2, seed=5)
    assert out.shape == (B, H, N, dv)
    buckets = lsh_buckets(q, random_rotations(2, D, 4, 5, dtype=F64), 4)
    q2, v2 = q.clone().requires_grad_(), v.clone().requires_grad_()
    ref = lsh_reference(q2, v2, buckets, 4, causal, kpm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = rand(*out.shape, seed=9)
    for a, b in zip(torch.autograd.grad(out, (q1, v1), g), torch.autograd.grad(ref, (q2, v2), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_head_groups_equal_all_heads(monkeypatch, causal):
    """Heads run in checkpointed groups (memory): same outputs and gradients as one call."""
    import longattn.ops.lsh as lsh_mod

    B, H, N, D = 1, 3, 27, 8
    q, v = rand(B, H, N, D, seed=1), rand(B, H, N, D, seed=2)
    kpm = rand(B, N, seed=3) > -0.8
    g = rand(B, H, N, D, seed=4)

    def run():
        q1, v1 = q.clone().requires_grad_(), v.clone().requires_grad_()
        out = lsh_attention(q1, q1, v1, causal=causal, key_padding_mask=kpm, bucket_size=4, n_buckets=4, seed=5)
        return (out, *torch.autograd.grad(out, (q1, v1), g))

    whole = run()
    monkeypatch.setattr(lsh_mod, "HEAD_GROUP_ELEMENTS", N * D)  # one head per group
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_memory_at_issue_size(causal):
    """Regression: fwd+bwd at N=16384, B=1, H=8, D=64 was ~700-850 MiB; now < 512 MiB."""
    setup = """
from longattn.ops.lsh import lsh_attention
w = torch.randn(1, 8, 256, 64, requires_grad=True)
lsh_attention(w, w, w).sum().backward()
q, v = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(2))
"""
    peak = peak_memory_mb(setup, f"lsh_attention(q, q, v, causal={causal}).sum().backward()", threads=2)
    assert peak < 512, f"{peak:.0f} MiB"
