"""A row's output never depends on keys it cannot see, even non-finite ones (issue 29,
defect 8), and ``full``'s bias (defect 5): shapes, bool = keep, packed documents.

Non-finite keys or values in the future (causal) or in padded positions (fp16 overflow
in padding is the real case) must leave every row that cannot see them finite and
equal to the float64 oracle with those keys removed, forward and backward."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.reference import dense_attention
from longattn.ops.sparse import with_globals

B, H, N, D = 2, 2, 75, 8
T = 41  # the position of the bad key
MECHS = {
    "local": dict(before=9, after=4),
    "full": {},
    "bigbird": dict(block=16, random_blocks=1, global_blocks=1),
}


def _inputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _mask(name: str, n: int, causal: bool) -> torch.Tensor | None:
    return None if name == "full" else with_globals(name, **MECHS[name]).mask(n, H, causal)[None]


@pytest.mark.parametrize("name", list(MECHS))
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_future_bad_key_reaches_no_earlier_row(name, where, bad):
    q, k, v = _inputs()
    {"k": k, "v": v}[where][:, :, T] = bad
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = longattn.attention(q, k, v, name, causal=True, **MECHS[name])
    past = out[:, :, :T]
    assert torch.isfinite(past).all(), "a row before the bad key is not finite"
    # the oracle with the bad key (and every later one) removed
    q0, k0, v0 = (x.detach()[:, :, :T].clone().requires_grad_() for x in (q, k, v))
    ref = dense_attention(q0, k0, v0, _mask(name, T, True), causal=True)
    assert (past - ref).abs().max().item() < 1e-10
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(past, (q, k, v), g)
    want = torch.autograd.grad(ref, (q0, k0, v0), g)
    for x, a, b in zip("qkv", got, want):
        assert (a[:, :, :T] - b).abs().max().item() < 1e-10, f"d{x} before the bad key differs"
        assert torch.equal(a[:, :, T:], torch.zeros_like(a[:, :, T:])), f"d{x} reaches the future"


@pytest.mark.parametrize("name", list(MECHS))
@pytest.mark.parametrize("causal", [False, True])
def test_bad_padded_keys_and_values_reach_no_row(name, causal):
    q, k, v = _inputs(1)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, 60:] = False
    kpm[1, [3, 17, 50]] = False
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~kpm[:, None, :].expand(B, H, N)] = float("nan")
    v_bad[~kpm[:, None, :].expand(B, H, N)] = float("inf")
    q, k_bad, v_bad = (x.requires_grad_() for x in (q, k_bad, v_bad))
    out = longattn.attention(q, k_bad, v_bad, name, causal=causal, key_padding_mask=kpm, **MECHS[name])
    q0, k0, v0 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = dense_attention(q0, k0, v0, _mask(name, N, causal), causal=causal, key_padding_mask=kpm)
    assert torch.isfinite(out).all(), "a real row read a padded key"
    assert (out - ref).abs().max().item() < 1e-10
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k_bad, v_bad), g)
    want = torch.autograd.grad(ref, (q0, k0, v0), g)
    for x, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all() and (a - b).abs().max().item() < 1e-10, f"d{x} differs"


# ------------------------------------------------------------------------------------
# full's bias (defect 5)
# ------------------------------------------------------------------------------------


def test_full_bias_wrong_shape_names_bias():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"bias must be broadcastable to \[B, H, Nq, Nk\] = \[2, 2, 75, 75\]"):
        longattn.attention(q, k, v, "full", bias=torch.zeros(1, 3, N, N))
    with pytest.raises(ValueError, match="bias must be broadcastable"):
        longattn.attention(q, k, v, "full", bias=torch.zeros(N, N - 1))
    with pytest.raises(TypeError, match="bias must be a float"):
        longattn.attention(q, k, v, "full", bias=torch.zeros(N, N, dtype=torch.long))


def test_full_bool_bias_keeps_true_entries_like_sdpa():
    q, k, v = _inputs()
    keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[0, 0, 5] = False  # a row with no key: zeros
    out = longattn.attention(q, k, v, "full", bias=keep, causal=True)
    ref = dense_attention(q, k, v, keep, causal=True)
    assert (out - ref).abs().max().item() < 1e-10
    assert torch.equal(out[0, :, 5], torch.zeros_like(out[0, :, 5]))


@pytest.mark.parametrize("bias_kind", ["float", "bool"])
@pytest.mark.parametrize("causal", [False, True])
def test_full_bias_is_sliced_per_packed_document(bias_kind, causal):
    q, k, v = _inputs()
    gen = torch.Generator().manual_seed(4)
    bias = (torch.randn(B, H, N, N, generator=gen, dtype=torch.float64) if bias_kind == "float"
            else torch.rand(1, 1, N, N, generator=gen) > 0.3)
    seg = torch.tensor([[0] * 30 + [1] * 45, [0] * 11 + [1] * 64])
    out = longattn.attention(q, k, v, "full", bias=bias, causal=causal, segment_ids=seg)
    for b in range(B):
        cut = 30 if b == 0 else 11
        for a, e in ((0, cut), (cut, N)):
            bb = bias[b if bias.shape[0] > 1 else 0, :, a:e, a:e][None]
            x = [t[b : b + 1, :, a:e] for t in (q, k, v)]
            ref = dense_attention(*x, causal=causal, bias=bb)
            assert (out[b : b + 1, :, a:e] - ref).abs().max().item() < 1e-10, f"row {b} document [{a}, {e})"
