"""``dsa`` (DeepSeek Sparse Attention): a float64 dense oracle that builds the same lightning-
indexer scores, the same top-k token selection (as a mask) and the same KL indexer loss,
outputs and gradients (indexer weights included); warm-up, causality, decode, memory,
errors, registration, training."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import api, registry
from longattn.model import ModelConfig, Transformer
from longattn.ops.dsa import DSAAttention, dsa_attention, dsa_weights, index_inputs, indexer_loss, select_tokens
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, peak_memory_mb

D64 = torch.float64


def _qkv(B, H, Hkv, N, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=D64).requires_grad_()
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=D64).requires_grad_()
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=D64).requires_grad_()
    return q, k, v


def _weights(H, D, Hi=3, Di=4, seed=1):
    return {n: t.double().requires_grad_() for n, t in dsa_weights(H, D, Hi, Di, seed=seed).items()}


def _oracle_scores(q, k, w):
    """Dense index scores I [B, Nq, Nk], float64, from the detached inputs."""
    qd, kd = q.detach(), k.detach()
    Hi = w["index_w"].shape[-1]
    qi = torch.einsum("bhnd,hde->bne", qd, w["index_q"]).unflatten(-1, (Hi, -1))  # [B, Nq, Hi, Di]
    wi = torch.einsum("bhnd,hde->bne", qd, w["index_w"]) / Hi ** 0.5
    ki = kd.mean(1) @ w["index_k"]  # [B, Nk, Di]
    r = torch.relu(torch.einsum("bthe,bse->bths", qi, ki))
    return torch.einsum("bth,bths->bts", wi, r)


def _visible(B, Nq, Nk, causal, kpm):
    pos = torch.arange(Nq) + Nk - Nq
    vis = torch.ones(B, Nq, Nk, dtype=torch.bool)
    if causal:
        vis &= (torch.arange(Nk)[None, :] <= pos[:, None])[None]
    if kpm is not None:
        vis &= kpm[:, None, :]
    return vis


def _oracle_selection(I, vis, topk):
    """bool [B, Nq, Nk]: the topk highest visible scores, ties to the lower position."""
    order = torch.sort(-I.masked_fill(~vis, float("-inf")), dim=-1, stable=True).indices[..., :topk]
    sel = torch.zeros_like(vis)
    sel.scatter_(-1, order, vis.gather(-1, order))
    return sel


def _oracle_loss(q, k, I, support):
    """mean over rows of KL(main distribution summed over heads, L1-normalised || softmax(I))."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    s = q.detach() @ k.detach().repeat_interleave(H // Hkv, 1).transpose(-1, -2) / D ** 0.5
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~support[:, None], float("-inf")), -1)).sum(1)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    logq = torch.log_softmax(I.masked_fill(~support, float("-inf")), -1)
    kl = torch.where(support & (p > 0), p * (torch.log(p.clamp_min(1e-300)) - logq), torch.zeros_like(p))
    return kl.sum() / (q.shape[0] * q.shape[2])


CASES = {
    "causal_gqa": dict(N=77, H=4, Hkv=2, topk=9, causal=True, pad=False),
    "bidirectional_pad": dict(N=50, H=2, Hkv=1, topk=7, causal=False, pad=True),
    "causal_pad_mha": dict(N=50, H=2, Hkv=2, topk=5, causal=True, pad=True),
}


def _case(c):
    q, k, v = _qkv(2, c["H"], c["Hkv"], c["N"])
    kpm = None
    if c["pad"]:
        kpm = torch.rand(2, c["N"], generator=torch.Generator().manual_seed(4)) > 0.3
        kpm[:, 0] = True
    return q, k, v, kpm, _weights(c["H"], 6)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_outputs_gradients_and_indexer_loss_equal_the_dense_oracle(case):
    c = CASES[case]
    q, k, v, kpm, w = _case(c)
    B, N = 2, c["N"]
    out = dsa_attention(q, k, v, causal=c["causal"], key_padding_mask=kpm, topk=c["topk"], weights=w)
    I = _oracle_scores(q, k, w)
    vis = _visible(B, N, N, c["causal"], kpm)
    sel = _oracle_selection(I, vis, c["topk"])
    R = c["H"] // c["Hkv"]
    ref = dense_attention(q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1), sel[:, None])
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-9)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=D64)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), gout), torch.autograd.grad(ref, (q, k, v), gout)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")
    # the indexer loss over the selected tokens (sparse stage) and over all visible ones (warm-up)
    qi, ki, wi = index_inputs(q, k, w)
    idx = select_tokens(qi, ki, wi, topk=c["topk"], causal=c["causal"], key_padding_mask=kpm)
    for indices, support in ((idx, sel), (None, vis)):
        loss = indexer_loss(q, k, qi, ki, wi, indices=indices, causal=c["causal"], key_padding_mask=kpm)
        ref_loss = _oracle_loss(q, k, I, support)
        torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-9)
        ga = torch.autograd.grad(loss, list(w.values()), retain_graph=True)
        gb = torch.autograd.grad(ref_loss, list(w.values()), retain_graph=True)
        for name, a, b in zip(w, ga, gb):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


def test_warmup_is_dense_attention_and_the_module_stores_its_loss():
    q, k, v, kpm, w = _case(CASES["causal_gqa"])
    mod = DSAAttention(4, 6, topk=9, index_heads=3, index_dim=4, warmup=True, weights=w).double()
    out = mod(q, k, v, causal=True)
    ref = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    loss = mod.last_indexer_loss
    assert loss is not None and loss.item() > 0
    loss.backward()  # the indexer learns from its loss alone; q, k get nothing from it
    assert mod.index_q.grad.abs().sum() > 0 and q.grad is None and k.grad is None
    mod.eval()
    mod(q, k, v, causal=True)
    assert mod.last_indexer_loss is None


def test_topk_at_least_the_visible_keys_is_full_attention():
    q, k, v = _qkv(1, 2, 1, 40)
    out = longattn.attention(q, k, v, "dsa", causal=True, topk=40)
    ref = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_decode_rows_equal_the_last_rows_of_the_full_call():
    q, k, v = _qkv(1, 4, 2, 61)
    mod = DSAAttention(4, 6, topk=8, index_heads=2, index_dim=4).double().eval()
    full = mod(q, k, v, causal=True)
    for m in (1, 6):
        torch.testing.assert_close(mod(q[:, :, -m:], k, v, causal=True), full[:, :, -m:], atol=1e-12, rtol=1e-10)


def test_no_causal_leak():
    q, k, v = _qkv(1, 2, 1, 58)
    w = _weights(2, 6)
    fn = lambda q, k, v: dsa_attention(q, k, v, causal=True, topk=6, weights=w)
    for t in (0, 5, 31, 50):
        assert_no_causal_leak(fn, q, k, v, t, atol=1e-12)


def _peak(N: int, H: int) -> float:
    setup = f"""
from longattn.ops.dsa import DSAAttention
q = torch.randn(1, {H}, {N}, 16, requires_grad=True)
k, v = (torch.randn(1, 1, {N}, 16, requires_grad=True) for _ in range(2))
m = DSAAttention({H}, 16, topk=32, index_heads=1, index_dim=4).eval()
"""
    return peak_memory_mb(setup, "out = m(q, k, v, causal=True)\nout.sum().backward()")


def test_memory_at_8k_is_far_below_the_score_matrices():
    # N = 8192, H = 4 over 1 kv head: the N x N fp32 score matrices are 1 GiB. Fwd + bwd.
    peak = _peak(8192, 4)
    assert peak < 200, f"peak {peak:.0f} MiB: something quadratic was built"


@pytest.mark.slow  # the indexer's selection alone takes ~7 s on one core
def test_memory_at_16k_is_far_below_one_score_matrix():
    # N = 16384, H = 2 over 1 kv head: one N x N fp32 score matrix per head is 1 GiB. Fwd + bwd.
    peak = _peak(16384, 2)
    print(f"dsa N=16384 peak {peak:.0f} MiB")
    assert peak < 400, f"peak {peak:.0f} MiB: something quadratic was built"


@pytest.mark.parametrize(
    "params,err,match",
    [
        ({"topk": 0}, ValueError, "topk"),
        ({"index_heads": 0}, ValueError, "index_heads"),
        ({"index_dim": 1.5}, TypeError, "index_dim"),
        ({"warmup": 1}, TypeError, "warmup"),
        ({"weights": {"index_q": torch.zeros(2, 6, 8), "index_k": torch.zeros(6, 3),
                      "index_w": torch.zeros(2, 6, 2)}}, ValueError, "index_q"),
        ({"weights": "w"}, TypeError, "weights"),
        ({"nope": 1}, TypeError, "nope"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params, err, match):
    q, k, v = (x.detach() for x in _qkv(1, 2, 1, 20))
    with pytest.raises(err, match=match):
        longattn.attention(q, k, v, "dsa", **params)


def test_registered_with_a_module_and_the_model_trains():
    spec = registry.get("dsa")
    assert spec.learned and spec.causal and spec.gqa and spec.bottom_right and spec.family == "select"
    assert isinstance(api.build("dsa", heads=2, head_dim=8), DSAAttention)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, max_len=40, dim=16, depth=1, heads=4, kv_heads=2, mechanism="dsa",
                      mechanism_params={"topk": 6, "index_heads": 2, "index_dim": 4}, head="lm")
    model = Transformer(cfg)
    dsa = [m for m in model.modules() if isinstance(m, DSAAttention)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.randint(0, 11, (2, 37), generator=torch.Generator().manual_seed(0))
    losses, index_losses = [], []
    for step in range(6):
        for m in dsa:
            m.warmup = step < 3  # warm-up (dense, indexer by KL), then sparse and joint
        lm = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        aux = sum(m.last_indexer_loss for m in dsa)
        opt.zero_grad()
        (lm + aux).backward()
        opt.step()
        losses.append(lm.item())
        index_losses.append(aux.item())
    assert losses[-1] < losses[0] and all(0 <= x < float("inf") for x in index_losses)
    assert dsa and all(m.index_q.grad.abs().sum() > 0 for m in dsa)


@pytest.mark.parametrize("case", ["causal_gqa", "bidirectional_pad"])
def test_module_loss_from_the_recorded_attention_weights_equals_the_oracle(case):
    """In training the module's sparse-stage loss takes the main attention's weights as its
    forward recorded them (SlotPlan.weights): the loss and the indexer gradients equal the
    float64 oracle's, and the output is still the oracle's."""
    c = CASES[case]
    q, k, v, kpm, w = _case(c)
    mod = DSAAttention(c["H"], 6, topk=c["topk"], index_heads=3, index_dim=4, weights=w).double().train()
    out = mod(q, k, v, causal=c["causal"], key_padding_mask=kpm)
    I = _oracle_scores(q, k, {n: getattr(mod, n) for n in w})
    sel = _oracle_selection(I, _visible(2, c["N"], c["N"], c["causal"], kpm), c["topk"])
    R = c["H"] // c["Hkv"]
    ref = dense_attention(q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1), sel[:, None])
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-9)
    ref_loss = _oracle_loss(q, k, I, sel)
    torch.testing.assert_close(mod.last_indexer_loss, ref_loss, atol=1e-12, rtol=1e-9)
    params = [getattr(mod, n) for n in w]
    for a, b in zip(torch.autograd.grad(mod.last_indexer_loss, params), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
