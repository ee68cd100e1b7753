"""longattn.distributed: sequence parallelism over gloo processes on this machine.

Each group of cases runs once in P spawned processes (file:// rendezvous); every rank
compares its shard of the output and of the gradients with the single-process call on
the whole sequence (float64), and the parametrized tests below read the verdicts.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
import traceback
import zlib

import pytest
import torch
import torch.multiprocessing as mp

from longattn import patterns as P_

B, H, D, DV = 2, 4, 8, 6


def _pattern_param():
    return P_.PerHead([P_.Local(6, 2) | P_.Strided(11), P_.GlobalTokens([1, 30]) | P_.Local(2, 2)])


# (name, mechanism, params): windows wider than a shard, windows reaching back more than one
# shard, strides and globals across shards; the shard lengths (37, 23) are multiples of no block
CASES = [
    ("local_wide_before", "local", dict(before=50, after=3)),
    ("local_wide_after", "local", dict(before=2, after=29)),
    ("local_small", "local", dict(before=4, after=4)),
    ("local_global_idx", "local", dict(before=3, after=1, global_idx=(5, 41))),
    ("dilated", "dilated", dict(radius=4, dilation=7)),
    ("strided", "strided", dict(stride=9)),
    ("global", "global", dict(indices=(0, 40, 71))),
    ("random", "random", dict(blocks_per_row=2, block=8, seed=1)),
    ("bigbird", "bigbird", dict(block=8, random_blocks=1, global_blocks=1, seed=2)),
    ("longformer", "longformer", dict(window=10, global_indices=(3, 50))),
    ("block_diagonal", "block_diagonal", dict(block=13)),
    ("st_strided", "sparse_transformer_strided", dict(l=9)),
    ("st_fixed", "sparse_transformer_fixed", dict(l=10, c=3)),
    ("pattern_per_head", "pattern", None),
    ("full", "full", {}),
    ("linear_elu", "linear", dict(chunk_size=8)),
    ("linear_relu", "linear", dict(feature_map="relu", chunk_size=5)),
    ("performer", "performer", dict(num_features=16, seed=3, chunk_size=7)),
]
SHARD = {2: 37, 4: 23}


def _inputs(N: int, seed: int, padded: bool):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, N, DV, generator=g, dtype=torch.float64)
    gout = torch.randn(B, H, N, DV, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.rand(B, N, generator=g) > 0.25
        mask[1, N // 2:] = False  # a whole tail padded: some shards see no real key
    return q, k, v, gout, mask


def _init(rank: int, world: int, path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # a bounded wait: a rank that fails mid-exchange makes the others raise, not hang
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=90))


def _one_case(mech, params, causal, padded, rank, world, n, seed):
    import longattn
    import longattn.distributed as ld

    N = n * world
    q, k, v, gout, mask = _inputs(N, seed, padded)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = longattn.attention(*full, mech, causal=causal, key_padding_mask=mask, **params)
    ref.backward(gout)
    sl = slice(rank * n, (rank + 1) * n)
    mine = [t[:, :, sl].clone().requires_grad_(True) for t in (q, k, v)]
    out = ld.attention(*mine, mech, causal=causal, key_padding_mask=None if mask is None else mask[:, sl],
                       **params)
    out.backward(gout[:, :, sl])
    errs = []
    for name, a, b in [("out", out, ref[:, :, sl])] + [
        (f"d{x}", m.grad, f.grad[:, :, sl]) for x, m, f in zip("qkv", mine, full)
    ]:
        if a is None or not torch.allclose(a, b, rtol=1e-9, atol=1e-10):
            diff = None if a is None else float((a - b).abs().max())
            errs.append(f"{name} differs on rank {rank} (max |diff| {diff})")
    return errs


def _worker(rank, world, path, result_dir, cases, extras):
    _init(rank, world, path)
    res = {}
    for key, mech, params, causal, padded in cases:
        if mech == "pattern":
            params = dict(pattern=_pattern_param())
        try:
            errs = _one_case(mech, params, causal, padded, rank, world, SHARD[world], seed=zlib.crc32(key.encode()) % 1000)
            res[key] = "; ".join(errs) or "ok"
        except Exception:  # noqa: BLE001 - reported to the parent
            res[key] = traceback.format_exc()
    for probe in extras:
        try:
            res.update(_PROBES[probe](rank, world))
        except Exception:  # noqa: BLE001 - reported to the parent
            res[probe] = traceback.format_exc()
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()


def _spawn(fn, world, args, timeout=600.0):
    """Run fn(rank, world, rendezvous, *args) in `world` processes; kill them after `timeout` s."""
    tmp = tempfile.mkdtemp(prefix="longattn-dist-")
    path = os.path.join(tmp, "rendezvous")
    ctx = mp.start_processes(fn, args=(world, path, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish in {timeout} s (deadlock?)")


def _run_cases(world, cases, extras):
    out = tempfile.mkdtemp(prefix="longattn-dist-res-")
    _spawn(_worker, world, (out, cases, extras))
    per_rank = []
    for r in range(world):
        with open(os.path.join(out, f"{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


# at P = 4, the cases where more than two shards matter run by default, the rest with -m slow
P4_FAST = ("local_wide_before", "local_wide_after", "strided", "global", "bigbird", "pattern_per_head",
           "full", "linear_elu", "performer")


def _keys(world, slow=False):
    keys = []
    for name, mech, params in CASES:
        if world == 4 and (name in P4_FAST) == slow:
            continue
        for causal in (False, True):
            padded = name not in ("local_small", "linear_relu")
            keys.append((f"{name}-{'causal' if causal else 'bidir'}-P{world}", mech, params, causal, padded))
    if not slow:
        keys.append((f"full-bidir-nopad-P{world}", "full", {}, False, False))
        keys.append((f"full-causal-nopad-P{world}", "full", {}, True, False))
        keys.append((f"performer-causal-nopad-P{world}", "performer", dict(num_features=16, seed=3), True, False))
    return keys


_RESULTS: dict[tuple, list[dict]] = {}
_EXTRAS = {2: ("errors", "mismatch", "model", "math", "recurrent", "two_models"), 4: ("bytes",)}


def _results(world, slow=False):
    if (world, slow) not in _RESULTS:
        _RESULTS[world, slow] = _run_cases(world, _keys(world, slow), () if slow else _EXTRAS[world])
    return _RESULTS[world, slow]


def _check(key, slow):
    world = int(key.rsplit("P", 1)[1])
    verdicts = [res[key] for res in _results(world, slow)]
    bad = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v != "ok"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("key", [k[0] for k in _keys(2)] + [k[0] for k in _keys(4)])
def test_shards_equal_single_process(key):
    _check(key, False)


@pytest.mark.slow
@pytest.mark.parametrize("key", [k[0] for k in _keys(4, slow=True)])
def test_shards_equal_single_process_more_at_4(key):
    _check(key, True)


# ------------------------------------------------------------------------------ communication


def _bytes_probe(rank, world):
    import longattn.distributed as ld

    res = {}
    for n in (64, 256):  # equally aligned to the engine's tiles (needed_keys may round up to a tile)
        q, k, v, gout, _ = _inputs(n * world, 0, False)
        sl = slice(rank * n, (rank + 1) * n)
        mine = [t[:, :, sl].clone().requires_grad_(True) for t in (q, k, v)]
        ld.reset_comm_stats()
        ld.attention(*mine, "local", before=20, after=20).backward(gout[:, :, sl])
        res[f"local-{n}"] = ld.comm_stats()["received"]
        ld.reset_comm_stats()
        ld.attention(*mine, "linear", causal=True).backward(gout[:, :, sl])
        res[f"linear-{n}"] = ld.comm_stats()["received"]
        ld.reset_comm_stats()
        ld.attention(*mine, "full", causal=False).sum().backward()
        res[f"full-{n}"] = ld.comm_stats()["received"]
    return res


def _error_probe(rank, world):
    import longattn.distributed as ld

    res = {}
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    try:
        ld.attention(q, q, q, "lsh")
        res["unsupported"] = "no error"
    except ValueError as e:
        res["unsupported"] = str(e)
    n = 8 + rank  # unequal shards
    x = torch.randn(1, 2, n, 4, dtype=torch.float64)
    try:
        ld.attention(x, x, x, "local", before=2, after=2)
        res["unequal"] = "no error"
    except ValueError as e:
        res["unequal"] = str(e)
    return res


def _model_probe(rank, world):
    """A Transformer's loss and parameter gradients, sequence parallel vs one process."""
    import torch.nn.functional as F

    import longattn.distributed as ld
    from longattn.model import ModelConfig, Transformer

    def loss_fn(logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                               reduction="sum")

    res = {}
    N = 2 * 29 + 1  # not a multiple of the world size: the batch is padded
    for name, mech, params, head, pos in [
        ("model-local", "local", dict(before=20, after=3), "tokens", "learned"),
        ("model-full", "full", {}, "lm", "sinusoidal"),
        ("model-linear", "linear", {}, "lm", "sinusoidal"),
        ("model-retention", "retention", dict(chunk_size=8), "lm", "sinusoidal"),
        ("model-bigbird", "bigbird", dict(block=8, random_blocks=1), "tokens", "sinusoidal"),
    ]:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=11, max_len=64, dim=16, depth=2, heads=2, mechanism=mech,
                          mechanism_params=params, head=head, num_classes=5, pos=pos)
        model = Transformer(cfg).double()
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 11, (2, N), generator=g)
        y = torch.randint(0, 5 if head == "tokens" else 11, (2, N), generator=g)
        y[0, :7] = -100
        ref = loss_fn(model(x), y)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        loss = ld.sequence_parallel_loss(model, x, None, y, loss_fn)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        flat = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                          for gr, p in zip(grads, model.parameters())])
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(flat)
        ref_flat = torch.cat([gr.reshape(-1) for gr in ref_grads])
        ok = torch.allclose(total, ref, rtol=1e-10) and torch.allclose(flat, ref_flat, rtol=1e-8, atol=1e-10)
        res[name] = "ok" if ok else f"loss {float(total)} vs {float(ref)}, grad diff {float((flat - ref_flat).abs().max())}"
        assert not hasattr(model, "embed") or "embed" not in model.__dict__  # restored
    return res


def _math_probe(rank, world):
    """The ring with the plain-tensor block kernels (what devices without the CPU flash kernel run)."""
    from longattn.distributed import ring

    ring.FORCE_MATH, saved = True, ring._MATH_ROWS
    ring._MATH_ROWS = 4 * B * H * SHARD[world]  # several query chunks per block
    try:
        return {f"math-{c}-{p}": "; ".join(_one_case("full", {}, c, p, rank, world, SHARD[world], 7)) or "ok"
                for c in (False, True) for p in (False, True)}
    finally:
        ring.FORCE_MATH, ring._MATH_ROWS = False, saved


def _two_models_probe(rank, world):
    """Two models of one config in one process, one inside sequence_parallel: the other
    (in this thread, and the parallel one in another thread) runs as one process, and
    nothing is assigned to longattn.registry or to the model (issue 30 step 4)."""
    import threading

    import longattn.distributed as ld
    from longattn import api
    from longattn.model import ModelConfig, Transformer

    def build(seed):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=11, max_len=64, dim=16, depth=1, heads=2, mechanism="local",
                          mechanism_params=dict(before=5, after=2), head="tokens", num_classes=3, pos="learned")
        return Transformer(cfg).double().eval()

    par, plain = build(0), build(1)
    n = 13
    x = torch.randint(0, 11, (2, n * world), generator=torch.Generator().manual_seed(2))
    sl = slice(rank * n, (rank + 1) * n)
    with torch.no_grad():
        want_par, want_plain, want_plain_shard = par(x), plain(x), plain(x[:, sl])
        run, box = api.run, {}
        with ld.sequence_parallel(par) as sp:
            untouched = api.run is run and "embed" not in vars(par)
            got_plain, got_plain_shard = plain(x), plain(x[:, sl])
            other = threading.Thread(target=lambda: box.update(out=par(x)))
            other.start()
            other.join()
            got_par = par(x[:, sl])
        untouched = untouched and api.run is run and "embed" not in vars(par)
    checks = {
        "two-models-parallel": torch.allclose(got_par, want_par[:, sl], rtol=1e-10, atol=1e-12),
        "two-models-plain": torch.equal(got_plain, want_plain),
        "two-models-plain-shard-not-offset": torch.equal(got_plain_shard, want_plain_shard),
        "two-models-other-thread": "out" in box and torch.equal(box["out"], want_par),
        "two-models-registry-untouched": untouched and sp.calls == 1,
    }
    return {k: "ok" if v else "failed" for k, v in checks.items()}


_PROBES = {"bytes": _bytes_probe, "errors": _error_probe, "model": _model_probe, "math": _math_probe,
           "two_models": _two_models_probe}


@pytest.mark.parametrize("name", ["two-models-parallel", "two-models-plain", "two-models-plain-shard-not-offset",
                                  "two-models-other-thread", "two-models-registry-untouched"])
def test_two_models_one_sequence_parallel_one_not(name):
    for r, res in enumerate(_results(2)):
        assert res.get(name) == "ok", f"rank {r}: {res.get(name, res.get('two_models'))}"


def test_sequence_parallel_assigns_no_attribute_of_another_module():
    """The routing is scoped (contextvars), not a monkeypatch: no module of
    longattn.distributed assigns to registry/api attributes (api.run...), a model's embed,
    or uses setattr."""
    import pathlib
    import re

    import longattn.distributed as ld

    root = pathlib.Path(ld.__file__).parent
    assert root.name == "distributed", root
    for path in root.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*[\w.]*\b((registry|api)\.\w+|embed)\s*=", text, re.M), path
        assert "setattr(" not in text, path


def test_bytes_received_do_not_grow_with_n_for_local_and_linear():
    world = 4
    for r, res in enumerate(_results(world)):
        assert "local-64" in res, res.get("bytes")
        row = (D + DV) * 8 * B * H  # one K|V row of every head, float64
        assert 0 < res["local-64"] == res["local-256"], res
        # a halo of 20 rows (at most a tile more) on each inner side, forward and backward
        sides = (r > 0) + (r < world - 1)
        assert res["local-64"] <= 2 * sides * (20 + 32) * row + 4096, res
        assert res["linear-64"] == res["linear-256"] > 0, res
        assert res["full-256"] > 3 * res["full-64"], res  # the ring does move whole blocks


def test_clear_errors_for_unsupported_mechanism_and_unequal_shards():
    for res in _results(2):
        assert "unsupported" in res, res.get("errors")
        assert "'lsh'" in res["unsupported"] and "supported" in res["unsupported"] and "full" in res["unsupported"]
        assert "equal shards" in res["unequal"] and "[8, 9]" in res["unequal"], res["unequal"]


@pytest.mark.parametrize("name", ["model-local", "model-full", "model-linear", "model-retention",
                                  "model-bigbird"])
def test_transformer_sequence_parallel_loss_and_gradients_equal_one_process(name):
    for r, res in enumerate(_results(2)):
        assert res.get(name) == "ok", f"rank {r}: {res.get(name, res.get('model'))}"


@pytest.mark.parametrize("name", [f"math-{c}-{p}" for c in (False, True) for p in (False, True)])
def test_ring_with_plain_tensor_block_kernels(name):
    for r, res in enumerate(_results(2)):
        assert res.get(name) == "ok", f"rank {r}: {res.get(name, res.get('math'))}"


def _mismatch_probe(rank, world):
    """Calls whose mechanism, parameters, causal or dtype differ between the ranks, on a
    subgroup with a short timeout: a regression (a hang in a collective) fails here in
    seconds, not at the world group's 90 s."""
    import longattn.distributed as ld

    sub = torch.distributed.new_group(list(range(world)), timeout=datetime.timedelta(seconds=10))
    x = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    y = x if rank == 0 else x.float()
    calls = {
        "dtype": lambda: ld.attention(y, y, y, "local", before=2, after=1, group=sub),
        "mechanism": lambda: (ld.attention(x, x, x, "local", before=2, group=sub) if rank else
                              ld.attention(x, x, x, "full", group=sub)),
        "before": lambda: ld.attention(x, x, x, "local", before=2 + rank, after=0, group=sub),
        "causal": lambda: ld.attention(x, x, x, "local", causal=bool(rank), before=2, after=0, group=sub),
        "unsupported_on_one": lambda: ld.attention(x, x, x, "lsh" if rank else "local", before=2, group=sub),
        "agree": lambda: ld.attention(x, x, x, "local", before=2, after=0, group=sub).shape,
    }
    res = {}
    for name, call in calls.items():
        try:
            res[f"mismatch-{name}"] = f"no error {call()}"
        except ValueError as e:
            res[f"mismatch-{name}"] = str(e)
    return res


_PROBES["mismatch"] = _mismatch_probe


def test_ranks_that_disagree_raise_the_same_error_on_every_rank():
    """Issue 29: a dtype mismatch aborted one rank (gloo EnforceNotMet) while the other
    returned; another mechanism per rank hung; another before/causal was accepted.
    Now every rank raises one ValueError naming the field and the ranks."""
    res = [{k: v for k, v in r.items() if k.startswith("mismatch")} for r in _results(2)]
    assert res[0] and res[0] == res[1], res  # the same message on both ranks
    assert res[0]["mismatch-agree"] == "no error torch.Size([1, 2, 9, 4])", res[0]
    for name, needles in [
        ("dtype", ["q, k, v dtypes", "rank 0: torch.float64", "rank 1: torch.float32"]),
        ("mechanism", ["mechanism", "rank 0: 'full'", "rank 1: 'local'", "parameter before", "(not given)"]),
        ("before", ["parameter before", "rank 0: 2", "rank 1: 3"]),
        ("causal", ["causal", "rank 0: False", "rank 1: True"]),
        ("unsupported_on_one", ["mechanism", "rank 1: 'lsh'"]),
    ]:
        msg = res[0][f"mismatch-{name}"]
        assert "disagree" in msg and all(t in msg for t in needles), (name, msg)


def test_needs_an_initialised_group():
    import longattn.distributed as ld

    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="process group"):
        ld.attention(q, q, q, "local")
    with pytest.raises(ValueError, match="supported"):
        ld.attention(q, q, q, "sinkhorn")


# ------------------------------------------------------------------------------ memory


def _peak_probe(rank, world, path, result_dir, N):
    """Peak RSS above rest of one forward + backward of local attention (513 keys)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import longattn
    import longattn.distributed as ld

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=1800))
    n = N // world

    def call(m):
        g = torch.Generator().manual_seed(rank)
        q, k, v, gout = (torch.randn(1, 8, m, 64, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        fn = ld.attention if world > 1 else longattn.attention
        fn(q, k, v, "local", before=256, after=256).backward(gout)

    call(2048)  # warm-up: kernels, allocator, gloo buffers

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    rest = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    call(n)
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump({"peak": status("VmHWM:") - rest}, f)
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_per_rank_peak_is_below_half_the_single_process_peak():
    N = 262144
    peaks = {}
    for world in (1, 4):
        out = tempfile.mkdtemp(prefix="longattn-dist-mem-")
        _spawn(_peak_probe, world, (out, N), timeout=1800)
        peaks[world] = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.json")) as f:
                peaks[world].append(json.load(f)["peak"])
    single = peaks[1][0]
    assert single > 200 * 2**20, peaks  # q, k, v, their gradients, out: 64 MiB each at least
    assert max(peaks[4]) < single / 2, peaks


# ------------------------------------------------------------------------------ training


def _train_losses(tmp, name, extra, nproc):
    import socket
    import subprocess
    import sys

    args = ["-m", "longattn", "train", "--task", "copy", "--task-option", "n_train=128", "--task-option",
            "n_val=16", "--task-option", "n_test=16", "--mechanism", "local", "--param", "before=24",
            "--param", "after=0", "--layers", "2", "--dim", "32", "--heads", "2", "--steps", "6", "--batch", "4",
            "--log-every", "1", "--eval-every", "1000", "--ckpt-every", "1000", "--no-progress", "--seed", "3",
            "--out", str(tmp / name), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    out = []
    with open(tmp / name / "log.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split", "train") == "train" and "loss" in rec:
                out.append(rec["loss"])
    return out


@pytest.mark.slow
def test_train_sequence_parallel_loss_curve_equals_one_process(tmp_path):
    one = _train_losses(tmp_path, "one", [], 1)
    two = _train_losses(tmp_path, "two", ["--sequence-parallel"], 2)
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)


# ------------------------------------------------------------------------------ recurrent family

RECURRENT = ("gated_delta", "kda", "ssd", "gla", "retention")


def _recurrent_inputs(kind, N, padded):
    """q, k, v, dO and the gates of ``kind`` (g and beta per token; retention's gamma per head)."""
    from longattn.ops.recurrent import KINDS

    q, k, v, gout, mask = _inputs(N, zlib.crc32(kind.encode()) % 1000, padded)
    g = torch.Generator().manual_seed(5)
    spec = KINDS[kind]
    if kind == "retention":
        return q, k, v, gout, mask, {"gamma": torch.rand(H, generator=g, dtype=torch.float64) * 0.5 + 0.45}
    shape = (B, H, N, D) if spec.per_channel else (B, H, N)
    gates = {"g": -0.3 * torch.rand(*shape, generator=g, dtype=torch.float64)}
    if spec.delta:
        gates["beta"] = torch.rand(B, H, N, generator=g, dtype=torch.float64)
    return q, k, v, gout, mask, gates


def _recurrent_case(kind, padded, rank, world, n):
    """Outputs and the gradients of q, k, v and the gates, shard vs the single-process call."""
    import longattn
    import longattn.distributed as ld

    q, k, v, gout, mask, gates = _recurrent_inputs(kind, n * world, padded)
    sl = slice(rank * n, (rank + 1) * n)
    full = {**{x: t.clone().requires_grad_(True) for x, t in zip("qkv", (q, k, v))},
            **{a: t.clone().requires_grad_(True) for a, t in gates.items()}}
    ref = longattn.attention(full["q"], full["k"], full["v"], kind, causal=True, key_padding_mask=mask,
                             chunk_size=8, **{a: full[a] for a in gates})
    ref.backward(gout)
    # per-token tensors are sharded like q; retention's gamma [H] is the same on every rank
    mine = {a: (t if t.dim() == 1 else t[:, :, sl]).clone().requires_grad_(True) for a, t in
            {**dict(zip("qkv", (q, k, v))), **gates}.items()}
    out = ld.attention(mine["q"], mine["k"], mine["v"], kind, causal=True, chunk_size=8,
                       key_padding_mask=None if mask is None else mask[:, sl], **{a: mine[a] for a in gates})
    out.backward(gout[:, :, sl])
    errs = []
    for name, a, b in [("out", out, ref[:, :, sl])] + [(f"d{x}", mine[x].grad, full[x].grad) for x in mine]:
        if b.dim() == 1:  # a shared parameter: its gradient is the sum over ranks
            a = a.clone()
            torch.distributed.all_reduce(a)
        elif name != "out":
            b = b[:, :, sl]
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-10):
            errs.append(f"{name} differs on rank {rank} (max |diff| {float((a - b).abs().max())})")
    return errs


def _recurrent_probe(rank, world):
    import longattn.distributed as ld

    res = {f"recurrent-{kind}-{'pad' if padded else 'nopad'}":
           "; ".join(_recurrent_case(kind, padded, rank, world, SHARD[world])) or "ok"
           for kind in RECURRENT for padded in (False, True)}
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    try:
        ld.attention(q, q, q, "gated_delta", causal=False)
        res["recurrent-bidir"] = "no error"
    except ValueError as e:
        res["recurrent-bidir"] = str(e)
    return res


_PROBES["recurrent"] = _recurrent_probe


@pytest.mark.parametrize("name", [f"recurrent-{k}-{p}" for k in RECURRENT for p in ("nopad", "pad")])
def test_recurrent_state_passes_along_the_ranks(name):
    """The recurrent family sequence parallel (issue 33 item 5): each rank's (T, M) state
    map composed over the ranks before it; outputs and every gradient (q, k, v, g, beta,
    gamma) equal the single-process call on 2 gloo ranks, float64, with padded keys."""
    for r, res in enumerate(_results(2)):
        assert res.get(name) == "ok", f"rank {r}: {res.get(name, res.get('recurrent'))}"


def test_recurrent_sequence_parallel_is_causal_only():
    for res in _results(2):
        assert "causal" in res["recurrent-bidir"], res["recurrent-bidir"]


def test_routed_calls_reach_only_their_owners_layers_and_end_with_the_block():
    """api.routed (what sequence_parallel uses) in one process: a layer of the routed
    model goes to the runner, the same layer type of another model does not, nothing
    after the block; model.sequence_shard checks its index."""
    from longattn import api
    from longattn.layers.attention import MultiHeadAttention
    from longattn.model import ModelConfig, Transformer, sequence_shard

    torch.manual_seed(0)
    a, b = MultiHeadAttention(8, 2, "local", before=2, after=1), MultiHeadAttention(8, 2, "local", before=2, after=1)
    x = torch.randn(1, 7, 8)
    seen = []

    def runner(spec, call, q, k, v, *, causal, key_padding_mask, segment_ids, params=None):
        seen.append(spec.name)
        return torch.zeros_like(q)

    want_b = b(x)
    with api.routed(list(a.groups), runner):
        assert torch.equal(a(x), a.out_proj(torch.zeros_like(x)))
        assert torch.equal(b(x), want_b)
    assert seen == ["local"] and not torch.equal(a(x), a.out_proj(torch.zeros_like(x)))
    with pytest.raises(TypeError, match="runner"):
        with api.routed(list(a.groups), None):
            pass
    model = Transformer(ModelConfig(vocab_size=5, max_len=16, dim=8, depth=1, heads=2, head="tokens", num_classes=2))
    with pytest.raises(ValueError, match="index"):
        with sequence_shard(model, -1):
            pass
