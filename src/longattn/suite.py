"""The long-range suite: does each mechanism learn what full attention learns?

    longattn suite --quick                   # the default mechanisms on every task but Pathfinder, <= 10 min
    longattn suite --mechanisms all          # every registered mechanism
    longattn suite --tasks listops recall --mechanisms full local performer --out runs/suite

Every chosen mechanism trains on every chosen task with the same budget (model
size, steps, batch, learning rate, data), and the suite writes to ``--out``:

- ``results.json``: one record per (task, mechanism): test accuracy at the best
  validation step, the majority-class baseline, train time, peak memory, tokens/s,
  parameters, the mechanism parameters used, or why the pair was skipped / failed;
- ``results.md``: an LRA-style table (mechanisms x tasks, with a majority-class row
  and an average), then train time and peak memory tables;
- ``accuracy.png``: accuracy per task per mechanism, baseline dashed;
- ``curves_<task>.png``: validation accuracy and training loss against the step, one
  line per mechanism (the learning curves).

Mechanisms that need per-task parameters (windows, ``max_len`` of Linformer and
the Synthesizer, the image side of 2-D patterns) take them from
:data:`MECHANISM_PARAMS`, a table keyed by mechanism name whose values may name
task quantities (``"{seq_len}"``, ``"{side}"``, ``"{seq_len_4}"`` = seq_len // 4).
A key the mechanism does not declare in the registry is an error (a misspelt key
would silently leave it at its defaults); a learned mechanism's module makes its
own tensors (e.g. Linformer's E and F). A pair is
skipped (and reported as such) when the task is causal and the mechanism cannot be,
when the mechanism is causal only (a recurrence) and the task non-causal and not
readable left to right (:data:`CAUSAL_READABLE`; on those the model is built causal),
or when a required parameter cannot be resolved for the task (e.g. a 2-D pattern on
a 1-D task).

By default each run is its own subprocess (peak memory per process; a crash in
one mechanism does not stop the suite); ``--quick`` runs in-process to save the
start-up time of ~75 processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from longattn import tasks

DEFAULT_TASKS = ("listops", "pathfinder", "recall", "copy", "digits")
# --quick leaves Pathfinder out: no budget of a few CPU minutes teaches it to any
# mechanism (full attention included), and quick must show full attention above the
# majority class on every task it runs. ``--tasks pathfinder`` still runs it.
QUICK_TASKS = ("listops", "recall", "copy", "digits")
# One or two per family: what the default (a little over two hours on 2 cores) and --quick run:
# a window (local), window + random + global blocks (bigbird), fewer keys (linformer,
# nystrom), kernel features (performer), content routing (lsh, sinkhorn), no Q.K
# (synthesizer). ``--mechanisms all`` takes every registered mechanism: longformer (it
# matched local within a few points in every column), linear and clustered among them.
# Names not registered (yet) are left out with a note.
# Then the select-then-attend family (topk_blocks: training-free block top-k; nsa: learned
# compression + selection + window) and one recurrence (gated_delta).
DEFAULT_MECHANISMS = ("full", "local", "bigbird", "linformer", "nystrom", "performer", "lsh", "sinkhorn",
                      "synthesizer", "topk_blocks", "nsa", "gated_delta")

# Non-causal tasks whose labels depend only on earlier tokens, so that a causal-only
# mechanism (a recurrence) can be trained on them with a causal model, read left to right.
# On the other non-causal tasks such a mechanism sits out (it would see only a prefix of
# the input at most positions, and the task is posed bidirectionally).
CAUSAL_READABLE = {
    "recall": "every query comes after the pair it asks for",
}

# Per-task budgets: (task options, trainer options), the same for every mechanism.
# "default" takes a little over two hours for the whole suite on 2 CPU cores (two runs side by
# side, ``--jobs``); "quick" at <= 10 minutes. Sizes: seq_len listops <= 128 (mean ~58),
# pathfinder 16x16 = 256, recall 64, copy 64, digits 64.
BUDGETS: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "default": {
        # 10000 test examples: binomial standard error ~0.5 points at 35%, so one point is outside the noise.
        # 32-128 tokens (mean ~58), rotary positions and the closing-value aux loss at weight 3, lr 3e-3,
        # 900 steps (README, "ListOps": at 300-600 steps, or aux weight 1, full attention stays within
        # 2 points of the 33.5% that the root operator alone predicts)
        "listops": ({"min_len": 32, "max_len": 128, "n_train": 8000, "n_test": 10000},
                    dict(steps=900, batch=32, eval_every=300, pos="rope", aux_weight=3.0, lr=3e-3)),
        # 16 x 16 pixels, one distractor, markers as their own token; 4 layers, 2D rotary positions
        # and the flood-fill aux loss (without rotary positions and the aux loss full attention stays
        # at chance; with 1D RoPE it trailed the +-16 window by 7 points: docs/suite.md, "Pathfinder")
        "pathfinder": ({"size": 16, "distractors": 1, "marker_token": True, "n_train": 8000},
                       dict(steps=600, batch=32, eval_every=200, max_eval=500, layers=4, pos="rope2d",
                            aux_weight=1.0)),
        # (recall at 1200 steps left full attention at 99.8%, copy at 800 at 61.8%: not shorter)
        "recall": ({"n_train": 8000}, dict(steps=1500, batch=32, eval_every=250)),
        "copy": ({"n_train": 8000}, dict(steps=1000, batch=32, eval_every=250)),
        "copy_masked": ({"n_train": 8000}, dict(steps=600, batch=32, eval_every=200)),
        # learned positions and dropout 0.2 (the task's defaults), lr 5e-3: full attention 96.4% at 1000
        # steps (44.4% with sinusoidal positions at 400); at 400 steps with learned positions 60.8%
        "digits": ({}, dict(steps=1000, batch=32, eval_every=250, lr=5e-3, warmup=50)),
    },
    "quick": {
        # sized so that full attention beats the majority class on every task quick runs
        # (measured: listops 27.6 / 17.0, recall 100 / 13.9, copy 44.8 / 13.7, digits 24.8 / 11.6)
        "listops": ({"min_len": 16, "max_len": 48, "max_depth": 4, "n_train": 2000, "n_val": 200, "n_test": 500},
                    dict(steps=200, batch=16, eval_every=100)),
        "pathfinder": ({"size": 16, "distractors": 1, "n_train": 600, "n_val": 200, "n_test": 200},
                       dict(steps=40, batch=16, eval_every=40)),
        "recall": ({"num_keys": 8, "num_values": 8, "pairs": 4, "queries": 4, "seq_len": 24, "n_train": 2000,
                    "n_val": 200, "n_test": 200}, dict(steps=400, batch=16, eval_every=200)),
        "copy": ({"length": 8, "symbols": 8, "n_train": 2000, "n_val": 200, "n_test": 200},
                 dict(steps=400, batch=16, eval_every=200)),
        "copy_masked": ({"length": 8, "symbols": 8, "n_train": 2000, "n_val": 200, "n_test": 200},
                        dict(steps=400, batch=16, eval_every=200)),
        "digits": ({}, dict(steps=200, batch=16, eval_every=100)),
    },
}
MODEL = {"default": dict(layers=2, dim=64, heads=4, lr=2e-3, warmup=60),
         "quick": dict(layers=2, dim=32, heads=4, lr=3e-3, warmup=20)}

# CPU-sized parameters per mechanism (only those the mechanism declares are used).
MECHANISM_PARAMS: dict[str, dict[str, Any]] = {
    "local": {"before": 16, "after": 16},
    "local2d": {"height": "{side}", "width": "{side}", "radius_h": 2, "radius_w": 2},
    "block_diagonal": {"block": 16},
    "strided": {"stride": 8},
    "dilated": {"radius": 8, "dilation": 2},
    "random": {"blocks_per_row": 2, "block": 16},
    "longformer": {"window": 16, "global_indices": [0]},
    "bigbird": {"block": 16, "random_blocks": 2, "global_blocks": 1},
    "sparse_transformer_strided": {"l": 16},
    "sparse_transformer_fixed": {"l": 16, "c": 4},
    "linformer": {"max_len": "{seq_len}", "proj_dim": 32},
    "compressed": {"slots": 32},
    "nystrom": {"landmarks": 16},
    "performer": {"num_features": 64},
    "lsh": {"bucket_size": 16, "n_hashes": 2},
    "clustered": {"n_clusters": 4, "chunk_size": 16},
    "sinkhorn": {"block_size": 16},
    "synthesizer": {"max_len": "{seq_len}"},
    # sequences of 64-256 tokens: blocks of 16, so that selection has 4-16 blocks to choose from
    "topk_blocks": {"block": 16, "topk": 3, "sink_tokens": 1, "window": 16},
    "nsa": {"block": 16, "topk": 3, "window": 16},
    # a short convolution on q, k, v, the output norm and gate, as Gated DeltaNet's layer has them:
    # recall 53.5 % without any, 79.2 % with the convolution, 97.0 % with the norm too, 97.5 % with
    # the gate too (seeds 1, 2: 96.9, 98.1) (docs/suite.md)
    "gated_delta": {"chunk_size": 32, "short_conv": 4, "output_norm": True, "output_gate": True},
}


@dataclass
class TaskInfo:
    name: str
    seq_len: int
    side: int | None  # image side for image tasks
    causal: bool

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
            key = value[1:-1]
            table = {"seq_len": self.seq_len, "side": self.side, "seq_len_4": self.seq_len // 4}
            if key not in table:
                raise ValueError(f"unknown task quantity {value!r} in MECHANISM_PARAMS")
            return table[key]
        return value


def task_info(name: str, options: dict[str, Any]) -> TaskInfo:
    spec = tasks.get(name)
    cfg = spec.make_config(**options)
    side = math.isqrt(cfg.seq_len) if name in ("pathfinder", "digits") else None
    return TaskInfo(name=name, seq_len=cfg.seq_len, side=side, causal=spec.causal)


def mechanism_params(mechanism: str, info: TaskInfo) -> tuple[dict[str, Any] | None, str]:
    """(params for ``mechanism`` on the task, "") or (None, why it cannot run there)."""
    from longattn.registry import get

    spec = get(mechanism)
    if info.causal and not spec.causal:
        return None, f"{mechanism} cannot be causal; {info.name} is a causal task"
    if not info.causal and spec.causal_only and info.name not in CAUSAL_READABLE:
        return None, (f"{mechanism} is causal only; {info.name} is a non-causal task that a left-to-right "
                      f"model cannot read (causal-readable tasks: {sorted(CAUSAL_READABLE)})")
    table = MECHANISM_PARAMS.get(mechanism, {})
    unknown = sorted(set(table) - {p.name for p in spec.params})
    if unknown:  # a misspelt key would silently leave the mechanism at its defaults
        raise ValueError(f"MECHANISM_PARAMS[{mechanism!r}] has {unknown}, which {mechanism} does not take; "
                         f"it takes {[p.name for p in spec.params]}")
    params = {}
    for p in spec.params:
        if p.name in table:
            val = info.resolve(table[p.name])
            if val is None:
                if p.required:
                    return None, f"{mechanism} needs {p.name}, which {info.name} does not define"
                continue
            params[p.name] = val
        elif p.required and spec.module is None:  # a learned module makes its own tensors
            return None, f"{mechanism} needs {p.name} per call or per task; not in longattn.suite.MECHANISM_PARAMS"
    return params, ""


def causal_model(mechanism: str, info: TaskInfo) -> bool | None:
    """True when ``mechanism`` is causal only and ``info`` a non-causal task it may read left
    to right (:data:`CAUSAL_READABLE`): its model is built causal. None: the task's default."""
    from longattn.registry import get

    if not info.causal and get(mechanism).causal_only and info.name in CAUSAL_READABLE:
        return True
    return None


@dataclass
class SuiteConfig:
    tasks: list[str] | None = None  # None = DEFAULT_TASKS (QUICK_TASKS with quick)
    mechanisms: list[str] | None = None  # None = DEFAULT_MECHANISMS; ["all"] = every registered one
    quick: bool = False
    out: str = "suite-results"
    seed: int = 0  # the first seed; run k of a pair uses seed + k
    seeds: int = 1  # runs per (task, mechanism); the table shows mean +- std over them
    isolate: bool | None = None  # subprocess per run; None = not quick
    steps: int | None = None  # override every task's steps (tests, smoke runs)
    progress: bool = True
    timeout_s: int = 3600
    resume: bool = False  # reuse finished runs under ``out`` whose settings match
    jobs: int | None = None  # runs at once (subprocesses only); None = auto (see :func:`job_layout`)


def job_layout(jobs: int | None, isolate: bool, cpus: int | None = None) -> tuple[int, int]:
    """(runs at once, torch threads per run) for ``jobs`` on a machine with ``cpus`` cores.

    The suite's models are small (dim 64), and their matmuls do not scale across cores:
    on 2 cores, two one-thread runs side by side finish a column about 1.5x sooner than
    one two-thread run at a time. Auto therefore runs one job per core, at most 4, each
    with an equal share of the cores. In-process runs (``--quick``) are one at a time.
    """
    cpus = max(1, cpus if cpus is not None else (os.cpu_count() or 1))
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive integer or None (auto), got {jobs!r}")
    if not isolate:
        if jobs not in (None, 1):
            raise ValueError(f"jobs={jobs} needs one subprocess per run; in-process runs go one at a time "
                             "(drop --in-process, or --jobs 1)")
        return 1, cpus
    n = min(cpus, 4) if jobs is None else jobs
    return n, max(1, cpus // n)


# Settings a finished run's saved config must match to be reused by ``--resume``.
_RESUME_KEYS = ("task", "task_options", "mechanism", "mechanism_params", "seed", "layers", "dim", "heads", "steps",
                "batch", "lr", "warmup", "eval_every", "max_eval", "pos", "pool", "aux_weight", "causal")


def _finished(run_dir: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of a finished run in ``run_dir`` if its settings equal ``want``, else None."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
        saved = res["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    diff = [k for k in want if json.dumps(saved.get(k), sort_keys=True) != json.dumps(want[k], sort_keys=True)]
    if diff:
        print(f"[suite]   {run_dir}: saved run differs in {diff}; training again", file=sys.stderr)
        return None
    return res


def suite_tasks(cfg: "SuiteConfig") -> list[str]:
    """The tasks a suite runs: the given ones, else DEFAULT_TASKS (QUICK_TASKS with quick)."""
    if cfg.tasks is not None:
        return list(cfg.tasks)
    return list(QUICK_TASKS if cfg.quick else DEFAULT_TASKS)


def budget(task: str, quick: bool, steps: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task options, trainer options) of ``task`` in the default or quick suite."""
    mode = "quick" if quick else "default"
    topts, trainopts = BUDGETS[mode].get(task, ({}, dict(steps=300, batch=32, eval_every=100)))
    trainopts = {**MODEL[mode], **trainopts}
    if steps is not None:
        trainopts.update(steps=steps, eval_every=steps)
    return dict(topts), trainopts


def run_one(task: str, mechanism: str, cfg: SuiteConfig, run_dir: Path, seed: int | None = None,
            threads: int | None = None) -> dict[str, Any]:
    """Train ``mechanism`` on ``task`` with the suite's budget (seed ``seed``, default ``cfg.seed``).

    ``threads``: torch threads of the run's subprocess (None = torch's default).
    """
    seed = cfg.seed if seed is None else seed
    topts, trainopts = budget(task, cfg.quick, cfg.steps)
    info = task_info(task, topts)
    params, why = mechanism_params(mechanism, info)
    rec: dict[str, Any] = {"task": task, "mechanism": mechanism, "seed": seed, "seq_len": info.seq_len}
    if params is None:
        return {**rec, "status": "skipped", "reason": why}
    rec["mechanism_params"] = params
    causal = causal_model(mechanism, info)
    if causal:
        rec["causal_model"] = f"read left to right: {CAUSAL_READABLE[task]}"
    keep = ("test_acc", "final_test_acc", "best_val_acc", "majority_baseline", "test_items", "train_time_s",
            "peak_mem_mb", "tokens_per_s", "params", "steps")
    if cfg.resume:
        want = {"task": task, "task_options": topts, "mechanism": mechanism, "mechanism_params": params,
                "seed": seed, "max_eval": 0, "causal": causal, **trainopts}
        res = _finished(run_dir, {k: want[k] for k in _RESUME_KEYS if k in want})
        if res is not None:
            return {**rec, "status": "ok", **{k: res.get(k) for k in keep}, "wall_s": None, "resumed": True}
    isolate = (not cfg.quick) if cfg.isolate is None else cfg.isolate
    t0 = time.perf_counter()
    try:
        if isolate:
            res = _run_subprocess(task, mechanism, params, topts, trainopts, cfg, run_dir, seed, threads, causal)
        else:
            from longattn.train import TrainConfig, train

            tc = TrainConfig(task=task, task_options=topts, mechanism=mechanism, mechanism_params=params,
                             seed=seed, out=str(run_dir), progress=cfg.progress,
                             ckpt_every=10**9, causal=causal, **trainopts)
            res = train(tc)
            res.pop("model", None)
    except Exception as e:  # one broken mechanism must not stop the suite
        return {**rec, "status": "failed", "error": f"{type(e).__name__}: {e}"[-2000:],
                "wall_s": time.perf_counter() - t0}
    return {**rec, "status": "ok", **{k: res.get(k) for k in keep}, "wall_s": time.perf_counter() - t0}


def _run_subprocess(task: str, mechanism: str, params: dict[str, Any], topts: dict[str, Any],
                    trainopts: dict[str, Any], cfg: SuiteConfig, run_dir: Path, seed: int,
                    threads: int | None = None, causal: bool | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "longattn", "train", "--task", task, "--mechanism", mechanism,
           "--seed", str(seed), "--out", str(run_dir), "--ckpt-every", str(10**9)]
    for k, v in topts.items():
        cmd += ["--task-option", f"{k}={json.dumps(v)}"]
    for k, v in params.items():
        cmd += ["--param", f"{k}={json.dumps(v)}"]
    flags = {"layers": "--layers", "dim": "--dim", "heads": "--heads", "steps": "--steps", "batch": "--batch",
             "lr": "--lr", "warmup": "--warmup", "eval_every": "--eval-every", "max_eval": "--max-eval",
             "pos": "--pos", "pool": "--pool", "aux_weight": "--aux-weight"}
    for k, v in trainopts.items():
        if k in flags:
            cmd += [flags[k], str(v)]
    if not cfg.progress:
        cmd.append("--no-progress")
    if causal:
        cmd.append("--causal")
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if cfg.progress else subprocess.PIPE,
                          text=True, timeout=cfg.timeout_s, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-1500:]
        raise RuntimeError(f"train exited with {proc.returncode}: {tail}")
    return json.loads((run_dir / "result.json").read_text())


def run_suite(cfg: SuiteConfig) -> list[dict[str, Any]]:
    """Every chosen mechanism on every chosen task; writes results.json/.md and accuracy.png."""
    from longattn.registry import names as mechanism_names

    known = set(mechanism_names())
    if not cfg.mechanisms:
        mechs = [m for m in DEFAULT_MECHANISMS if m in known]
        missing = [m for m in DEFAULT_MECHANISMS if m not in known]
        if missing:
            print(f"[suite] not registered, left out: {missing}", file=sys.stderr)
    elif list(cfg.mechanisms) == ["all"]:
        mechs = sorted(known)
    else:
        mechs = list(cfg.mechanisms)
    cfg = replace(cfg, tasks=suite_tasks(cfg))
    for t in cfg.tasks:
        tasks.get(t)  # unknown names fail before any training
    bad = [m for m in mechs if m not in known]
    if bad:
        raise ValueError(f"unknown mechanism(s) {bad}; registered: {sorted(known)}")
    if cfg.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {cfg.seeds}")
    isolate = (not cfg.quick) if cfg.isolate is None else cfg.isolate
    jobs, threads = job_layout(cfg.jobs, isolate)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(cfg, mechs)
    if jobs > 1:
        print(f"[suite] {len(plan)} runs, {jobs} at a time with {threads} thread(s) each", file=sys.stderr)
    done: dict[int, dict[str, Any]] = {}

    def finish(i: int, rec: dict[str, Any]) -> None:
        task, mech, seed = plan[i]
        done[i] = rec
        if rec.get("resumed"):
            print(f"[suite] {task} / {mech} / seed {seed}: finished before, reused (--resume)", file=sys.stderr)
        elif rec["status"] != "ok":
            print(f"[suite] {task} / {mech} / seed {seed}: {rec['status']}: {rec.get('reason') or rec.get('error')}",
                  file=sys.stderr)
        elif jobs > 1:
            print(f"[suite] {task} / {mech} / seed {seed}: test {100 * rec['test_acc']:.1f}%, "
                  f"{rec['train_time_s']:.0f} s", file=sys.stderr, flush=True)
        # partial results survive an interruption
        write_outputs([done[k] for k in sorted(done)], out, cfg, with_plot=False)

    if jobs == 1:
        if isolate:
            for task in cfg.tasks:
                _prepare_data(cfg, task)
        for i, (task, mech, seed) in enumerate(plan):
            print(f"[suite] {task} / {mech} / seed {seed}", file=sys.stderr, flush=True)
            finish(i, run_one(task, mech, cfg, run_dir(out, task, mech, seed), seed))
    else:
        _run_side_by_side(plan, cfg, jobs, threads, finish)
    records = [done[k] for k in sorted(done)]
    write_outputs(records, out, cfg)
    return records


def run_dir(out: Path, task: str, mechanism: str, seed: int) -> Path:
    """Where the run of (task, mechanism, seed) keeps its log, checkpoint and result."""
    return out / "runs" / task / mechanism / f"seed{seed}"


def _plan(cfg: SuiteConfig, mechs: list[str]) -> list[tuple[str, str, int]]:
    """(task, mechanism, seed) of every run, in table order; a pair the suite skips gets one entry."""
    plan = []
    for task in cfg.tasks or []:
        info = task_info(task, budget(task, cfg.quick, cfg.steps)[0])
        for mech in mechs:
            skipped = mechanism_params(mech, info)[0] is None  # every seed would be skipped alike
            seeds = [cfg.seed] if skipped else range(cfg.seed, cfg.seed + cfg.seeds)
            plan += [(task, mech, seed) for seed in seeds]
    return plan


def _prepare_data(cfg: SuiteConfig, task: str) -> None:
    """Generate (and cache) ``task``'s splits once, before runs that would each generate them."""
    config = tasks.get(task).make_config(**budget(task, cfg.quick, cfg.steps)[0])
    for split in tasks.SPLITS:
        tasks.load(task, split, seed=0, config=config)  # the data seed `longattn train` uses


def _run_cost(task: str, cfg: SuiteConfig) -> float:
    """Rough relative cost of one run of ``task``: steps x batch x tokens x layers."""
    topts, trainopts = budget(task, cfg.quick, cfg.steps)
    return trainopts["steps"] * trainopts["batch"] * task_info(task, topts).seq_len * trainopts["layers"]


def _run_side_by_side(plan: list[tuple[str, str, int]], cfg: SuiteConfig, jobs: int, threads: int,
                      finish: Callable[[int, dict[str, Any]], None]) -> None:
    """Run ``plan`` ``jobs`` at a time, each run a subprocess with ``threads`` torch threads.

    A task's data is generated once (in a slot of its own, while other tasks' runs
    train; Pathfinder's takes minutes), and a free slot takes the most expensive run
    whose data is ready: longest first packs the slots best, so the suite does not end
    on one long run with the other cores idle.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    out = Path(cfg.out)
    quiet = replace(cfg, progress=False)  # one bar over the runs, not interleaved bars of each
    cost = {t: _run_cost(t, cfg) for t in cfg.tasks or []}
    to_prepare = sorted(cost, key=lambda t: -cost[t])
    ready: set[str] = set()
    pending = sorted(range(len(plan)), key=lambda i: -cost[plan[i][0]])  # stable: table order within a task

    def start(i: int) -> dict[str, Any]:
        task, mech, seed = plan[i]
        return run_one(task, mech, quiet, run_dir(out, task, mech, seed), seed, threads=threads)

    bar = tqdm(total=len(plan), desc="suite", unit="run", disable=not cfg.progress)
    running: dict[Future, tuple[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads wait on subprocesses (or generate data)
        while pending or running:
            while len(running) < jobs:
                nxt = next((i for i in pending if plan[i][0] in ready), None)
                if nxt is not None:
                    pending.remove(nxt)
                    running[pool.submit(start, nxt)] = ("run", nxt)
                elif to_prepare:
                    task = to_prepare.pop(0)
                    running[pool.submit(_prepare_data, cfg, task)] = ("data", task)
                else:
                    break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, what = running.pop(fut)
                if kind == "data":
                    fut.result()  # a generator error stops the suite, as it does without --jobs
                    ready.add(what)
                else:
                    finish(what, fut.result())
                    bar.update(1)
    bar.close()


def write_outputs(records: list[dict[str, Any]], out: Path, cfg: SuiteConfig, with_plot: bool = True) -> None:
    payload = {"config": asdict(cfg), "results": records}
    _atomic_text(out / "results.json", json.dumps(payload, indent=2, default=str))
    _atomic_text(out / "results.md", markdown(records, quick=cfg.quick))
    if not with_plot:
        return
    try:
        plot(records, out / "accuracy.png")
        plot_curves(records, out)
    except Exception as e:  # a missing display backend must not lose the results
        print(f"[suite] plot failed: {e}", file=sys.stderr)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Cell:
    """The runs of one (task, mechanism): their mean accuracy and its uncertainty."""

    runs: list[dict[str, Any]]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("status") == "ok"]

    @property
    def status(self) -> str:
        return "ok" if self.ok else self.runs[0].get("status", "failed")

    def mean(self, key: str = "test_acc") -> float | None:
        vals = [r[key] for r in self.ok if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else None

    def error(self) -> tuple[float | None, str]:
        """(std over seeds, "std") for several runs; (binomial standard error, "se") for one
        run with a known test size; (None, "") otherwise."""
        accs = [r["test_acc"] for r in self.ok]
        if len(accs) > 1:
            m = sum(accs) / len(accs)
            return math.sqrt(sum((a - m) ** 2 for a in accs) / (len(accs) - 1)), "std"
        if len(accs) == 1 and self.ok[0].get("test_items"):
            return binomial_se(accs[0], self.ok[0]["test_items"]), "se"
        return None, ""


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent test items."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


def _grid(records: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    task_order = list(dict.fromkeys(r["task"] for r in records))
    mech_order = list(dict.fromkeys(r["mechanism"] for r in records))
    cells: dict[tuple[str, str], Cell] = {}
    for r in records:
        cells.setdefault((r["task"], r["mechanism"]), Cell([])).runs.append(r)
    return task_order, mech_order, cells


def _baselines(task_order: list[str], cells: dict[tuple[str, str], Cell]) -> dict[str, float | None]:
    return {t: next((c.mean("majority_baseline") for (tt, _), c in cells.items() if tt == t and c.ok), None)
            for t in task_order}


def _fmt(cell: Cell | None, key: str, scale: float = 1.0, nd: int = 1) -> str:
    if cell is None:
        return ""
    if cell.status == "skipped":
        return "n/a"
    if cell.status == "failed":
        return "failed"
    v = cell.mean(key)
    return "" if v is None else f"{v * scale:.{nd}f}"


def markdown(records: list[dict[str, Any]], quick: bool = False) -> str:
    """LRA-style tables: accuracy +- its uncertainty (with a majority-class row), train time, peak memory,
    tokens/s."""
    task_order, mech_order, cells = _grid(records)
    base = _baselines(task_order, cells)
    seeds = max((len(c.ok) for c in cells.values()), default=0)
    spread = (f"+- = standard deviation over {seeds} seeds" if seeds > 1 else
              "+- = binomial standard error of the test accuracy, sqrt(p(1-p)/n) over the n test items "
              "(one seed; `--seeds S` gives the spread over seeds)")
    head = "| mechanism | " + " | ".join(task_order) + " | avg |"
    sep = "|---" * (len(task_order) + 2) + "|"
    lines = [f"# Long-range suite{' (quick)' if quick else ''}", "",
             "Test accuracy (%) at the best validation step; every mechanism trained with the same budget; "
             f"{spread}.", "**bold** = above the majority-class baseline.", "", head, sep]
    for m in mech_order:
        row, accs = [], []
        for t in task_order:
            c = cells.get((t, m))
            s = _fmt(c, "test_acc", 100)
            if c is not None and c.ok:
                acc = c.mean()
                accs.append(acc)
                if base[t] is not None and acc > base[t]:
                    s = f"**{s}**"
                err, _ = c.error()
                if err is not None:
                    s += f" +- {100 * err:.1f}"
            row.append(s)
        avg = f"{100 * sum(accs) / len(accs):.1f}" if accs and len(accs) == len(task_order) else ""
        lines.append(f"| {m} | " + " | ".join(row) + f" | {avg} |")
    lines.append("| *majority class* | " + " | ".join("" if base[t] is None else f"{100 * base[t]:.1f}"
                                                       for t in task_order) + " | |")
    for title, key, scale, nd in (("Train time (s)", "train_time_s", 1.0, 0),
                                  ("Peak memory added by training (MB)", "peak_mem_mb", 1.0, 0),
                                  ("Training throughput (tokens/s)", "tokens_per_s", 1.0, 0)):
        lines += ["", f"## {title}{' (mean over seeds)' if seeds > 1 else ''}", "",
                  "| mechanism | " + " | ".join(task_order) + " |", "|---" * (len(task_order) + 1) + "|"]
        for m in mech_order:
            lines.append(f"| {m} | " + " | ".join(_fmt(cells.get((t, m)), key, scale, nd) for t in task_order) + " |")
    notes = [r for r in records if r.get("status") in ("skipped", "failed")]
    if notes:
        lines += ["", "## Skipped / failed", ""]
        lines += [f"- {r['task']} / {r['mechanism']}"
                  + (f" (seed {r['seed']})" if r.get("status") == "failed" and "seed" in r else "")
                  + f": {r['status']}: {r.get('reason') or r.get('error')}" for r in notes]
    causal = sorted({(r["task"], r["mechanism"], r["causal_model"]) for r in records if r.get("causal_model")})
    if causal:  # a causal-only mechanism on a non-causal task: say so beside its number
        lines += ["", "## Causal models on non-causal tasks", ""]
        lines += [f"- {t} / {m}: {why}" for t, m, why in causal]
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: mean accuracy per task (groups) per mechanism (bars) with its error bar;
    majority class dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_order, mech_order, cells = _grid(records)
    base = _baselines(task_order, cells)
    fig, ax = plt.subplots(figsize=(min(15, max(6, 1.2 * len(task_order) * max(1, len(mech_order)) / 3)), 4.5))
    width = 0.8 / max(1, len(mech_order))
    cmap = plt.get_cmap("tab20")
    for j, m in enumerate(mech_order):
        xs, ys, errs = [], [], []
        for i, t in enumerate(task_order):
            c = cells.get((t, m))
            if c is not None and c.ok:
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(100 * c.mean())
                errs.append(100 * (c.error()[0] or 0.0))
        ax.bar(xs, ys, width=width, label=m, color=cmap(j % 20), yerr=errs, error_kw=dict(lw=0.8, capsize=1.5))
    for i, t in enumerate(task_order):
        if base[t] is not None:
            ax.hlines(100 * base[t], i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(task_order)))
    ax.set_xticklabels(task_order)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per task and mechanism (error bars: +- 1 std or s.e.; dashed: majority class)",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_log(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, validation records) of a run's ``log.jsonl``; empty lists if it has none."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return [], []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "split" not in r], [r for r in recs if r.get("split") == "val"]


def plot_curves(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """``curves_<task>.png`` per task: validation accuracy and training loss (and the aux
    loss where the task's recipe uses one) against the step, one line per mechanism (its
    first seed), read from each run's ``log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_order, mech_order, cells = _grid(records)
    base = _baselines(task_order, cells)
    cmap = plt.get_cmap("tab10" if len(mech_order) <= 10 else "tab20")
    paths = []
    for t in task_order:
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
        drawn = False
        for j, m in enumerate(mech_order):
            c = cells.get((t, m))
            if c is None or not c.ok:
                continue
            train_recs, val_recs = read_log(run_dir(out, t, m, c.ok[0]["seed"]))
            if not val_recs:
                continue
            drawn = True
            color = cmap(j % cmap.N)
            acc_ax.plot([r["step"] for r in val_recs], [100 * r["acc"] for r in val_recs], "o-", ms=3,
                        color=color, label=m)
            loss_ax.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], color=color, lw=1)
            aux = [r for r in train_recs if "aux_loss" in r]
            if aux:
                loss_ax.plot([r["step"] for r in aux], [r["aux_loss"] for r in aux], color=color, lw=0.8, ls=":")
        if not drawn:
            plt.close(fig)
            continue
        if base[t] is not None:
            acc_ax.axhline(100 * base[t], color="k", ls="--", lw=1, label="majority class")
        acc_ax.set(xlabel="step", ylabel="validation accuracy (%)", title=f"{t}: validation accuracy")
        loss_ax.set(xlabel="step", ylabel="cross-entropy", title=f"{t}: training loss (dotted: aux loss)")
        acc_ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"curves_{t}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    cfg = SuiteConfig(tasks=args.tasks, mechanisms=args.mechanisms, quick=args.quick,
                      out=args.out, seed=args.seed, seeds=args.seeds, isolate=args.isolate, steps=args.steps,
                      progress=not args.no_progress, resume=args.resume, jobs=args.jobs)
    try:
        records = run_suite(cfg)
    except Exception:
        traceback.print_exc()
        return 1
    print(markdown(records, quick=cfg.quick))
    print(f"[suite] wrote {Path(cfg.out) / 'results.json'}, results.md, accuracy.png", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suite", help="train every mechanism on every long-range task; table + plot")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_TASKS)} ({' '.join(QUICK_TASKS)} with --quick)")
    p.add_argument("--mechanisms", nargs="+", default=None,
                   help="default: one or two per family (DEFAULT_MECHANISMS); 'all': every registered one")
    p.add_argument("--quick", action="store_true", help="tiny budget: <= 10 minutes on 2 cores")
    p.add_argument("--out", default="suite-results")
    p.add_argument("--seed", type=int, default=0, help="first seed (runs use seed, seed+1, ...)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per (task, mechanism); the table shows mean +- std (one seed: +- binomial s.e.)")
    p.add_argument("--steps", type=int, default=None, help="override the steps of every run")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one subprocess per run (default unless --quick)")
    iso.add_argument("--in-process", dest="isolate", action="store_false")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once, each a subprocess with an equal share of the cores (default: one per "
                        "core, at most 4; small models train faster side by side than on more threads)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs under --out that finished with the same settings (an interrupted suite "
                        "continues where it stopped)")
    p.set_defaults(run=_run)
