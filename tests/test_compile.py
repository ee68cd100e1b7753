"""torch.compile of longattn: the custom ops of longattn.ops.custom.

Compiling is slow on a shared CPU, so the fast tests use the ``aot_eager`` backend
(Dynamo with ``fullgraph=True`` -- any graph break raises -- plus AOTAutograd's fake
tensor and joint-graph tracing of the ops) or Dynamo alone (``eager``); the inductor
runs are marked slow.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.model import ModelConfig, Transformer
from longattn.ops import custom
from longattn.ops.reference import dense_attention


def _qkv(B=1, H=4, Hkv=2, N=40, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


@pytest.mark.parametrize("mech,params", [
    ("local", {"before": 6, "after": 2}),
    ("bigbird", {"block": 8, "random_blocks": 1}),
    ("full", {}),
    ("linear", {}),
    ("performer", {"num_features": 16}),
    ("graph", None),
])
@pytest.mark.parametrize("causal", [False, True])
def test_custom_attention_equals_eager(mech, params, causal):
    """custom.attention (the ops, called eagerly) equals longattn.attention: output
    and gradients, grouped KV heads, key padding, bottom-right causal (Nq < Nk)."""
    if mech == "graph":
        if causal:
            pytest.skip("graph is not causal")
        src = torch.arange(40).repeat_interleave(3)
        dst = (src + torch.tensor([0, 1, 5]).repeat(40)) % 40
        params = {"edge_index": torch.stack((src, dst))}
    q, k, v = _qkv()
    kpm = torch.ones(1, 40, dtype=torch.bool)
    kpm[:, 3] = False
    for qq in (q, q[:, :, -7:]) if causal and mech != "graph" else (q,):
        ref = longattn.attention(qq, k, v, mech, causal=causal, key_padding_mask=kpm, **params)
        out = custom.attention(qq, k, v, mech, causal=causal, key_padding_mask=kpm, **params)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(ref)
        for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_custom_attention_packed_documents():
    q, k, v = _qkv(N=30)
    seg = torch.tensor([[0] * 11 + [1] * 12 + [2] * 7])
    for mech, params in (("local", {"before": 4, "after": 0}), ("full", {})):
        ref = longattn.attention(q, k, v, mech, causal=True, segment_ids=seg, **params)
        out = custom.attention(q, k, v, mech, causal=True, segment_ids=seg, **params)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(ref)
        for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_config_key_is_deterministic_and_checked():
    a = custom.config_key("local", True, None, "cpu", True, (), ("after", "before"), 0, 8)
    b = custom.config_key("local", True, None, "cpu", True, (), ("before", "after"), 8, 0)
    c = custom.config_key("local", True, None, "cpu", True, (), ("after", "before"), 0, 9)
    assert a == b != c and "|engine|" in a
    with pytest.raises(TypeError, match="unknown parameter"):
        custom.config_key("local", False, None, "cpu", True, (), ("window",), 3)
    with pytest.raises(ValueError, match="cannot be causal"):
        custom.config_key("linformer", True, None, "cpu", True, (), ())


def test_unsupported_mechanisms_fall_back_to_eager():
    assert custom.supported("local") and custom.supported("performer")
    assert not custom.supported("full", {"dropout": 0.1})
    assert not custom.supported("lsh")
    q, k, v = _qkv(H=2, Hkv=2, N=32)
    out = custom.attention(q, k, v, "nystrom", landmarks=8)
    torch.testing.assert_close(out, longattn.attention(q, k, v, "nystrom", landmarks=8))


@pytest.mark.parametrize("op", ["engine", "generic"])
def test_opcheck(op):
    q, k, v = _qkv(N=24)
    kpm = torch.ones(1, 24, dtype=torch.bool)
    kpm[:, -3:] = False
    if op == "engine":
        key = custom.config_key("local", True, None, "cpu", True, (), ("after", "before"), 0, 5)
        args = (q, k, v, kpm, key)
        target = torch.ops.longattn.engine_attention.default
    else:
        proj = torch.randn(16, 8, dtype=torch.float64)
        key = custom.config_key("performer", True, None, "cpu", True, ("projection",), ())
        args = (q, k, v, kpm, None, [proj], key)
        target = torch.ops.longattn.attention.default
    result = torch.library.opcheck(target, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _lm(mech, params, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, max_len=64, dim=32, depth=2, heads=4, mechanism=mech,
                      mechanism_params=params)
    return Transformer(cfg).to(dtype)


def _check_model(model, backend, atol, n=45):
    x = torch.randint(0, 40, (2, n), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    g = torch.randn_like(ref)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(_grads(out, params, g), _grads(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_model_local_compiles_without_graph_break():
    """fullgraph=True: any graph break raises. Outputs and parameter gradients equal eager."""
    torch._dynamo.reset()
    _check_model(_lm("local", {"before": 16, "after": 0}), "aot_eager", 1e-12)


def test_model_performer_traces_without_graph_break():
    torch._dynamo.reset()
    _check_model(_lm("performer", {"num_features": 16}), "eager", 1e-12)


def test_functional_bigbird_gqa_causal_compiles():
    torch._dynamo.reset()
    q, k, v = _qkv(H=4, Hkv=2, N=50)
    kw = dict(block=8, random_blocks=1, global_blocks=1)
    fn = torch.compile(lambda q, k, v: custom.attention(q, k, v, "bigbird", causal=True, **kw),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    ref = longattn.attention(q, k, v, "bigbird", causal=True, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_functional_performer_op_compiles():
    """Non-causal performer runs through the generic op (recomputing backward) under compile."""
    torch._dynamo.reset()
    q, k, v = _qkv(H=4, Hkv=2, N=30)
    proj = torch.randn(16, 8, dtype=torch.float64)
    assert not custom.traced_natively("performer", False, 30, 30)
    fn = torch.compile(lambda q, k, v: custom.attention(q, k, v, "performer", projection=proj),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    ref = longattn.attention(q, k, v, "performer", projection=proj)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("mech,params", [("local", {"before": 16, "after": 0}),
                                         ("performer", {"num_features": 16})])
def test_model_inductor_float32(mech, params):
    torch._dynamo.reset()
    _check_model(_lm(mech, params, dtype=torch.float32), "inductor", 1e-5)


@pytest.mark.slow
def test_functional_bigbird_inductor_float32():
    torch._dynamo.reset()
    q, k, v = _qkv(H=4, Hkv=2, N=50, dtype=torch.float32)
    kw = dict(block=8, random_blocks=1, global_blocks=1)
    fn = torch.compile(lambda q, k, v: custom.attention(q * 1.0, k, v, "bigbird", causal=True, **kw) + 1.0,
                       fullgraph=True)
    out = fn(q, k, v)
    ref = longattn.attention(q, k, v, "bigbird", causal=True, **kw) + 1.0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _local_oracle(q, k, v, before, after):
    """float64 dense reference of local(before, after) with its mask drawn by hand."""
    n = q.shape[-2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    mask = (j >= i - before) & (j <= i + after)
    return dense_attention(q, k, v, mask)


@pytest.mark.parametrize("dynamic", [True, None])
def test_head_sizes_and_dv_under_dynamic_shapes(dynamic):
    """Issue 29: a symbolic head-size comparison reached config_key
    (assume_constant_result) and Dynamo refused it -- under dynamic=True, and with the
    default automatic dynamic on the second head size or a Dv != D call after a D == Dv
    one. Every call must compile (fullgraph) and equal the float64 dense reference."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: custom.attention(q, k, v, "local", before=4, after=2),
                       fullgraph=True, backend="aot_eager", dynamic=dynamic)
    g = torch.Generator().manual_seed(3)
    for n, d, dv in ((21, 8, 8), (21, 16, 16), (21, 8, 12), (19, 6, 6)):
        q, k = (torch.randn(1, 2, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        v = torch.randn(1, 2, n, dv, generator=g, dtype=torch.float64, requires_grad=True)
        out = fn(q, k, v)
        ref = _local_oracle(q, k, v, 4, 2)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        go = torch.randn_like(ref)
        for a, b in zip(_grads(out, (q, k, v), go), _grads(ref, (q, k, v), go)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
