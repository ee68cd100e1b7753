"""Steps split out of long functions and duplicated blocks (issue 30): the atomic
write train.py shares, split_block_mask_for's forwarded options, the benchmark's
skip prediction. Independent references: hand-computed numbers, the pattern's
dense mask."""

from __future__ import annotations

import pytest
import torch

from longattn._atomic import atomic_write
from longattn.bench import harness
from longattn.patterns import make


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write(path, lambda f: f.write("old"), binary=False)

    def broken(f):
        f.write("half of the n")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken, binary=False)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"


def test_split_block_mask_for_forwards_block_mask_for_options():
    flex = pytest.importorskip("longattn.ops.flex")
    if not flex.flex_available():  # pragma: no cover
        pytest.skip("this torch has no FlexAttention")
    p = make("local", before=5, after=3)
    n, nq = 50, 21
    sbm = flex.split_block_mask_for(p, n, 1, causal=True, block=8, q_len=nq, heavy_min_blocks=10**9)
    want = p.mask(n, 1, causal=True)[0, n - nq:]  # bottom-right queries
    assert sbm.heavy_q_blocks.numel() == 0 and sbm.heavy_k_blocks.numel() == 0
    assert torch.equal(flex.expand_block_mask(sbm.block_mask)[0, 0], want)
    with pytest.raises(TypeError, match="blok"):
        flex.split_block_mask_for(p, n, 1, blok=8)


def _state(**cfg) -> harness._SweepState:
    return harness._SweepState(harness.BenchConfig(mem_budget_mb=1000.0, timeout_s=100.0, **cfg), threads=1,
                               budget_mb=1000.0, matmul=10.0, t_start=0.0, log=None)


def test_skip_reason_predicts_from_the_previous_size():
    st = _state(warmup=1)
    key = ("local", "fwd")
    case = {"warmup": 1}
    assert harness._skip_reason(st, key, {"flops": 1e9, "est_mb": 10.0}, case, 500.0, 100.0) is None  # 0.3 s at 10 GFLOP/s
    why = harness._skip_reason(st, key, {"flops": 1e12, "est_mb": 10.0}, case, 500.0, 100.0)
    assert why.startswith("needs 300 s even at the full matmul rate")  # 1e12 / 1e10 x (1 + 2)
    st.last_ok[key] = {"n": 1000, "flops": 1e9, "time_s": {"median": 2.0}, "setup_s": 1.0, "peak_mb": 50.0,
                       "est_mb": 10.0}
    # 2 s x 40 x 1.5 (margin) x 3 calls + 1 s setup = 361 s > 100 s
    why = harness._skip_reason(st, key, {"flops": 4e10, "est_mb": 10.0}, case, 500.0, 100.0)
    assert why.startswith("predicted 361 s (from N=1000")
    why = harness._skip_reason(st, key, {"flops": 1e9, "est_mb": 300.0}, case, 500.0, 100.0)
    assert why == "predicted 1500 MiB exceeds the memory budget 1000 MiB"  # 50 MiB x 300 / 10
    assert harness._skip_reason(st, key, {"flops": 1e9, "est_mb": 1.0}, case, 0.5, 0.5) == "time budget of the run spent"
    st.dead[key] = "N=1000 was oom"
    assert harness._skip_reason(st, key, {"flops": 1.0, "est_mb": 1.0}, case, 500.0, 100.0) == "N=1000 was oom"
