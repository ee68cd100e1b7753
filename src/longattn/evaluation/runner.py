"""One evaluation run: every mechanism, side by side with the model's own ``sdpa``, on
one loaded model and text.

Per mechanism and context length L (:mod:`longattn.evaluation.perplexity`): one forward
of each window with the KV cache on, which gives the perplexity of the window's second
half, the prefill time and peak memory (first window), then a greedy decode of
``decode_tokens`` over that cache (tokens/s, cache MiB). Per passkey length and depth
(:mod:`longattn.evaluation.passkey`): one prefill and ``passkey_tokens`` greedy steps.
A mechanism that fails (e.g. one that cannot be causal) is recorded with its error and
the run goes on. Cost: (windows x len(lengths) + len(passkey_lengths) x len(depths))
prefills per mechanism, each O(L) model compute plus the mechanism's attention.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from longattn.bench.harness import machine_info
import longattn.evaluation.loading as loading
from longattn.evaluation.passkey import build_prompt, make_key, retrieved
from longattn.evaluation.perplexity import perplexity, score_window, windows
from longattn.evaluation.timing import cache_kwargs, cache_mib, cache_of, greedy_decode, measure

SCHEMA = "longattn.eval"


@dataclass
class EvalConfig:
    """What to measure. ``passkey_lengths=None``: the perplexity ``lengths``; an empty
    tuple (or no ``depths``) skips passkey retrieval."""

    mechanisms: Sequence[str] = loading.DEFAULT_MECHANISMS
    lengths: Sequence[int] = (1024, 2048, 4096)
    windows: int = 1
    passkey_lengths: Sequence[int] | None = None
    depths: Sequence[float] = (0.1, 0.5, 0.9)
    passkey_tokens: int = 8
    decode_tokens: int = 16
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.mechanisms:
            raise ValueError("mechanisms must name at least one mechanism")
        for name in ("lengths", "passkey_lengths"):
            bad = [n for n in (getattr(self, name) or ()) if not isinstance(n, int) or n < 2]
            if bad:
                raise ValueError(f"{name} must be integers >= 2, got {bad}")
        if not self.lengths:
            raise ValueError("lengths must hold at least one context length")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {list(self.depths)}")
        for name in ("windows", "passkey_tokens", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def mechanism_specs(texts: Sequence[str]) -> list[loading.MechanismSpec]:
    """Parse the specs, baseline ``sdpa`` first (added when missing), duplicates dropped;
    every longattn mechanism is registered here, so a bad name or parameter fails
    before any model work."""
    specs = [loading.parse_mechanism(t) for t in texts]
    if loading.BASELINE not in [s.name for s in specs]:
        specs.insert(0, loading.parse_mechanism(loading.BASELINE))
    specs.sort(key=lambda s: s.name != loading.BASELINE)
    unique = list({s.label: s for s in specs}.values())
    for s in unique:
        loading.attn_implementation(s)
    return unique


def _perplexity_case(model: Any, tokens: torch.Tensor, length: int, cfg: EvalConfig,
                     spec: loading.MechanismSpec) -> dict[str, Any]:
    device = torch.device(cfg.device)
    rec: dict[str, Any] = {"length": length, "windows": cfg.windows}
    nll, count = 0.0, 0
    for i, ids in enumerate(windows(tokens, length, cfg.windows)):
        ids = ids.to(device)
        if i == 0:
            cache = loading.new_cache(model, spec)
            score, rec["prefill_s"], rec["peak_mb"] = measure(lambda: score_window(model, ids, cache=cache), device)
            cache = cache_of(score.output)
            _, seconds = greedy_decode(model, cache, score.output.logits[0, -1], cfg.decode_tokens + 1, device)
            rec["decode_tok_s"] = cfg.decode_tokens / seconds if seconds > 0 else None
            rec["cache_mib"] = cache_mib(cache)
            del cache
        else:
            score = score_window(model, ids, use_cache=False)
        nll, count = nll + score.nll, count + score.count
        del score
    rec.update(nll=nll, tokens=count, ppl=perplexity(nll, count))
    return rec


def _passkey_case(model: Any, tokenizer: Any, length: int, depth: float, cfg: EvalConfig,
                  spec: loading.MechanismSpec) -> dict[str, Any]:
    prompt = build_prompt(loading.encoder(tokenizer), length, depth, make_key(length, depth, cfg.seed))
    ids = torch.tensor([prompt.ids], device=cfg.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, loading.new_cache(model, spec)))
    new, _ = greedy_decode(model, cache_of(out), out.logits[0, -1], cfg.passkey_tokens, cfg.device)
    text = tokenizer.decode(new)
    return {"length": length, "depth": depth, "key": prompt.key, "generated": text,
            "hit": retrieved(text, prompt.key)}


def _cases(cfg: EvalConfig) -> list[tuple[str, int, float | None]]:
    plengths = cfg.lengths if cfg.passkey_lengths is None else cfg.passkey_lengths
    return [("perplexity", n, None) for n in cfg.lengths] + [
        ("passkey", n, d) for n in plengths for d in cfg.depths]


def _run_mechanism(model: Any, tokenizer: Any, tokens: torch.Tensor, spec: loading.MechanismSpec,
                   cfg: EvalConfig, bar: Any) -> tuple[dict[str, list], str | None]:
    """Every case of one mechanism: ({"perplexity": [...], "passkey": [...]}, error or None)."""
    found: dict[str, list] = {"perplexity": [], "passkey": []}
    try:
        model.set_attn_implementation(loading.attn_implementation(spec))
        model(input_ids=tokens[None, :min(64, tokens.numel())].to(cfg.device), use_cache=False,
              logits_to_keep=1)  # warm-up: one-time costs out of the timings
        for kind, n, depth in _cases(cfg):
            bar.set_postfix_str(f"{spec.label} {kind} {n}" + ("" if depth is None else f"@{depth}"))
            rec = (_perplexity_case(model, tokens, n, cfg, spec) if kind == "perplexity"
                   else _passkey_case(model, tokenizer, n, depth, cfg, spec))
            found[kind].append({"mechanism": spec.label, **rec})
            bar.update(1)
        return found, None
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        return found, f"{type(e).__name__}: {e}"


def evaluate(model: Any, tokenizer: Any, text: str, config: EvalConfig | None = None, *,
             model_name: str = "", progress: bool = True) -> dict[str, Any]:
    """Run ``config`` on ``model`` (a transformers causal LM) and ``tokenizer`` over
    ``text``; return the result document (:mod:`longattn.evaluation.report`)."""
    from tqdm.auto import tqdm

    cfg = config or EvalConfig()
    cfg.validate()
    specs = mechanism_specs(cfg.mechanisms)
    tokens = loading.tokenize(tokenizer, text, max(cfg.lengths) * cfg.windows)
    own = model.config._attn_implementation
    doc: dict[str, Any] = {"schema": SCHEMA, "version": 1, "model": model_name or type(model).__name__,
                           "config": {**asdict(cfg), "mechanisms": [s.label for s in specs]},
                           "threads": torch.get_num_threads(), "machine": machine_info(torch.get_num_threads(), None),
                           "perplexity": [], "passkey": [], "errors": []}
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(specs) * len(_cases(cfg)), desc="longattn eval", disable=not progress) as bar, \
                torch.inference_mode():
            for spec in specs:
                found, error = _run_mechanism(model, tokenizer, tokens, spec, cfg, bar)
                doc["perplexity"] += found["perplexity"]
                doc["passkey"] += found["passkey"]
                if error:
                    doc["errors"].append({"mechanism": spec.label, "error": error})
    finally:
        model.set_attn_implementation(own)
    doc["elapsed_s"] = time.perf_counter() - t0
    return doc
