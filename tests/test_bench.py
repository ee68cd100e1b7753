"""The benchmark harness, the FLOP counts, the error meter and the demo (all small)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from longattn import patterns as P
from longattn.bench import cases, flops, harness, report
from longattn.bench.error import ErrorConfig, error_curve, measure

D = 64


# ----------------------------------------------------------------------- FLOPs


def test_local_pairs_by_hand():
    # local(before=2, after=1) at N=8: row i sees j in [i-2, i+1] clipped to [0, 7].
    # rows 2..6 see 4 keys; row 0 sees {0,1} (loses 2), row 1 sees {0,1,2} (loses 1),
    # row 7 sees {5,6,7} (loses 1): 8*4 - 2 - 1 - 1 = 28.
    assert flops.pattern_pairs(P.Local(2, 1), 8, 1, causal=False) == 28
    # causal: j in [i-2, i]: rows 0, 1 see 1, 2 keys; rows 2..7 see 3: 1 + 2 + 6*3 = 21
    assert flops.pattern_pairs(P.Local(2, 1), 8, 1, causal=True) == 21
    # 4 FLOPs per pair per feature (2 for q.k, 2 for p*v), times heads
    got = flops.forward_flops("local", {"before": 2, "after": 1}, n=8, batch=1, heads=3, dim=D)
    assert got == 4 * 28 * D * 3


def test_strided_and_longformer_pairs_by_hand():
    # strided(3) at N=7: residue classes {0,3,6}, {1,4}, {2,5} -> 9 + 4 + 4 = 17
    assert flops.pattern_pairs(P.Strided(3), 7, 1, causal=False) == 17
    # longformer(window=1, global 0) at N=5: band rows 2,3,3,3,2 = 13; the global row 0
    # adds keys 2,3,4 (+3); the global column adds key 0 to rows 2,3,4 (+3) -> 19
    pat = P.longformer(window=1, global_indices=(0,))
    assert flops.pattern_pairs(pat, 5, 2, causal=False) == 2 * 19
    # full causal at N=8: 8*9/2 = 36 pairs
    assert flops.forward_flops("full", {}, n=8, batch=2, heads=1, dim=D, causal=True) == 2 * 4 * 36 * D


def test_bigbird_block_count_by_hand():
    # N=8, blocks of 2 (4 blocks), no random blocks, 1 global block.
    # window |qb-kb| <= 1: 2 + 3 + 3 + 2 = 10 block pairs; global block 0 adds
    # (qb0: kb2, kb3) + (qb2: kb0) + (qb3: kb0) = 4 -> 14 blocks * 4 pairs = 56
    params = {"block": 2, "random_blocks": 0, "global_blocks": 1, "seed": 0}
    got = flops.forward_flops("bigbird", params, n=8, batch=1, heads=2, dim=D)
    assert got == 4 * 56 * D * 2


@pytest.mark.parametrize("name", ["local", "dilated", "strided", "longformer", "bigbird", "random",
                                  "sparse_transformer_strided", "sparse_transformer_fixed", "global"])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_pair_counts_equal_the_dense_mask(name, causal):
    n, heads = 300, 4
    params = cases.settings(name, n, heads, D)
    shrink = {"local": dict(before=7, after=3), "dilated": dict(radius=5, dilation=3),
              "strided": dict(stride=17), "longformer": dict(window=9, global_indices=(0,)),
              "bigbird": dict(block=16, random_blocks=2, global_blocks=1, seed=0),
              "random": dict(blocks_per_row=3, block=16, seed=1), "global": dict(indices=(0, 7, 299)),
              "sparse_transformer_strided": dict(l=16), "sparse_transformer_fixed": dict(l=16, c=4)}
    params.update(shrink[name])
    pat = cases.pattern_of(name, params)
    want = int(pat.mask(n, heads, causal).sum())
    got = flops.forward_flops(name, params, n=n, batch=1, heads=heads, dim=D, causal=causal)
    assert got == 4 * want * D


def test_train_flops_convention():
    assert flops.case_flops("train", 10.0) == 10.0 * flops.TRAIN_FACTOR
    assert flops.case_flops("fwd", 10.0) == 10.0
    assert flops.case_flops("fwd", None) is None


# ----------------------------------------------------------------------- harness


def _tiny_cfg(**kw):
    base = dict(mechanisms=["full", "local"], peers=[], ns=[128], modes=["fwd", "train"], threads=1,
                warmup=1, min_repeats=1, max_repeats=2, min_time_s=0.0, timeout_s=60, matmul_n=128)
    base.update(kw)
    return harness.BenchConfig(**base)


def test_harness_tiny_writes_schema_and_plots(tmp_path):
    import matplotlib.image as mpimg

    from longattn.bench.cli import write_bench

    doc = harness.sweep(_tiny_cfg(), progress=False)
    paths = write_bench(doc, tmp_path)
    data = json.loads(paths["json"].read_text())
    for key in report.BENCH_KEYS:
        assert key in data, key
    assert data["schema"] == "longattn.bench" and data["version"] == harness.SCHEMA_VERSION
    assert data["machine"]["matmul_gflops"] > 0
    assert len(data["results"]) == 4
    for r in data["results"]:
        for key in report.RESULT_KEYS:
            assert key in r, key
        assert r["status"] == "ok", r
        assert r["time_s"]["min"] <= r["time_s"]["median"] <= r["time_s"]["max"]
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0
        assert r["gflops"] > 0 and r["flops"] > 0
    local = [r for r in data["results"] if r["mechanism"] == "local"]
    assert all("speedup_vs_full" in r for r in local)
    for name in ("bench_time", "bench_memory"):
        p = paths[name]
        assert p.stat().st_size > 1000
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100
    md = paths["markdown"].read_text()
    assert "| `local` |" in md and "bench_time.png" in md


def test_harness_skips_what_cannot_fit():
    # synthesizer at N=4096 holds N x N scores per head: over a 50 MiB budget, so it is
    # skipped before running (no process is started for it)
    doc = harness.sweep(_tiny_cfg(mechanisms=["synthesizer"], ns=[4096], modes=["fwd"], mem_budget_mb=50),
                        progress=False)
    (r,) = doc["results"]
    assert r["status"] == "skipped" and "memory budget" in r["reason"]


def test_harness_respects_the_run_deadline():
    # a run whose time budget is spent skips (and lists) what it could not start
    doc = harness.sweep(_tiny_cfg(deadline_s=1e-3), progress=False)
    assert doc["results"] and all(r["status"] == "skipped" for r in doc["results"])
    assert all("time budget" in r["reason"] for r in doc["results"])


def test_isolated_case_timeout_and_memory_watchdog():
    case = {"mechanism": "full", "peer": None, "n": 2048, "mode": "train", "batch": 1, "heads": 8, "dim": 64,
            "dtype": "float32", "causal": False, "threads": 1, "warmup": 50, "min_repeats": 50,
            "max_repeats": 50, "min_time_s": 100.0, "soft_timeout_s": 100.0}
    res = harness.run_isolated(harness._child, (case,), timeout_s=1.0, mem_limit_mb=0.0)
    assert res["status"] == "timeout"
    res = harness.run_isolated(harness._child, (case,), timeout_s=60.0, mem_limit_mb=1.0)
    assert res["status"] == "killed" and "budget" in res["reason"]


# ----------------------------------------------------------------------- error meter


def test_error_meter_exact_zero_and_approximations_improve():
    doc = measure(ErrorConfig(n=256, heads=2, dim=16, exact_n=128, threads=1,
                              mechanisms=["full", "local", "strided", "bigbird", "performer", "nystrom", "lsh"]))
    exact = {(r["mechanism"], r["input"]): r["rel_error"] for r in doc["exact"]}
    assert {m for m, _ in exact} == {"full", "local", "strided", "bigbird"}
    assert max(exact.values()) < 1e-12
    # approximations: positive error, falling with the budget (fixed seed)
    perf = dict(error_curve(doc, "performer", "local"))
    assert perf[16] > perf[1024] > 0
    nys = dict(error_curve(doc, "nystrom", "local"))
    assert nys[4] > nys[16] > nys[64] > 0
    lsh = dict(error_curve(doc, "lsh", "gaussian"))
    assert lsh[1] > lsh[8] > 0
    for r in doc["approximate"]:
        assert r["rel_error"] is not None and r["rel_error"] > 0


def test_error_meter_catches_a_wrong_mechanism():
    # the meter must be able to fail: a "local" whose outputs are 1% off
    from longattn.bench import error as E
    from longattn.registry import get

    spec = get("local")
    real = spec.fn

    def broken(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return out * 0.99

    object.__setattr__(spec, "fn", broken)
    try:
        doc = E.measure(E.ErrorConfig(n=64, heads=1, dim=8, exact_n=64, mechanisms=["local"], threads=1))
    finally:
        object.__setattr__(spec, "fn", real)
    assert min(r["rel_error"] for r in doc["exact"]) > 1e-3


# ----------------------------------------------------------------------- demo and CLI


def test_demo_tiny_end_to_end(tmp_path):
    from longattn.bench.cli import demo

    page = demo(tmp_path / "report", tiny=True, progress=False, budget_s=60)
    text = page.read_text()
    out = page.parent
    for f in ("bench.json", "error.json", "bench_time.png", "bench_memory.png", "error.png"):
        assert (out / f).stat().st_size > 0, f
        assert f in text
    assert "## Speed and memory" in text and "## Approximation error" in text
    err = json.loads((out / "error.json").read_text())
    for key in report.ERROR_KEYS:
        assert key in err


def test_cli_registers_commands():
    from longattn.cli import build_parser

    p = build_parser()
    a = p.parse_args(["bench", "--n", "128,256", "--mode", "fwd", "--mechanisms", "local,full"])
    assert a.n == [128, 256] and a.mode == ["fwd"] and a.mechanisms == ["local", "full"]
    assert p.parse_args(["demo", "--tiny"]).tiny
    assert p.parse_args(["error", "--n", "64"]).n == 64
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--mode", "backward"])


def test_unknown_mechanism_is_refused():
    with pytest.raises(ValueError, match="nope"):
        cases.mechanism_names(["local", "nope"])
    with pytest.raises(ValueError, match="nope"):
        cases.peer_names(["nope"])


def test_every_registered_mechanism_has_a_bench_setting():
    from longattn.registry import names

    for name in names():
        params = cases.settings(name, 256, 8, D)  # raises if a required parameter is missing
        assert isinstance(params, dict)


def test_inputs_have_requested_shape():
    q, k, v = cases.make_inputs(1, 2, 16, 8, torch.float32, train=True)
    assert q.shape == (1, 2, 16, 8) and q.requires_grad


# ----------------------------------------------------------------------- peers compute the same thing


@pytest.mark.parametrize("name", cases.FLEX_PATTERNS)
def test_flex_mask_mods_equal_our_patterns(name):
    # the FlexAttention peer is handed the same visible set as our mechanism
    n, heads = 700, 8
    mm = cases._flex_mask_mod(name, n, heads)
    i = torch.arange(n)[None, :, None]
    j = torch.arange(n)[None, None, :]
    h = torch.arange(heads)[:, None, None]
    got = mm(0, h, i, j).expand(heads, n, n)
    want = cases.pattern_of(name, cases.settings(name, n, heads, D)).mask(n, heads)
    assert torch.equal(got, want)


def test_local_attention_peer_equals_local():
    pytest.importorskip("local_attention")
    from longattn.ops.reference import dense_attention

    # N a multiple of the window (as in the benchmark): local-attention's autopad path
    # lets the last rows see padding otherwise
    n, heads, d = 768, 2, 16
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=False)
    peer = cases.PEERS["local-attention"].build(n, heads, d, False)
    s = cases.settings("local", n, heads, d)
    mask = cases.pattern_of("local", s).mask(n, 1)
    ref = dense_attention(q.double(), k.double(), v.double(), mask=mask)
    assert torch.allclose(peer(q, k, v).double(), ref, atol=1e-4)


def test_missing_peers_are_listed_not_dropped(monkeypatch):
    from longattn.bench import cases as C
    from longattn.bench.report import skipped_table

    import dataclasses

    gone = dataclasses.replace(C.PEERS["performer-pytorch"], available=lambda: False)
    monkeypatch.setitem(C.PEERS, "performer-pytorch", gone)
    assert "performer-pytorch" in C.missing_peers(None, ["performer", "local"])
    assert "performer-pytorch" not in C.missing_peers(None, ["local"])  # its mechanism is not benchmarked
    table = skipped_table({"results": [], "peers_missing": ["performer-pytorch"]})
    assert "performer-pytorch" in table and "not installed" in table


def test_short_runs_list_missing_peers_and_peers_that_cannot_run(monkeypatch):
    """make demo / bench --quick ask for every peer of their mechanisms, installed or
    not, so a missing one reaches the report; a peer without a causal form or a
    backward is listed with the reason instead of vanishing from the plan."""
    import dataclasses

    from longattn.bench import cases as C
    from longattn.bench import harness
    from longattn.bench.report import skipped_table

    gone = dataclasses.replace(C.PEERS["performer-pytorch"], available=lambda: False)
    monkeypatch.setitem(C.PEERS, "performer-pytorch", gone)
    peers = C.short_run_peers(["local", "performer"])
    assert "performer-pytorch" in peers and "flex:local" in peers and "flex:dilated" not in peers
    missing = C.missing_peers(peers)
    assert "performer-pytorch" in missing and all(not C.PEERS[p].available() for p in missing)
    fwd_only = dataclasses.replace(C.PEERS["local-attention"], available=lambda: True, modes=("fwd",),
                                   causal=False)
    monkeypatch.setitem(C.PEERS, "local-attention", fwd_only)
    cfg = harness.BenchConfig(mechanisms=["local"], peers=["local-attention"], modes=("fwd", "train"))
    assert harness.peers_left_out(cfg) == [
        {"peer": "local-attention", "modes": "train", "reason": harness.peers_left_out(cfg)[0]["reason"]}]
    assert "fwd only" in harness.peers_left_out(cfg)[0]["reason"]
    cfg.causal = True
    left = harness.peers_left_out(cfg)
    assert left[0]["reason"] == "no causal form"
    table = skipped_table({"results": [], "peers_missing": [], "peers_left_out": left})
    assert "local-attention" in table and "no causal form" in table


def _count_calls(case_kw, warm_s_per_call=0.0):
    calls = []

    def step():
        calls.append(1)
        time.sleep(warm_s_per_call)

    case = dict(warmup=1, min_repeats=3, max_repeats=3, min_time_s=0.0, soft_timeout_s=60.0)
    case.update(case_kw)
    res = harness._timed(step, case)
    return len(calls), res


def test_timed_calls_warm_up_then_peak_then_timed():
    # warm-up 1 + the peak call + 3 timed calls; the peak call's time is not a timed one
    n, res = _count_calls({})
    assert n == 5 and len(res["times"]) == 3 and res["warmup_s"] >= 0
    # a slow case (warm-up over 2 * min_time_s) in adaptive mode: one timed call after the peak call
    n, res = _count_calls(dict(adaptive_repeats=True, min_time_s=0.01), warm_s_per_call=0.03)
    assert n == 3 and len(res["times"]) == 1
    # strict: the peak call is that one timed call (no third call)
    n, res = _count_calls(dict(adaptive_repeats=True, min_time_s=0.01, allocator="strict"), warm_s_per_call=0.03)
    assert n == 2 and len(res["times"]) == 1 and res["times"][0] >= 0.03


def test_peak_call_sees_a_buffer_the_step_allocates():
    """The peak is the resident growth during one call: a 64 MiB buffer written in the call
    shows (mapped afresh above glibc's 32 MiB threshold even without the strict setting)."""
    import torch

    def step():
        torch.ones(16 << 20)  # 64 MiB

    _, peak = harness._peak_call(step)
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 <= peak < 200


def test_report_says_which_allocator_timed_the_calls(tmp_path):
    doc = harness.sweep(_tiny_cfg(mechanisms=["local"], modes=["fwd"], allocator="strict"), progress=False)
    assert doc["config"]["allocator"] == "strict"
    assert "`--allocator strict`" in report.bench_markdown(doc)
    doc["config"]["allocator"] = "reuse"
    assert "reuse freed buffers" in report.bench_markdown(doc)


def test_selection_pair_count_by_hand_and_by_the_mechanism():
    # causal, N=10, blocks of 4, top-1: rows 0-3 see their own block causally (1+2+3+4);
    # rows 4-7 own (10) + block 0 (4 each: 16); rows 8-9 own (1+2) + one block of 4 (8): 47
    assert flops._block_pairs_selected(10, 4, 1, causal=True) == 10 + 26 + 11
    # the mechanism itself: with v = identity each output row is its attention weights
    from longattn.api import attention

    n = 10
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, n, 8, generator=g), torch.randn(1, 1, n, 8, generator=g)
    w = attention(q, k, torch.eye(n)[None, None], "topk_blocks", causal=True, block=4, topk=1)
    assert int((w > 0).sum()) == 47
    got = flops.forward_flops("topk_blocks", {"block": 4, "topk": 1}, n=n, batch=1, heads=1, dim=D, causal=True)
    gate = 2 * n * 3 * D // 2  # q . block mean over the 3 blocks, causal half
    assert got == gate + 4 * 47 * D


def test_error_meter_measures_topk_blocks_and_names_why_others_sit_out():
    doc = measure(ErrorConfig(n=200, heads=2, dim=16, threads=1, inputs=("local",),
                              mechanisms=["topk_blocks", "gated_delta", "nsa"]))
    err = dict(error_curve(doc, "topk_blocks", "local"))
    # 200 / 32 -> 7 blocks: top-1 < top-2 < top-4 in accuracy; top-8 selects every block = exact
    assert err[1] > err[2] > err[4] > 1e-6
    assert err[8] < 1e-12 and err[32] < 1e-12
    reasons = {s["mechanism"]: s["reason"] for s in doc["skipped"]}
    assert "recurrent" in reasons["gated_delta"] and "gated sum" in reasons["nsa"]
