"""Linformer, memory-compressed and Nystrom attention: degenerate settings equal full
attention (float64 oracle), padding, causality (compressed), refusals, memory."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.lowrank import iterative_pinv
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

D64 = torch.float64


def qkv(B=2, H=3, N=37, D=8, dtype=D64, seed=0, Nk=None):
    g = torch.Generator().manual_seed(seed)
    Nk = Nk or N
    return (torch.randn(B, H, N, D, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, D, generator=g, dtype=dtype))


def pad_mask(B, N, cut=20):
    m = torch.ones(B, N, dtype=torch.bool)
    m[-1, cut:] = False
    return m


# --------------------------------------------------------------------------- linformer


def test_linformer_identity_equals_full():
    q, k, v = qkv()
    eye = torch.eye(37, dtype=D64)
    mask = pad_mask(2, 37)
    torch.testing.assert_close(longattn.attention(q, k, v, "linformer", E=eye, F=eye), dense_attention(q, k, v))
    torch.testing.assert_close(
        longattn.attention(q, k, v, "linformer", E=eye, F=eye, key_padding_mask=mask),
        dense_attention(q, k, v, key_padding_mask=mask),
    )
    # longer E (max_len 50): shorter inputs use the first N columns
    big = torch.eye(50, dtype=D64)
    torch.testing.assert_close(longattn.attention(q, k, v, "linformer", E=big, F=big)[..., :],
                               dense_attention(q, k, v))


def test_linformer_hand_projection_and_gradients():
    q, k, v = qkv(N=12)
    E = torch.randn(3, 4, 16, dtype=D64)  # per head, max_len 16
    F = torch.randn(4, 16, dtype=D64)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = longattn.attention(*ins, "linformer", E=E, F=F)
    kp = torch.einsum("hkn,bhnd->bhkd", E[:, :, :12], ins[1])
    vp = torch.einsum("kn,bhnd->bhkd", F[:, :12], ins[2])
    ref = torch.softmax(ins[0] @ kp.transpose(-1, -2) / 8 ** 0.5, -1) @ vp
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.sum(), ins)
    ins2 = [t.clone().requires_grad_() for t in (q, k, v)]
    kp = torch.einsum("hkn,bhnd->bhkd", E[:, :, :12], ins2[1])
    vp = torch.einsum("kn,bhnd->bhkd", F[:, :12], ins2[2])
    g2 = torch.autograd.grad((torch.softmax(ins2[0] @ kp.transpose(-1, -2) / 8 ** 0.5, -1) @ vp).sum(), ins2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_linformer_padding_and_refusals():
    q, k, v = qkv()
    mask = pad_mask(2, 37)
    fn = lambda q, k, v, m: longattn.attention(q, k, v, "linformer", max_len=64, proj_dim=16, key_padding_mask=m)
    assert_padding_no_leak(fn, q, k, v, mask)
    with pytest.raises(ValueError, match="cannot be causal"):
        longattn.attention(q, k, v, "linformer", causal=True)
    with pytest.raises(ValueError, match="cannot be causal"):
        from longattn.ops.lowrank import linformer_attention
        linformer_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="max_len"):
        longattn.attention(q, k, v, "linformer", max_len=20)
    with pytest.raises(ValueError, match="max_len"):
        longattn.attention(q, k, v, "linformer", E=torch.randn(4, 30, dtype=D64))
    with pytest.raises(ValueError, match="E must be"):
        longattn.attention(q, k, v, "linformer", E=torch.randn(5, 4, 40, dtype=D64))
    m = longattn.build("linformer", heads=3, head_dim=8, max_len=20, proj_dim=4)
    with pytest.raises(ValueError, match="max_len"):
        m(q.float(), k.float(), v.float())


def test_linformer_module_trains():
    m = longattn.build("linformer", heads=3, head_dim=8, max_len=40, proj_dim=8, share_kv=True)
    q, k, v = qkv(dtype=torch.float32)
    m(q, k, v).square().sum().backward()
    assert m.F is None and torch.isfinite(m.E.grad).all() and m.E.grad.abs().sum() > 0


# --------------------------------------------------------------------------- compressed


def compressed_oracle(q, k, v, c, causal, mask=None):
    """Independent: build compressed keys with a Python loop, then one dense masked
    softmax over [compressed slots | raw keys] with the visibility rules written out."""
    B, H, N, D = k.shape
    real = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    S = -(-N // c)
    kc = torch.zeros(B, H, S, D, dtype=k.dtype)
    vc = torch.zeros(B, H, S, D, dtype=v.dtype)
    ok = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        for s in range(S):
            idx = [j for j in range(s * c, min(N, s * c + c)) if real[b, j]]
            if idx:
                ok[b, s] = True
                kc[b, :, s] = k[b, :, idx].mean(1)
                vc[b, :, s] = v[b, :, idx].mean(1)
    keys = torch.cat([kc, k], 2) if causal else kc
    vals = torch.cat([vc, v], 2) if causal else vc
    vis = torch.zeros(B, 1, N, keys.shape[2], dtype=torch.bool)
    for i in range(N):
        for s in range(S):
            vis[:, 0, i, s] = ok[:, s] & ((s < i // c) if causal else True)
        if causal:
            for j in range((i // c) * c, i + 1):
                vis[:, 0, i, S + j] = real[:, j]
    return dense_attention(q, keys, vals, mask=vis)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("c", [1, 3, 5])
def test_compressed_equals_oracle(c, causal):
    q, k, v = qkv(N=23)
    mask = pad_mask(2, 23, cut=14)
    mask[0, 6] = False
    for m in (None, mask):
        out = longattn.attention(q, k, v, "compressed", stride=c, causal=causal, key_padding_mask=m)
        torch.testing.assert_close(out, compressed_oracle(q, k, v, c, causal, m))


def test_compressed_c1_is_full_attention():
    q, k, v = qkv()
    for causal in (False, True):
        torch.testing.assert_close(longattn.attention(q, k, v, "compressed", stride=1, causal=causal),
                                   dense_attention(q, k, v, causal=causal))


def test_compressed_conv_weights_and_slots():
    q, k, v = qkv(N=20)
    c = 4
    w = torch.randn(8, 8, c, dtype=D64)
    out = longattn.attention(q, k, v, "compressed", conv_k=w, conv_v=w)
    kc = torch.einsum("oit,bhsti->bhso", w, k.view(2, 3, 5, c, 8))
    vc = torch.einsum("oit,bhsti->bhso", w, v.view(2, 3, 5, c, 8))
    torch.testing.assert_close(out, dense_attention(q, kc, vc))
    # per-head weights
    wh = torch.randn(3, 8, 8, c, dtype=D64)
    out = longattn.attention(q, k, v, "compressed", conv_k=wh, conv_v=wh)
    kc = torch.einsum("hoit,bhsti->bhso", wh, k.view(2, 3, 5, c, 8))
    vc = torch.einsum("hoit,bhsti->bhso", wh, v.view(2, 3, 5, c, 8))
    torch.testing.assert_close(out, dense_attention(q, kc, vc))
    # slots: c = ceil(N / slots)
    torch.testing.assert_close(longattn.attention(q, k, v, "compressed", slots=5),
                               longattn.attention(q, k, v, "compressed", stride=4))


@pytest.mark.parametrize("params", [{"stride": 4}, {"slots": 6}])
def test_compressed_causal_no_leak_and_padding(params):
    q, k, v = qkv(N=30)
    fn = lambda q, k, v: longattn.attention(q, k, v, "compressed", causal=True, **params)
    for t in (0, 3, 4, 13, 28):
        assert_no_causal_leak(fn, q, k, v, t)
    m = longattn.build("compressed", heads=3, head_dim=8, **params)
    fm = lambda q, k, v: m(q, k, v, causal=True)
    assert_no_causal_leak(fm, q.float(), k.float(), v.float(), 13)
    mask = pad_mask(2, 30, cut=17)
    for causal in (False, True):
        assert_padding_no_leak(
            lambda q, k, v, mm: longattn.attention(q, k, v, "compressed", causal=causal, key_padding_mask=mm, **params),
            q, k, v, mask)


def test_compressed_module_learns_conv_and_errors():
    m = longattn.build("compressed", heads=3, head_dim=8, stride=3)
    q, k, v = qkv(dtype=torch.float32)
    m(q, k, v, causal=True).square().sum().backward()
    assert m.conv_k.grad.abs().sum() > 0 and m.conv_v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stride"):
        longattn.attention(q, k, v, "compressed", stride=0)
    with pytest.raises(ValueError, match="conv_k"):
        longattn.attention(q, k, v, "compressed", stride=3, conv_k=torch.randn(8, 8, 4))
    with pytest.raises(ValueError, match="slots"):
        longattn.attention(q, k, v, "compressed", slots=0)


# --------------------------------------------------------------------------- nystrom


def test_iterative_pinv_matches_linalg():
    a = torch.softmax(torch.randn(4, 10, 10, dtype=D64), -1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), rtol=1e-6, atol=1e-6)
    # rank-deficient (zero column, zero row): still the Moore-Penrose inverse
    a[:, :, 3] = 0
    a[:, 5, :] = 0
    torch.testing.assert_close(iterative_pinv(a, 60), torch.linalg.pinv(a), rtol=1e-6, atol=1e-6)


def test_nystrom_m_equals_n_is_full_attention():
    q, k, v = qkv()
    mask = pad_mask(2, 37)
    out = longattn.attention(q, k, v, "nystrom", landmarks=37, pinv_iters=30)
    assert (out - dense_attention(q, k, v)).abs().max() < 1e-4
    out = longattn.attention(q, k, v, "nystrom", landmarks=37, pinv_iters=30, key_padding_mask=mask)
    assert (out - dense_attention(q, k, v, key_padding_mask=mask)).abs().max() < 1e-4


def test_nystrom_hand_formula():
    """m divides N: landmarks are plain segment means; the formula written out with linalg.pinv."""
    q, k, v = qkv(N=24)
    m = 6
    ql = q.view(2, 3, m, 4, 8).mean(3)
    kl = k.view(2, 3, m, 4, 8).mean(3)
    sm = lambda x: torch.softmax(x / 8 ** 0.5, -1)
    ref = sm(q @ kl.transpose(-1, -2)) @ torch.linalg.pinv(sm(ql @ kl.transpose(-1, -2))) @ (
        sm(ql @ k.transpose(-1, -2)) @ v)
    out = longattn.attention(q, k, v, "nystrom", landmarks=m, pinv_iters=40)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def _segment_means_loop(x, m):
    """Landmarks by hand: means of consecutive segments of ceil(N / m) rows (the last
    one shorter), so N = 100, m = 16 gives 15 landmarks and N = 257 gives 16."""
    N = x.shape[2]
    seg = -(-N // m)
    return torch.stack([x[:, :, a : a + seg].mean(2) for a in range(0, N, seg)], dim=2)


def _nystrom_formula(q, k, v):
    ql, kl = _segment_means_loop(q, 16), _segment_means_loop(k, 16)
    sm = lambda x: torch.softmax(x / q.shape[-1] ** 0.5, -1)
    return sm(q @ kl.transpose(-1, -2)) @ torch.linalg.pinv(sm(ql @ kl.transpose(-1, -2))) @ (
        sm(ql @ k.transpose(-1, -2)) @ v)


def test_nystrom_cross_with_different_landmark_counts():
    """Nq = 100 -> 15 query landmarks, Nk = 257 -> 16 key landmarks (crashed: 16 vs 15)."""
    q, k, v = qkv(B=1, H=2, N=100, Nk=257, seed=3)
    assert _segment_means_loop(q, 16).shape[2] == 15 and _segment_means_loop(k, 16).shape[2] == 16
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = longattn.attention(*ins, "nystrom", landmarks=16)
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _nystrom_formula(*refs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, refs, g)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    # the iterative pinv handles the rectangular 15 x 16 kernel too, given iterations
    out_it = longattn.attention(q, k, v, "nystrom", landmarks=16, pinv_iters=60)
    torch.testing.assert_close(out_it, ref.detach(), rtol=1e-6, atol=1e-6)


def test_nystrom_default_is_the_exact_pinv_formula():
    """The default equals the formula with the exact pinv (6 paper iterations did not:
    ~90% relative error at m = 16), in float32 too."""
    q, k, v = qkv(B=1, H=2, N=256, seed=4)
    ref = _nystrom_formula(q, k, v)
    rel = lambda x: ((x.double() - ref).norm() / ref.norm()).item()
    assert rel(longattn.attention(q, k, v, "nystrom", landmarks=16)) < 1e-10
    # float32: the kernel is ill-conditioned, input rounding is amplified (~2e-4 here)
    assert rel(longattn.attention(q.float(), k.float(), v.float(), "nystrom", landmarks=16)) < 2e-3
    assert rel(longattn.attention(q, k, v, "nystrom", landmarks=16, pinv_iters=6)) > 0.1  # why not 6


def test_iterative_pinv_rectangular():
    a = torch.softmax(torch.randn(3, 7, 11, dtype=D64), -1)
    torch.testing.assert_close(iterative_pinv(a, 60), torch.linalg.pinv(a), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(iterative_pinv(a.transpose(-1, -2), 60), torch.linalg.pinv(a.transpose(-1, -2)),
                               rtol=1e-6, atol=1e-6)


def test_nystrom_padding_and_refusal():
    q, k, v = qkv()
    mask = pad_mask(2, 37, cut=9)
    mask[0, 2] = False
    fn = lambda q, k, v, mm: longattn.attention(q, k, v, "nystrom", landmarks=8, key_padding_mask=mm)
    assert_padding_no_leak(fn, q, k, v, mask)
    with pytest.raises(ValueError, match="cannot be causal"):
        longattn.attention(q, k, v, "nystrom", causal=True)
    with pytest.raises(ValueError, match="cannot be causal"):
        from longattn.ops.lowrank import nystrom_attention
        nystrom_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="landmarks"):
        longattn.attention(q, k, v, "nystrom", landmarks=0)


def test_fully_masked_rows_zero():
    q, k, v = qkv(N=16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1] = False
    for name, p in (("linformer", {"max_len": 16, "proj_dim": 4}), ("nystrom", {"landmarks": 4}),
                    ("compressed", {"stride": 4})):
        out = longattn.attention(q, k, v, name, key_padding_mask=mask, **p)
        assert torch.isfinite(out).all() and (out[1] == 0).all(), name


@pytest.mark.parametrize("name,params", [("linformer", {"max_len": 16384, "proj_dim": 64}),
                                         ("compressed", {"slots": 64}),
                                         ("nystrom", {"landmarks": 32})])
def test_low_precision_gradients_finite(name, params):
    q, k, v = (t.float().mul(3).to(torch.bfloat16).requires_grad_() for t in qkv(N=40))
    out = longattn.attention(q, k, v, name, **params)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    if name == "compressed":
        out = longattn.attention(q, k, v, name, causal=True, **params)
        out.float().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("name,params,causal", [
    ("linformer", "max_len=16384, proj_dim=64", False),
    ("nystrom", "landmarks=32", False),
    ("compressed", "slots=64", False),
    ("compressed", "slots=64", True),
])
def test_memory_no_n_by_n(name, params, causal):
    """fwd+bwd at N=16384 (H=1, D=32): one N x N fp32 tensor would be 1 GiB."""
    setup = """
import longattn
q, k, v = (torch.randn(1, 1, 16384, 32, requires_grad=True) for _ in range(3))
"""
    run = f"out = longattn.attention(q, k, v, {name!r}, causal={causal}, {params})\nout.sum().backward()\n"
    peak = peak_memory_mb(setup, run)
    assert peak < 250, f"peak {peak:.0f} MiB at N=16384 (N^2 fp32 = 1024 MiB)"


@pytest.mark.parametrize("name,params", [("linformer", {"proj_dim": 7, "max_len": 40}),
                                         ("nystrom", {"landmarks": 5}), ("compressed", {"stride": 3})])
def test_fused_kernel_path_equals_matmul_path(name, params, monkeypatch):
    """The CPU flash path of the few-keys softmax and its plain-matmul form (used on
    other devices) agree, outputs and gradients, with padded keys."""
    import longattn.ops.lowrank as lr

    q, k, v = qkv(N=29)
    kpm = torch.ones(2, 29, dtype=torch.bool)
    kpm[1, 20:] = False

    def run():
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = longattn.attention(*ins, name, key_padding_mask=kpm, **params)
        grads = torch.autograd.grad((out * torch.arange(out.numel(), dtype=D64).view_as(out).sin()).sum(), ins)
        return out.detach(), *grads

    fused = run()

    def matmul_only(q, k, v, scale, visible):
        p = lr._masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, visible)
        return torch.matmul(p, v)

    monkeypatch.setattr(lr, "_softmax_attention", matmul_only)
    plain = run()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_compressed_causal_head_groups_equal_all_heads(monkeypatch):
    """Causal compressed runs (head, query-chunk) parts under checkpointing (memory):
    same outputs and gradients as one call, padded or not, N no multiple of the stride."""
    import longattn.ops.lowrank as lr

    q, k, v = qkv(N=29)
    kpm = torch.ones(2, 29, dtype=torch.bool)
    kpm[1, 20:] = False
    g = torch.randn(2, 3, 29, 8, dtype=D64)
    for mask in (None, kpm):
        def run():
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            out = longattn.attention(*ins, "compressed", causal=True, stride=4, key_padding_mask=mask)
            return (out, *torch.autograd.grad(out, ins, g))

        monkeypatch.setattr(lr, "CAUSAL_PART_ELEMENTS", 1 << 20)
        whole = run()
        monkeypatch.setattr(lr, "CAUSAL_PART_ELEMENTS", 2 * 4 * 12 * 3)  # 3 blocks, one head per part
        for a, b in zip(whole, run()):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.slow
def test_compressed_causal_memory_at_issue_size():
    """Regression: causal compressed fwd+bwd at N=16384, B=1, H=8, D=64 was 794 MiB."""
    setup = """
import longattn
q, k, v = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(3))
"""
    peak = peak_memory_mb(setup, "longattn.attention(q, k, v, 'compressed', causal=True).sum().backward()",
                          threads=2)
    assert peak < 512, f"{peak:.0f} MiB"
