"""HF hybrid models (Qwen3.5, Qwen3-Next, Kimi-Linear) on longattn's recurrent kernels
(longattn.integrations.hf_recurrent): equal to transformers' own torch path (logits,
gradients of every parameter, cached greedy generation), and packed training, which
the torch path refuses, equal to each document run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("kernels")

from longattn.integrations import hf_recurrent  # noqa: E402
from longattn.integrations.hf_recurrent import causal_conv1d, restore_hf_kernels, use_longattn_kernels  # noqa: E402

V = 61


def _qwen35(dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"])
    return transformers.Qwen3_5ForCausalLM(cfg).to(dtype)


def _qwen3_next(dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.Qwen3NextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])
    return transformers.Qwen3NextForCausalLM(cfg).to(dtype)


def _kimi(dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.KimiLinearConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=8, num_local_experts=4, num_experts_per_tok=2, linear_attn_config={"head_dim": 8, "num_heads": 2},
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "dense"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    return transformers.KimiLinearForCausalLM(cfg).to(dtype)


def _init_gates(model: torch.nn.Module) -> None:
    """Random-init decays that actually decay (HF leaves some of them empty or at 1)."""
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias")):
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) - 0.5)


def _logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, weight: torch.Tensor, **kw):
    model.zero_grad()
    logits = model(ids, use_cache=False, **kw).logits
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build,dtype,tol", [(_qwen35, torch.float64, 1e-5), (_qwen3_next, torch.float32, 2e-4),
                                              (_kimi, torch.float32, 2e-4)])
def test_equals_torch_path_logits_and_every_gradient(build, dtype, tol):
    torch.manual_seed(0)
    model = build(dtype)
    _init_gates(model)
    ids = torch.randint(3, V, (2, 53))
    weight = torch.randn(2, 53, V, dtype=dtype)
    ref, ref_grads = _logits_and_grads(model, ids, weight)
    assert use_longattn_kernels(model) in (["model.layers.0.linear_attn"], ["model.layers.0.self_attn"])
    out, grads = _logits_and_grads(model, ids, weight)
    # HF's torch path computes the delta rule in float32 even for float64 models.
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        scale = ref_grads[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("build,step", [(_qwen35, "gated_delta_rule_step"), (_kimi, "kda_step")])
def test_cached_greedy_generate_equals_torch_path(monkeypatch, build, step):
    torch.manual_seed(1)
    model = build(torch.float32).eval()
    _init_gates(model)
    prompt = torch.randint(3, V, (2, 19))
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    steps = []
    real_step = getattr(hf_recurrent, step)
    monkeypatch.setattr(hf_recurrent, step, lambda *a, **k: steps.append(1) or real_step(*a, **k))
    use_longattn_kernels(model)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out, ref)
    assert len(steps) == 5  # one longattn decode step per generated token after the first


def _packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return cu, pos


@pytest.mark.parametrize("build", [_qwen35, _kimi])
def test_packed_training_equals_each_document_alone(build):
    torch.manual_seed(2)
    model = build(torch.float64)
    _init_gates(model)
    lengths = [17, 29, 11]
    ids = torch.randint(3, V, (1, sum(lengths)))
    weight = torch.randn(1, sum(lengths), V, dtype=torch.float64)
    cu, pos = _packed(lengths)
    kw = {"position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths),
          "max_length_k": max(lengths)}
    use_longattn_kernels(model)
    packed, grads = _logits_and_grads(model, ids, weight, **kw)
    model.zero_grad()
    alone = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = model(ids[:, a:b], use_cache=False).logits
        (logits * weight[:, a:b]).sum().backward()
        alone.append(logits.detach())
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-10, rtol=1e-10)
    if build is _kimi:  # transformers' torch KDA path drops cu_seq_lens_q silently: documents leak
        restore_hf_kernels(model)
        leaked = model(ids, use_cache=False, **kw).logits.detach()
        assert not torch.allclose(leaked, packed, atol=1e-6)
        use_longattn_kernels(model)
    for name, p in model.named_parameters():
        if p.grad is not None:
            # HF's RMSNorms round to float32 inside: a float64 model agrees to ~1e-7 of each gradient's size.
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6 * scale, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torch_path_refuses_packing_and_restore_brings_it_back():
    model = _qwen35(torch.float32)
    cu, pos = _packed([9, 14])
    ids = torch.randint(3, V, (1, 23))
    use_longattn_kernels(model)
    assert model(ids, position_ids=pos, cu_seq_lens_q=cu, use_cache=False).logits.shape == (1, 23, V)
    assert restore_hf_kernels(model) == 1
    with pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=pos, cu_seq_lens_q=cu, use_cache=False)


def test_causal_conv1d_restarts_at_each_document():
    torch.manual_seed(4)
    x, w, bias = (torch.randn(*shape, dtype=torch.float64) for shape in ((1, 5, 23), (5, 4), (5,)))
    cu = torch.tensor([0, 2, 13, 23])
    want = torch.cat([F.conv1d(x[..., a:b], w[:, None], bias, padding=3, groups=5)[..., : b - a]
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], -1)
    torch.testing.assert_close(causal_conv1d(x, w, bias, cu_seqlens=cu), want)
    torch.testing.assert_close(causal_conv1d(x, w, bias, "silu", cu_seq_lens_q=cu), F.silu(want))
    whole = F.conv1d(x, w[:, None], bias, padding=3, groups=5)[..., :23]
    torch.testing.assert_close(causal_conv1d(x, w, bias), whole)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="model"):
        use_longattn_kernels("qwen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="linear-attention"):
        use_longattn_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        use_longattn_kernels(_qwen35(torch.float32), chunk_size=0)
    q = torch.randn(2, 7, 1, 4)
    with pytest.raises(ValueError, match="batch must be 1"):
        hf_recurrent.chunk_gated_delta_rule(q, q, q, -torch.rand(2, 7, 1), torch.rand(2, 7, 1),
                                            cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="total"):
        hf_recurrent.chunk_gated_delta_rule(q[:1], q[:1], q[:1], -torch.rand(1, 7, 1), torch.rand(1, 7, 1),
                                            cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="query"):
        hf_recurrent.chunk_gated_delta_rule(q[0], q[0], q[0], -torch.rand(7, 1), torch.rand(7, 1))
