"""graph (scatter softmax over edges) and additive (Bahdanau) attention against references."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.ops.reference import dense_attention
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb


def _edges(n: int, e: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)
    return torch.unique(ei, dim=1)  # no duplicate edges: the dense mask can express it


def _qkv(B, H, N, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("edge_chunk", [1 << 24, 200])
def test_graph_equals_dense_with_edge_mask(edge_chunk, monkeypatch):
    from longattn.ops import graph

    monkeypatch.setattr(graph, "EDGE_CHUNK", edge_chunk)  # one chunk, or many
    N = 60
    ei = _edges(N, 300)
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[ei[1], ei[0]] = True  # query i = target, key j = source
    q, k, v = _qkv(2, 3, N, 8)
    kpm = torch.rand(2, N, generator=torch.Generator().manual_seed(5)) > 0.2
    for causal in (False, True):
        out = longattn.attention(q, k, v, "graph", edge_index=ei, causal=causal, key_padding_mask=kpm)
        ref = dense_attention(q, k, v, mask, causal=causal, key_padding_mask=kpm)
        assert (out - ref).abs().max() < 1e-12
        ga = torch.autograd.grad(out.sum(), (q, k, v))
        gb = torch.autograd.grad(ref.sum(), (q, k, v))
        assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < 1e-12


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


def test_additive_equals_formula():
    B, H, N, D, A = 2, 2, 23, 6, 5
    q, k, v = _qkv(B, H, N, D)
    g = torch.Generator().manual_seed(9)
    wq, wk = (torch.randn(H, A, D, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(H, A, generator=g, dtype=torch.float64)
    kpm = torch.rand(B, N, generator=g) > 0.2
    for causal in (False, True):
        out = longattn.attention(q, k, v, "additive", wq=wq, wk=wk, w=w, block=7, causal=causal, key_padding_mask=kpm)
        # reference: the full [B, H, N, N, A] tensor of the formula, softmax with masks
        e = torch.tanh(torch.einsum("bhid,had->bhia", q, wq)[:, :, :, None] + torch.einsum("bhjd,had->bhja", k, wk)[:, :, None])
        s = torch.einsum("bhija,ha->bhij", e, w)
        vis = kpm[:, None, None, :].expand(B, H, N, N)
        if causal:
            vis = vis & torch.ones(N, N, dtype=torch.bool).tril()
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        ref = p @ v
        assert (out - ref).abs().max() < 1e-12


def test_additive_module_trains():
    m = longattn.build("additive", heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    out = m(q, k, v, causal=True)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(ValueError, match="wq"):
        longattn.attention(q, k, v, "additive", wq=torch.randn(3, 4, 8), wk=torch.randn(2, 4, 8), w=torch.randn(2, 4))
