"""Suite: per-task mechanism parameters, tables, and a tiny end-to-end quick run."""

from __future__ import annotations

import json
import os

import pytest
import torch

from longattn import registry, suite
from longattn.registry import Mechanism, Param


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _fake(name: str, **caps) -> Mechanism:
    def fn(q, k, v, *, causal, key_padding_mask, scale, **params):  # pragma: no cover - never called
        return v

    return Mechanism(name=name, fn=fn, **caps)


def test_mechanism_params_come_from_the_table(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "fake_lowrank",
                        _fake("fake_lowrank", causal=False, params=(Param("max_len", registry.REQUIRED), Param("k", 8))))
    monkeypatch.setitem(registry._REGISTRY, "fake_2d",
                        _fake("fake_2d", params=(Param("height", registry.REQUIRED), Param("width", registry.REQUIRED), Param("radius_h", 1))))
    monkeypatch.setitem(suite.MECHANISM_PARAMS, "fake_lowrank", {"max_len": "{seq_len}", "k": 4})
    monkeypatch.setitem(suite.MECHANISM_PARAMS, "fake_2d", {"height": "{side}", "width": "{side}"})
    lo = suite.task_info("listops", {"max_len": 100})
    pf = suite.task_info("pathfinder", {"size": 16})
    cp = suite.task_info("copy", {"length": 5})
    assert (lo.seq_len, lo.side, pf.seq_len, pf.side, cp.causal) == (100, None, 256, 16, True)

    params, why = suite.mechanism_params("fake_lowrank", lo)
    assert params == {"max_len": 100, "k": 4} and why == ""
    monkeypatch.setitem(suite.MECHANISM_PARAMS, "fake_lowrank", {"max_len": "{seq_len}", "junk": 1})
    with pytest.raises(ValueError, match="junk"):  # a misspelt key is not silently dropped
        suite.mechanism_params("fake_lowrank", lo)
    monkeypatch.setitem(suite.MECHANISM_PARAMS, "fake_lowrank", {"max_len": "{seq_len}", "k": 4})
    params, why = suite.mechanism_params("fake_lowrank", cp)
    assert params is None and "cannot be causal" in why
    assert suite.mechanism_params("fake_2d", pf)[0] == {"height": 16, "width": 16}
    params, why = suite.mechanism_params("fake_2d", lo)
    assert params is None and "height" in why
    assert suite.mechanism_params("full", cp) == ({}, "")


def test_every_table_entry_is_a_declared_parameter():
    for name, table in suite.MECHANISM_PARAMS.items():
        declared = {p.name for p in registry.get(name).params}
        assert set(table) <= declared, (name, set(table) - declared)


def test_markdown_table_marks_baseline_skips_and_failures():
    recs = [
        {"task": "listops", "mechanism": "full", "status": "ok", "test_acc": 0.40, "majority_baseline": 0.17,
         "train_time_s": 12.0, "peak_mem_mb": 30.0, "tokens_per_s": 1000.0},
        {"task": "listops", "mechanism": "weak", "status": "ok", "test_acc": 0.10, "majority_baseline": 0.17,
         "train_time_s": 10.0, "peak_mem_mb": 20.0, "tokens_per_s": 900.0},
        {"task": "copy", "mechanism": "full", "status": "ok", "test_acc": 0.9, "majority_baseline": 0.06,
         "train_time_s": 5.0, "peak_mem_mb": 10.0, "tokens_per_s": 800.0},
        {"task": "copy", "mechanism": "weak", "status": "skipped", "reason": "weak cannot be causal"},
    ]
    md = suite.markdown(recs)
    assert "| full | **40.0** | **90.0** | 65.0 |" in md
    assert "| weak | 10.0 | n/a |  |" in md
    assert "| *majority class* | 17.0 | 6.0 | |" in md
    assert "copy / weak: skipped: weak cannot be causal" in md


def test_table_shows_std_over_seeds_or_the_binomial_error():
    ok = dict(status="ok", majority_baseline=0.17, train_time_s=1.0, peak_mem_mb=1.0, tokens_per_s=1.0)
    recs = [{"task": "listops", "mechanism": "full", "seed": s, "test_acc": a, "test_items": 1000, **ok}
            for s, a in ((0, 0.40), (1, 0.42))]
    md = suite.markdown(recs)
    assert "| full | **41.0** +- 1.4 | 41.0 |" in md and "standard deviation over 2 seeds" in md
    one = suite.markdown(recs[:1])  # one seed: sqrt(0.4 * 0.6 / 1000) = 1.5 points
    assert "| full | **40.0** +- 1.5 | 40.0 |" in one and "binomial standard error" in one
    assert suite.binomial_se(0.5, 10000) == pytest.approx(0.005)


def test_seeds_run_each_pair_several_times(tmp_path):
    cfg = suite.SuiteConfig(tasks=["recall"], mechanisms=["full"], quick=True, steps=1, seeds=2, seed=5,
                            out=str(tmp_path), progress=False)
    recs = suite.run_suite(cfg)
    assert [(r["seed"], r["status"]) for r in recs] == [(5, "ok"), (6, "ok")]
    assert recs[0]["test_items"] > 0 and (tmp_path / "runs" / "recall" / "full" / "seed6" / "result.json").is_file()
    assert "standard deviation over 2 seeds" in (tmp_path / "results.md").read_text()


def test_quick_suite_end_to_end(tmp_path):
    cfg = suite.SuiteConfig(tasks=["recall", "copy"], mechanisms=["full", "linear"], quick=True, steps=2,
                            out=str(tmp_path), progress=False)
    recs = suite.run_suite(cfg)
    assert [(r["task"], r["mechanism"], r["status"]) for r in recs] == [
        ("recall", "full", "ok"), ("recall", "linear", "ok"), ("copy", "full", "ok"), ("copy", "linear", "ok")]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["results"]) == 4 and saved["config"]["quick"] is True
    for r in saved["results"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["steps"] == 2 and r["train_time_s"] > 0
        assert 0.0 < r["majority_baseline"] < 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| mechanism | recall | copy | avg |" in md and "*majority class*" in md
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    train_recs, val_recs = suite.read_log(tmp_path / "runs" / "recall" / "full" / "seed0")
    assert train_recs[-1]["step"] == 2 and [r["step"] for r in val_recs] == [2]
    for t in ("recall", "copy"):  # the learning curves drawn from those logs
        assert (tmp_path / f"curves_{t}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # two interpreter start-ups (~20 s on a busy 2-core machine)
def test_isolated_run_in_a_subprocess(tmp_path):
    cfg = suite.SuiteConfig(quick=True, steps=2, out=str(tmp_path), progress=False, isolate=True)
    rec = suite.run_one("recall", "full", cfg, tmp_path / "run")
    assert rec["status"] == "ok", rec
    assert rec["steps"] == 2 and rec["peak_mem_mb"] > 0


def test_quick_leaves_pathfinder_out_unless_asked():
    assert suite.suite_tasks(suite.SuiteConfig()) == list(suite.DEFAULT_TASKS)
    assert "pathfinder" in suite.DEFAULT_TASKS
    assert suite.suite_tasks(suite.SuiteConfig(quick=True)) == ["listops", "recall", "copy", "digits"]
    assert suite.suite_tasks(suite.SuiteConfig(quick=True, tasks=["pathfinder"])) == ["pathfinder"]


def test_unknown_names_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        suite.run_suite(suite.SuiteConfig(tasks=["recall"], mechanisms=["nope"], out=str(tmp_path)))
    with pytest.raises(ValueError, match="nada"):
        suite.run_suite(suite.SuiteConfig(tasks=["nada"], mechanisms=["full"], out=str(tmp_path)))


def test_resume_reuses_only_finished_runs_with_the_same_settings(tmp_path, monkeypatch):
    cfg = suite.SuiteConfig(tasks=["recall"], mechanisms=["full", "linear"], quick=True, steps=2,
                            out=str(tmp_path), progress=False)
    first = suite.run_suite(cfg)
    # "linear" was interrupted: its run directory has no result.json.
    (tmp_path / "runs" / "recall" / "linear" / "seed0" / "result.json").unlink()
    import longattn.train as train_mod

    calls = []
    real = train_mod.train

    def counting(tc):
        calls.append(tc.mechanism)
        return real(tc)

    monkeypatch.setattr(train_mod, "train", counting)
    cfg.resume = True
    again = suite.run_suite(cfg)
    assert calls == ["linear"]  # full reused, linear trained again
    assert again[0]["resumed"] and again[0]["test_acc"] == first[0]["test_acc"]
    assert not again[1].get("resumed") and again[1]["status"] == "ok"
    # Other settings: nothing is reused.
    calls.clear()
    cfg.steps = 3
    suite.run_suite(cfg)
    assert calls == ["full", "linear"]


def test_job_layout_shares_the_cores():
    assert suite.job_layout(None, True, cpus=2) == (2, 1)  # one single-thread run per core
    assert suite.job_layout(None, True, cpus=16) == (4, 4)
    assert suite.job_layout(3, True, cpus=2) == (3, 1)
    assert suite.job_layout(1, True, cpus=8) == (1, 8)
    assert suite.job_layout(None, False, cpus=2) == (1, 2)  # in-process runs go one at a time
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs"):
            suite.job_layout(bad, True, cpus=2)
    with pytest.raises(ValueError, match="jobs=2"):
        suite.job_layout(2, False, cpus=2)


def test_parallel_runs_keep_the_table_order(tmp_path, monkeypatch):
    import threading
    import time as time_mod

    seen = []
    lock = threading.Lock()

    def fake_run_one(task, mech, cfg, run_dir, seed=None, threads=None):
        if mech == "full":  # the first run finishes last
            time_mod.sleep(0.5)
        with lock:
            seen.append((task, mech, seed, threads, cfg.progress))
        return {"task": task, "mechanism": mech, "seed": seed, "status": "ok", "test_acc": 0.5,
                "majority_baseline": 0.1, "test_items": 100, "train_time_s": 1.0, "peak_mem_mb": 1.0,
                "tokens_per_s": 1.0, "steps": 1}

    monkeypatch.setattr(suite, "run_one", fake_run_one)
    cfg = suite.SuiteConfig(tasks=["recall", "copy"], mechanisms=["full", "linear", "linformer"], quick=True,
                            steps=1, out=str(tmp_path), progress=False, isolate=True, jobs=2)
    recs = suite.run_suite(cfg)
    # linformer cannot be causal: copy plans it once (run_one reports the skip)
    assert [(r["task"], r["mechanism"]) for r in recs] == [
        ("recall", "full"), ("recall", "linear"), ("recall", "linformer"),
        ("copy", "full"), ("copy", "linear"), ("copy", "linformer")]
    assert [s[:2] for s in seen] != [(r["task"], r["mechanism"]) for r in recs]  # finished out of order
    assert {s[3] for s in seen} == {max(1, (os.cpu_count() or 1) // 2)}
    assert not any(s[4] for s in seen)  # no per-run progress bars interleaved
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["mechanism"] for r in saved["results"]][:3] == ["full", "linear", "linformer"]


def test_side_by_side_runs_take_the_longest_ready_run_first(tmp_path, monkeypatch):
    import time as time_mod

    events = []

    def fake_prepare(cfg, task):
        if task == "recall":
            time_mod.sleep(0.3)  # recall's data is late: copy's runs go first
        events.append(("data", task))

    def fake_run_one(task, mech, cfg, run_dir, seed=None, threads=None):
        events.append((task, mech))
        return {"task": task, "mechanism": mech, "seed": seed, "status": "ok", "test_acc": 0.5,
                "majority_baseline": 0.1, "test_items": 10, "train_time_s": 1.0, "peak_mem_mb": 1.0,
                "tokens_per_s": 1.0, "steps": 1}

    monkeypatch.setattr(suite, "_prepare_data", fake_prepare)
    monkeypatch.setattr(suite, "run_one", fake_run_one)
    monkeypatch.setattr(suite, "_run_cost", lambda task, cfg: {"copy": 10.0, "recall": 1.0}[task])
    cfg = suite.SuiteConfig(tasks=["recall", "copy"], mechanisms=["full", "linear"], quick=True, steps=1,
                            out=str(tmp_path), progress=False, isolate=True, jobs=2)
    recs = suite.run_suite(cfg)
    assert events == [("data", "copy"), ("copy", "full"), ("copy", "linear"), ("data", "recall"),
                      ("recall", "full"), ("recall", "linear")]
    assert [(r["task"], r["mechanism"]) for r in recs] == [
        ("recall", "full"), ("recall", "linear"), ("copy", "full"), ("copy", "linear")]


def test_new_families_get_cpu_params_and_sit_out_only_where_they_cannot_run():
    for name in ("topk_blocks", "nsa", "gated_delta"):
        assert name in suite.DEFAULT_MECHANISMS and name in suite.MECHANISM_PARAMS
    for task in suite.DEFAULT_TASKS:
        info = suite.task_info(task, suite.budget(task, False)[0])
        for name in ("topk_blocks", "nsa"):  # both have a non-causal form: every task
            params, why = suite.mechanism_params(name, info)
            assert params == suite.MECHANISM_PARAMS[name] and why == "", (task, name)
        params, why = suite.mechanism_params("gated_delta", info)
        if task in ("copy", "recall"):  # copy is causal; recall is read left to right
            assert params == suite.MECHANISM_PARAMS["gated_delta"] and why == "", task
        else:
            assert params is None and "causal only" in why, task
        want = True if task == "recall" else None
        assert suite.causal_model("gated_delta", info) is want and suite.causal_model("full", info) is None


def test_causal_only_mechanism_trains_on_recall_with_a_causal_model(tmp_path):
    cfg = suite.SuiteConfig(tasks=["recall", "digits"], mechanisms=["gated_delta"], quick=True, steps=1,
                            out=str(tmp_path), progress=False)
    rec, skipped = suite.run_suite(cfg)
    assert rec["status"] == "ok" and "left to right" in rec["causal_model"], rec
    saved = json.loads((tmp_path / "runs" / "recall" / "gated_delta" / "seed0" / "result.json").read_text())
    assert saved["config"]["causal"] is True
    assert skipped["status"] == "skipped" and "causal only" in skipped["reason"]
    assert "recall / gated_delta: read left to right" in (tmp_path / "results.md").read_text()
    from longattn.train import TrainConfig, build_model
    from longattn import tasks

    spec = tasks.get("recall")
    tc = TrainConfig(task="recall", mechanism="full", causal=True, layers=1, dim=16, heads=2).resolved()
    model = build_model(tc, spec.make_config(), spec.kind)
    assert model.cfg.is_causal
