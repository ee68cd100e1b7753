"""Linear attention / Performer: order identity, chunked causal == masked quadratic,
recurrent step == parallel, FAVOR+ error falls with features, padding, causality,
memory, low precision, errors."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.kernel import (
    FavorFeatureMap,
    linear_attention,
    linear_attention_init_state,
    linear_attention_naive,
    linear_attention_step,
    resolve_feature_map,
)
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

D64 = torch.float64
MAPS = ["elu", "relu", "favor", lambda x: torch.nn.functional.softplus(x) + 0.1]
MAP_IDS = ["elu", "relu", "favor", "callable"]


def qkv(B=2, H=3, N=37, D=8, Dv=None, dtype=D64, seed=0, Nk=None):
    g = torch.Generator().manual_seed(seed)
    Nk = Nk or N
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Nk, Dv or D, generator=g, dtype=dtype)
    return q, k, v


def pad_mask(B, N, cut=20):
    m = torch.ones(B, N, dtype=torch.bool)
    m[-1, cut:] = False
    return m


@pytest.fixture(params=["one_segment", "many_segments"])
def segments(request, monkeypatch):
    """Run the fast forms on one feature segment, or on segments of 8-16 rows (so the
    inter-segment state carry, max re-referencing included, is exercised)."""
    import longattn.ops.kernel as kmod

    if request.param == "many_segments":
        monkeypatch.setattr(kmod, "_SEG_ELEMS", 2 * 3 * 8 * 12)
        monkeypatch.setattr(kmod, "_SEG_ELEMS_GRAD", 2 * 3 * 8 * 12)  # causal training: checkpointed segments
        monkeypatch.setattr(kmod, "_INFER_ROWS", 8 * 12)  # FAVOR+ inference: blocks of 12/8 rows
    return request.param


def hand_quadratic(q, k, v, phi, causal=False, mask=None):
    """Written out independently: w_ij = phi(q_i) . phi(k_j), masked, rows normalised."""
    w = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        w = w.tril()
    if mask is not None:
        w = w * mask[:, None, None, :]
    return (w @ v) / w.sum(-1, keepdim=True)


def test_naive_matches_hand_written_elu():
    q, k, v = qkv()
    phi = lambda x: torch.nn.functional.elu(x) + 1
    for causal in (False, True):
        torch.testing.assert_close(
            linear_attention_naive(q, k, v, "elu", causal=causal), hand_quadratic(q, k, v, phi, causal)
        )


@pytest.mark.parametrize("fm", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_order_identity_fast_equals_quadratic(fm, causal, segments):
    # N = 37 is no multiple of chunk 8 or 5; padding on the last batch row
    q, k, v = qkv(Dv=5)
    mask = pad_mask(2, 37)
    ref = linear_attention_naive(q, k, v, fm, causal=causal, key_padding_mask=mask)
    for chunk in (5, 8, 64):
        out = linear_attention(q, k, v, feature_map=fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fm", ["elu", "relu"])
def test_inference_grouped_kv_heads_and_scale(fm, segments):
    """The no-autograd CPU path (features in one reused buffer) with grouped kv heads,
    a scale, padded keys and Dv != D equals the quadratic form on repeated heads."""
    q, _, _ = qkv(H=4, N=23)
    _, k, v = qkv(H=2, N=23, Dv=5, seed=1)
    mask = pad_mask(2, 23, cut=9)
    with torch.no_grad():
        out = linear_attention(q, k, v, feature_map=fm, key_padding_mask=mask, scale=0.3)
    kr, vr = (x.repeat_interleave(2, 1) for x in (k, v))
    r = 0.3 ** 0.5
    ref = linear_attention_naive(q * r, kr * r, vr, fm, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_cross_attention_noncausal():
    q, k, v = qkv(N=11, Nk=29)
    torch.testing.assert_close(
        linear_attention(q, k, v, feature_map="favor"), linear_attention_naive(q, k, v, "favor")
    )


@pytest.mark.parametrize("fm", ["elu", "favor"])
def test_gradients_equal_quadratic_form(fm, segments):
    q, k, v = qkv(N=19)
    mask = pad_mask(2, 19, cut=13)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ins2 = [t.clone().requires_grad_() for t in (q, k, v)]
    w = torch.randn(2, 3, 19, 8, dtype=D64)
    (linear_attention(*ins, feature_map=fm, causal=True, key_padding_mask=mask, chunk_size=4) * w).sum().backward()
    (linear_attention_naive(*ins2, fm, causal=True, key_padding_mask=mask) * w).sum().backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("fm", ["elu", "favor"])
def test_recurrent_step_equals_parallel(fm):
    q, k, v = qkv(N=23, Dv=6)
    fmap = resolve_feature_map(fm, 8)
    par = linear_attention(q, k, v, feature_map=fmap, causal=True, chunk_size=4)
    st = linear_attention_init_state(2, 3, 8, 6, fmap, dtype=D64)
    outs = []
    for t in range(23):
        o, st = linear_attention_step(st, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fmap)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), par, rtol=1e-10, atol=1e-10)
    assert st.length == 23 and st.S.shape == (2, 3, fmap.num_features(8), 6)
    # a prefill of several tokens then single steps gives the same
    st = linear_attention_init_state(2, 3, 8, 6, fmap, dtype=D64)
    o1, st = linear_attention_step(st, q[:, :, :10], k[:, :, :10], v[:, :, :10], fmap)
    o2, st = linear_attention_step(st, q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], fmap)
    torch.testing.assert_close(torch.cat([o1, o2], 2), par, rtol=1e-10, atol=1e-10)


def test_module_step_and_redraw():
    m = longattn.build("performer", heads=3, head_dim=8, num_features=32, seed=1)
    q, k, v = qkv(N=9, dtype=torch.float32)
    par = m(q, k, v, causal=True)
    st = m.init_state(2, 8)
    outs = []
    for t in range(9):
        o, st = m.step(st, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), par, rtol=1e-5, atol=1e-5)
    w0 = m.feature_map.projection.clone()
    m.redraw(seed=2)
    assert not torch.equal(w0, m.feature_map.projection)
    m.redraw(seed=1)
    assert torch.equal(w0, m.feature_map.projection)  # seedable


def test_performer_error_falls_with_features():
    q, k, v = qkv(B=1, H=2, N=64, D=16, seed=3)
    q, k = q * 0.7, k * 0.7
    exact = dense_attention(q, k, v)

    def err(F):
        return sum(
            (longattn.attention(q, k, v, "performer", num_features=F, seed=s) - exact).abs().mean().item()
            for s in range(4)
        ) / 4

    e16, e128, e1024 = err(16), err(128), err(1024)
    assert e1024 < e128 < e16
    assert e1024 < 0.4 * e16


def test_favor_features_unbiased_kernel():
    # E[phi(x)^T phi(y)] = exp(x^T y): the mean over many features approaches it
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 1, 1, 4, generator=g, dtype=D64) * 0.5, torch.randn(1, 1, 1, 4, generator=g, dtype=D64) * 0.5
    fm = FavorFeatureMap(4, 8192, seed=0)
    fm.projection = fm.projection.double()
    fx, _ = fm(x, is_query=True)
    fy, sy = fm(y, is_query=False)
    ax = (x @ fm.projection.T) - (x * x).sum(-1, keepdim=True) / 2  # un-stabilised log-features
    est = (torch.exp(ax) * fy * torch.exp(sy)[..., None]).sum() / 8192
    assert abs(est.item() - torch.exp((x * y).sum()).item()) < 0.05


@pytest.mark.parametrize("name,params", [("linear", {}), ("linear", {"feature_map": "relu"}),
                                          ("performer", {"num_features": 16})])
def test_no_causal_leak(name, params, segments):
    q, k, v = qkv(N=29)
    fn = lambda q, k, v: longattn.attention(q, k, v, name, causal=True, chunk_size=8, **params)
    for t in (0, 7, 8, 15, 27):
        assert_no_causal_leak(fn, q, k, v, t)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,params", [("linear", {}), ("performer", {"num_features": 16})])
def test_padding_no_leak(name, params, causal, segments):
    q, k, v = qkv(N=29)
    mask = pad_mask(2, 29, cut=11)
    mask[0, 3] = False  # a hole in the middle too
    fn = lambda q, k, v, m: longattn.attention(q, k, v, name, causal=causal, key_padding_mask=m, chunk_size=8, **params)
    assert_padding_no_leak(fn, q, k, v, mask)


def test_padding_reaches_normaliser_too():
    # one real key: every query returns exactly its value (numerator and normaliser both masked)
    q, k, v = qkv(B=1, N=12)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4] = True
    for fm in ("elu", "favor"):
        out = linear_attention(q, k, v, feature_map=fm, key_padding_mask=mask)
        torch.testing.assert_close(out, v[:, :, 4:5].expand_as(out))


def test_fully_masked_rows_are_zero():
    q, k, v = qkv(N=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1] = False
    for causal in (False, True):
        for fm in ("elu", "favor"):
            out = linear_attention(q, k, v, feature_map=fm, causal=causal, key_padding_mask=mask)
            assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_favor_stabiliser_extreme_keys_no_overflow():
    # keys of very different norms: stabilised features stay finite, in fp32 as in fp64
    q, k, v = qkv(N=40, D=8)
    k = k * torch.linspace(0.1, 12, 40, dtype=D64)[None, None, :, None]
    q = q * 6
    ref = linear_attention_naive(q, k, v, "favor", causal=True)
    out = linear_attention(q.float(), k.float(), v.float(), feature_map="favor", causal=True, chunk_size=8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["linear", "performer"])
def test_low_precision_finite_and_close(dtype, name):
    q, k, v = qkv(N=50, dtype=torch.float32)
    q, k, v = (t.mul(4).to(dtype).requires_grad_() for t in (q, k, v))
    out = longattn.attention(q, k, v, name, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = longattn.attention(*(t.detach().double() for t in (q, k, v)), name, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)


def test_errors():
    q, k, v = qkv(N=8)
    with pytest.raises(ValueError, match="feature_map"):
        longattn.attention(q, k, v, "linear", feature_map="tanh")
    with pytest.raises(TypeError, match="feature_map"):
        longattn.attention(q, k, v, "linear", feature_map=3)
    with pytest.raises(ValueError, match="chunk_size"):
        longattn.attention(q, k, v, "linear", chunk_size=0)
    with pytest.raises(ValueError, match="num_features"):
        longattn.attention(q, k, v, "performer", num_features=0)
    with pytest.raises(ValueError, match="redraw_interval"):
        longattn.attention(q, k, v, "performer", redraw_interval=3)
    with pytest.raises(TypeError, match="unknown parameter"):
        longattn.attention(q, k, v, "linear", features=3)
    with pytest.raises(ValueError, match="Nq"):
        longattn.attention(q, k[:, :, :5], v[:, :, :5], "linear", causal=True)
    with pytest.raises(ValueError, match="projection"):
        longattn.attention(q, k, v, "performer", projection=torch.randn(16, 5))
    st = linear_attention_init_state(2, 3, 8, 8, "elu", dtype=D64)
    with pytest.raises(ValueError, match="features"):
        linear_attention_step(st, q[:, :, :1], k[:, :, :1], v[:, :, :1], "favor")


def test_memory_no_n_by_n_favor_inference():
    """Non-causal FAVOR+ without gradients (the reused-buffer path) at N=16384 (H=1,
    D=32, 256 features): one N x N fp32 tensor would be 1 GiB, one N x F feature
    tensor 16 MiB; the path keeps a 4 MiB block."""
    setup = """
import longattn
q, k, v = (torch.randn(1, 1, 16384, 32) for _ in range(3))
with torch.no_grad():  # imports every family (flex, custom ops) outside the measured run
    longattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], "performer", num_features=256)
"""
    run = "with torch.no_grad():\n    out = longattn.attention(q, k, v, 'performer', num_features=256)\n"
    peak = peak_memory_mb(setup, run)
    assert peak < 64, f"peak {peak:.0f} MiB at N=16384 (N^2 fp32 = 1024 MiB)"


def test_memory_no_n_by_n_linear_inference():
    """Non-causal elu+1 linear attention without gradients (the reused-buffer path) at
    N=16384 (H=1, D=32): one N x N fp32 tensor would be 1 GiB; the path keeps two
    feature blocks of at most 4 MiB besides its output."""
    setup = """
import longattn
q, k, v = (torch.randn(1, 1, 16384, 32) for _ in range(3))
with torch.no_grad():  # imports every family outside the measured run
    longattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], "linear")
"""
    run = "with torch.no_grad():\n    out = longattn.attention(q, k, v, 'linear')\n"
    peak = peak_memory_mb(setup, run)
    assert peak < 64, f"peak {peak:.0f} MiB at N=16384 (N^2 fp32 = 1024 MiB)"


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_memory_no_n_by_n_causal_fwd_bwd(name):
    """Causal fwd+bwd at N=16384 (H=1, D=32): one N x N fp32 tensor would be 1 GiB;
    the chunked form needs O(N (F + C) + N/C F Dv), well under 250 MiB."""
    setup = """
import longattn
q, k, v = (torch.randn(1, 1, 16384, 32, requires_grad=True) for _ in range(3))
"""
    extra = ", num_features=64" if name == "performer" else ""
    run = f"out = longattn.attention(q, k, v, {name!r}, causal=True{extra})\nout.sum().backward()\n"
    peak = peak_memory_mb(setup, run)
    assert peak < 250, f"peak {peak:.0f} MiB at N=16384 (N^2 fp32 = 1024 MiB)"


@pytest.mark.slow
def test_memory_performer_causal_training_at_issue_size():
    """Causal FAVOR+ fwd+bwd at N=16384, H=8, D=64, 256 features: the features and chunk
    products of every segment used to be kept for the backward (about 1 GB); segments
    under checkpointing keep one at a time (measured 441 MiB)."""
    setup = """
import longattn
q, k, v = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(3))
"""
    run = "longattn.attention(q, k, v, 'performer', causal=True).sum().backward()\n"
    peak = peak_memory_mb(setup, run, threads=2)
    assert peak < 512, f"peak {peak:.0f} MiB"
