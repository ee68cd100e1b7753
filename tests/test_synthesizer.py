"""Synthesizer: every kind against scores written out by hand + the dense oracle's
masking, mixture, causality, padding, module training, errors. (N x N by nature: no
memory test.)"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.synthesizer import KINDS, synthesizer_weights
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak

D64 = torch.float64
B, H, N, D = 2, 3, 13, 8


def qkv(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=D64) for _ in range(3))


def softmax_masked(scores, causal=False, mask=None):
    vis = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        vis = vis.tril()
    vis = vis.expand(scores.shape)
    if mask is not None:
        vis = vis & mask[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1)
    return torch.nan_to_num(p, nan=0.0)


def hand_scores(kind, w, q):
    """Each kind's row of scores, written with explicit loops / einsum (independent)."""
    n = q.shape[2]
    if kind == "random":
        return w["R"][:, :n, :n].expand(B, -1, -1, -1)
    if kind == "factorized_random":
        return torch.einsum("hir,hjr->hij", w["R1"][:, :n], w["R2"][:, :n]).expand(B, -1, -1, -1)
    if kind == "dense":
        h = torch.relu(torch.einsum("bhnd,hdk->bhnk", q, w["w1"]) + w["b1"][None, :, None])
        return torch.einsum("bhnk,hkl->bhnl", h, w["w2"][:, :, :n]) + w["b2"][None, :, None, :n]
    a = torch.einsum("bhnd,hda->bhna", q, w["wa"]) + w["ba"][None, :, None]
    b = torch.einsum("bhnd,hde->bhne", q, w["wb"]) + w["bb"][None, :, None]
    nb = b.shape[-1]
    out = torch.empty(B, H, n, n, dtype=q.dtype)
    for j in range(n):
        out[..., j] = a[..., j // nb] * b[..., j % nb]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_kinds_equal_hand_formula(kind, causal):
    q, k, v = qkv()
    w = {n: t.double() for n, t in synthesizer_weights(kind, H, D, 20, rank=4,
                                                       generator=torch.Generator().manual_seed(1)).items()}
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 9:] = False
    out = longattn.attention(q, k, v, "synthesizer", kind=kind, weights=w, causal=causal, key_padding_mask=mask)
    ref = softmax_masked(hand_scores(kind, w, q), causal, mask) @ v
    torch.testing.assert_close(out, ref)
    # mixture with dot-product scores
    mix = 0.3
    out = longattn.attention(q, k, v, "synthesizer", kind=kind, weights=w, mix=mix, causal=causal)
    dot = q @ k.transpose(-1, -2) / D ** 0.5
    ref = softmax_masked((1 - mix) * hand_scores(kind, w, q) + mix * dot, causal) @ v
    torch.testing.assert_close(out, ref)


def test_random_is_input_independent_and_mix1_is_full():
    q, k, v = qkv()
    q2, k2, _ = qkv(seed=5)
    a = longattn.attention(q, k, v, "synthesizer", kind="random", max_len=32)
    b = longattn.attention(q2, k2, v, "synthesizer", kind="random", max_len=32)
    torch.testing.assert_close(a, b)
    from longattn.ops.reference import dense_attention
    torch.testing.assert_close(longattn.attention(q, k, v, "synthesizer", mix=1.0, max_len=32),
                               dense_attention(q, k, v))


@pytest.mark.parametrize("kind", KINDS)
def test_causal_leak_and_padding(kind):
    q, k, v = qkv()
    for mix in (None, 0.5):
        fn = lambda q, k, v: longattn.attention(q, k, v, "synthesizer", kind=kind, max_len=16, mix=mix, causal=True)
        for t in (0, 6, 11):
            assert_no_causal_leak(fn, q, k, v, t)
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, 4:] = False
        assert_padding_no_leak(
            lambda q, k, v, m: longattn.attention(q, k, v, "synthesizer", kind=kind, max_len=16, mix=mix,
                                                  key_padding_mask=m), q, k, v, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_module_trains_bf16_and_fixed_random(kind):
    m = longattn.build("synthesizer", heads=H, head_dim=D, kind=kind, max_len=16, mix=0.5, seed=0)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in qkv())
    out = m(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert m.mix_logit.grad is not None
    if kind in ("random", "factorized_random"):
        fixed = longattn.build("synthesizer", heads=H, head_dim=D, kind=kind, max_len=16, trainable=False)
        assert sum(p.numel() for p in fixed.parameters()) == 0 and len(list(fixed.buffers())) > 0


def test_fully_masked_rows_zero_and_errors():
    q, k, v = qkv()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1] = False
    out = longattn.attention(q, k, v, "synthesizer", kind="dense", max_len=16, key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    with pytest.raises(ValueError, match="kind"):
        longattn.attention(q, k, v, "synthesizer", kind="conv")
    with pytest.raises(ValueError, match="max_len"):
        longattn.attention(q, k, v, "synthesizer", max_len=8)
    with pytest.raises(ValueError, match="lack"):
        longattn.attention(q, k, v, "synthesizer", kind="dense", weights={"R": torch.zeros(3, 16, 16)})
    with pytest.raises(ValueError, match="mix"):
        longattn.attention(q, k, v, "synthesizer", mix=1.5, max_len=16)
    with pytest.raises(TypeError, match="weights"):
        longattn.attention(q, k, v, "synthesizer", weights=[1, 2])


@pytest.mark.parametrize("kind", KINDS)
def test_causal_left_padding_dead_rows_give_zeros_and_exact_gradients(kind):
    """Causal + left padding: rows before the first real key see nothing (zeros, finite
    gradients); the other rows and every gradient equal the masked formula."""
    q, k, v = qkv()
    w = {n: t.double().requires_grad_() for n, t in synthesizer_weights(
        kind, H, D, 16, rank=4, generator=torch.Generator().manual_seed(2)).items()}
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :4] = False  # batch 1: rows 0..3 have no visible key
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(B, H, N, D, dtype=D64, generator=torch.Generator().manual_seed(3))
    out = longattn.attention(q, k, v, "synthesizer", kind=kind, weights=w, causal=True, key_padding_mask=mask,
                             mix=0.25)
    assert (out[1, :, :4] == 0).all()
    (out * g).sum().backward()
    got = [t.grad.clone() for t in (q, k, v, *w.values())]
    for t in (q, k, v, *w.values()):
        t.grad = None
    # reference: the masked formula on the rows that see a key (no NaN anywhere)
    dot = q @ k.transpose(-1, -2) / D ** 0.5
    scores = 0.75 * hand_scores(kind, w, q) + 0.25 * dot
    total = 0.0
    for b, first in ((0, 0), (1, 4)):
        p = softmax_masked(scores[b : b + 1], True, mask[b : b + 1])[:, :, first:]
        ref = p @ v[b : b + 1]
        torch.testing.assert_close(out[b : b + 1, :, first:], ref)
        total = total + (ref * g[b : b + 1, :, first:]).sum()
    total.backward()
    for a, r in zip(got, (q.grad, k.grad, v.grad, *(t.grad for t in w.values()))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r)
