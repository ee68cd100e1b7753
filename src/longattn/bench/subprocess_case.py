"""Measure one importable case function in a fresh process, through the sweep's harness.

The scripts under ``benchmarks/`` compare things the registry sweep does not hold
(peers with their own call conventions, whole models, decode steps, packed rows). Each
writes its cases as plain functions and measures them here::

    from longattn.bench.subprocess_case import case_ref, run_case

    def case(n: int) -> Callable[[], None]:      # builds the inputs (not measured) ...
        q, k, v = ...
        return lambda: attention(q, k, v)        # ... and returns the step to measure

    r = run_case(case_ref(__file__, "case"), {"n": 4096}, threads=2, warmup=1, repeats=3)
    r["time_s"]["median"], r["peak_mb"]

A case function may also return ``(step, extra)``: ``extra`` (a JSON-able dict, e.g. the
useful FLOPs of the case) comes back as ``r["extra"]``; it is read after the last call, so
a step may record into it (e.g. the time of its forward part).

How it measures is :mod:`longattn.bench.harness`'s (its module docstring): the child is
forked from the harness's forkserver (torch and longattn already imported) and watched by
:func:`~longattn.bench.harness.run_isolated` (timeout, resident-memory budget); in it,
``warmup`` untimed calls, one peak-memory call (``peak_mb``: MiB the call adds to the
resident set at its peak, inputs not counted), then ``repeats`` timed calls
(``repeats=0``: the peak call is the only, timed, call). ``rss_peak_mb`` is the whole
process's high-water mark (inputs, model and libraries included).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from longattn.bench import harness as H

__all__ = ["case_ref", "load_target", "reset_peak", "resident_mb", "run_case"]


def case_ref(file: str | os.PathLike[str], function: str) -> str:
    """The target string of ``function`` defined in the script ``file``:
    ``"/abs/path/script.py:function"`` (pass a script's ``__file__``)."""
    return f"{Path(file).resolve()}:{function}"


def resident_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB: the resident set now and its high-water
    mark (Linux /proc; NaN elsewhere), as the harness reads them."""
    return H._status_kb("VmRSS") / 1024, H._status_kb("VmHWM") / 1024


def reset_peak() -> bool:
    """Reset this process's high-water mark to its resident set now (``clear_refs``), for
    a process that measures itself (e.g. one rank of a distributed run); False where the
    kernel does not allow it."""
    return H._reset_peak()


def load_target(target: str) -> Callable[..., Any]:
    """The function named by ``target``: ``"package.module:function"`` or
    ``"path/to/file.py:function"`` (the file is loaded as a module of its own name, so
    its ``if __name__ == "__main__"`` block does not run). ValueError on a malformed
    target, AttributeError/ImportError where the function or module is missing."""
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"target must be 'module:function' or 'file.py:function', got {target!r}")
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        mod_name = f"_longattn_case_{Path(where).stem}"
        module = sys.modules.get(mod_name)
        if module is None or getattr(module, "__file__", None) != where:
            spec = importlib.util.spec_from_file_location(mod_name, where)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load a module from {where!r}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"target {target!r} names {type(fn).__name__}, not a function")
    return fn


def _measure(step: Callable[[], Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, the peak call and the timed calls of ``step`` (harness semantics)."""
    if opts["repeats"] == 0:
        for _ in range(opts["warmup"]):
            step()
        seconds, peak_mb = H._peak_call(step)
        return {"times": [seconds], "peak_mb": peak_mb}
    case = {"soft_timeout_s": opts["timeout_s"], "warmup": opts["warmup"], "min_repeats": opts["repeats"],
            "max_repeats": opts["repeats"], "min_time_s": 0.0, "allocator": opts["allocator"]}
    res = H._timed(step, case)
    return {"times": res["times"], "peak_mb": res["peak_mb"]}


def _case_child(target: str, kwargs: dict[str, Any], opts: dict[str, Any], result_path: str) -> None:
    """Child side: build the case, measure it, write the JSON result to ``result_path``."""
    import torch

    out: dict[str, Any]
    try:
        torch.set_num_threads(opts["threads"])
        torch.manual_seed(0)
        made = load_target(target)(**kwargs)
        step, extra = made if isinstance(made, tuple) else (made, {})
        out = {"status": "ok", **_measure(step, opts), "rss_peak_mb": H._status_kb("VmHWM") / 1024,
               "extra": extra}
    except MemoryError as e:  # pragma: no cover - depends on the machine
        out = {"status": "oom", "reason": f"MemoryError: {e}"[:300]}
    except Exception as e:  # noqa: BLE001 - reported to the script, which prints it
        out = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:1000],
               "traceback": traceback.format_exc()[-3000:]}
    with open(result_path, "w") as f:
        json.dump(out, f, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else repr(x))


def run_case(
    target: str, kwargs: dict[str, Any] | None = None, *, threads: int = 1, warmup: int = 1,
    repeats: int = 3, timeout_s: float = 1800.0, mem_limit_mb: float = 0.0, allocator: str = "reuse",
) -> dict[str, Any]:
    """Run the case function ``target`` (see :func:`load_target`) with ``kwargs`` in a
    fresh process and measure the step it returns (module docstring).

    Args:
        target: ``"module:function"`` or ``"file.py:function"`` (:func:`case_ref`).
        kwargs: keyword arguments of the case function (picklable).
        threads: torch threads in the child (>= 1).
        warmup: untimed calls before the peak call (>= 0).
        repeats: timed calls after it (>= 0; 0: the peak call is the timed one).
        timeout_s: the child is killed past this many seconds (> 0).
        mem_limit_mb: ... or past this resident memory (0: no limit).
        allocator: ``"reuse"`` or ``"strict"`` glibc settings of the timed calls (harness).

    Returns:
        ``{"status": "ok", "time_s": {"median", "min", "max", "q1", "q3", "repeats"},
        "times", "peak_mb", "rss_peak_mb", "extra", "wall_s"}``, or ``{"status":
        "error" | "timeout" | "killed" | "oom", "reason", ...}``. Cost: one process start
        (a fork of the forkserver) plus the case's own work.
    """
    for name, value, low in (("threads", threads, 1), ("warmup", warmup, 0), ("repeats", repeats, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    if allocator not in ("reuse", "strict"):
        raise ValueError(f"allocator must be 'reuse' or 'strict', got {allocator!r}")
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"target must be 'module:function' or 'file.py:function', got {target!r}")
    opts = {"threads": threads, "warmup": warmup, "repeats": repeats, "timeout_s": 0.8 * timeout_s,
            "allocator": allocator}
    res = H.run_isolated(_case_child, (target, dict(kwargs or {}), opts), timeout_s, mem_limit_mb)
    if res.get("status") == "ok":
        res["time_s"] = H._quantiles(res["times"])
    return res
