"""SinkWindowCache: a bounded KV cache for local attention with leading sink tokens.
Generation past sinks + window keeps the cache at that length and gives the same tokens
(and scores) as recomputation without a cache over the same mechanism, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longattn.integrations.transformers import SinkWindowCache, register  # noqa: E402

SINKS, WINDOW = 3, 7


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).double().eval()
    model.set_attn_implementation(register("local", before=WINDOW, after=0, global_idx=tuple(range(SINKS))))
    return model


def test_cache_stays_bounded_and_tokens_equal_recomputation():
    model = _model()
    x = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    cache = SinkWindowCache(model.config, sinks=SINKS, window=WINDOW)
    kw = dict(max_new_tokens=17, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ours = model.generate(x, cache=cache, **kw)
    ref = model.generate(x, use_cache=False, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert cache.get_seq_length() == 13 + 17 - 1
    assert all(cache.stored_length(i) == SINKS + WINDOW for i in range(2))


def test_step_by_step_logits_equal_the_full_masked_forward():
    model = _model()
    x = torch.randint(0, 61, (1, 25), generator=torch.Generator().manual_seed(2))
    full = model(x, use_cache=False).logits
    cache = SinkWindowCache(model.config, sinks=SINKS, window=WINDOW)
    steps = [model(x[:, :4], cache=cache).logits]
    for t in range(4, 25):
        steps.append(model(x[:, t:t + 1], cache=cache).logits)
        assert cache.stored_length() <= SINKS + WINDOW
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_padding_and_bad_arguments_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="window"):
        SinkWindowCache(model.config, sinks=2, window=0)
    with pytest.raises(ValueError, match="sinks"):
        SinkWindowCache(model.config, sinks=-1, window=4)
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(x, attention_mask=mask, cache=SinkWindowCache(model.config, 2, 4),
                       max_new_tokens=4, do_sample=False, pad_token_id=0)
