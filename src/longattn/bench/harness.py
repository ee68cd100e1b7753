"""The speed/memory sweep: every case in its own process, warm-up, repeats, median.

Isolation. Each case runs in a fresh child process forked from a *forkserver*
that has only imported torch and longattn (so starting a case costs a fork, not a
Python start-up, and no thread pool or cached allocation of a previous case is
inherited). Peak memory is per process: the child resets its high-water mark
(``/proc/self/clear_refs``) once its inputs are built and warmed up, and reports
``VmHWM - VmRSS`` at that point, i.e. the working memory of the attention call,
not counting its inputs. That call runs under a strict allocator
(``MALLOC_MMAP_THRESHOLD_=65536``: every buffer above 64 KiB is mapped afresh and
returned when freed), so the peak is the live tensors', not what the allocator kept.
The timed calls that follow run with glibc's reuse of freed buffers up to 32 MiB (the
steady state of its default settings, set with ``mallopt``: what a user's process
gets), so they do not pay their buffers' page faults again at every call.
``allocator="strict"`` (``--allocator strict``) times under the strict setting too, as
the sweep did until December 2026 (there a slow case's one timed call is the peak call).

Safety. Before running, a case is skipped when its estimated memory
(:func:`longattn.bench.cases.estimate_bytes`, or the previous size's measured
peak scaled by the model) exceeds the budget, or when its predicted time (the
previous size's time scaled by the useful FLOPs, times :data:`EXTRAPOLATION_MARGIN`;
or the FLOPs at the machine's full matmul rate) cannot fit the per-case timeout. A running case is killed by a
watchdog when its resident memory passes the budget, or when it passes its
timeout; larger sizes of that mechanism are then skipped.

Timing: ``warmup`` calls (compilation happens there), the peak-memory call, then at least
``min_repeats`` and up to ``max_repeats`` timed calls until ``min_time_s`` of
measured time (with ``adaptive_repeats``, as in the demo, a case whose warm-up call
took over ``2 * min_time_s`` gets one timed call, and one predicted to take over
5 s per call gets no warm-up). ``train`` = forward + backward of ``(out * g).sum()`` with a fixed
random ``g``. Reported: median, min, max, first and third quartiles.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEMA = "longattn.bench"
SCHEMA_VERSION = 1

# ------------------------------------------------------------------ configuration


@dataclass
class BenchConfig:
    """What to sweep and how (see ``longattn bench --help``)."""

    mechanisms: list[str] | None = None  # None: every registered mechanism
    peers: list[str] | None = None  # None: every available peer of a benchmarked mechanism
    ns: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    modes: list[str] = field(default_factory=lambda: ["fwd", "train"])
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    dim: int = 64
    causal: bool = False
    threads: int = 0  # 0: all cores
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 10
    min_time_s: float = 1.0
    timeout_s: float = 300.0
    mem_budget_mb: float = 0.0  # 0: 60% of available memory
    deadline_s: float = 0.0  # 0: none; else skip what would start after this many seconds
    adaptive_repeats: bool = False  # one timed call when a warm-up call took > 2 * min_time_s
    allocator: str = "reuse"  # timed calls: "reuse" freed buffers (glibc default) or "strict" (see _timed)
    matmul_n: int = 2048

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    def resolved_budget_mb(self) -> float:
        if self.mem_budget_mb:
            return self.mem_budget_mb
        return 0.6 * available_mb()


def available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 4096.0


# ------------------------------------------------------------------ child side


def _status_kb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    return float("nan")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

#: a case predicted (from the previous N, scaled by useful FLOPs) to need more than
#: timeout / this factor is skipped rather than started and killed at the timeout
EXTRAPOLATION_MARGIN = 1.5


def _glibc() -> Any | None:
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - platforms without a C library to load
        return None


def _reusing_allocator() -> None:
    """From now on glibc keeps freed buffers up to 32 MiB for reuse (its default
    settings' steady state: the dynamic mmap threshold grows to 32 MiB, the trim
    threshold to twice that), so a call does not pay the page faults of its buffers
    again. A no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_call(step: Callable[[], None]) -> tuple[float, float | None]:
    """One ``step()`` under the strict allocator the child starts with: (seconds, MiB it
    adds to the resident set at its peak, or None where the high-water mark cannot be
    reset)."""
    import gc

    gc.collect()
    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t = time.perf_counter()
    step()
    seconds = time.perf_counter() - t
    return seconds, max(0.0, (_status_kb("VmHWM") - base_kb) / 1024) if exact else None


def _timed(step: Callable[[], None], case: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, the peak-memory call, then the timed calls (module docstring):
    {"times", "warmup_s", "peak_mb", "peak_call_s" (0 when the peak call is the timed one)}."""
    deadline = time.perf_counter() + case["soft_timeout_s"]
    t0 = time.perf_counter()
    for _ in range(max(case["warmup"], 0)):
        step()
    warm_s = time.perf_counter() - t0
    reuse = case.get("allocator", "reuse") == "reuse"
    peak_s, peak_mb = _peak_call(step)
    min_repeats = case["min_repeats"]
    if case.get("adaptive_repeats"):
        slow = warm_s / case["warmup"] > 2 * case["min_time_s"] if case["warmup"] else True
        if slow and not reuse:  # one call is enough, and the peak call was timed as one
            return {"times": [peak_s], "warmup_s": warm_s, "peak_mb": peak_mb, "peak_call_s": 0.0}
        if slow:  # (with no warm-up: the sweep predicted a multi-second call)
            min_repeats = 1
    if reuse:
        _reusing_allocator()
    times: list[float] = []
    while True:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if len(times) >= case["max_repeats"]:
            break
        if len(times) >= min_repeats and sum(times) >= case["min_time_s"]:
            break
        if time.perf_counter() + times[-1] > deadline:
            break
    return {"times": times, "warmup_s": warm_s, "peak_mb": peak_mb, "peak_call_s": peak_s}


def _child(case: dict[str, Any], result_path: str) -> None:
    """Run one case and write its measurement as JSON to ``result_path``."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    from longattn.bench import cases as C

    out: dict[str, Any] = {"status": "error"}
    try:
        torch.set_num_threads(case["threads"])
        torch.manual_seed(0)
        dtype = getattr(torch, case["dtype"])
        train = case["mode"] == "train"
        fn = C.build_case(case)
        q, k, v = C.make_inputs(case["batch"], case["heads"], case["n"], case["dim"], dtype, train)
        g = None

        def step() -> None:
            nonlocal g
            if train:
                for t in (q, k, v):
                    t.grad = None
                o = fn(q, k, v)
                if g is None:
                    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
                (o * g).sum().backward()
            else:
                with torch.no_grad():
                    fn(q, k, v)

        out = {
            "status": "ok",
            **_timed(step, case),
            "rss_peak_mb": _status_kb("VmHWM") / 1024,
            "params": C.param_count(fn),
        }
    except MemoryError as e:  # pragma: no cover - depends on the machine
        out = {"status": "oom", "reason": f"MemoryError: {e}"[:300]}
    except Exception as e:  # noqa: BLE001 - reported, not raised: the sweep goes on
        out = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
    with open(result_path, "w") as f:
        json.dump(out, f)


def _matmul_child(n: int, threads: int, result_path: str) -> None:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    times = []
    t_end = time.perf_counter() + 3.0
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 20):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    with open(result_path, "w") as f:
        json.dump({"gflops": 2 * n**3 / min(times) / 1e9, "median_gflops": 2 * n**3 / statistics.median(times) / 1e9}, f)


# ------------------------------------------------------------------ parent side

_CTX: Any = None


def _context() -> Any:
    """The forkserver context (children forked from a process that imported torch)."""
    global _CTX
    if _CTX is None:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # the peak call's strict allocator
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "longattn.ops", "longattn.bench.cases"])
        except ValueError:  # pragma: no cover - platforms without fork
            ctx = mp.get_context("spawn")
        _CTX = ctx
    return _CTX


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_isolated(target: Callable, args: tuple, timeout_s: float, mem_limit_mb: float) -> dict[str, Any]:
    """Run ``target(*args, result_path)`` in a child process with a timeout and a
    resident-memory watchdog; return its JSON result or a status record."""
    ctx = _context()
    fd, path = tempfile.mkstemp(prefix="longattn-bench-", suffix=".json")
    os.close(fd)
    os.unlink(path)
    proc = ctx.Process(target=target, args=(*args, path), daemon=False)
    t0 = time.perf_counter()
    proc.start()
    status, reason, max_rss = None, "", 0.0
    while proc.is_alive():
        proc.join(0.05)
        rss = _rss_mb(proc.pid) if proc.pid else 0.0
        max_rss = max(max_rss, rss)
        if mem_limit_mb and rss > mem_limit_mb:
            proc.kill()
            status, reason = "killed", f"resident memory {rss:.0f} MiB passed the budget {mem_limit_mb:.0f} MiB"
        elif time.perf_counter() - t0 > timeout_s:
            proc.kill()
            status, reason = "timeout", f"ran past the {timeout_s:.0f} s timeout"
    proc.join()
    wall = time.perf_counter() - t0
    try:
        if status is None and os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
        else:
            if status is None:
                status = "killed"
                reason = f"child exited with code {proc.exitcode} (killed by the OS? out of memory?)"
            res = {"status": status, "reason": reason}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    res["wall_s"] = wall
    res["watch_rss_mb"] = max_rss
    return res


def measure_matmul_gflops(threads: int, n: int = 2048, timeout_s: float = 60.0) -> float | None:
    """The machine's fp32 matmul rate (best of a few n x n products), in GFLOP/s."""
    res = run_isolated(_matmul_child, (n, threads), timeout_s, 0.0)
    return res.get("gflops")


def _quantiles(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q1, "q3": q3, "repeats": len(s)}


@dataclass
class Case:
    label: str  # mechanism name, or peer name
    mechanism: str  # the registered mechanism whose settings / FLOPs apply
    peer: str | None
    kind: str  # "dense" | "ours" | "peer"
    modes: tuple[str, ...]


def plan_cases(cfg: BenchConfig) -> list[Case]:
    """The mechanisms and peers to run, in a stable order."""
    from longattn.bench import cases as C
    from longattn.registry import get

    mechs = C.mechanism_names(cfg.mechanisms)
    out = []
    for m in mechs:
        spec = get(m)
        if cfg.causal and not spec.causal:
            continue
        out.append(Case(m, m, None, "dense" if m == "full" else "ours", tuple(cfg.modes)))
    for p in C.peer_names(cfg.peers, mechs if cfg.peers is None else None):
        peer = C.PEERS[p]
        if (cfg.causal and not peer.causal) or (not cfg.causal and peer.causal_only):
            continue
        modes = tuple(md for md in cfg.modes if md in peer.modes)
        if modes:
            out.append(Case(p, peer.equals, p, "peer", modes))
    return out


def peers_left_out(cfg: BenchConfig) -> list[dict[str, str]]:
    """Installed peers (or modes of them) that :func:`plan_cases` does not run because
    the peer cannot do what was asked (no causal form, no backward here): listed in the
    report with the reason, never silently dropped."""
    from longattn.bench import cases as C

    mechs = C.mechanism_names(cfg.mechanisms)
    out = []
    for p in C.peer_names(cfg.peers, mechs if cfg.peers is None else None):
        peer = C.PEERS[p]
        if cfg.causal and not peer.causal:
            out.append({"peer": p, "modes": ",".join(cfg.modes), "reason": "no causal form"})
            continue
        if not cfg.causal and peer.causal_only:
            out.append({"peer": p, "modes": ",".join(cfg.modes), "reason": CAUSAL_ONLY_REASON})
            continue
        lacking = [md for md in cfg.modes if md not in peer.modes]
        if lacking:
            out.append({"peer": p, "modes": ",".join(lacking),
                        "reason": f"runs {'/'.join(peer.modes)} only here" + (f" ({peer.note})" if peer.note else "")})
    return out


#: why a causal-only mechanism or peer (a recurrence) does not run in a non-causal sweep
CAUSAL_ONLY_REASON = "causal only (a recurrence over the past): run the sweep with --causal"


@dataclass
class _SweepState:
    """What :func:`sweep` carries from one case to the next."""

    cfg: BenchConfig
    threads: int
    budget_mb: float
    matmul: float | None
    t_start: float
    log: Callable[[str], None] | None
    last_ok: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (label, mode) -> its last ok
    dead: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, mode) -> why larger N are skipped


def sweep(cfg: BenchConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the result document (see :mod:`longattn.bench.report`).

    Cases run by N, then dense SDPA first (every ratio needs it), then each mechanism
    with its modes side by side: a run cut short by its deadline loses whole
    mechanisms at the largest N, never the reference or a whole mode. A case is
    skipped when the previous N's time or memory, scaled by useful FLOPs, predicts
    it would not fit (see :func:`_skip_reason`)."""
    t_start = time.perf_counter()
    threads = cfg.resolved_threads()
    st = _SweepState(cfg, threads, cfg.resolved_budget_mb(), measure_matmul_gflops(threads, cfg.matmul_n),
                     t_start, log)
    plan = sorted(plan_cases(cfg), key=lambda c: c.kind != "dense")
    jobs = [(n, mode, c) for n in sorted(set(cfg.ns)) for c in plan for mode in cfg.modes if mode in c.modes]
    results: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="bench", unit="case", dynamic_ncols=True)
    for n, mode, c in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{c.label} N={n} {mode}")
        results.append(_sweep_case(st, n, mode, c))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _add_ratios(results)
    return _document(st, plan, results)


def _sweep_case(st: _SweepState, n: int, mode: str, c: Case) -> dict[str, Any]:
    """One case's record: skipped (causal-only, no setting, predicted too slow or too
    large, its mechanism dead at a smaller N, the deadline), or run in a child."""
    from longattn.bench import cases as C
    from longattn.bench import flops as Fl

    cfg = st.cfg
    rec: dict[str, Any] = {
        "mechanism": c.label, "equals": c.mechanism, "kind": c.kind, "peer": c.peer,
        "n": n, "mode": mode, "batch": cfg.batch, "heads": cfg.heads, "dim": cfg.dim,
        "dtype": cfg.dtype, "causal": cfg.causal,
    }
    case = {**rec, "peer": c.peer, "mechanism": c.mechanism, "threads": st.threads,
            "warmup": cfg.warmup, "min_repeats": cfg.min_repeats, "max_repeats": cfg.max_repeats,
            "min_time_s": cfg.min_time_s, "adaptive_repeats": cfg.adaptive_repeats,
            "allocator": cfg.allocator}
    if c.peer is None and not cfg.causal and C.causal_only(c.mechanism):
        rec.update(status="skipped", reason=CAUSAL_ONLY_REASON)
    try:
        params = C.settings(c.mechanism, n, cfg.heads, cfg.dim)
        fwd = Fl.forward_flops(c.mechanism, params, n=n, batch=cfg.batch, heads=cfg.heads,
                               dim=cfg.dim, causal=cfg.causal)
    except Exception as e:  # noqa: BLE001
        params, fwd = None, None
        rec.setdefault("status", "skipped")
        rec.setdefault("reason", f"no benchmark setting: {e}")
    rec["flops"] = Fl.case_flops(mode, fwd)
    rec["est_mb"] = C.estimate_bytes(case, fwd) / 2**20 if params is not None else None
    if "status" in rec:
        return rec
    remaining = (cfg.deadline_s - (time.perf_counter() - st.t_start)) if cfg.deadline_s else math.inf
    timeout = min(cfg.timeout_s, remaining)
    reason = _skip_reason(st, (c.label, mode), rec, case, remaining, timeout)
    if reason is not None:
        rec.update(status="skipped", reason=reason)
    else:
        _run_case(st, (c.label, mode), rec, case, timeout)
    return rec


def _skip_reason(st: _SweepState, key: tuple[str, str], rec: dict[str, Any], case: dict[str, Any],
                 remaining: float, timeout: float) -> str | None:
    """Why the case should not run, or None. From the last N that ran: its time
    scaled by useful FLOPs (x EXTRAPOLATION_MARGIN: the few calls of the previous
    size move by 20-30% on a shared machine) against the timeout, its peak memory
    scaled by the estimate against the budget; else the FLOPs at the full matmul
    rate, and the estimate alone. Drops the warm-up of a predicted multi-second call
    (``case["warmup"] = 0``) with adaptive repeats."""
    cfg, flops, est_mb = st.cfg, rec["flops"], rec["est_mb"]
    if key in st.dead:
        return st.dead[key]
    if remaining <= 1.0:
        return "time budget of the run spent"
    reason = None
    prev = st.last_ok.get(key)
    if prev is not None and prev.get("flops") and flops:
        pred_t = prev["time_s"]["median"] * flops / prev["flops"]
        if cfg.adaptive_repeats and pred_t > 5.0:  # a multi-second call needs no warm-up
            case["warmup"] = 0
        # warm-up, the peak call and one timed call
        pred_t_total = pred_t * EXTRAPOLATION_MARGIN * (case["warmup"] + 2) + prev.get("setup_s", 0.0)
        if pred_t_total > timeout:
            reason = (f"predicted {pred_t_total:.0f} s (from N={prev['n']} scaled by useful FLOPs) "
                      f"exceeds the {timeout:.0f} s timeout")
        if prev.get("peak_mb") and prev.get("est_mb") and est_mb:
            pred_mb = prev["peak_mb"] * est_mb / prev["est_mb"]
            if pred_mb > st.budget_mb:
                reason = f"predicted {pred_mb:.0f} MiB exceeds the memory budget {st.budget_mb:.0f} MiB"
    elif flops and st.matmul:
        ideal = flops / (st.matmul * 1e9) * (cfg.warmup + 2)
        if ideal > timeout:
            reason = f"needs {ideal:.0f} s even at the full matmul rate; timeout {timeout:.0f} s"
    if reason is None and est_mb is not None and est_mb > st.budget_mb and (prev is None or not prev.get("peak_mb")):
        reason = f"estimated {est_mb:.0f} MiB exceeds the memory budget {st.budget_mb:.0f} MiB"
    return reason


def _run_case(st: _SweepState, key: tuple[str, str], rec: dict[str, Any], case: dict[str, Any],
              timeout: float) -> None:
    """Run the case in an isolated child and fill ``rec`` (times, memory, rates); a
    timeout, kill or OOM marks (mechanism, mode) dead for the larger N."""
    case["soft_timeout_s"] = max(1.0, 0.8 * timeout)
    res = run_isolated(_child, (case,), timeout, st.budget_mb)
    rec["status"] = res["status"]
    if res["status"] != "ok":
        rec["reason"] = res.get("reason", "")
        if res["status"] in ("timeout", "killed", "oom"):
            st.dead[key] = f"N={rec['n']} was {res['status']}: {res.get('reason', '')}"
        if st.log:
            st.log(f"{key[0]} N={rec['n']} {key[1]}: {res['status']}: {res.get('reason', '')}")
        return
    rec["time_s"] = _quantiles(res["times"])
    rec["peak_mb"] = res["peak_mb"]
    rec["rss_peak_mb"] = res["rss_peak_mb"]
    rec["params"] = res["params"]
    rec["setup_s"] = max(0.0, res["wall_s"] - sum(res["times"]) - res["warmup_s"] - res.get("peak_call_s", 0.0))
    if rec["flops"]:
        rec["gflops"] = rec["flops"] / rec["time_s"]["median"] / 1e9
        rec["frac_of_matmul"] = rec["gflops"] / st.matmul if st.matmul else None
    st.last_ok[key] = rec


def _document(st: _SweepState, plan: list[Case], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The result document of a sweep: schema, machine, config, conventions, records."""
    from longattn.bench import cases as C
    from longattn.bench import flops as Fl

    cfg = st.cfg
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(st.threads, st.matmul),
        "config": asdict(cfg),
        "flops_convention": (
            "forward = 4 * visible pairs * D for softmax attention (2 FLOPs per multiply-add); "
            f"train = {Fl.TRAIN_FACTOR:g} x forward (backward = 2 matmuls per forward matmul, no recomputation)"
        ),
        "settings": {c.label: (C.describe_settings(c.mechanism) if c.peer is None else C.PEERS[c.peer].note)
                     for c in plan},
        "elapsed_s": time.perf_counter() - st.t_start,
        "results": results,
        # peers that would have run beside their mechanism but are not installed:
        # listed in the report, never silently dropped
        "peers_missing": C.missing_peers(cfg.peers, C.mechanism_names(cfg.mechanisms) if cfg.peers is None else None),
        "peers_left_out": peers_left_out(cfg),
    }


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """time / time of dense SDPA (``full``) at the same N and mode."""
    dense = {(r["n"], r["mode"]): r["time_s"]["median"] for r in results
             if r["mechanism"] == "full" and r.get("status") == "ok"}
    for r in results:
        d = dense.get((r["n"], r["mode"]))
        if r.get("status") == "ok" and d:
            r["speedup_vs_full"] = d / r["time_s"]["median"]


def machine_info(threads: int, matmul: float | None) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_available_mb": available_mb(),
        "matmul_gflops": matmul,
    }


def write_json(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=_json_default))
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return repr(x)
