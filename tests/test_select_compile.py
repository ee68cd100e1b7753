"""torch.compile over the select-then-attend family (docs/design.md section 9).

``torch.compile(fn)`` (graph breaks allowed, no ``fullgraph``) over
``longattn.attention(q, k, v, "topk_blocks", causal=True, ...)``: forward and backward
equal the eager call; the NSA and DSA modules' forward under ``torch.compile`` equals
eager. Compiling is slow on a shared CPU: one function and one shape each, the
``aot_eager`` backend (Dynamo + AOTAutograd's fake-tensor and joint-graph tracing)
for topk_blocks, Dynamo alone (``eager``) for the modules; the inductor run and NSA
(many graph breaks, ~7 s of tracing) are marked slow.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import api, registry

B, H, HKV, N, D = 1, 4, 2, 45, 8  # N no multiple of the blocks (8, 16); grouped KV heads


def _qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, N, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, N, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _topk_blocks(q, k, v, kpm):
    return longattn.attention(q, k, v, "topk_blocks", causal=True, key_padding_mask=kpm, block=8, topk=2,
                              sink_tokens=1, window=3)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_topk_blocks_forward_and_backward_equal_eager(backend):
    q, k, v = _qkv()
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[:, 5] = False
    ref = _topk_blocks(q, k, v, kpm)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch._dynamo.reset()
    out = torch.compile(_topk_blocks, backend=backend)(q, k, v, kpm)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


MODULES = {"nsa": dict(block=8, stride=4, topk=2, window=6), "dsa": dict(topk=7, index_heads=2, index_dim=8)}


@pytest.mark.parametrize("name", [pytest.param("nsa", marks=pytest.mark.slow), "dsa"])  # nsa: ~7 s of tracing
def test_compiled_select_module_forward_equals_eager(name):
    if name not in registry.names():
        pytest.skip(f"{name} is not registered")
    module = api.build(name, heads=H, head_dim=D, **MODULES[name]).eval()
    q, k, v = (t.detach().float() for t in _qkv(seed=1))
    with torch.no_grad():
        ref = module(q, k, v, causal=True)
        torch._dynamo.reset()
        out = torch.compile(module, backend="eager")(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
