"""StreamingLLM cache positions for sinks (``register(..., sink_positions="cache")``).

Every check compares against a float64 dense reference written here: per query the
window keys at their true RoPE distance and the sinks outside the window scored from
the query rotated to position P_i = min(i, W + S)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.integrations import sink_positions as sp  # noqa: E402
from longattn.integrations.transformers import SinkWindowCache, register  # noqa: E402

N, W, S = 53, 9, 2
THETA = 100.0  # small base: sizeable rotations at these short distances


def _model(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256, rope_theta=THETA)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] rotated to positions pos [N] (Llama's rotate_half), float64."""
    d = x.shape[-1]
    inv = 1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Dense float64 oracle from un-rotated projections q [B, N, H, D], k, v [B, N, Hkv, D]
    -> [B, N, H, D]."""
    n, H = q.shape[1], q.shape[2]
    g = H // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    i = torch.arange(n)
    qa, ka = _rope(q, i), _rope(k, i)
    qp = _rope(q, i.clamp(max=window + sinks))
    j = i[None, :]
    window_vis = (j <= i[:, None]) & (j >= i[:, None] - window)
    sink_vis = (j < sinks) & (j < i[:, None] - window)
    s_win = torch.einsum("bihd,bjhd->bhij", qa, ka)
    s_snk = torch.einsum("bihd,bjhd->bhij", qp, ka)
    s = torch.where(window_vis, s_win, torch.where(sink_vis, s_snk, float("-inf"))) / q.shape[-1] ** 0.5
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


def _capture(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """Per layer the raw q/k/v projections and the attention output (o_proj's input)."""
    seen: list[dict] = [dict() for _ in model.model.layers]
    hooks = []
    for rec, layer in zip(seen, model.model.layers):
        att = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            hooks.append(getattr(att, name).register_forward_hook(
                lambda m, a, out, rec=rec, name=name: rec.__setitem__(name, out.detach())))
        hooks.append(att.o_proj.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("o", a[0].detach())))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_attention_output_matches_reference():
    model = _model()
    model.set_attn_implementation(register("local", before=W, after=0, global_idx=tuple(range(S)),
                                           sink_positions="cache"))
    ids = torch.randint(0, 61, (2, N), generator=torch.Generator().manual_seed(1))
    seen, _ = _capture(model, ids)
    for rec in seen:
        q, k, v = (rec[n].view(2, N, -1, 8) for n in ("q_proj", "k_proj", "v_proj"))
        ref = _reference(q, k, v, W, S).reshape(2, N, -1)
        torch.testing.assert_close(rec["o"], ref, atol=1e-5, rtol=1e-5)
    # and the true-position ("text") sinks differ from it: the test sees the shift
    model.set_attn_implementation(register("local", before=W, after=0, global_idx=tuple(range(S))))
    seen_text, _ = _capture(model, ids)
    assert (seen_text[0]["o"] - seen[0]["o"]).abs().max() > 1e-3


def test_same_as_text_positions_until_the_shift():
    model = _model(2)
    ids = torch.randint(0, 61, (1, W + S + 1), generator=torch.Generator().manual_seed(3))
    out = []
    for mode in ("cache", "text"):
        model.set_attn_implementation(register("local", before=W, after=0, global_idx=tuple(range(S)),
                                               sink_positions=mode))
        with torch.no_grad():
            out.append(model(ids).logits)
    torch.testing.assert_close(out[0], out[1], atol=1e-10, rtol=1e-10)


def _op_reference(q, qs, k, v, window, sinks):
    """The op's semantics densely (already-rotated q, shifted q): [B, H, N, D]."""
    n = q.shape[2]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    win = (j <= i) & (j >= i - window)
    snk = (j < sinks) & (j < i - window)
    s = torch.where(win, q @ k.transpose(-1, -2), torch.where(snk, qs @ k.transpose(-1, -2), float("-inf")))
    return (s / q.shape[-1] ** 0.5).softmax(-1) @ v


def test_op_gradients_and_no_leak():
    gen = torch.Generator().manual_seed(4)
    n, t = 23, 12
    x = [torch.randn(1, 4 if a < 2 else 2, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
         for a in range(4)]
    out = sp.local_with_cache_sinks(*x, before=4, sinks=3)
    ref = _op_reference(*x, 4, 3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, x, dout, retain_graph=True)
    want = torch.autograd.grad(ref, x, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # causal: out[:t] ignores inputs after t, values and gradients
    grads = torch.autograd.grad(out[:, :, :t].sum(), x)
    for gr in grads:
        assert gr[:, :, t:].abs().max() == 0
    moved = [a.detach().clone() for a in x]
    for a in moved:
        a[:, :, t:] += 5.0
    torch.testing.assert_close(sp.local_with_cache_sinks(*moved, before=4, sinks=3)[:, :, :t], out[:, :, :t].detach(),
                               atol=0, rtol=0)


def test_model_has_no_causal_leak():
    model = _model(5)
    model.set_attn_implementation(register("local", before=W, after=0, global_idx=tuple(range(S)),
                                           sink_positions="cache"))
    ids = torch.randint(0, 61, (1, N), generator=torch.Generator().manual_seed(6))
    other = ids.clone()
    other[:, 30:] = (other[:, 30:] + 7) % 61
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    torch.testing.assert_close(a[:, :30], b[:, :30], atol=0, rtol=0)
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-6


def test_decode_with_sink_window_cache_equals_one_forward():
    model = _model(7)
    model.set_attn_implementation(register("local", before=W, after=0, global_idx=tuple(range(S)),
                                           sink_positions="cache"))
    ids = torch.randint(0, 61, (1, 31), generator=torch.Generator().manual_seed(8))
    cache = SinkWindowCache(model.config, sinks=S, window=W)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :20], cache=cache, use_cache=True).logits]
        for t in range(20, 31):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert cache.stored_length() == S + W
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)


def test_spec_string_and_refusals():
    from longattn.evaluation.loading import attn_implementation, parse_mechanism

    spec = parse_mechanism("local:before=511,global_idx=(0,1,2,3),sink_positions='cache'")
    assert attn_implementation(spec).endswith("_cachepos")
    bad = [({"mechanism": "local", "before": 5, "after": 0}, "needs sink tokens"),
           ({"mechanism": "bigbird", "block": 4}, "mechanism 'local'"),
           ({"mechanism": {"full_attention": "local"}}, "mapping"),
           ({"mechanism": "local", "before": 5, "after": 0, "global_idx": (1, 2)}, "leading tokens"),
           ({"mechanism": "local", "before": 5, "after": 2, "global_idx": (0,)}, "after=0")]
    for kw, msg in bad:
        kw = dict(kw)
        with pytest.raises(ValueError, match=msg):
            register(kw.pop("mechanism"), sink_positions="cache", **kw)
    with pytest.raises(ValueError, match="sink_positions must be one of"):
        register("local", before=5, after=0, global_idx=(0,), sink_positions="kv")
    with pytest.raises(ValueError, match="model_type 'gpt_neox'"):
        sp.rope_shift(SimpleNamespace(config=SimpleNamespace(model_type="gpt_neox")))
    model = _model(9)
    model.set_attn_implementation(register("local", before=W, after=0, global_idx=(0,), sink_positions="cache"))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="sink_positions='cache'.*padding mask"):
        model(torch.zeros(2, 20, dtype=torch.long), attention_mask=mask)


def test_op_builds_no_n_by_n_tensor():
    """Forward + backward of the op at N = 8192 (H = 2, D = 16): one N x N float32 score
    matrix per head would be 256 MiB; the op holds O(N (W + S) D)."""
    from longattn.testing import peak_memory_mb

    setup = """
import torch
from longattn.integrations.sink_positions import local_with_cache_sinks
g = torch.Generator().manual_seed(0)
q, qs, k, v = (torch.randn(1, 2, 8192, 16, generator=g, requires_grad=True) for _ in range(4))
"""
    run = "local_with_cache_sinks(q, qs, k, v, before=63, sinks=4).sum().backward()"
    peak = peak_memory_mb(setup, run)
    assert peak < 96, f"peak {peak:.0f} MiB: an N x N tensor (256 MiB) or worse was built"


def test_op_bad_input_names_the_argument():
    from longattn.integrations.sink_positions import local_with_cache_sinks

    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="q_shifted"):
        local_with_cache_sinks(q, q[:, :, :5], q, q, before=3, sinks=2)
    with pytest.raises(ValueError, match="before"):
        local_with_cache_sinks(q, q, q, q, before=-1, sinks=2)
    with pytest.raises(ValueError, match="sinks"):
        local_with_cache_sinks(q, q, q, q, before=3, sinks=0)
    with pytest.raises(ValueError, match="do not match"):
        local_with_cache_sinks(q, q, torch.randn(2, 2, 9, 8), q, before=3, sinks=2)
