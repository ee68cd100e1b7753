"""The exact engine against the dense masked oracle: outputs and q/k/v gradients."""

from __future__ import annotations

import pytest
import torch

import longattn
from conftest import make_qkv
from longattn import patterns as P
from longattn.ops.blocksparse import pattern_attention
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

PATTERNS = {
    "local": P.Local(20, 13),
    "local_causal_window": P.Local(37, 0),
    "local_tiny": P.Local(1, 0),
    "local_wide": P.Local(300, 170),
    "dilated": P.Dilated(9, 3),
    "strided": P.Strided(7),
    "block_diagonal": P.BlockDiagonal(30),
    "global": P.GlobalTokens([0, 5, 100, 999]),
    "random": P.RandomBlocks(2, 32, seed=1),
    "longformer": P.longformer(24, [0, 3]),
    "longformer_dilated": P.longformer(24, [0], dilation=3),
    "bigbird": P.bigbird(32, 2, 1),
    "st_strided_heads": P.SparseTransformerStrided(16),
    "st_fixed_heads": P.SparseTransformerFixed(32, 4),
    "st_strided_union": P.SparseTransformerStrided(16, "union"),
    "st_fixed_union": P.SparseTransformerFixed(32, 4, "union"),
    "local_or_dilated": P.Local(30, 30) | P.Dilated(10, 4),
    "local_and_strided": P.Local(40, 40) & P.Strided(3),
    "per_head": P.PerHead([P.Local(8, 8), P.Strided(5), P.GlobalTokens([1]), P.RandomBlocks(1, 16)]),
    "full": P.Full(),
}


def _inputs(B, H, N, D, dtype, seed=0):
    return list(make_qkv(B, H, H, N, N, D, dtype=dtype, seed=seed, requires_grad=True))


def _compare(pattern, N, causal, padded, dtype=torch.float64, B=2, H=4, D=16, tol=1e-10):
    q, k, v = _inputs(B, H, N, D, dtype)
    kpm = None
    if padded:
        kpm = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) > 0.25
        if B > 1:
            kpm[1, :] = True
            kpm[1, N // 2 :] = False  # a right-padded sequence too
    out = pattern_attention(q, k, v, pattern, causal=causal, key_padding_mask=kpm)
    mask = pattern.mask(N, H, causal)  # the pattern's predicate on the full grid
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_attention(q64, k64, v64, mask[None], causal=causal, key_padding_mask=kpm)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    assert (out.double() - ref).abs().max().item() < tol, "output differs from the dense oracle"
    for name, a, b in zip("qkv", got, want):
        err = (a.double() - b).abs().max().item()
        assert err < tol, f"d{name} differs from the dense oracle by {err:g}"


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_float64_equals_oracle_at_1000(name, causal):
    _compare(PATTERNS[name], 1000, causal, padded=False)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_unfilled_output_buffers_are_fully_written(name, causal, monkeypatch):
    """Plans that claim their first writes cover every query leave the output buffers
    uninitialised; filled with NaN instead, any row they miss would show."""
    import longattn.ops.pattern.engine as bs

    monkeypatch.setattr(bs, "UNINIT_FILL", float("nan"))
    _compare(PATTERNS[name], 259, causal, padded=False, B=1, H=4)
    _compare(PATTERNS[name], 259, causal, padded=True, B=2, H=4)


def test_some_plans_write_every_row_and_some_do_not():
    from longattn.ops.blocksparse import _cached_plan

    assert _cached_plan(P.Strided(16), 256, 2, False, 32, (0, 256), None, False)[1]
    assert _cached_plan(P.Local(8, 8), 300, 2, True, 32, (0, 300), None, False)[1]
    # global rows are planned first, the global columns' tiles then merge into rows
    # that were already written: the buffers must start at zero / -inf
    assert not _cached_plan(P.GlobalTokens([0, 5]), 64, 2, False, 32, (0, 64), None, False)[1]
    # causal random blocks drawn outside the query's own block: block 0 has none
    assert not _cached_plan(P.RandomBlocks(1, 16, avoid_window=0), 259, 1, True, 32, (0, 259), None, False)[1]


@pytest.mark.parametrize("name", ["local", "dilated", "strided", "global", "bigbird", "st_fixed_union", "per_head", "longformer"])
@pytest.mark.parametrize("causal", [False, True])
def test_float64_with_padding_at_257(name, causal):
    _compare(PATTERNS[name], 257, causal, padded=True)


@pytest.mark.parametrize("name", ["dilated", "strided", "st_strided_heads", "st_strided_union"])
@pytest.mark.parametrize("causal", [False, True])
def test_residue_fold_when_stride_divides_n(name, causal):
    # 1008 = 16 * 63 = 7 * 144 = 3 * 336: dilated/strided run as bands over N / stride
    _compare(PATTERNS[name], 1008, causal, padded=True)


@pytest.mark.parametrize("N", [1, 3, 17, 129, 300])
@pytest.mark.parametrize("name", ["local", "local_wide", "dilated", "bigbird", "st_fixed_union"])
def test_odd_lengths(name, N):
    _compare(PATTERNS[name], N, causal=N % 2 == 1, padded=False, B=1, H=4, D=8)


@pytest.mark.parametrize("name", ["local", "bigbird", "st_strided_union"])
def test_float32_within_1e5(name):
    _compare(PATTERNS[name], 700, causal=False, padded=True, dtype=torch.float32, tol=1e-5)


def test_random_sizes_seeded():
    gen = torch.Generator().manual_seed(123)
    for _ in range(4):
        N = int(torch.randint(2, 600, (1,), generator=gen))
        before = int(torch.randint(0, 80, (1,), generator=gen))
        after = int(torch.randint(0, 80, (1,), generator=gen))
        _compare(P.Local(before, after), N, causal=bool(N % 2), padded=True, B=1, H=2, D=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = _inputs(1, 2, 300, 32, dtype)
    out = pattern_attention(q, k, v, PATTERNS["longformer"], causal=True)
    ref = dense_attention(*(x.detach().double() for x in (q, k, v)), PATTERNS["longformer"].mask(300, 2, True)[None], causal=True)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("name", ["local", "local_causal_window", "dilated", "strided", "bigbird", "longformer", "st_fixed_heads", "per_head"])
def test_causal_leakage(name):
    q, k, v = (x.detach() for x in _inputs(1, 4, 300, 8, torch.float64))
    fn = lambda q, k, v: pattern_attention(q, k, v, PATTERNS[name], causal=True)  # noqa: E731
    for t in (0, 150, 257):
        assert_no_causal_leak(fn, q, k, v, t)


@pytest.mark.parametrize("name", ["local", "bigbird", "global", "st_fixed_union"])
def test_padding_never_leaks(name):
    q, k, v = (x.detach() for x in _inputs(2, 4, 200, 8, torch.float64))
    kpm = torch.rand(2, 200, generator=torch.Generator().manual_seed(3)) > 0.3
    fn = lambda q, k, v, m: pattern_attention(q, k, v, PATTERNS[name], key_padding_mask=m)  # noqa: E731
    assert_padding_no_leak(fn, q, k, v, kpm)


def test_fully_padded_query_gives_zeros_not_nan():
    q, k, v = _inputs(2, 2, 100, 8, torch.float32)
    kpm = torch.ones(2, 100, dtype=torch.bool)
    kpm[0, :60] = False  # queries 0..57 of batch 0 see only padded keys in local(2, 2)
    kpm[1] = False  # everything padded
    out = pattern_attention(q, k, v, P.Local(2, 2), key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert out[0, :, :57].abs().max() == 0 and out[1].abs().max() == 0
    assert out[0, :, 70:].abs().max() > 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_functional_api_and_registry():
    q, k, v = (x.detach() for x in _inputs(1, 2, 150, 8, torch.float64))
    out = longattn.attention(q, k, v, "local", before=3, after=4)
    ref = dense_attention(q, k, v, P.Local(3, 4).mask(150)[None])
    assert (out - ref).abs().max() < 1e-12
    out = longattn.attention(q, k, v, "pattern", pattern=P.Local(3, 0) | P.Strided(10), causal=True)
    ref = dense_attention(q, k, v, (P.Local(3, 0) | P.Strided(10)).mask(150)[None], causal=True)
    assert (out - ref).abs().max() < 1e-12
    names = {m["name"]: m for m in longattn.mechanisms()}
    for n in ("full", "local", "dilated", "strided", "global", "random", "longformer", "bigbird",
              "sparse_transformer_strided", "sparse_transformer_fixed", "graph", "additive"):
        assert n in names, n
    assert names["local"]["exact"] and names["local"]["causal"] and not names["local"]["learned"]
    assert names["local"]["params"]["before"] == 64


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda q, k, v: longattn.attention(q, k, v, "nope"), ValueError, "unknown mechanism 'nope'"),
        (lambda q, k, v: longattn.attention(q, k, v, "local", width=3), TypeError, "width"),
        (lambda q, k, v: longattn.attention(q, k, v, "local", before=-1), ValueError, "before"),
        (lambda q, k, v: longattn.attention(q[0], k, v, "local"), ValueError, "q must have shape"),
        (lambda q, k, v: longattn.attention(q, k[:1], v, "local"), ValueError, "batch and heads"),
        (lambda q, k, v: longattn.attention(q, k[:, :1], v, "local"), ValueError, "batch and heads"),
        (lambda q, k, v: longattn.attention(q, k[..., :4], v, "local"), ValueError, "last dim"),
        (lambda q, k, v: longattn.attention(q, k[:, :, :10], v[:, :, :10], "local", causal=True), ValueError, "Nq"),
        (lambda q, k, v: longattn.attention(q, k[:, :, :10], v[:, :, :10], "local"), ValueError, "last Nq"),
        (lambda q, k, v: longattn.attention(q, k, v, "local", key_padding_mask=torch.ones(3, 3)), TypeError, "key_padding_mask"),
        (lambda q, k, v: longattn.attention(q, k, v, "local", key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (lambda q, k, v: longattn.attention(q.int(), k, v, "local"), TypeError, "floating"),
        (lambda q, k, v: longattn.attention(q, k, v, "pattern", pattern="local"), TypeError, "Pattern"),
        (lambda q, k, v: longattn.attention(q, k, v, "pattern", pattern=P.PerHead([P.Local(1, 1)] * 3)), ValueError, "divisible"),
        (lambda q, k, v: longattn.attention(q, k, v, "longformer", dilation=0), ValueError, "dilation"),
        (lambda q, k, v: longattn.attention(q, k, v, "global", indices=[-1]), ValueError, "indices"),
        (lambda q, k, v: longattn.attention(q, k, v, "longformer", global_indices=[0, -3]), ValueError, "global_indices"),
        (lambda q, k, v: longattn.attention(q, k, v, "local", global_idx=[-2]), ValueError, "global_idx"),
        (lambda q, k, v: longattn.attention(q, k, v, "full", dropout=-0.5), ValueError, "dropout"),
        (lambda q, k, v: longattn.attention(q, k, v, "full", dropout=1.5), ValueError, "dropout"),
    ],
)
def test_bad_inputs(call, err, match):
    q, k, v = (torch.randn(2, 2, 20, 8) for _ in range(3))
    with pytest.raises(err, match=match):
        call(q, k, v)


def test_memory_local_forward_backward_no_n_squared():
    # N = 16384, H = 4: one N x N float32 score matrix per head would be 4 GiB;
    # the inputs and their gradients are 6 x 16 MiB. Budget: 600 MiB.
    setup = """
from longattn.ops.blocksparse import pattern_attention
from longattn.patterns import Local
q, k, v = (torch.randn(1, 4, 16384, 64, requires_grad=True) for _ in range(3))
"""
    run = """
out = pattern_attention(q, k, v, Local(128, 128))
out.sum().backward()
"""
    peak = peak_memory_mb(setup, run, threads=2)
    assert peak < 600, f"peak {peak:.0f} MiB: something quadratic was built"


def test_memory_global_tokens_forward_backward_no_n_squared():
    # 16 global tokens at N = 16384, H = 4: the global columns run as one kernel call over
    # all rows; one N x N float32 score matrix per head would be 4 GiB. Budget: 600 MiB.
    setup = """
from longattn.ops.blocksparse import pattern_attention
from longattn.patterns import GlobalTokens
q, k, v = (torch.randn(1, 4, 16384, 64, requires_grad=True) for _ in range(3))
"""
    run = """
out = pattern_attention(q, k, v, GlobalTokens(list(range(16))))
out.sum().backward()
"""
    peak = peak_memory_mb(setup, run, threads=2)
    assert peak < 600, f"peak {peak:.0f} MiB: something quadratic was built"


def test_memory_grows_linearly_for_bigbird():
    def peak(n):
        setup = f"""
from longattn.ops.blocksparse import pattern_attention
from longattn.patterns import bigbird
q, k, v = (torch.randn(1, 2, {n}, 32, requires_grad=True) for _ in range(3))
pat = bigbird(64, 3, 1)
"""
        return peak_memory_mb(setup, "out = pattern_attention(q, k, v, pat, causal=True); out.sum().backward()", threads=2)

    small, large = peak(4096), peak(16384)
    # quadratic growth would be 16x; linear is 4x (plus constant overheads)
    assert large < 6 * max(small, 8.0), f"peak {small:.0f} MiB at 4K, {large:.0f} MiB at 16K"


# --- paths added with the strided-view engine ------------------------------------------

VIEW_PATTERNS = {
    # causal groups of 64..512 positions run as prefix tiles (one call per query block)
    "st_strided_prefix": P.SparseTransformerStrided(8),  # residue groups of 125
    "st_fixed_prefix": P.SparseTransformerFixed(100, 10),  # chunks of 100 (last one 100)
    "causal_blocks": P.BlockDiagonal(96) & P.Causal(),
    # global rows planned first, the window after them skips their queries
    "longformer_many_globals": P.longformer(40, list(range(0, 1000, 37))),
    # a band inside residue classes of unequal length (1000 = 7 * 142 + 6)
    "dilated_uneven": P.Dilated(40, 7),
    "strided_uneven": P.Strided(7),
}


@pytest.mark.parametrize("name", list(VIEW_PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_view_paths_equal_oracle(name, causal):
    _compare(VIEW_PATTERNS[name], 1000, causal, padded=name.startswith("longformer"))


@pytest.mark.parametrize("indices", [list(range(16)), [0, 5, 100, 999], list(range(0, 1000, 29))])
@pytest.mark.parametrize("causal", [False, True])
def test_global_columns_run_as_one_call_and_equal_oracle(indices, causal, monkeypatch):
    """Query tiles that all see the same unmasked keys (global columns) run as one kernel
    call over all their rows, forward and backward; still equal to the oracle, and in
    float32 and GQA too."""
    import longattn.ops.pattern.engine as bs

    calls = []
    real = bs._rows_as_one
    monkeypatch.setattr(bs, "_rows_as_one", lambda x: calls.append(tuple(x.shape)) or real(x))
    _compare(P.GlobalTokens(indices), 1000, causal, padded=False)
    if indices == list(range(16)) or not causal:
        assert calls, "no chunk took the one-call path"
    if indices == list(range(16)):  # every query after the global rows, in one call
        assert max(c[1] * c[2] for c in calls) >= 1000 - 128
    # (one call sums a global key's gradient over ~1000 rows in float32: ~3e-5 here, 1e-5 in tiles)
    _compare(P.GlobalTokens(indices), 999, causal, padded=False, dtype=torch.float32, tol=1e-4)
    q, k, v = _inputs(1, 4, 777, 16, torch.float64)
    kv = [x[:, :2].detach().clone().requires_grad_() for x in (k, v)]
    out = pattern_attention(q, *kv, P.GlobalTokens(indices), causal=causal)
    mask = P.GlobalTokens(indices).mask(777, 4, causal)
    ref = dense_attention(q, *(x.repeat_interleave(2, 1) for x in kv), mask[None], causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(out.sum(), kv)
    want = torch.autograd.grad(ref.sum(), kv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["local", "dilated", "strided", "bigbird", "st_fixed_heads", "per_head", "longformer"])
def test_plain_matmul_tile_kernel_equals_oracle(name, monkeypatch):
    # the path other devices take (no CPU flash kernel), run here on the CPU
    import longattn.ops._softmax as bs

    monkeypatch.setattr(bs, "FORCE_MATH", True)
    _compare(PATTERNS[name], 300, causal=True, padded=True)
    _compare(PATTERNS[name], 300, causal=False, padded=False)


def test_value_dim_differs_from_key_dim():
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 2, 130, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 130, 24, generator=g, dtype=torch.float64, requires_grad=True)
    pat = PATTERNS["longformer"]
    out = pattern_attention(q, k, v, pat, causal=True)
    ref = dense_attention(q, k, v, pat.mask(130, 2, True)[None], causal=True)
    assert out.shape == (2, 2, 130, 24)
    assert (out - ref).abs().max() < 1e-10
    ga = torch.autograd.grad(out.sum(), (q, k, v))
    gb = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(ga, gb))


@pytest.mark.parametrize("name", ["local_wide", "dilated", "strided", "global", "random", "per_head", "st_strided_heads"])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_and_softcap_equal_oracle(name, causal):
    """Issue 31: a sink logit per head in the denominator and a tanh score cap, outputs
    and gradients (d sinks too), padded, value dim != key dim, 131 rows (no block divides)."""
    N, H = 131, 4
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, H, N, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    v = torch.randn(2, H, N, 12, generator=g, dtype=torch.float64).requires_grad_()
    sinks = torch.randn(H, generator=g, dtype=torch.float64).requires_grad_()
    kpm = torch.rand(2, N, generator=g) > 0.2
    pat = PATTERNS[name]
    out = pattern_attention(q, k, v, pat, causal=causal, key_padding_mask=kpm, sinks=sinks, softcap=1.5)
    ref = dense_attention(q, k, v, pat.mask(N, H, causal)[None], causal=causal, key_padding_mask=kpm,
                          sinks=sinks, softcap=1.5)
    assert (out - ref).abs().max().item() < 1e-10
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v, sinks), w)
    want = torch.autograd.grad(ref, (q, k, v, sinks), w)
    for x, a, b in zip(("q", "k", "v", "sinks"), got, want):
        assert (a - b).abs().max().item() < 1e-10, f"d{x} differs from the oracle"
