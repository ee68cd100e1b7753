"""Attention over given keys against a float64 dense oracle that builds the same key set
as an Nq x Nk mask: outputs and gradients (q, k, v, sinks), GQA, per-head lists, empty
slots, duplicates, padding, bottom-right causal, low precision, errors and memory."""

from __future__ import annotations

import pytest
import torch

from conftest import make_qkv
from longattn.ops import given_keys as GK
from longattn.ops.given_keys import given_keys_attention
from longattn.testing import assert_no_causal_leak, peak_memory_mb

D64 = torch.float64


def _inputs(B, H, Hkv, Nq, Nk, D=6, Dv=5, seed=0, dtype=D64):
    return make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=dtype, seed=seed, requires_grad=True)


def _oracle(q, k, v, indices, *, causal=False, kpm=None, sinks=None):
    """Dense float64 softmax over the mask [B, H, Nq, Nk] the index lists draw (one
    extra score column for the sink), K/V repeated per query head."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    idx = indices if indices.dim() == 4 else indices[:, None]
    idx = idx.repeat_interleave(H // idx.shape[1], 1)  # [B, H, Nq, T]
    mask = torch.zeros(B, H, Nq, Nk + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(idx < 0, Nk, idx), True)  # -1 -> a dropped extra column
    mask = mask[..., :Nk]
    if causal:
        mask &= torch.arange(Nk) <= torch.arange(Nq)[:, None] + (Nk - Nq)
    if kpm is not None:
        mask &= kpm[:, None, None, :]
    kr, vr = (x.double().repeat_interleave(H // Hkv, 1) for x in (k, v))
    s = (q.double() @ kr.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    sink = torch.full((B, H, Nq, 1), float("-inf"), dtype=D64) if sinks is None else \
        sinks.double().view(1, H, 1, 1).expand(B, H, Nq, 1)
    s = torch.cat([s, sink], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)[..., :Nk]  # a row with nothing: zeros
    return p @ vr


def _check(out, ref, inputs, tol=1e-10):
    assert (out.double() - ref).abs().max().item() < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=D64)
    ga = torch.autograd.grad(out, inputs, g.to(out.dtype))
    gb = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip("qkvs", ga, gb):
        err = (a.double() - b.double()).abs().max().item()
        assert err < tol, f"d{name} differs by {err:g}"


CASES = {  # name: (H, Hkv, index heads (0: [B, Nq, T]), causal, padded, sinks)
    "shared_gqa_causal_padded_sinks": (4, 2, 0, True, True, True),
    "per_kv_head": (4, 2, 2, False, True, False),
    "per_query_head_mqa": (4, 1, 4, True, False, True),
    "mha_per_head": (3, 3, 3, False, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_dense_oracle(case, monkeypatch):
    monkeypatch.setattr(GK, "CSR_EDGES", 60)  # several chunks of queries
    H, Hkv, Hi, causal, padded, with_sinks = CASES[case]
    B, Nq, Nk, T = 2, 23, 37, 9  # bottom-right: Nq < Nk
    q, k, v = _inputs(B, H, Hkv, Nq, Nk)
    g = torch.Generator().manual_seed(1)
    shape = (B, Nq, T) if Hi == 0 else (B, Hi, Nq, T)
    idx = torch.randint(-1, Nk, shape, generator=g)
    idx[..., 1] = idx[..., 0]  # duplicates in every row
    kpm = (torch.rand(B, Nk, generator=g) > 0.25) if padded else None
    sinks = torch.randn(H, generator=g, dtype=D64).requires_grad_() if with_sinks else None
    out = given_keys_attention(q, k, v, idx, causal=causal, key_padding_mask=kpm, sinks=sinks)
    ref = _oracle(q, k, v, idx, causal=causal, kpm=kpm, sinks=sinks)
    _check(out, ref, (q, k, v) + ((sinks,) if with_sinks else ()))


@pytest.mark.parametrize("H,Hkv", [(3, 3), (4, 2)])
def test_shared_lists_equal_the_oracle(H, Hkv, monkeypatch):
    # one list per query for every head, read by every head's sampled product; several chunks
    monkeypatch.setattr(GK, "CSR_EDGES", 30)
    B, Nq, Nk, T = 2, 19, 41, 7
    q, k, v = _inputs(B, H, Hkv, Nq, Nk)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, Nk, (B, Nq, T), generator=g)
    kpm = torch.rand(B, Nk, generator=g) > 0.2
    sinks = torch.randn(H, generator=g, dtype=D64).requires_grad_()
    out = given_keys_attention(q, k, v, idx, causal=True, key_padding_mask=kpm, sinks=sinks)
    _check(out, _oracle(q, k, v, idx, causal=True, kpm=kpm, sinks=sinks), (q, k, v, sinks))


def test_shared_granule_plan_equals_the_oracle_over_its_keys(monkeypatch):
    """A shared plan of whole key blocks (granule 4, a block past Nk partly valid): the CSR
    path expands granules into keys; outputs and gradients equal the oracle on the same keys."""
    monkeypatch.setattr(GK, "CSR_EDGES", 40)
    B, H, Hkv, Nq, Nk, G = 2, 4, 2, 13, 22, 4
    q, k, v = _inputs(B, H, Hkv, Nq, Nk)
    gen = torch.Generator().manual_seed(5)
    blocks = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(B * Nq)]).view(B, Nq, 3)
    tok = (blocks.unsqueeze(-1) * G + torch.arange(G)).flatten(-2)  # [B, Nq, 12], some >= Nk
    valid = tok < Nk
    plan = GK.SlotPlan(lambda c0, c1: (blocks[:, None, None, c0:c1], valid[:, None, None, c0:c1]), 3,
                       granule=G, shared=True)
    out = GK.given_keys_apply(q, k, v, plan, scale=6 ** -0.5)
    ref = _oracle(q, k, v, torch.where(valid, tok, torch.full_like(tok, -1)))
    _check(out, ref, (q, k, v))


def test_duplicates_count_once_and_empty_slots_are_ignored():
    q, k, v = _inputs(1, 2, 2, 5, 11)
    a = torch.tensor([[[3, 3, 7, 7, 7], [0, -1, 0, 10, -1], [4, 2, 4, 2, -1], [9, 9, 9, 9, 9], [1, 5, 6, 8, 2]]])
    b = torch.tensor([[[3, 7, -1, -1, -1], [0, 10, -1, -1, -1], [2, 4, -1, -1, -1], [9, -1, -1, -1, -1],
                       [1, 5, 6, 8, 2]]])
    with torch.no_grad():
        torch.testing.assert_close(given_keys_attention(q, k, v, a), given_keys_attention(q, k, v, b),
                                   rtol=0, atol=1e-14)


def test_rows_with_no_visible_key_are_zero_with_finite_gradients():
    q, k, v = _inputs(1, 2, 1, 4, 6)
    idx = torch.tensor([[[-1, -1], [5, 4], [0, 1], [2, -1]]])
    kpm = torch.tensor([[True, True, False, True, True, True]])
    sinks = torch.tensor([0.5, -1.0], dtype=D64, requires_grad=True)
    # row 0: empty; row 1 (position 3, causal): keys 5, 4 in the future; row 3: key 2 padded
    out = given_keys_attention(q, k, v, idx, causal=True, key_padding_mask=kpm, sinks=sinks)
    assert out[:, :, [0, 1]].abs().max() == 0 and out[:, :, 2].abs().max() > 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, sinks))
    ref = _oracle(q, k, v, idx, causal=True, kpm=kpm, sinks=sinks)
    assert (out - ref).abs().max() < 1e-12


def test_causal_leaks_nothing():
    N = 29
    idx = torch.randint(0, N, (1, N, 12), generator=torch.Generator().manual_seed(2))

    def fn(q, k, v):
        return given_keys_attention(q, k, v, idx, causal=True)

    assert_no_causal_leak(fn, *_inputs(1, 2, 1, N, N), t=13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    q, k, v = _inputs(1, 2, 2, 19, 31, D=16, Dv=16, dtype=dtype)
    idx = torch.randint(-1, 31, (1, 19, 10), generator=torch.Generator().manual_seed(3))
    out = given_keys_attention(q, k, v, idx, causal=True)
    assert out.dtype == dtype
    ref = _oracle(q, k, v, idx, causal=True)
    assert (out.double() - ref).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(k.grad.float()).all()


@pytest.mark.parametrize(
    "indices,err,match",
    [
        (torch.zeros(2, 7, 3), TypeError, "indices"),
        (torch.zeros(2, 7, 3, dtype=torch.bool), TypeError, "indices"),
        (torch.zeros(2, 6, 3, dtype=torch.long), ValueError, "indices"),
        (torch.zeros(2, 3, 7, 3, dtype=torch.long), ValueError, "indices"),
        (torch.zeros(2, 7, 0, dtype=torch.long), ValueError, "indices"),
        (torch.full((2, 7, 3), 11), ValueError, "indices"),
        (torch.full((2, 7, 3), -2), ValueError, "indices"),
        ([[0]], TypeError, "indices"),
    ],
)
def test_bad_indices_are_refused_naming_them(indices, err, match):
    q, k, v = (x.detach() for x in _inputs(2, 4, 2, 7, 11))
    with pytest.raises(err, match=match):
        given_keys_attention(q, k, v, indices)


def test_bad_sinks_and_causal_lengths_are_refused():
    q, k, v = (x.detach() for x in _inputs(1, 4, 2, 7, 5))
    idx = torch.zeros(1, 7, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="sinks"):
        given_keys_attention(q, k, v, idx, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="sinks"):
        given_keys_attention(q, k, v, idx, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="Nq"):
        given_keys_attention(q, k, v, idx, causal=True)


def test_memory_is_linear_in_the_listed_keys():
    # N = 16384, H = 2, 16 keys per query, forward + backward: one N x N fp32 score
    # matrix per head would be 1 GiB (2 GiB in all); inputs and gradients ~25 MiB, the
    # chunk buffers and the libraries' first-call overhead ~200 MiB.
    setup = """
from longattn.ops.given_keys import given_keys_attention
N = 16384
q, k, v = (torch.randn(1, 2, N, 32, requires_grad=True) for _ in range(3))
idx = torch.randint(0, N, (1, N, 16))
"""
    run = "out = given_keys_attention(q, k, v, idx, causal=True)\nout.sum().backward()"
    peak = peak_memory_mb(setup, run)
    assert peak < 600, f"peak {peak:.0f} MiB: something quadratic was built"


def test_recorded_weights_are_the_head_summed_attention_and_need_shared_lists():
    """SlotPlan.weights: the forward adds every slot's weight summed over heads (the dense
    softmax of each head, summed); a per-kv-head plan that asks for them is refused."""
    B, H, Hkv, Nq, Nk, T = 1, 4, 2, 7, 12, 5
    q, k, v = _inputs(B, H, Hkv, Nq, Nk)
    idx = torch.stack([torch.randperm(Nk, generator=torch.Generator().manual_seed(r))[:T] for r in range(Nq)])[None]
    ok = torch.ones_like(idx, dtype=torch.bool)
    w = torch.zeros(B, Nq, T, dtype=D64)
    plan = GK.SlotPlan(lambda c0, c1: (idx[:, None, None, c0:c1], ok[:, None, None, c0:c1]), T, shared=True, weights=w)
    GK.given_keys_apply(q, k, v, plan, scale=0.5)
    kr = k.repeat_interleave(H // Hkv, 1)[0]  # [H, Nk, D]
    s = torch.einsum("hnd,hntd->hnt", q[0], kr[:, idx[0]]) * 0.5
    torch.testing.assert_close(w[0], torch.softmax(s, -1).sum(0).detach(), rtol=0, atol=1e-12)
    per_kv = GK.SlotPlan(lambda c0, c1: (idx[:, None, None, c0:c1].expand(B, Hkv, 1, -1, -1),
                                         ok[:, None, None, c0:c1].expand(B, Hkv, 1, -1, -1)), T, weights=w)
    with pytest.raises(ValueError, match="weights"):
        GK.given_keys_apply(q, k, v, per_kv, scale=0.5)
