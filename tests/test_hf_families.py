"""Hugging Face families with mixed layers and extra score terms, each against its own
eager path in float64 (tiny random-init models, lengths past the sliding window):
Gemma-2 (softcap), Gemma-3, Cohere2, gpt-oss (learned sinks), SmolLM3, Qwen3 with sliding
layers, ModernBERT (symmetric non-causal windows), GPT-2 with cross-attention, DeepSeek-V3.2
and GLM-5 (indexer-selected keys), PaliGemma's prefix-LM (token_type_ids, honoured), and
the refusals: a user's or_mask/and_mask, blocks over a window, unknown arguments."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.integrations.transformers import register  # noqa: E402

LT = ["sliding_attention", "full_attention"]
S = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, layer_types=LT,
         sliding_window=8)
N = 29  # past the window (8), no multiple of any block size
# eager softmaxes in float32 even for float64 models: tolerances at float32 rounding


def _build(kind: str):
    T = transformers
    if kind == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**S, attn_logit_softcapping=2.0))
    if kind == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**S))
    if kind == "cohere2":
        return T.Cohere2ForCausalLM(T.Cohere2Config(**S))
    if kind == "gpt_oss":
        return T.GptOssForCausalLM(T.GptOssConfig(**S, num_local_experts=2, num_experts_per_tok=1,
                                                  experts_implementation="eager"))
    if kind == "smollm3":
        return T.SmolLM3ForCausalLM(T.SmolLM3Config(**S, use_sliding_window=True))
    if kind == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**S, use_sliding_window=True, max_window_layers=1))
    raise KeyError(kind)


def _model(kind: str):
    torch.manual_seed(0)
    model = _build(kind).double().eval()
    if kind == "gpt_oss":  # random sinks that matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model


def _x(B=2, n=N, seed=1):
    return torch.randint(3, 97, (B, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, impl, x, **kw):
    model.set_attn_implementation(impl)
    return model(x, **kw).logits


#: on full layers an explicit wide local (it has sinks and softcap); sliding layers stay the model's
OURS = dict(mechanism="local", before=1000)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "cohere2", "gpt_oss", "smollm3", "qwen3"])
def test_mixed_layer_logits_equal_eager(kind):
    model = _model(kind)
    x = _x()
    ref = _logits(model, "eager", x)
    for impl in (register(**OURS), register({}), register({"full_attention": "model", "sliding_attention": "local"})):
        torch.testing.assert_close(_logits(model, impl, x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_gradients_sinks_and_generate_equal_eager(kind):
    model = _model(kind).train()
    x = _x(B=1)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for impl in ("eager", register(**OURS)):
        out = _logits(model, impl, x)
        grads[impl] = torch.autograd.grad(out.square().mean(), params, allow_unused=True)
    for p, a, b in zip(params, grads["eager"], grads[register(**OURS)]):
        if a is None:
            assert b is None or b.abs().max() == 0
            continue
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    if kind == "gpt_oss":  # the sinks get their gradient
        at = [i for i, p in enumerate(params) if p is model.model.layers[0].self_attn.sinks][0]
        g = grads[register(**OURS)][at]
        assert g.abs().max() > 0
    model.eval()
    gen = {}
    for impl in ("eager", register(**OURS)):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(x[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen["eager"], gen[register(**OURS)])


def test_full_on_a_sliding_layer_keeps_the_window_unless_mapped():
    model = _model("qwen3")
    x = _x()
    ref = _logits(model, "eager", x)
    torch.testing.assert_close(_logits(model, register("full"), x), ref, rtol=1e-5, atol=1e-6)
    # mapped explicitly: the sliding layer runs full, which differs past the window
    dropped = _logits(model, register({"full_attention": "full", "sliding_attention": "full"}), x)
    assert (dropped[:, 9:] - ref[:, 9:]).abs().max() > 1e-6
    torch.testing.assert_close(dropped[:, :8], ref[:, :8], rtol=1e-5, atol=1e-6)


def test_modernbert_symmetric_windows_equal_eager():
    T = transformers
    torch.manual_seed(0)
    cfg = T.ModernBertConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0)
    model = T.ModernBertForMaskedLM(cfg).double().eval()
    x = _x()
    mask = torch.ones_like(x)
    mask[1, -5:] = 0
    ref = _logits(model, "eager", x, attention_mask=mask)
    out = _logits(model, register("full"), x, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, :-5], ref[1, :-5], rtol=1e-5, atol=1e-6)


def test_gpt2_cross_attention_with_a_shorter_encoder_equals_eager():
    T = transformers
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True)
    model = T.GPT2LMHeadModel(cfg).double().eval()
    x = _x(n=40)
    enc = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    enc_mask = torch.ones(2, 23, dtype=torch.long)
    enc_mask[1, 17:] = 0
    kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    ref = _logits(model, "eager", x, **kw)
    torch.testing.assert_close(_logits(model, register("full"), x, **kw), ref, rtol=1e-5, atol=1e-6)
    # the cross layers stay exact full over the encoder; the self layers run local (= causal up to 16)
    out = _logits(model, register("local", before=16), x, **kw)
    torch.testing.assert_close(out[:, :17], ref[:, :17], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cross_attention"):
        register({"cross_attention": "local"})


def test_deepseek_v32_indices_equal_eager():
    pytest.importorskip("longattn.ops.given_keys")
    T = transformers
    torch.manual_seed(0)
    cfg = T.DeepseekV32Config(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                              n_shared_experts=1, n_routed_experts=4, n_group=1, topk_group=1,
                              num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                              v_head_dim=8, qk_nope_head_dim=8, head_dim=8, index_topk=5, index_head_dim=8,
                              index_n_heads=2, first_k_dense_replace=1, pad_token_id=0)
    model = T.DeepseekV32ForCausalLM(cfg).double().eval()
    x = _x(n=19)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding
    ref = _logits(model, "eager", x, attention_mask=mask)
    out = _logits(model, register("full"), x, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, 4:], ref[1, 4:], rtol=1e-5, atol=1e-6)


def test_glm5_dsa_indices_and_shared_layer_equal_eager():
    """GLM-5 (glm_moe_dsa): a full indexer layer, then a 'shared' layer reusing its top-k;
    both run given-keys attention over exactly the indexer's keys. Right padding (eager
    itself turns left-padded rows to NaN through the padded queries); cached greedy
    generation equals eager's."""
    pytest.importorskip("longattn.ops.given_keys")
    T = transformers
    if not hasattr(T, "GlmMoeDsaConfig"):
        pytest.skip("this transformers has no glm_moe_dsa")
    torch.manual_seed(0)
    cfg = T.GlmMoeDsaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                            n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, kv_lora_rank=16,
                            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, head_dim=8,
                            index_topk=5, index_head_dim=8, index_n_heads=2, first_k_dense_replace=1,
                            pad_token_id=0, experts_implementation="eager", indexer_types=["full", "shared"])
    model = T.GlmMoeDsaForCausalLM(cfg).double().eval()
    x = _x(n=19)
    mask = torch.ones_like(x)
    mask[1, -4:] = 0
    ref = _logits(model, "eager", x, attention_mask=mask)
    out = _logits(model, register("full"), x, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, :-4], ref[1, :-4], rtol=1e-5, atol=1e-6)
    gen = {}
    for impl in ("eager", register("full")):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(x[:1, :9], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen["eager"], gen[register("full")])


def _paligemma():
    T = transformers
    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)  # 16 image tokens
    text = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, pad_token_id=0)
    cfg = T.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=96, projection_dim=32)
    return T.PaliGemmaForConditionalGeneration(cfg).double().eval()


def test_paligemma_prefix_lm_equals_eager():
    """PaliGemma's prefix-LM (token_type_ids: image + prompt bidirectional, causal after):
    honoured exactly. Rows with different prefixes (one left-padded), every registration
    that covers the sequence equals eager (the SigLIP tower runs it too); a narrow local on
    the language model changes only the suffix (the prefix stays dense and bidirectional);
    greedy generation with the cache and a text-only forward (the layers say non-causal,
    the mask is causal) equal eager."""
    model = _paligemma()
    x = _x(n=27)
    x[0, :16] = 96  # image tokens
    x[1, :3], x[1, 3:19] = 0, 96  # 3 left pads, then the image
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    types = torch.zeros_like(x)
    types[:, 22:] = 1  # the suffix: the prefix ends at 22 in both rows, after 22 and 19 real tokens
    kw = dict(pixel_values=torch.randn(2, 3, 16, 16, dtype=torch.float64), token_type_ids=types, attention_mask=mask)
    ref = _logits(model, "eager", x, **kw)
    for impl in (register("full"), register({}), register(**OURS)):
        out = _logits(model, impl, x, **kw)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[1, 3:], ref[1, 3:], rtol=1e-5, atol=1e-6)
    # the vision tower (non-causal SigLIP) stays eager: a narrow window there would change the image
    narrow = _logits(model, {"text_config": register("local", before=2), "vision_config": "eager"}, x, **kw)
    torch.testing.assert_close(narrow[0, :22], ref[0, :22], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(narrow[1, 3:22], ref[1, 3:22], rtol=1e-5, atol=1e-6)
    assert (narrow[:, 22:] - ref[:, 22:]).abs().max() > 1e-4
    gen = {}
    for impl in ("eager", register("full")):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(x[:1, :22], pixel_values=kw["pixel_values"][:1], token_type_ids=types[:1, :22],
                                   max_new_tokens=6, do_sample=False)
    assert torch.equal(gen["eager"], gen[register("full")])
    text = _x(n=21, seed=2)
    torch.testing.assert_close(_logits(model, register("full"), text), _logits(model, "eager", text),
                               rtol=1e-5, atol=1e-6)


def test_blocks_over_a_window_or_split_blocks_are_refused():
    """Blocks (block_sequence_ids) over a sliding-window mask, and one block id in two
    separate runs, are refused with a message naming the term."""
    from longattn.integrations.transformers import padding_mask
    from transformers.masking_utils import blockwise_overlay, or_masks, sliding_window_causal_mask_function

    ids = torch.tensor([[0, 0, 0, -1, -1, -1, -1, -1, -1]])
    fn = or_masks(sliding_window_causal_mask_function(4), blockwise_overlay(ids))
    with pytest.raises(ValueError, match="block_sequence_ids.*sliding window"):
        padding_mask(1, 9, 9, mask_function=fn, config=transformers.Gemma2Config(sliding_window=4))
    model = _paligemma()
    model.set_attn_implementation(register("full"))
    x = _x(B=1, n=24)
    x[0, :16] = 96
    types = torch.zeros_like(x)
    types[0, 18:20] = 1  # the prefix is cut in two by two suffix tokens
    with pytest.raises(ValueError, match="two separate runs"):
        model(x, pixel_values=torch.randn(1, 3, 16, 16, dtype=torch.float64), token_type_ids=types)


def test_prefix_lm_mask_and_unknown_arguments_are_refused():
    from longattn.integrations.transformers import padding_mask
    from transformers.masking_utils import and_masks, causal_mask_function, or_masks

    def prefix(b, h, q, kv):  # a prefix-LM term (PaliGemma's token_type_ids)
        return kv < 4

    for fn in (or_masks(causal_mask_function, prefix), and_masks(causal_mask_function, prefix)):
        with pytest.raises(ValueError, match="prefix"):
            padding_mask(1, 9, 9, mask_function=fn)
    model = _model("qwen3")
    model.set_attn_implementation(register("full"))
    with pytest.raises(ValueError, match="made_up="):
        model(_x(), made_up=3)
