"""Hugging Face transformers integration: random-init Llama (GQA), Qwen2 and Mistral
(sliding window) from configs, against the models' own sdpa attention."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from longattn import registry  # noqa: E402
from longattn.integrations.transformers import implementation_name, register  # noqa: E402
from longattn.testing import peak_memory_mb  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _model(kind: str, **over):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, **over)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL, **over)).eval()
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=24, **over)).eval()


def _tokens(B=2, N=77, seed=1):
    return torch.randint(0, 97, (B, N), generator=torch.Generator().manual_seed(seed))


def _logits(model, impl, x, **kw):
    model.set_attn_implementation(impl)
    return model(x, **kw).logits


# which registration reduces to the model's own attention
OWN = {"llama": dict(mechanism="local", before=4096), "qwen2": dict(mechanism="local", before=4096),
       "mistral": dict(mechanism="local")}  # mistral: local follows the sliding window


def _own(kind):
    p = dict(OWN[kind])
    return register(p.pop("mechanism"), **p)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_logits_and_gradients_equal_sdpa_when_the_pattern_is_the_models_own(kind):
    model = _model(kind).train()
    x = _tokens()
    ref = _logits(model, "sdpa", x)
    g_ref = torch.autograd.grad(ref.square().mean(), [p for p in model.parameters() if p.requires_grad])
    out = _logits(model, _own(kind), x)
    g = torch.autograd.grad(out.square().mean(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generate_and_left_padding_equal_sdpa(kind):
    model = _model(kind)
    x = _tokens(N=30)
    mask = torch.ones_like(x)
    mask[1, :7] = 0  # left padding in a batch of two
    ref = _logits(model, "sdpa", x, attention_mask=mask)
    out = _logits(model, _own(kind), x, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, 7:], ref[1, 7:], atol=1e-4, rtol=1e-4)  # real positions
    gen = {}
    for impl in ("sdpa", _own(kind)):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(x, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(gen["sdpa"], gen[_own(kind)])


CACHED = {"bigbird": {"block": 16, "random_blocks": 2}, "performer": {"num_features": 32}, "linear": {},
          "longformer": {"window": 8}, "sparse_transformer_fixed": {"l": 16, "c": 4}}


@pytest.mark.parametrize("name", list(CACHED))
def test_cached_generate_equals_uncached(name):
    model = _model("llama")
    model.set_attn_implementation(register(name, **CACHED[name]))
    x = _tokens(B=1, N=40)
    runs = [model.generate(x, max_new_tokens=12, do_sample=False, use_cache=c, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=0) for c in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_every_causal_mechanism_registers():
    for spec in registry.specs():
        if not spec.causal:
            continue
        needed = [p.name for p in spec.params if p.required]
        if needed:
            with pytest.raises(TypeError, match="needs parameter"):
                register(spec.name)
        else:
            assert register(spec.name).startswith("longattn_")


def test_packed_rows_equal_the_documents_alone():
    model = _model("llama")
    model.set_attn_implementation(register("bigbird", block=16, random_blocks=1))
    x = _tokens(B=1, N=90)
    pos = torch.cat([torch.arange(33), torch.arange(57)])[None]  # two documents, positions restart
    packed = model(x, position_ids=pos).logits
    alone = torch.cat([model(x[:, :33]).logits, model(x[:, 33:]).logits], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_names_are_idempotent_and_errors_are_clear():
    assert register("local", before=7) == register("local", before=7) == implementation_name("local", before=7)
    assert register("local", before=7) != register("local", before=8)
    with pytest.raises(ValueError, match="unknown mechanism"):
        register("nope")
    with pytest.raises(TypeError, match="width"):
        register("local", width=3)
    model = _model("llama")
    model.set_attn_implementation(register("local", before=8))
    with pytest.raises(ValueError, match="output_attentions"):
        model(_tokens(), output_attentions=True)
    model.set_attn_implementation(register("local"))  # no before=, and llama has no sliding window
    with pytest.raises(ValueError, match="sliding_window"):
        model(_tokens())
    model = _model("llama", attention_dropout=0.1).train()
    model.set_attn_implementation(register("local", before=8))
    with pytest.raises(ValueError, match="dropout"):
        model(_tokens())
    model.set_attn_implementation(register("full"))  # full has dropout: it runs
    model(_tokens())


def test_sliding_window_model_with_padding_never_builds_n_by_n():
    """Mistral-style model, window 4096, N = 16384, one pad token: the sdpa path builds a
    16384^2 mask; ours a 2-D one. Peak below 0.4x sdpa's."""
    setup = """
from transformers import MistralConfig, MistralForCausalLM
from longattn.integrations.transformers import register
torch.manual_seed(0)
cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, sliding_window=4096,
                    max_position_embeddings=16384)
model = MistralForCausalLM(cfg).eval()
x = torch.randint(0, 64, (1, 16384))
mask = torch.ones_like(x)
mask[0, 0] = 0
"""
    run = """
with torch.no_grad():
    model.set_attn_implementation({impl})
    model.model(x, attention_mask=mask)
"""
    ours = peak_memory_mb(setup, run.format(impl="register('local')"), threads=2)
    sdpa = peak_memory_mb(setup, run.format(impl="'sdpa'"), threads=2)
    assert ours < 0.4 * sdpa, f"longattn local {ours:.0f} MiB vs sdpa {sdpa:.0f} MiB"


def _loss_and_grads(model, x, **kw):
    model.zero_grad()
    logits = model(x, **kw).logits
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("mechanism,params", [
    ("local", dict(before=16)),
    pytest.param("performer", dict(num_features=16), marks=pytest.mark.slow),  # ~20 s of compiling
])
def test_compiled_model_fullgraph_equals_eager(mechanism, params):
    """torch.compile(fullgraph=True) of an HF Llama (GQA) with a longattn attention: any
    graph break raises. Logits and parameter gradients equal eager, with left padding and
    packed rows too."""
    model = _model("llama").double().train()
    model.set_attn_implementation(register(mechanism, **params))
    x = _tokens(N=45)
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    packed = torch.cat([torch.arange(20), torch.arange(25)])[None]  # two documents per row
    for kw in ({}, {"attention_mask": mask}, {"position_ids": packed}):
        ref, ref_grads = _loss_and_grads(model, x, **kw)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out, grads = _loss_and_grads(compiled, x, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        assert len(grads) == len(ref_grads) > 0
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_topk_blocks_covering_every_block_equals_sdpa_and_cached_generate_equals_recomputation():
    """register("topk_blocks", ...) on a tiny Llama (GQA): with topk past the number of
    earlier blocks every key is selected, so logits (left padding too) equal sdpa; with
    topk=2 (a real selection, sink token, no window) cached greedy generation equals
    recomputation without a cache, tokens and scores."""
    model = _model("llama").double()
    x = _tokens(N=37)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    ref = _logits(model, "sdpa", x, attention_mask=mask)
    out = _logits(model, register("topk_blocks", block=8, topk=8, sink_tokens=1), x, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[1, 5:], ref[1, 5:], atol=1e-10, rtol=1e-10)
    model.set_attn_implementation(register("topk_blocks", block=8, topk=2, sink_tokens=1))
    sparse = model(x).logits
    assert (sparse[:, 24:] - _logits(model, "sdpa", x)[:, 24:]).abs().max() > 1e-6  # it does select
    model.set_attn_implementation(register("topk_blocks", block=8, topk=2, sink_tokens=1))
    runs = [model.generate(x[:1], max_new_tokens=11, do_sample=False, use_cache=c, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=0) for c in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_key_state_cache_keeps_topk_block_summaries_and_generates_as_recomputation(monkeypatch):
    """KeyStateCache: greedy generation with topk_blocks (left padding, GQA) equals
    recomputation without a cache, tokens and scores; every layer keeps one
    KeySummaries as long as the sequence, and after the prompt no step summarises more
    than one block and its new key."""
    from longattn.integrations.transformers import KeyStateCache
    from longattn.ops import topk_blocks as TB

    model = _model("llama").double()
    x = _tokens(N=37)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    model.set_attn_implementation(register("topk_blocks", block=8, topk=2, sink_tokens=1))
    seen = []
    summarise = TB.block_summaries
    monkeypatch.setattr(TB, "block_summaries", lambda k, *a: seen.append(k.shape[2]) or summarise(k, *a))
    cache = KeyStateCache(config=model.config)
    kw = dict(attention_mask=mask, max_new_tokens=11, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    kept = model.generate(x, cache=cache, **kw)
    assert seen[:2] == [37, 37] and max(seen[2:]) <= 8  # the prompt, then one block at most
    again = model.generate(x, use_cache=False, **kw)
    assert torch.equal(kept.sequences, again.sequences)
    for a, b in zip(kept.scores, again.scores):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for layer in range(2):
        (state,) = cache.key_states(layer).values()
        assert isinstance(state, TB.KeySummaries) and state.length == 37 + 10
    cache.crop(-3)
    assert not cache.key_states(0)


def test_topk_blocks_with_key_state_cache_compiles_fullgraph():
    """torch.compile(fullgraph=True) of an HF Llama running topk_blocks over a
    KeyStateCache (topk_blocks runs as one custom op; the cache keeps no state while
    compiled): the prompt's logits and two decode steps equal eager."""
    from longattn.integrations.transformers import KeyStateCache

    model = _model("llama").double().eval()
    model.set_attn_implementation(register("topk_blocks", block=8, topk=2, sink_tokens=1))
    x = _tokens(B=1, N=37)
    with torch.no_grad():
        runs = []
        for m in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
            torch._dynamo.reset()
            cache = KeyStateCache(config=model.config)
            runs.append([m(x, cache=cache).logits] + [m(x[:, i:i + 1], cache=cache).logits for i in (3, 9)])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
