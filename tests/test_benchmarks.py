"""longattn.bench.subprocess_case: the scripts' way of measuring one case function in a
fresh process through the harness (benchmarks/*.py)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import pytest
import torch

from longattn.bench.subprocess_case import case_ref, load_target, run_case

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory reads /proc")


def buffer_case(mib: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """A step that fills a fresh ``mib`` MiB buffer and counts its calls in ``extra``."""
    extra: dict[str, Any] = {"calls": 0}

    def step() -> None:
        torch.ones(mib * 2**20 // 4, dtype=torch.float32).add_(1.0)
        extra["calls"] += 1

    return step, extra


def failing_case() -> Callable[[], None]:
    raise KeyError("no such setting 7")


def test_run_case_measures_the_step_in_a_child_process():
    r = run_case(case_ref(__file__, "buffer_case"), {"mib": 48}, warmup=1, repeats=2, timeout_s=120)
    assert r["status"] == "ok", r
    assert r["time_s"]["repeats"] == 2 and r["time_s"]["min"] <= r["time_s"]["median"] <= r["time_s"]["max"]
    assert r["extra"]["calls"] == 1 + 1 + 2  # warm-up, the peak call, two timed calls (recorded after them)
    assert 40 <= r["peak_mb"] <= 150  # the 48 MiB buffer (+ torch's add), not the interpreter
    assert r["rss_peak_mb"] > r["peak_mb"]


def test_run_case_reports_errors_and_refuses_bad_arguments():
    r = run_case(case_ref(__file__, "failing_case"), repeats=0, timeout_s=120)
    assert r["status"] == "error" and "KeyError" in r["reason"] and "no such setting 7" in r["reason"]
    with pytest.raises(ValueError, match="target"):
        run_case("no_colon_here")
    with pytest.raises(ValueError, match="repeats"):
        run_case(case_ref(__file__, "buffer_case"), {"mib": 1}, repeats=-1)
    with pytest.raises(ValueError, match="allocator"):
        run_case(case_ref(__file__, "buffer_case"), {"mib": 1}, allocator="lazy")


def test_load_target_reads_modules_and_script_files():
    assert load_target("longattn.bench.subprocess_case:case_ref") is case_ref
    fn = load_target(case_ref(__file__, "failing_case"))
    assert fn.__name__ == "failing_case" and fn.__module__ == "_longattn_case_test_benchmarks"
