"""``nsa`` (Native Sparse Attention): a float64 dense oracle that builds the same compressed
tokens, the same block selection (as a mask) and the same window, outputs and gradients
(learned weights included); causality, decode, memory, errors, registration, training."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import api, registry
from longattn.model import ModelConfig, Transformer
from longattn.ops.nsa import NSAAttention, nsa_attention, nsa_weights
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, peak_memory_mb

D64 = torch.float64


def _qkv(B, H, Hkv, N, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=D64).requires_grad_()
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=D64).requires_grad_()
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=D64).requires_grad_()
    return q, k, v


def _weights(H, D, block, seed=1):
    """Random (not initial) weights, float64, differentiable."""
    g = torch.Generator().manual_seed(seed)
    w = nsa_weights(H, D, block, seed=seed)
    return {n: (torch.randn(t.shape, generator=g, dtype=D64) * 0.5).requires_grad_() for n, t in w.items()}


def _oracle(q, k, v, w, *, block, stride, topk, window, causal, kpm, shared):
    """Dense NSA, float64: loops for the compressed tokens, masks for every branch."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    R = H // Hkv
    real = torch.ones(B, Nk, dtype=torch.bool) if kpm is None else kpm
    km, vm = k * real[:, None, :, None], v * real[:, None, :, None]
    nc = (Nk - block) // stride + 1 if Nk >= block else 0
    ak, av = torch.softmax(w["pool_k"], 0), torch.softmax(w["pool_v"], 0)
    kc = torch.stack([sum(ak[t] * (km[:, :, i * stride + t] + w["pos_k"][t]) for t in range(block))
                      for i in range(nc)], 2).repeat_interleave(R, 1)
    vc = torch.stack([sum(av[t] * (vm[:, :, i * stride + t] + w["pos_v"][t]) for t in range(block))
                      for i in range(nc)], 2).repeat_interleave(R, 1)
    pos = torch.arange(Nq) + Nk - Nq
    cvis = torch.ones(B, Nq, nc, dtype=torch.bool)
    for i in range(nc):
        cvis[:, :, i] &= real[:, i * stride: i * stride + block].any(-1)[:, None]
        if causal:
            cvis[:, :, i] &= (i * stride + block - 1 <= pos)[None]
    sc = (q @ kc.transpose(-1, -2) / D ** 0.5).masked_fill(~cvis[:, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(sc, -1), nan=0.0)  # [B, H, Nq, nc]; no token: zeros
    o_cmp = p @ vc
    p = p.detach()
    if shared:
        p = p.view(B, Hkv, R, Nq, nc).sum(2, keepdim=True).expand(B, Hkv, R, Nq, nc).reshape(B, H, Nq, nc)
    nb = -(-Nk // block)
    overlap = torch.tensor([[float(i * stride < (j + 1) * block and i * stride + block > j * block)
                             for j in range(nb)] for i in range(nc)], dtype=D64).view(nc, nb)
    bscore = p @ overlap
    own = pos // block
    ar = torch.arange(nb)
    cand = ((ar < own[:, None]) if causal else (ar != own[:, None])) & (ar > 0)
    bnonempty = torch.stack([real[:, j * block:(j + 1) * block].any(-1) for j in range(nb)], 1)  # [B, nb]
    cand = cand[None, None] & bnonempty[:, None, None]
    order = torch.sort(-bscore.masked_fill(~cand, float("-inf")), dim=-1, stable=True).indices[..., :topk]
    chosen = torch.zeros(B, H, Nq, nb, dtype=torch.bool)
    chosen.scatter_(-1, order, cand.expand(B, H, Nq, nb).gather(-1, order))
    chosen[..., 0] = True
    chosen |= (ar[None, :] == own[:, None])[None, None]
    keyblock = torch.arange(Nk) // block
    smask = chosen[..., keyblock]
    j = torch.arange(Nk)
    if causal:
        smask &= (j[None, :] <= pos[:, None])
        wmask = (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - window)
    else:
        wmask = (j[None, :] - pos[:, None]).abs() < window
    kr, vr = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    o_slc = dense_attention(q, kr, vr, smask, key_padding_mask=kpm)
    o_win = dense_attention(q, kr, vr, wmask[None, None], key_padding_mask=kpm)
    g = torch.sigmoid(torch.einsum("bhnd,hdg->bhng", q, w["gate_w"]) + w["gate_b"][None, :, None, :])
    out = g[..., :1] * o_cmp + g[..., 1:2] * o_slc
    return out + g[..., 2:] * o_win if window else out


CASES = {
    "causal_gqa_shared": dict(N=77, H=4, Hkv=2, block=8, stride=8, topk=2, window=6, causal=True, pad=False,
                              shared=True),
    "causal_overlap_pad": dict(N=50, H=2, Hkv=1, block=8, stride=5, topk=3, window=4, causal=True, pad=True,
                               shared=True),
    "bidirectional_per_head": dict(N=50, H=4, Hkv=2, block=7, stride=4, topk=2, window=5, causal=False,
                                   pad=True, shared=False),
    "no_window": dict(N=41, H=2, Hkv=2, block=6, stride=6, topk=1, window=0, causal=True, pad=False,
                      shared=True),
    # whole blocks, no padding: the selected branch runs its own blocks and its first block apart
    "aligned_own_blocks_apart": dict(N=48, H=4, Hkv=2, block=8, stride=8, topk=2, window=3, causal=True, pad=False,
                                     shared=False),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_outputs_and_gradients_equal_the_dense_oracle(case):
    c = CASES[case]
    q, k, v = _qkv(2, c["H"], c["Hkv"], c["N"])
    w = _weights(c["H"], 6, c["block"])
    kpm = None
    if c["pad"]:
        kpm = torch.rand(2, c["N"], generator=torch.Generator().manual_seed(4)) > 0.25
        kpm[1, 8:20] = False  # whole padded blocks: never selected, no compressed token
    kw = dict(block=c["block"], stride=c["stride"], topk=c["topk"], window=c["window"], causal=c["causal"],
              shared=c["shared"])
    out = nsa_attention(q, k, v, key_padding_mask=kpm, weights=w, **kw)
    ref = _oracle(q, k, v, w, kpm=kpm, **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=D64)
    inputs = (q, k, v, *w.values())
    ga = torch.autograd.grad(out, inputs, gout)
    gb = torch.autograd.grad(ref, inputs, gout)
    for name, a, b in zip(("q", "k", "v", *w), ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


def test_selection_uses_blocks_the_compressed_branch_favours():
    # one key block whose keys match the queries: the compressed branch attends to it, so it
    # is selected; with topk=1 a distant block is otherwise out of reach of the window
    N, D = 70, 4
    q = torch.zeros(1, 1, N, D, dtype=D64)
    q[..., 0] = 4.0
    k = torch.zeros(1, 1, N, D, dtype=D64)
    k[:, :, 20:30, 0] = 4.0  # block 2 of 10 keys
    v = torch.zeros(1, 1, N, D, dtype=D64)
    v[:, :, 20:30, 1] = 1.0
    w = {n: t.double() for n, t in nsa_weights(1, D, 10, seed=0).items()}
    w["gate_b"] = torch.tensor([[-30.0, 30.0, -30.0]], dtype=D64)  # the selected branch only
    out = nsa_attention(q, k, v, causal=True, block=10, topk=1, window=1, weights=w)
    assert out[0, 0, 50:, 1].min() > 0.99  # rows 50..69: block 2 is neither own nor first


def test_decode_rows_equal_the_last_rows_of_the_full_call():
    q, k, v = _qkv(1, 4, 2, 61)
    mod = NSAAttention(4, 6, block=8, stride=4, topk=2, window=5).double()
    full = mod(q, k, v, causal=True)
    for m in (1, 6):
        part = mod(q[:, :, -m:], k, v, causal=True)
        torch.testing.assert_close(part, full[:, :, -m:], atol=1e-12, rtol=1e-10)


def test_no_causal_leak():
    q, k, v = _qkv(1, 2, 1, 58)
    w = _weights(2, 6, 8)
    fn = lambda q, k, v: nsa_attention(q, k, v, causal=True, block=8, stride=4, topk=2, window=5, weights=w)
    for t in (0, 20, 31, 40):
        assert_no_causal_leak(fn, q, k, v, t, atol=1e-12)  # grad / no-grad paths round apart


def _peak(N: int, H: int) -> float:
    setup = f"""
from longattn.ops.nsa import NSAAttention
q = torch.randn(1, {H}, {N}, 16, requires_grad=True)
k, v = (torch.randn(1, 1, {N}, 16, requires_grad=True) for _ in range(2))
m = NSAAttention({H}, 16, block=32, topk=1, window=16)
"""
    return peak_memory_mb(setup, "out = m(q, k, v, causal=True)\nout.sum().backward()")


def test_memory_at_16k_is_far_below_one_score_matrix():
    # N = 16384, H = 2 over 1 kv head: one N x N fp32 score matrix per head is 1 GiB. Fwd + bwd.
    peak = _peak(16384, 2)
    print(f"nsa N=16384 peak {peak:.0f} MiB")
    assert peak < 400, f"peak {peak:.0f} MiB: something quadratic was built"


@pytest.mark.parametrize(
    "params,err,match",
    [
        ({"block": 0}, ValueError, "block"),
        ({"block": 8, "stride": 9}, ValueError, "stride"),
        ({"topk": -1}, ValueError, "topk"),
        ({"window": 2.5}, TypeError, "window"),
        ({"shared": "yes"}, TypeError, "shared"),
        ({"weights": {"pool_k": torch.zeros(3)}}, ValueError, "pool_k"),
        ({"weights": [1]}, TypeError, "weights"),
        ({"nope": 1}, TypeError, "nope"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params, err, match):
    q, k, v = (x.detach() for x in _qkv(1, 2, 1, 20))
    with pytest.raises(err, match=match):
        longattn.attention(q, k, v, "nsa", **params)


def test_registered_with_a_module_and_the_model_trains():
    spec = registry.get("nsa")
    assert spec.learned and spec.causal and spec.gqa and spec.bottom_right and spec.family == "select"
    assert isinstance(api.build("nsa", heads=2, head_dim=8), NSAAttention)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, max_len=40, dim=16, depth=1, heads=4, kv_heads=2, mechanism="nsa",
                      mechanism_params={"block": 8, "topk": 1, "window": 4}, head="lm")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.randint(0, 11, (2, 37), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    nsa = [m for m in model.modules() if isinstance(m, NSAAttention)]
    assert nsa and all(m.pool_k.grad is not None and m.gate_w.grad.abs().sum() > 0 for m in nsa)
