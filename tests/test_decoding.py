"""Token-by-token decoding equals the parallel forward; local/linear states stay bounded."""

from __future__ import annotations

import pytest
import torch

from longattn import registry
from longattn.decoding import (
    DECODE_STATES,
    decode_step,
    generate,
    incremental_logits,
    init_cache,
    prefill,
    supports_cache,
)
from longattn.model import ModelConfig, Transformer
from longattn.ops.reference import dense_attention
from longattn.registry import Mechanism

D64 = torch.float64


def need(name: str) -> None:
    if name not in registry.names():
        pytest.skip(f"mechanism {name!r} not registered yet")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm(mechanism="full", params=None, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=17, max_len=64, dim=32, depth=2, heads=4, head="lm",
                      mechanism=mechanism, mechanism_params=params or {}, **kw)
    return Transformer(cfg).to(D64).eval()


def check_incremental(m: Transformer, n: int = 20, tol: float = 1e-9) -> None:
    x = torch.randint(0, 17, (2, n))
    with torch.no_grad():
        torch.testing.assert_close(incremental_logits(m, x), m(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "rope", "alibi", "none"])
def test_full_kv_cache_equals_parallel(pos):
    check_incremental(lm(pos=pos))


@pytest.mark.parametrize("norm,prenorm", [("layer", False), ("rms", True), ("batch", True)])
def test_full_kv_cache_equals_parallel_norms(norm, prenorm):
    m = lm(norm=norm, prenorm=prenorm)
    if norm == "batch":  # give the running statistics something non-trivial
        m.train()
        with torch.no_grad():
            m(torch.randint(0, 17, (4, 20)))
        m.eval()
    check_incremental(m)


def _state_bytes(m: Transformer, n: int) -> list[int]:
    cache = init_cache(m)
    x = torch.randint(0, 17, (1, n))
    sizes = []
    for t in range(n):
        decode_step(m, x[:, t], cache, t)
        sizes.append(sum(s.nbytes() for layer in cache for s in layer))
    return sizes


def test_kv_cache_grows_with_n():
    sizes = _state_bytes(lm(), 12)
    assert sizes[11] == 12 * sizes[0]


def test_local_window_cache_equals_parallel_and_is_bounded():
    need("local")
    m = lm("local", {"before": 3, "after": 3})
    check_incremental(m, 20)
    sizes = _state_bytes(m, 24)
    assert sizes[3] == sizes[23] == 4 * sizes[0], "the window holds before + 1 keys, no more"


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_local_with_sink_tokens_keeps_sinks_and_window_only(pos):
    """StreamingLLM's bounded cache (SinkWindowCache's, for generate): local(before=4)
    with global_idx = range(3) keeps the 3 sinks and the last 5 keys, memory flat, and
    the tokens equal generation that recomputes the whole prefix (no cache, no bound)."""
    need("local")
    m = lm("local", {"before": 4, "after": 0, "global_idx": (0, 1, 2)}, pos=pos)
    check_incremental(m, 23)
    sizes = _state_bytes(m, 30)
    assert sizes[7] == sizes[29] == 8 * sizes[0], "3 sinks + a window of 5 keys, whatever the length"
    prompt = torch.randint(0, 17, (2, 5))
    assert torch.equal(generate(m, prompt, 19, temperature=0), generate(m, prompt, 19, temperature=0, use_cache=False))


def test_local_with_a_later_global_token_holds_keys_until_it_passes():
    """A global query at position 9 reads every earlier key: they are held (and hidden
    from the local queries before it), then dropped."""
    need("local")
    m = lm("local", {"before": 2, "after": 0, "global_idx": (9,)})
    check_incremental(m, 17)
    sizes = _state_bytes(m, 17)
    assert sizes[8] == 9 * sizes[0] and sizes[9] == 3 * sizes[0] and sizes[12] == sizes[16] == 4 * sizes[0]


def _linear_params():
    spec = registry.get("linear")
    return {"feature_map": "elu"} if "feature_map" in spec.param_names else {}


def test_linear_recurrent_state_equals_parallel_and_is_constant():
    need("linear")
    m = lm("linear", _linear_params())
    check_incremental(m, 20)
    sizes = _state_bytes(m, 24)
    assert sizes[0] == sizes[23] > 0


def test_linear_state_against_hand_quadratic_form():
    """The state's per-step math alone: phi(q_t) sum_{j<=t} phi(k_j) v_j^T / phi(q_t) sum phi(k_j)."""
    need("linear")
    m = lm("linear", _linear_params())
    grp = m.blocks[0].attn.groups[0]
    st = DECODE_STATES["linear"](grp)
    q, k, v = (torch.randn(1, 4, 9, 8, dtype=D64) for _ in range(3))
    phi = lambda x: torch.nn.functional.elu(x) + 1
    w = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    ref = (w / w.sum(-1, keepdim=True)) @ v
    out = torch.cat([st.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t) for t in range(9)], 2)
    torch.testing.assert_close(out, ref)


def test_performer_module_state_equals_parallel():
    need("performer")
    m = lm("performer", {"num_features": 16})
    # FAVOR+ features are exponentials re-referenced to running maxima in a different
    # order by the two forms: float64 rounding grows to ~1e-7 relative in the logits
    check_incremental(m, 12, tol=1e-6)


def test_mixed_heads_full_and_linear():
    need("linear")
    m = lm(["full", ("linear", _linear_params())])
    check_incremental(m, 12)


def test_kv_state_softmax_against_oracle():
    m = lm()
    grp = m.blocks[0].attn.groups[0]
    st = DECODE_STATES["full"](grp)
    q, k, v = (torch.randn(2, 4, 7, 8, dtype=D64) for _ in range(3))
    out = torch.cat([st.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t) for t in range(7)], 2)
    torch.testing.assert_close(out, dense_attention(q, k, v, causal=True))


# ------------------------------------------------------------------ generate
def test_greedy_generate_equals_parallel_argmax():
    m = lm(pos="rope")
    prompt = torch.randint(0, 17, (3, 4))
    out = generate(m, prompt, 6, temperature=0)
    assert out.shape == (3, 10) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        for t in range(4, 10):
            torch.testing.assert_close(out[:, t], m(out[:, :t])[:, -1].argmax(-1))
    assert torch.equal(generate(m, prompt, 6, temperature=0.7, top_k=1), out)


def test_sampling_is_reproducible_and_restores_mode():
    m = lm()
    m.train()
    prompt = torch.randint(0, 17, (2, 3))
    a = generate(m, prompt, 5, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(m, prompt, 5, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and m.training


@pytest.fixture
def stateless(monkeypatch):
    """A causal mechanism with no decoding state (dense causal attention by the oracle)."""
    def fn(q, k, v, *, causal, key_padding_mask, scale):
        return dense_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    registry.get("full")
    monkeypatch.setitem(registry._REGISTRY, "_test_nostate",
                        Mechanism(name="_test_nostate", fn=fn, causal=True, cross=True))


def test_fallback_reruns_prefix_for_mechanisms_without_state(stateless):
    full = lm()
    other = lm("_test_nostate")
    other.load_state_dict(full.state_dict())
    assert supports_cache(full) and not supports_cache(other)
    prompt = torch.randint(0, 17, (2, 3))
    assert torch.equal(generate(other, prompt, 5, temperature=0), generate(full, prompt, 5, temperature=0))
    with pytest.raises(ValueError, match="no decoding state"):
        generate(other, prompt, 2, use_cache=True)


def test_generate_bad_inputs():
    m = lm()
    p = torch.randint(0, 17, (1, 3))
    with pytest.raises(ValueError, match="causal token LM"):
        generate(Transformer(ModelConfig(vocab_size=17, dim=16, heads=2, head="classify")), p, 2)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, p, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(m, p, 2, top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        generate(m, torch.randint(0, 17, (3,)), 2)


# ------------------------------------------------------------------ recurrent family (issue 33)
RECURRENT = ("gated_delta", "kda", "ssd", "gla", "retention")


def _recurrent_lm(name: str, **kw) -> Transformer:
    need(name)
    return lm(name, {"chunk_size": 8}, **kw)   # chunks of 8: prompts of 13, 21 tokens end mid-chunk


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_state_steps_and_prefill_equal_parallel(name):
    """Token-by-token logits, and a 13-token chunked prefill followed by 8 steps, equal
    model(x) (the chunked forward over all 21 tokens)."""
    m = _recurrent_lm(name)
    check_incremental(m, 21)
    x = torch.randint(0, 17, (2, 21))
    cache = init_cache(m)
    with torch.no_grad():
        head = prefill(m, x[:, :13], cache)
        tail = torch.stack([decode_step(m, x[:, t], cache, t) for t in range(13, 21)], dim=1)
        torch.testing.assert_close(torch.cat((head, tail), 1), m(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_generate_with_state_equals_recomputation(name):
    m = _recurrent_lm(name)
    prompt = torch.randint(0, 17, (2, 11))
    assert supports_cache(m)
    assert torch.equal(generate(m, prompt, 7, temperature=0, use_cache=True),
                       generate(m, prompt, 7, temperature=0, use_cache=False))


def test_recurrent_state_is_chosen_by_family_and_constant_in_size():
    """Every registered recurrent mechanism gets the family's state; the state is one
    [B, H, Dk, Dv] tensor per layer (8-byte floats here), whatever the tokens decoded."""
    from longattn.decoding import FAMILY_STATES, state_class

    m = _recurrent_lm("gated_delta")
    grp = m.blocks[0].attn.groups[0]
    assert state_class(grp) is FAMILY_STATES["recurrent"] and "gated_delta" not in DECODE_STATES
    for spec in registry.specs():
        if spec.family == "recurrent":
            assert FAMILY_STATES.get(spec.family) is not None
    sizes = _state_bytes(m, 30)
    assert sizes[0] == sizes[29] == 2 * (1 * 4 * 8 * 8) * 8     # depth 2, B 1, H 4, Dk = Dv = 8


def test_recurrent_prompt_uses_the_chunked_forward_and_grouped_kv(monkeypatch):
    """generate prefills the prompt with the chunked forward (no per-token step over the
    prompt: only the generated tokens step), with grouped KV heads (kv_heads=2)."""
    from longattn.decoding import RecurrentState

    m = _recurrent_lm("gated_delta", kv_heads=2)
    check_incremental(m, 13)
    steps = []
    orig = RecurrentState.step
    monkeypatch.setattr(RecurrentState, "step", lambda self, *a: steps.append(1) or orig(self, *a))
    prompt = torch.randint(0, 17, (2, 9))
    out = generate(m, prompt, 4, temperature=0)
    assert len(steps) == 3 * 2, "3 generated tokens fed back, 2 layers; the 9-token prompt never steps"
    monkeypatch.setattr(RecurrentState, "step", orig)
    assert torch.equal(out, generate(m, prompt, 4, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", ["gated_delta", "ssd", "kda"])
def test_recurrent_state_with_short_conv_equals_parallel(name):
    """The short convolution's last K-1 raw tokens travel in the state, and the output norm
    applies to every step: a 13-token prefill and 8 steps equal model(x) (prompt shorter than
    K too: a 2-token prefill)."""
    need(name)
    m = lm(name, {"chunk_size": 8, "short_conv": 4, "output_norm": True, "output_gate": True})
    x = torch.randint(0, 17, (2, 21))
    for cut in (13, 2):
        cache = init_cache(m)
        with torch.no_grad():
            head = prefill(m, x[:, :cut], cache)
            tail = torch.stack([decode_step(m, x[:, t], cache, t) for t in range(cut, 21)], dim=1)
            torch.testing.assert_close(torch.cat((head, tail), 1), m(x), rtol=1e-9, atol=1e-9)


def test_topk_blocks_steps_keep_block_summaries_and_equal_parallel(monkeypatch):
    """topk_blocks (a real selection: 4 blocks of 5 before the last query, top 2, one sink
    token) decodes through a PatternCache that keeps its block summaries: token-by-token
    logits equal the parallel forward, and no step summarises more than one block and
    its new key."""
    need("topk_blocks")
    from longattn.ops import topk_blocks as TB

    m = lm("topk_blocks", {"block": 5, "topk": 2, "sink_tokens": 1}, kv_heads=2)
    assert supports_cache(m)
    seen = []
    summarise = TB.block_summaries
    monkeypatch.setattr(TB, "block_summaries", lambda k, *a: seen.append(k.shape[2]) or summarise(k, *a))
    x = torch.randint(0, 17, (2, 23))
    with torch.no_grad():
        steps = incremental_logits(m, x)
        assert seen and max(seen) <= 5
        torch.testing.assert_close(steps, m(x), rtol=1e-9, atol=1e-9)
    cache = init_cache(m)
    prompt = torch.randint(0, 17, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(prefill(m, prompt, cache), m(prompt), rtol=1e-9, atol=1e-9)  # one call
    state = cache[0][0]
    assert state.key_state.length == state.t == 12 and state.k.shape[2] == 12


@pytest.mark.parametrize("name,params", [("nsa", {"block": 4, "topk": 2, "window": 3}), ("dsa", {"topk": 5})])
def test_learned_selection_decodes_over_a_kv_cache_equal_to_parallel(name, params):
    """nsa and dsa (select family, bottom-right paths) decode over a PatternCache:
    token-by-token logits equal the parallel forward, generation keeps a cache."""
    need(name)
    m = lm(name, params, kv_heads=2)
    assert supports_cache(m)
    check_incremental(m, 23)
