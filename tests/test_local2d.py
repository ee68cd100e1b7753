"""Exact 2D local attention ("local2d") against the dense oracle with a hand-made 2D mask."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.local2d import local2d_attention
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

D64 = torch.float64


def grid_mask(h: int, w: int, rh: int, rw: int) -> torch.Tensor:
    """Visible iff |r - r'| <= rh and |c - c'| <= rw, written from coordinates."""
    mask = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h * w):
        for j in range(h * w):
            mask[i, j] = abs(i // w - j // w) <= rh and abs(i % w - j % w) <= rw
    return mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = [(5, 7, 1, 2), (4, 20, 2, 1), (3, 3, 0, 0), (6, 9, 3, 5), (1, 30, 0, 4), (8, 11, 2, 9)]


@pytest.mark.parametrize("h,w,rh,rw", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_equals_dense_oracle_outputs_and_grads(h, w, rh, rw, causal):
    torch.manual_seed(h * 100 + w)
    n = h * w
    q, k, v = (torch.randn(2, 3, n, 8, dtype=D64, requires_grad=True) for _ in range(3))
    kpm = torch.rand(2, n) > 0.25
    params = dict(height=h, width=w, radius_h=rh, radius_w=rw)
    out = longattn.attention(q, k, v, "local2d", causal=causal, key_padding_mask=kpm, **params)
    ref = dense_attention(q, k, v, grid_mask(h, w, rh, rw), causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), g)
    gb = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_causal_raster_order_leaks_nothing():
    q, k, v = (torch.randn(1, 2, 35, 8, dtype=D64) for _ in range(3))
    fn = lambda q, k, v: local2d_attention(q, k, v, causal=True, height=5, width=7, radius_h=2, radius_w=2)
    for t in (0, 9, 20):
        assert_no_causal_leak(fn, q, k, v, t)


def test_padding_no_leak_and_fully_masked_rows_are_zero():
    q, k, v = (torch.randn(2, 2, 24, 8, dtype=D64) for _ in range(3))
    kpm = torch.rand(2, 24) > 0.4
    fn = lambda q, k, v, m: local2d_attention(q, k, v, key_padding_mask=m, height=4, width=6)
    assert_padding_no_leak(fn, q, k, v, kpm)
    kpm[1] = False
    out = fn(q, k, v, kpm)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    ref = dense_attention(q.double(), k.double(), v.double(), grid_mask(6, 8, 1, 1))
    out = local2d_attention(q.to(dtype), k.to(dtype), v.to(dtype), height=6, width=8)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_bad_input_errors():
    q = torch.randn(1, 1, 12, 4)
    with pytest.raises(ValueError, match="height \\* width"):
        local2d_attention(q, q, q, height=5, width=3)
    with pytest.raises(ValueError, match="radius_w"):
        local2d_attention(q, q, q, height=3, width=4, radius_w=-1)
    with pytest.raises(TypeError, match="height"):
        local2d_attention(q, q, q, height=3.0, width=4)
    with pytest.raises(ValueError, match="Nq"):
        local2d_attention(q, torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), height=3, width=4)
    with pytest.raises(TypeError, match="needs parameter"):
        longattn.attention(q, q, q, "local2d")


def test_memory_linear_in_pixels_no_n_by_n():
    """Forward + backward at 128 x 128 = 16384 pixels stays far below one N x N fp32 map (1 GiB)."""
    setup = """
from longattn.ops.local2d import local2d_attention
H = W = {side}
q, k, v = (torch.randn(1, 2, H * W, 16, requires_grad=True) for _ in range(3))
"""
    run = "out = local2d_attention(q, k, v, height=H, width=W, radius_h=2, radius_w=2); out.sum().backward()"
    small = peak_memory_mb(setup.format(side=64), run)
    big = peak_memory_mb(setup.format(side=128), run)
    n = 128 * 128
    nn_mb = n * n * 4 * 2 / 2 ** 20   # one fp32 score map for 2 heads
    assert big < nn_mb / 8, f"peak {big:.1f} MiB at N={n}: looks quadratic (N x N would be {nn_mb:.0f} MiB)"
    assert big < 8 * max(small, 2.0), f"4x the pixels grew peak memory {big / max(small, 1e-3):.1f}x"


@pytest.mark.parametrize("H,W,rh,rw", [(13, 21, 2, 3), (20, 19, 9, 2)])
def test_grouped_kv_heads_and_decode_rows_equal_the_oracle(H, W, rh, rw):
    """Engine conventions on an image: k/v with fewer heads, and the last m pixels in
    raster order (causal, bottom-right) equal the last rows of the full call. Sizes are
    no multiple of the 8 x 8 tiles; radius 9 reaches two rows of tiles."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, H * W, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, H * W, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, H * W, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kpm = torch.rand(2, H * W, generator=g) > 0.2
    for causal in (False, True):
        out = local2d_attention(q, k, v, height=H, width=W, radius_h=rh, radius_w=rw, causal=causal,
                                key_padding_mask=kpm)
        kr, vr = (x.repeat_interleave(2, 1) for x in (k, v))
        ref = dense_attention(q, kr, vr, grid_mask(H, W, rh, rw), causal=causal, key_padding_mask=kpm)
        torch.testing.assert_close(out, ref)
        gr = torch.randn(out.shape, generator=g, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), gr), torch.autograd.grad(ref, (q, k, v), gr)):
            torch.testing.assert_close(a, b)
    last = local2d_attention(q[:, :, -30:], k, v, height=H, width=W, radius_h=rh, radius_w=rw, causal=True,
                             key_padding_mask=kpm)
    torch.testing.assert_close(last, out[:, :, -30:])


# ----------------------------------------------------------------- haloed strips
@pytest.fixture(params=["whole_classes", "one_tile_per_backward_call"])
def strips_only(request, monkeypatch):
    """Every unpadded call runs over haloed strips, and the pattern engine may not run;
    the backward runs each class of tiles in one call, or one tile per call."""
    import longattn.ops.local2d as L

    def engine(*a, **k):
        raise AssertionError("the pattern engine ran instead of the haloed strips")

    monkeypatch.setattr(L, "STRIP_MIN_PIXELS", 0)
    monkeypatch.setattr(L, "pattern_attention", engine)
    if request.param == "one_tile_per_backward_call":
        monkeypatch.setattr(L, "BWD_WORKSPACE", 1)


# sizes no multiple of the 8 x 8 tiles; radius 9 reaches past a neighbouring tile; a
# single row; radius 0; an image narrower than a tile
STRIP_CASES = [(13, 11, 2, 3), (20, 17, 7, 7), (19, 21, 9, 2), (1, 30, 0, 4), (3, 3, 0, 0), (17, 5, 3, 1)]


@pytest.mark.parametrize("H,W,rh,rw", STRIP_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_strips_equal_the_oracle_outputs_and_grads(strips_only, H, W, rh, rw, causal):
    """Unpadded images run over haloed strips (no per-tile gathers): outputs and all
    gradients equal the dense oracle, grouped kv heads included."""
    g = torch.Generator().manual_seed(H * W + rh)
    q = torch.randn(2, 4, H * W, 8, generator=g, dtype=D64, requires_grad=True)
    k = torch.randn(2, 2, H * W, 8, generator=g, dtype=D64, requires_grad=True)
    v = torch.randn(2, 2, H * W, 8, generator=g, dtype=D64, requires_grad=True)
    out = local2d_attention(q, k, v, height=H, width=W, radius_h=rh, radius_w=rw, causal=causal)
    kr, vr = (x.repeat_interleave(2, 1) for x in (k, v))
    ref = dense_attention(q, kr, vr, grid_mask(H, W, rh, rw), causal=causal)
    torch.testing.assert_close(out, ref)
    gr = torch.randn(out.shape, generator=g, dtype=D64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), gr), torch.autograd.grad(ref, (q, k, v), gr)):
        torch.testing.assert_close(a, b)


def test_strips_causal_leak_and_low_precision(strips_only):
    q, k, v = (torch.randn(1, 2, 11 * 13, 8, dtype=D64) for _ in range(3))
    fn = lambda q, k, v: local2d_attention(q, k, v, causal=True, height=11, width=13, radius_h=3, radius_w=4)
    for t in (0, 40, 100):
        assert_no_causal_leak(fn, q, k, v, t)
    ref = dense_attention(q, k, v, grid_mask(11, 13, 2, 2))
    for dtype in (torch.float16, torch.bfloat16):
        out = local2d_attention(q.to(dtype), k.to(dtype), v.to(dtype), height=11, width=13, radius_h=2, radius_w=2)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
