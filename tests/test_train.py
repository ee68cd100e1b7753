"""Trainer: exact resume, refusal of damaged checkpoints, data order, torchrun parity."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longattn import train as T

TINY_TASK = dict(num_keys=8, num_values=8, pairs=4, queries=4, seq_len=24, n_train=64, n_val=32, n_test=32)


def tiny(out: Path | None, **kw) -> T.TrainConfig:
    base = dict(task="recall", task_options=dict(TINY_TASK), mechanism="full", layers=1, dim=16, heads=2,
                steps=6, batch=8, lr=3e-3, warmup=2, dropout=0.1, eval_every=3, ckpt_every=2, log_every=1,
                out=str(out) if out else None, progress=False, seed=3)
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    full = T.train(tiny(tmp_path / "a"))
    # "killed" after step 5: the last checkpoint is step 4, step 5 is lost
    stopped = T.train(tiny(tmp_path / "b", stop_after=5))
    assert stopped == {"stopped_at": 5}
    assert T.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 4
    resumed = T.train(tiny(tmp_path / "b", resume=True))
    _states_equal(full["model"].state_dict(), resumed["model"].state_dict())
    assert resumed["test_acc"] == full["test_acc"] and resumed["steps"] == 6
    # the log of the resumed run is the log of the uninterrupted one (minus timings)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("time", "tokens_per_s")}
                       for l in open(p)]  # noqa: E731
    assert strip(tmp_path / "a" / "log.jsonl") == strip(tmp_path / "b" / "log.jsonl")
    # and a different seed gives different weights (the comparison can fail)
    other = T.train(tiny(None, seed=4))
    assert not torch.equal(other["model"].head.weight, full["model"].head.weight)


def test_resume_refuses_other_settings(tmp_path):
    T.train(tiny(tmp_path, steps=2, ckpt_every=2))
    with pytest.raises(ValueError, match="settings differ.*dim"):
        T.train(tiny(tmp_path, steps=2, dim=32, resume=True))


def test_damaged_checkpoints_are_refused(tmp_path):
    T.train(tiny(tmp_path, steps=2, ckpt_every=2))
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    assert T.load_checkpoint(path)["step"] == 2

    path.write_bytes(good[: len(good) // 2])  # partial write
    with pytest.raises(T.CheckpointError, match="truncated"):
        T.load_checkpoint(path)
    with pytest.raises(T.CheckpointError, match="truncated"):  # the trainer refuses too, before training
        T.train(tiny(tmp_path, steps=2, ckpt_every=2, resume=True))

    flipped = bytearray(good)
    flipped[-100] ^= 0xFF  # one bit-rotted byte in the payload
    path.write_bytes(bytes(flipped))
    with pytest.raises(T.CheckpointError, match="corrupt"):
        T.load_checkpoint(path)

    path.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(T.CheckpointError, match="not a longattn checkpoint"):
        T.load_checkpoint(path)

    path.write_bytes(good.replace(b'"version": 1', b'"version": 9', 1))
    with pytest.raises(T.CheckpointError, match="version 9"):
        T.load_checkpoint(path)

    with pytest.raises(T.CheckpointError, match="no checkpoint"):
        T.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    T.save_checkpoint(path, {"w": torch.ones(3)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        T.save_checkpoint(path, {"w": torch.zeros(3)})
    assert torch.equal(T.load_checkpoint(path)["w"], torch.ones(3))  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_batch_order_is_a_function_of_seed_and_step():
    n, b = 10, 4
    seq = np.concatenate([T.batch_indices(s, n, b, seed=1) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert np.array_equal(T.batch_indices(3, n, b, 1), seq[12:16])
    assert not np.array_equal(T.batch_indices(0, n, b, 2), seq[:4])
    # two ranks' shards are disjoint and make up the global batch
    g = T.batch_indices(2, n, b, 1)
    assert sorted(np.concatenate([g[0::2], g[1::2]])) == sorted(g)


def test_evaluation_counts_every_row_once_in_any_length_order():
    """evaluate() walks the rows by length; its loss and accuracy equal a direct pass over
    each row on its own (no padding at all)."""
    import torch.nn.functional as F

    from longattn import tasks

    cfg = T.TrainConfig(task="listops", task_options=dict(min_len=8, max_len=40, n_train=8, n_val=37, n_test=8),
                        layers=1, dim=16, heads=2, steps=1, batch=4, progress=False).resolved()
    spec = tasks.get("listops")
    tcfg = spec.make_config(**cfg.task_options)
    data = tasks.load("listops", "val", config=tcfg)
    model = T.build_model(cfg, tcfg, "classify").eval()
    got = T.evaluate(model, T.Batches(data, torch.device("cpu")), T.Dist(), batch=5)
    losses, hits = [], []
    with torch.no_grad():
        for x, m, y in zip(data.x, data.mask, data.y):
            logits = model(torch.from_numpy(x[m])[None])
            losses.append(F.cross_entropy(logits, torch.tensor([int(y)])).item())
            hits.append(int(logits.argmax(-1).item() == y))
    assert got["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert got["acc"] == pytest.approx(float(np.mean(hits)))


def test_cli_arguments_parse():
    import argparse

    parser = argparse.ArgumentParser()
    T.add_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "--task", "listops", "--mechanism", "local,full", "--param", "x=3",
                              "--task-option", "min_len=10", "--steps", "7", "--out", "o"])
    cfg = T.config_from_args(args)
    assert cfg.mechanism == ["local", "full"] and cfg.mechanism_params == {"x": 3}
    assert cfg.task_options == {"min_len": 10} and cfg.steps == 7 and cfg.resolved().dim == 64
    with pytest.raises(ValueError, match="KEY=VALUE"):
        T.parse_kv(["nonsense"], "--param")


PF_TINY = dict(size=16, distractors=1, marker_token=True, n_train=16, n_val=8, n_test=8)


def test_aux_targets_add_their_weighted_mean_loss(tmp_path):
    """One step with ``aux_weight`` equals one hand-written AdamW step on
    CE(class) + w * mean CE(aux over labelled tokens), computed with torch directly."""
    import torch.nn.functional as F

    from longattn import tasks

    w = 0.5
    cfg = T.TrainConfig(task="pathfinder", task_options=dict(PF_TINY), layers=1, dim=16, heads=2, steps=1,
                        batch=4, lr=1e-2, warmup=1, aux_weight=w, eval_every=1, log_every=1, progress=False,
                        seed=2, out=str(tmp_path)).resolved()
    trained = T.train(cfg)["model"]
    assert trained.aux_head is not None and cfg.pos == "rope2d"

    spec = tasks.get("pathfinder")
    data = tasks.load("pathfinder", "train", config=spec.make_config(**PF_TINY))
    T.seed_everything(cfg.seed)
    model = T.build_model(cfg, spec.make_config(**PF_TINY), "classify")
    opt, sched = T.make_optimizer(model, cfg)
    idx = torch.from_numpy(T.batch_indices(0, len(data), cfg.batch, cfg.seed))
    x, y, aux = (torch.from_numpy(a)[idx] for a in (data.x, data.y, data.aux))
    logits, aux_logits = model.forward_with_aux(x)
    loss = F.cross_entropy(logits, y) + w * F.cross_entropy(aux_logits.reshape(-1, 2), aux.reshape(-1),
                                                            ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
    opt.step()
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    with torch.no_grad():
        T.seed_everything(cfg.seed)
        fresh = T.build_model(cfg, spec.make_config(**PF_TINY), "classify")
        want = F.cross_entropy(fresh.forward_with_aux(x)[1].reshape(-1, 2), aux.reshape(-1), ignore_index=-100)
    assert rec["aux_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_aux_weight_is_checked():
    with pytest.raises(ValueError, match="aux_weight must be a finite number >= 0, got -1"):
        T.train(tiny(None, aux_weight=-1.0))
    with pytest.raises(ValueError, match="task 'recall' gives no aux targets"):
        T.train(tiny(None, aux_weight=1.0))
    with pytest.raises(ValueError, match="aux_classes must be an int >= 0"):
        from longattn.model import ModelConfig

        ModelConfig(aux_classes=-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path):
    """2-process gloo data parallel == 1 process on the same global batch (losses and weights)."""
    kw = dict(dropout=0.0, steps=3, ckpt_every=3, eval_every=3)
    one = T.train(tiny(tmp_path / "one", **kw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "longattn", "train", "--task", "recall", "--mechanism", "full", "--layers", "1", "--dim", "16",
           "--heads", "2", "--steps", "3", "--batch", "8", "--lr", "3e-3", "--warmup", "2", "--seed", "3",
           "--eval-every", "3", "--ckpt-every", "3", "--log-every", "1", "--no-progress", "--device", "cpu",
           "--out", str(tmp_path / "two")]
    for k, v in TINY_TASK.items():
        cmd += ["--task-option", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [[json.loads(l) for l in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    train_losses = [[r["loss"] for r in log if "split" not in r] for log in logs]
    assert len(train_losses[0]) == 3
    np.testing.assert_allclose(train_losses[1], train_losses[0], rtol=1e-5, atol=1e-6)
    two = T.load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    for k, v in one["model"].state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)
    res = json.loads((tmp_path / "two" / "result.json").read_text())
    assert res["world_size"] == 2 and res["test_acc"] == pytest.approx(one["test_acc"], abs=1e-9)
