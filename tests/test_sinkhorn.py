"""Sparse Sinkhorn attention against independent references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import longattn
from longattn.ops.reference import dense_attention
from longattn.ops.sinkhorn import (
    SinkhornAttention, block_scores, sinkhorn, sinkhorn_attention, sinkhorn_permutation,
)
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

F64 = torch.float64


def rand(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def block_ids(N, b):
    return torch.arange(N) // b


def test_identity_permutation_is_block_local():
    B, H, N, D, b = 2, 2, 45, 8, 8
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    kpm = rand(B, N, seed=4) > -1.0
    nb = math.ceil(N / b)
    eye = torch.eye(nb, dtype=F64)[None, None]
    bi = block_ids(N, b)
    same = bi[:, None] == bi[None, :]
    for m in (None, kpm):
        out = sinkhorn_attention(q, k, v, block_size=b, permutation=eye, key_padding_mask=m)
        ref = dense_attention(q, k, v, same, key_padding_mask=m)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_registered_name_runs_sinkhorn_attention():
    """``longattn.attention(..., "sinkhorn")`` is the block-local oracle under an identity
    permutation (the registration once decorated a private helper instead)."""
    q, k, v = (rand(1, 2, 29, 8, seed=s) for s in (5, 6, 7))
    eye = torch.eye(math.ceil(29 / 8), dtype=F64)[None, None]
    bi = block_ids(29, 8)
    out = longattn.attention(q, k, v, "sinkhorn", block_size=8, permutation=eye)
    ref = dense_attention(q, k, v, bi[:, None] == bi[None, :])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_hyper_parameters_refuse_bools_and_non_numbers():
    q = rand(1, 2, 16, 4)
    for bad in (True, "1.0", float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            sinkhorn_attention(q, q, q, temperature=bad)
    with pytest.raises(ValueError, match="gumbel"):
        sinkhorn_attention(q, q, q, gumbel=False)


def test_causal_shift_permutation_is_own_causal_plus_previous_block():
    B, H, N, D, b = 1, 2, 37, 8, 6
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    nb = math.ceil(N / b)
    shift = torch.diag(torch.ones(nb - 1, dtype=F64), -1)[None, None]  # block i sorts to i-1
    bi, i = block_ids(N, b), torch.arange(N)
    vis = ((bi[:, None] == bi[None, :]) & (i[None, :] <= i[:, None])) | (bi[:, None] - 1 == bi[None, :])
    out = sinkhorn_attention(q, k, v, causal=True, block_size=b, permutation=shift)
    torch.testing.assert_close(out, dense_attention(q, k, v, vis), atol=1e-12, rtol=0)


def sinkhorn_reference(q, k, v, P, b, causal, kpm, scale):
    """Loop over query blocks: keys = own block (+causal) and sum_j P[i, j] * block j.

    Padded keys are zeroed before mixing; sorted slot t weighs m[t] = sum_j P[i, j] * real_j[t]
    (score + log m), and is invisible where m = 0.
    """
    B, H, N, D = q.shape
    nb = P.shape[-1]
    real = torch.ones(B, N, dtype=torch.bool) if kpm is None else kpm
    outs = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    rows = []
    for bb in range(B):
        for h in range(H):
            for i in range(nb):
                qi = q[bb, h, i * b : (i + 1) * b]
                own = list(range(i * b, min(N, (i + 1) * b)))
                ks, vs, bias = [k[bb, h, own]], [v[bb, h, own]], []
                sk = torch.zeros(b, D, dtype=q.dtype)
                sv = torch.zeros(b, v.shape[-1], dtype=q.dtype)
                m = torch.zeros(b, dtype=q.dtype)
                for j in range(nb):
                    for t in range(b):
                        pos = j * b + t
                        if pos < N and real[bb, pos]:
                            sk[t] = sk[t] + P[bb, h, i, j] * k[bb, h, pos]
                            sv[t] = sv[t] + P[bb, h, i, j] * v[bb, h, pos]
                            m[t] = m[t] + P[bb, h, i, j]
                s = torch.cat([qi @ ks[0].T, qi @ sk.T], dim=1) * scale
                ok_own = real[bb, own][None, :].expand(len(qi), -1).clone()
                if causal:
                    ok_own &= torch.tensor(own)[None, :] <= torch.arange(i * b, i * b + len(qi))[:, None]
                s_own = s[:, : len(own)].masked_fill(~ok_own, float("-inf"))
                s_srt = torch.where(m > 0, s[:, len(own):] + torch.log(m.clamp_min(1e-300)),
                                    torch.full_like(s[:, len(own):], float("-inf")))
                p = torch.softmax(torch.cat([s_own, s_srt], 1), dim=1)
                o = p @ torch.cat([vs[0], sv])
                rows.append((bb, h, own, o))
    for bb, h, own, o in rows:
        outs[bb, h, own] = o
    return outs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_loop_reference_with_gradients(causal, padded):
    B, H, N, D, b = 1, 2, 22, 4, 5
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    kpm = (rand(B, N, seed=4) > -0.6) if padded else None
    if padded:
        kpm[:, :b] = True  # the first block keeps a real key (no empty rows)
    wq, wk = rand(H, D, 3, seed=5), rand(H, D, 3, seed=6)
    x1 = [t.clone().requires_grad_() for t in (q, k, v, wq, wk)]
    out = sinkhorn_attention(*x1[:3], causal=causal, key_padding_mask=kpm, block_size=b,
                             iters=5, temperature=0.7, sort_net=(x1[3], x1[4]))
    # the permutation from the same SortNet + Sinkhorn, then attention by loops
    x2 = [t.clone().requires_grad_() for t in (q, k, v, wq, wk)]
    nb = math.ceil(N / b)
    pad = nb * b - N
    qp, kp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in x2[:2])
    valid = torch.ones(B, N, dtype=torch.bool) if kpm is None else kpm
    validp = torch.nn.functional.pad(valid, (0, pad)).reshape(B, nb, b)
    qvalid = (torch.arange(nb * b) < N).reshape(nb, b)
    R = block_scores(qp.reshape(B, H, nb, b, D), kp.reshape(B, H, nb, b, D), validp, qvalid,
                     x2[3], x2[4], causal)
    P = sinkhorn_permutation(R, iters=5, temperature=0.7, gumbel=0.0, causal=causal)
    ref = sinkhorn_reference(*x2[:3], P, b, causal, kpm, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = rand(*out.shape, seed=9)
    for a, bb in zip(torch.autograd.grad(out, x1, g), torch.autograd.grad(ref, x2, g)):
        torch.testing.assert_close(a, bb, atol=1e-11, rtol=0)


def test_sinkhorn_is_doubly_stochastic_and_causal_rows_only_past():
    x = rand(2, 3, 6, 6, seed=1)
    P = sinkhorn(x, 200).exp()
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 3, 6, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(P.sum(-2), torch.ones(2, 3, 6, dtype=F64), atol=1e-6, rtol=0)
    Pc = sinkhorn_permutation(x, iters=8, temperature=0.5, gumbel=0.0, causal=True)
    assert (Pc.triu() == 0).all()  # strictly past blocks only; block 0 has none
    torch.testing.assert_close(Pc[..., 1:, :].sum(-1), torch.ones(2, 3, 5, dtype=F64))
    # low temperature -> the best assignment (brute force over the 720 permutations)
    hard = sinkhorn_permutation(x, iters=300, temperature=0.05, gumbel=0.0, causal=False)
    for b in range(2):
        for h in range(3):
            best = max(itertools.permutations(range(6)),
                       key=lambda p: sum(x[b, h, i, p[i]].item() for i in range(6)))
            assert hard[b, h].argmax(-1).tolist() == list(best)


@pytest.mark.parametrize("t", [0, 7, 20, 38])
def test_no_causal_leak(t):
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in (1, 2, 3))
    fn = lambda q, k, v: sinkhorn_attention(q, k, v, causal=True, block_size=4)
    assert_no_causal_leak(fn, q, k, v, t, atol=1e-12)


def test_no_causal_leak_module_with_gumbel():
    m = SinkhornAttention(2, 8, block_size=4, gumbel=1.0).eval()
    q, k, v = (rand(1, 2, 30, 8, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    assert_no_causal_leak(lambda q, k, v: m(q, k, v, causal=True), q, k, v, 13, atol=1e-6)
    fn = lambda q, k, v: sinkhorn_attention(q, k, v, causal=True, block_size=4, gumbel=1.0, seed=3)
    assert_no_causal_leak(fn, q, k, v, 13, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_no_leak(causal):
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in (1, 2, 3))
    kpm = rand(2, 40, seed=4) > 0
    fn = lambda q, k, v, m: sinkhorn_attention(q, k, v, causal=causal, key_padding_mask=m,
                                               block_size=4)
    assert_padding_no_leak(fn, q, k, v, kpm)


def test_no_visible_key_gives_zeros():
    q, k, v = (rand(1, 1, 12, 4, seed=s) for s in (1, 2, 3))
    out = sinkhorn_attention(q, k, v, block_size=4, key_padding_mask=torch.zeros(1, 12, dtype=torch.bool))
    assert (out == 0).all()


def test_gradients_reach_q_k_v_and_the_sort_net():
    m = longattn.build("sinkhorn", heads=2, head_dim=8, block_size=8)
    assert isinstance(m, SinkhornAttention)
    m.train()
    q, k, v = (rand(2, 2, 60, 8, dtype=torch.float32, seed=s).requires_grad_() for s in (1, 2, 3))
    for causal in (False, True):
        m.zero_grad()
        out = m(q, k, v, causal=causal)
        out.square().sum().backward()
        for x in (q, k, v, m.wq, m.wk):
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gumbel_noise_in_training_only_and_seeded_functional():
    q, k, v = (rand(1, 2, 64, 8, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    m = SinkhornAttention(2, 8, block_size=8, gumbel=1.0)
    m.train()
    assert not torch.equal(m(q, k, v), m(q, k, v))
    m.eval()
    assert torch.equal(m(q, k, v), m(q, k, v))
    a = sinkhorn_attention(q, k, v, block_size=8, gumbel=1.0, seed=1)
    assert torch.equal(a, sinkhorn_attention(q, k, v, block_size=8, gumbel=1.0, seed=1))
    assert not torch.equal(a, sinkhorn_attention(q, k, v, block_size=8, gumbel=1.0, seed=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = (rand(1, 2, 64, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    ref = sinkhorn_attention(q, k, v, block_size=8)
    out = sinkhorn_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=8)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05


def test_bad_inputs():
    q = rand(1, 2, 16, 4)
    with pytest.raises(ValueError, match="block_size"):
        sinkhorn_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_attention(q, q, q, temperature=0.0)
    with pytest.raises(ValueError, match="gumbel"):
        sinkhorn_attention(q, q, q, gumbel=-1.0)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn_attention(q, q, q, iters=-1)
    with pytest.raises(ValueError, match="permutation"):
        sinkhorn_attention(q, q, q, block_size=4, permutation=torch.eye(3)[None, None])
    with pytest.raises(ValueError, match="sort_net"):
        sinkhorn_attention(q, q, q, sort_net=(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3)))
    with pytest.raises(TypeError, match="sort_net"):
        sinkhorn_attention(q, q, q, sort_net=torch.zeros(2, 4, 3))
    with pytest.raises(TypeError, match="unknown"):
        longattn.attention(q, q, q, "sinkhorn", n_blocks=4)


def _peak(N: int) -> float:
    setup = f"""
from longattn.ops.sinkhorn import sinkhorn_attention
w = torch.randn(1, 2, 256, 32, requires_grad=True)
sinkhorn_attention(w, w, w, causal=True).sum().backward()  # warm-up (lazy init)
q, k, v = (torch.randn(1, 2, {N}, 32, requires_grad=True) for _ in range(3))
"""
    run = "out = sinkhorn_attention(q, k, v, causal=True, block_size=64); out.sum().backward()"
    return peak_memory_mb(setup, run)


def test_memory_is_linear_not_quadratic():
    small, big = _peak(4096), _peak(16384)
    dense_scores_mb = 2 * 16384 * 16384 * 4 / 2**20  # one N x N fp32 matrix per head: 2 GiB
    assert big < dense_scores_mb / 6, f"peak {big:.0f} MiB at N=16384"
    assert big < 7 * max(small, 8.0), f"peak grew {big / max(small, 8.0):.1f}x from 4K to 16K"


@pytest.mark.parametrize("causal", [False, True])
def test_padded_queries_move_no_real_output(causal):
    """Regression: the block summaries pooled padded positions (1-2% moves, causal 31%)."""
    B, H, N, D, b = 2, 2, 43, 8, 6
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    kpm = rand(B, N, seed=4) > -0.3
    kpm[1, 30:] = False  # a padded tail too
    kpm[:, 0] = False  # block 0's first position padded (the causal query summary)
    pad = ~kpm[:, None, :, None]
    q2, k2, v2 = (torch.where(pad, rand(B, H, N, D, seed=10 + s) * 5, x) for s, x in enumerate((q, k, v)))
    fn = lambda q, k, v: sinkhorn_attention(q, k, v, causal=causal, key_padding_mask=kpm, block_size=b,
                                            iters=4)
    out, out2 = fn(q, k, v), fn(q2, k2, v2)
    real = kpm[:, None, :, None].expand_as(out)
    assert (out - out2)[real].abs().max() < 1e-12


def test_block_summaries_pool_real_positions():
    """block_scores against the summaries written out by loops (mean of real queries /
    keys; causal: the query at the first real position of the block)."""
    B, H, nb, b, D, S = 1, 2, 4, 3, 5, 2
    qb, kb = rand(B, H, nb, b, D, seed=1), rand(B, H, nb, b, D, seed=2)
    wq, wk = rand(H, D, S, seed=3), rand(H, D, S, seed=4)
    valid = torch.tensor([[[False, True, True], [True, False, True], [False, False, False], [True, True, False]]])
    qvalid = torch.ones(nb, b, dtype=torch.bool)
    qvalid[3, 2] = False
    for causal in (False, True):
        R = block_scores(qb, kb, valid, qvalid, wq, wk, causal)
        for h in range(H):
            sq, sk = [], []
            for i in range(nb):
                real = [t for t in range(b) if valid[0, i, t] and qvalid[i, t]]
                sk.append(kb[0, h, i, real].mean(0) if real else torch.zeros(D, dtype=F64))
                if causal:
                    sq.append(qb[0, h, i, real[0]] if real else torch.zeros(D, dtype=F64))
                else:
                    sq.append(qb[0, h, i, real].mean(0) if real else torch.zeros(D, dtype=F64))
            ref = (torch.stack(sq) @ wq[h]) @ (torch.stack(sk) @ wk[h]).T / math.sqrt(S)
            torch.testing.assert_close(R[0, h], ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_head_groups_equal_all_heads(monkeypatch, causal):
    """Heads run in checkpointed groups and the Sinkhorn loop is checkpointed (memory):
    same outputs and gradients (SortNet included) as one call, Gumbel noise too."""
    import longattn.ops.lsh as lsh_mod

    B, H, N, D = 2, 3, 23, 4
    q, k, v = (rand(B, H, N, D, seed=s) for s in (1, 2, 3))
    kpm = rand(B, N, seed=4) > -0.6
    wq, wk = rand(H, D, 3, seed=5), rand(H, D, 3, seed=6)
    g = rand(B, H, N, D, seed=7)

    def run():
        xs = [t.clone().requires_grad_() for t in (q, k, v, wq, wk)]
        out = sinkhorn_attention(*xs[:3], causal=causal, key_padding_mask=kpm, block_size=5, iters=4,
                                 gumbel=0.5, seed=11, sort_net=(xs[3], xs[4]))
        return (out, *torch.autograd.grad(out, xs, g))

    whole = run()
    monkeypatch.setattr(lsh_mod, "HEAD_GROUP_ELEMENTS", B * N * D)  # one head per group
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_memory_at_issue_size(causal):
    """Regression: fwd+bwd at N=16384, B=1, H=8, D=64 was ~650-860 MiB; now < 512 MiB."""
    setup = """
from longattn.ops.sinkhorn import sinkhorn_attention
w = torch.randn(1, 8, 256, 64, requires_grad=True)
sinkhorn_attention(w, w, w).sum().backward()
q, k, v = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(3))
"""
    peak = peak_memory_mb(setup, f"sinkhorn_attention(q, k, v, causal={causal}).sum().backward()", threads=2)
    assert peak < 512, f"{peak:.0f} MiB"
