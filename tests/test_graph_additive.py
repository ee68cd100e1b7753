"""graph (scatter softmax over edges) and additive (Bahdanau) attention against references."""

from __future__ import annotations

import pytest
import torch

import longattn
from conftest import make_qkv
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb


def _edges(n: int, e: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)
    return torch.unique(ei, dim=1)  # no duplicate edges: the dense mask can express it


def _qkv(B, H, N, D, seed=0, dtype=torch.float64):
    return list(make_qkv(B, H, H, N, N, D, dtype=dtype, seed=seed, requires_grad=True))


def _uniform_edges(nq: int, nk: int, deg: int, seed: int = 0) -> torch.Tensor:
    """deg distinct random keys for every query (the fixed in-degree path)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.argsort(torch.rand(nq, nk, generator=g), dim=1)[:, :deg].reshape(-1)
    dst = torch.arange(nq).repeat_interleave(deg)
    return torch.stack([src, dst])


def _check_graph_vs_dense(q, k, v, ei, kpm, causal, tol=1e-12):
    Nq, Nk = q.shape[2], k.shape[2]
    mask = torch.zeros(Nq, Nk, dtype=torch.bool)
    mask[ei[1], ei[0]] = True  # query i = target, key j = source
    out = longattn.attention(q, k, v, "graph", edge_index=ei, causal=causal, key_padding_mask=kpm)
    ref = dense_attention(q, k, v, mask, causal=causal, key_padding_mask=kpm)
    assert (out - ref).abs().max() < tol
    go = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), go)
    gb = torch.autograd.grad(ref, (q, k, v), go)
    assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < tol


@pytest.mark.parametrize("kind", ["random", "uniform"])
def test_graph_equals_dense_with_edge_mask(kind):
    N = 61
    ei = _edges(N, 300) if kind == "random" else _uniform_edges(N, N, 7)
    q, k, v = _qkv(2, 3, N, 8)
    kpm = torch.rand(2, N, generator=torch.Generator().manual_seed(5)) > 0.2
    for causal in (False, True):
        _check_graph_vs_dense(q, k, v, ei, kpm, causal)
        _check_graph_vs_dense(q, k, v, ei, None, causal)


def test_graph_cross_attention_dv_and_fp32():
    Nq, Nk = 37, 53
    ei = _uniform_edges(Nq, Nk, 5, seed=3)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, Nq, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(1, 2, Nk, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(1, 2, Nk, 5, generator=g, dtype=torch.float64).requires_grad_()
    _check_graph_vs_dense(q, k, v, ei, None, False)
    mixed = torch.cat([ei, _edges(Nq, 40, seed=4)], dim=1)  # duplicates of some edges: counted twice
    out = longattn.attention(*(x.float() for x in (q, k, v)), "graph", edge_index=mixed)
    w = torch.zeros(Nq, Nk, dtype=torch.float64)
    w.index_put_((mixed[1], mixed[0]), torch.ones(mixed.shape[1], dtype=torch.float64), accumulate=True)
    # duplicates: softmax with multiplicities = log-count bias on the dense scores
    ref = dense_attention(q, k, v, w > 0, bias=w.clamp_min(1).log())
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("ei", [[[1, 2], [0, 0]], [[1, 2, 0, 1, 0, 2], [0, 0, 1, 1, 2, 2]]],
                         ids=["ragged", "fixed-degree"])
def test_graph_all_in_edges_padded_has_zero_grad_not_nan(ei):
    # every in-edge of query 0 comes from a padded key (the fixed-degree graph takes the
    # fused-softmax path); its output and every gradient through it are 0, not NaN
    q, k, v = _qkv(1, 1, 3, 4)
    kpm = torch.tensor([[True, False, False]])
    out = longattn.attention(q, k, v, "graph", edge_index=torch.tensor(ei), key_padding_mask=kpm)
    (out[:, :, 0] * 10).sum().backward()
    assert out[:, :, 0].abs().max() == 0
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0


def test_graph_csr_cache_follows_in_place_edits():
    from longattn.ops import graph

    N = 20
    q, k, v = (x.detach() for x in _qkv(1, 1, N, 4))
    ei = _uniform_edges(N, N, 3)
    a = longattn.attention(q, k, v, "graph", edge_index=ei)
    assert any(entry[0] is ei for entry in graph._CSR_CACHE.values())
    ei[0] = (ei[0] + 1) % N  # same storage, new contents: must not reuse the old CSR
    b = longattn.attention(q, k, v, "graph", edge_index=ei)
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[ei[1], ei[0]] = True
    assert (b - dense_attention(q, k, v, mask)).abs().max() < 1e-12
    assert (a - b).abs().max() > 1e-3


def test_graph_node_without_in_edges_gets_zeros():
    q, k, v = _qkv(1, 1, 5, 4)
    ei = torch.tensor([[0, 1], [1, 1]])  # only node 1 has in-edges
    out = longattn.attention(q, k, v, "graph", edge_index=ei)
    assert torch.isfinite(out).all() and out[0, 0, [0, 2, 3, 4]].abs().max() == 0


def test_graph_causal_leak_and_padding():
    N = 80
    ei = _edges(N, 500, seed=1)
    q, k, v = (x.detach() for x in _qkv(1, 2, N, 8))
    assert_no_causal_leak(lambda q, k, v: longattn.attention(q, k, v, "graph", edge_index=ei, causal=True), q, k, v, 40)
    kpm = torch.rand(1, N) > 0.3
    assert_padding_no_leak(lambda q, k, v, m: longattn.attention(q, k, v, "graph", edge_index=ei, key_padding_mask=m), q, k, v, kpm)


def test_graph_bad_edge_index():
    q, k, v = _qkv(1, 1, 5, 4)
    with pytest.raises(ValueError, match="edge_index"):
        longattn.attention(q, k, v, "graph", edge_index=torch.tensor([[0, 9], [1, 1]]))
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        longattn.attention(q, k, v, "graph", edge_index=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="edge_index"):
        longattn.attention(q, k, v, "graph", edge_index=[[0], [1]])
    with pytest.raises(TypeError, match="edge_index"):
        longattn.attention(q, k, v, "graph")


def test_graph_memory_is_linear_in_edges():
    # a ring graph with 65536 nodes and 4 neighbours each: N x N would be 16 GiB per head
    setup = """
import longattn
N = 65536
src = torch.arange(N).repeat_interleave(4)
dst = (src + torch.tensor([1, 2, N - 1, N - 2]).repeat(N)) % N
ei = torch.stack([src, dst])
q, k, v = (torch.randn(1, 2, N, 32, requires_grad=True) for _ in range(3))
"""
    peak = peak_memory_mb(setup, "out = longattn.attention(q, k, v, 'graph', edge_index=ei); out.sum().backward()")
    assert peak < 1024, f"{peak:.0f} MiB"


def _additive_ref(q, k, v, wq, wk, w, kpm, causal, scale=1.0):
    """The formula with the full [B, H, Nq, Nk, A] tensor, masked softmax (float64)."""
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    e = torch.tanh(torch.einsum("bhid,had->bhia", q, wq)[:, :, :, None] + torch.einsum("bhjd,had->bhja", k, wk)[:, :, None])
    s = torch.einsum("bhija,ha->bhij", e, w) * scale
    vis = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if kpm is not None:
        vis = vis & kpm[:, None, None, :]
    if causal:
        vis = vis & torch.ones(Nq, Nk, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("causal", [False, True])
def test_additive_equals_formula(causal):
    B, H, N, D, A = 2, 2, 23, 6, 5
    q, k, v = _qkv(B, H, N, D)
    g = torch.Generator().manual_seed(9)
    wq, wk = (torch.randn(H, A, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    w = torch.randn(H, A, generator=g, dtype=torch.float64).requires_grad_()
    kpm = torch.rand(B, N, generator=g) > 0.3
    kpm[1, :3] = False  # causal: queries 0..2 of batch 1 see no key (zeros, zero grads)
    for block in (7, 64):
        out = longattn.attention(q, k, v, "additive", wq=wq, wk=wk, w=w, block=block, causal=causal,
                                 key_padding_mask=kpm, scale=0.7)
        ref = _additive_ref(q, k, v, wq, wk, w, kpm, causal, scale=0.7)
        assert (out - ref).abs().max() < 1e-12
        go = torch.randn_like(out)
        ga = torch.autograd.grad(out, (q, k, v, wq, wk, w), go)
        gb = torch.autograd.grad(ref, (q, k, v, wq, wk, w), go)
        for name, a, b in zip(["q", "k", "v", "wq", "wk", "w"], ga, gb):
            assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-11, name


def test_additive_cross_dv_and_causal_leak():
    H, D, A = 3, 4, 6
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, H, 19, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, H, 41, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, H, 41, 7, generator=g, dtype=torch.float64, requires_grad=True)
    wq, wk = (torch.randn(H, A, D, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(H, A, generator=g, dtype=torch.float64)
    out = longattn.attention(q, k, v, "additive", wq=wq, wk=wk, w=w, block=8)
    ref = _additive_ref(q, k, v, wq, wk, w, None, False)
    assert (out - ref).abs().max() < 1e-12
    ga = torch.autograd.grad(out.sum(), (q, k, v))
    gb = torch.autograd.grad(ref.sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < 1e-12
    x = torch.randn(1, H, 30, D, generator=g, dtype=torch.float64)
    assert_no_causal_leak(lambda q, k, v: longattn.attention(q, k, v, "additive", wq=wq, wk=wk, w=w, block=8, causal=True),
                          x, x.clone(), x.clone(), 13)


def test_additive_scale_errors_name_scale():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    kw = dict(wq=torch.randn(2, 3, 4), wk=torch.randn(2, 3, 4), w=torch.randn(2, 3))
    with pytest.raises((TypeError, ValueError), match="scale"):
        longattn.attention(q, k, v, "additive", scale="abc", **kw)
    with pytest.raises((TypeError, ValueError), match="scale"):
        longattn.attention(q, k, v, "additive", scale=float("nan"), **kw)
    assert "scale 1" in longattn.registry.get("additive").summary


def test_additive_train_memory_is_not_quadratic():
    # N = 1024, H = 2, A = D = 32: the [N, N, A] tanh tensors of the old code, kept
    # for the backward, are 256 MiB; the 64 x 64 tiles are 1 MiB
    setup = """
import longattn
m = longattn.build("additive", heads=2, head_dim=32)
q, k, v = (torch.randn(1, 2, 1024, 32, requires_grad=True) for _ in range(3))
"""
    peak = peak_memory_mb(setup, "out = m(q, k, v); out.sum().backward()")
    print(f"additive train N=1024: {peak:.1f} MiB")
    assert peak < 40, f"{peak:.0f} MiB"


def test_additive_module_trains():
    m = longattn.build("additive", heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    out = m(q, k, v, causal=True)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(ValueError, match="wq"):
        longattn.attention(q, k, v, "additive", wq=torch.randn(3, 4, 8), wk=torch.randn(2, 4, 8), w=torch.randn(2, 4))
