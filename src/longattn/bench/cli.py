"""``longattn bench``, ``longattn error`` and ``longattn demo``.

- ``bench``: the speed/memory sweep (:mod:`longattn.bench.harness`) -> bench.json,
  bench.md, bench_time.png, bench_memory.png in ``--out``.
- ``error``: the approximation-error meter (:mod:`longattn.bench.error`) ->
  error.json, error.md, error.png.
- ``demo`` (``make demo``): a quick bench of every mechanism with its peers, the
  error meter and the pattern pictures, in a time budget (default 10 minutes),
  written as ``report/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _modes(s: str) -> list[str]:
    out = [x for x in s.replace(" ", "").split(",") if x]
    bad = [m for m in out if m not in ("fwd", "train")]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"modes are 'fwd' and 'train', got {s!r}")
    return out


def _names(s: str) -> list[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------- bench


def write_bench(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    from longattn.bench import harness, report

    out.mkdir(parents=True, exist_ok=True)
    js = harness.write_json(doc, out / "bench.json")
    plots = report.plot_bench(doc, out)
    md = out / "bench.md"
    md.write_text("# longattn benchmark\n\n" + report.bench_markdown(doc, plots, rel_to=out))
    return {"json": js, "markdown": md, **{p.stem: p for p in plots}}


def _bench_config(args: argparse.Namespace) -> Any:
    from longattn.bench.harness import BenchConfig

    cfg = BenchConfig(
        mechanisms=args.mechanisms, peers=args.peers, ns=args.n, modes=args.mode, dtype=args.dtype,
        batch=args.batch, heads=args.heads, dim=args.dim, causal=args.causal, threads=args.threads,
        timeout_s=args.timeout, mem_budget_mb=args.mem_budget_mb, allocator=args.allocator,
    )
    if args.quick:
        cfg.ns = args.n if args.n_given else [1024, 4096]
        cfg.min_repeats, cfg.max_repeats, cfg.min_time_s = 2, 5, 0.3
        cfg.matmul_n = 1024
        if args.peers is None:
            from longattn.bench.cases import short_run_peers

            cfg.peers = short_run_peers(cfg.mechanisms)
    if args.repeats:
        cfg.min_repeats = cfg.max_repeats = args.repeats
    return cfg


def _run_bench(args: argparse.Namespace) -> int:
    from longattn.bench import harness

    cfg = _bench_config(args)
    doc = harness.sweep(cfg, progress=not args.no_progress, log=_log)
    paths = write_bench(doc, Path(args.out))
    ok = sum(r["status"] == "ok" for r in doc["results"])
    print(f"{ok}/{len(doc['results'])} cases ran in {doc['elapsed_s']:.0f} s; "
          f"report: {paths['markdown']}  data: {paths['json']}")
    return 0


# ----------------------------------------------------------------------- error


def write_error(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    from longattn.bench import report

    out.mkdir(parents=True, exist_ok=True)
    js = out / "error.json"
    js.write_text(json.dumps(doc, indent=1, default=repr))
    plot = report.plot_error(doc, out)
    md = out / "error.md"
    md.write_text("# longattn approximation error\n\n" + report.error_markdown(doc, plot, rel_to=out))
    return {"json": js, "markdown": md, "plot": plot}


def _run_error(args: argparse.Namespace) -> int:
    from longattn.bench.error import ErrorConfig, measure

    cfg = ErrorConfig(n=args.n, heads=args.heads, dim=args.dim, seed=args.seed, causal=args.causal,
                      mechanisms=args.mechanisms, threads=args.threads)
    doc = measure(cfg, progress=not args.no_progress, log=_log)
    paths = write_error(doc, Path(args.out))
    print(f"error meter done in {doc['elapsed_s']:.0f} s; report: {paths['markdown']}  data: {paths['json']}")
    return 0


# ----------------------------------------------------------------------- demo


def demo(out: str | Path = "report", *, tiny: bool = False, budget_s: float = 600.0,
         progress: bool = True, threads: int = 0) -> Path:
    """Quick bench + error meter + pattern pictures into ``out/README.md``; returns its path.

    The bench gets what the budget leaves after reserving time for the error meter
    and the pictures; each case has a timeout and cases predicted not to fit are
    skipped (and listed), so the whole run stays within ``budget_s``.
    """
    from longattn.bench import harness, report
    from longattn.bench.cases import short_run_peers
    from longattn.bench.error import ErrorConfig, measure

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tiny:
        cfg = harness.BenchConfig(mechanisms=["full", "local", "performer"], peers=[], ns=[128, 256],
                                  min_repeats=1, max_repeats=2, min_time_s=0.0, timeout_s=20,
                                  matmul_n=256, warmup=1, threads=threads or 1)
        ecfg = ErrorConfig(n=128, heads=2, dim=16, exact_n=64,
                           mechanisms=["full", "local", "performer", "nystrom"], threads=threads or 1)
        reserve = 10.0
    else:
        peers = short_run_peers()
        cfg = harness.BenchConfig(ns=[1024, 4096, 16384], peers=peers, min_repeats=2, max_repeats=5,
                                  min_time_s=0.3, timeout_s=40, matmul_n=1024, threads=threads,
                                  adaptive_repeats=True)
        ecfg = ErrorConfig(n=1024, threads=threads)
        reserve = 100.0  # error meter (~25-40 s on 2 busy cores), pictures, plots
    cfg.deadline_s = max(10.0, budget_s - reserve)
    bench_doc = harness.sweep(cfg, progress=progress, log=_log)
    bench_paths = write_bench(bench_doc, out)
    print("\nAgainst dense SDPA (time, peak memory above inputs, speed-up):\n")
    print(report.headline_table(bench_doc), flush=True)
    err_doc = measure(ecfg, progress=progress, log=_log)
    err_paths = write_error(err_doc, out)
    gallery_note, gallery = _gallery(out / "patterns", budget_left=budget_s - (time.perf_counter() - t0), tiny=tiny)
    sections = [
        "Every registered mechanism side by side: speed and memory against dense SDPA and the "
        "public packages (same run, same machine), approximation error against exact attention, "
        "and the pictures of the fixed patterns. Regenerate with `make demo` "
        "(`python -m longattn demo`); the full sweep is `longattn bench`.", "",
        f"Files: [`bench.json`](bench.json), [`error.json`](error.json) (schemas in "
        "`longattn/bench/report.py`).", "",
        report.bench_markdown(bench_doc, [bench_paths["bench_time"], bench_paths["bench_memory"]], rel_to=out),
        report.error_markdown(err_doc, err_paths["plot"], rel_to=out),
        "## Patterns", "", gallery_note, "",
        *[f"![{p.stem}]({p.relative_to(out)})" for p in gallery],
        "", f"_Generated in {time.perf_counter() - t0:.0f} s._", "",
    ]
    return report.write_page(out / "README.md", "longattn report", sections)


def _gallery(out: Path, budget_left: float, tiny: bool) -> tuple[str, list[Path]]:
    try:
        from longattn import viz
    except ImportError:
        return "(pattern pictures skipped: `longattn.viz` is not available)", []
    fn = getattr(viz, "pattern_gallery", None)
    if fn is None:
        return "(pattern pictures skipped: `longattn.viz.pattern_gallery` is not available)", []
    if budget_left < 5:
        return "(pattern pictures skipped: time budget spent)", []
    try:
        paths = [Path(p) for p in fn(out)]
    except Exception as e:  # noqa: BLE001 - a picture failing must not lose the report
        return f"(pattern pictures failed: {type(e).__name__}: {e})", []
    return "Each fixed pattern, per head (drawn by `longattn.viz.pattern_gallery`).", paths


def _run_demo(args: argparse.Namespace) -> int:
    page = demo(args.out, tiny=args.tiny, budget_s=args.budget_s, progress=not args.no_progress,
                threads=args.threads)
    print(f"report written: {page}")
    return 0


# ----------------------------------------------------------------------- parsers


class _NGiven(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        setattr(namespace, self.dest, values)
        namespace.n_given = True


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed/memory sweep of the mechanisms and their peers",
                       description="Each case runs in its own process (peak memory per process), "
                                   "with warm-up, repeats, a timeout and a memory budget.")
    p.add_argument("--mechanisms", type=_names, default=None, help="comma-separated (default: all registered)")
    p.add_argument("--peers", type=_names, default=None,
                   help="comma-separated peers (default: every installed one); '' for none")
    p.add_argument("--n", type=_ints, default=[1024, 4096, 16384, 65536], action=_NGiven,
                   help="sequence lengths (default 1024,4096,16384,65536)")
    p.add_argument("--mode", type=_modes, default=["fwd", "train"], help="fwd,train (default both)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (default: all cores)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case (default 300)")
    p.add_argument("--mem-budget-mb", type=float, default=0.0, help="default: 60%% of available memory")
    p.add_argument("--repeats", type=int, default=0, help="fixed number of timed repeats")
    p.add_argument("--allocator", choices=["reuse", "strict"], default="reuse",
                   help="timed calls reuse freed buffers up to 32 MiB (glibc's default, the "
                        "default here) or map every buffer above 64 KiB afresh (strict: each call "
                        "pays its page faults again); peak memory is always measured strict")
    p.add_argument("--quick", action="store_true", help="N=1024,4096, fewer repeats, flex only for local")
    p.add_argument("--out", default="report", help="output folder (default report/)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_bench, n_given=False)

    e = sub.add_parser("error", help="relative error of each approximation against exact attention")
    e.add_argument("--n", type=int, default=1024)
    e.add_argument("--heads", type=int, default=4)
    e.add_argument("--dim", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--causal", action="store_true")
    e.add_argument("--mechanisms", type=_names, default=None)
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--out", default="report")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(run=_run_error)

    d = sub.add_parser("demo", help="quick bench + error meter + pictures -> report/README.md (<= 10 min)")
    d.add_argument("--out", default="report")
    d.add_argument("--budget-s", type=float, default=600.0, help="total time budget in seconds (default 600)")
    d.add_argument("--tiny", action="store_true", help="a seconds-long smoke version (tests)")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=_run_demo)
