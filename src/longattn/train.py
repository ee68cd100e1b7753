"""Trainer: one task, one mechanism, reproducible, resumable, data parallel.

    longattn train --task listops --mechanism bigbird --steps 1500 --out runs/lo-bb
    longattn train --task listops --mechanism bigbird --out runs/lo-bb --resume
    torchrun --nproc_per_node 2 -m longattn train --task recall   # data parallel

What it guarantees:

- Reproducible: the seed fixes the weights, the data (the task's own ``data_seed``)
  and the data order. The global batch of step s is a pure function of
  (seed, s): the epoch-e permutation comes from ``numpy.random.default_rng([seed,
  e])``, so no loader state needs saving.
- Resumable: a checkpoint (model, optimizer, scheduler, step, best weights, RNG
  states of torch/numpy/python) is written every ``ckpt_every`` steps to a temporary
  file, fsynced and moved into place with ``os.replace``; its header carries a format
  version, the payload size and a SHA-256, and :func:`load_checkpoint` refuses a
  truncated or corrupt file with :class:`CheckpointError` before anything is
  loaded. ``--resume`` continues where a killed run stopped, to the same final
  weights as an uninterrupted run.
- Data parallel with no code change: under ``torchrun`` (``WORLD_SIZE`` > 1) every
  rank takes ``global_batch[rank::world]``, the loss is the sum over the rank's
  labelled items divided by the count over the *global* batch, and the gradients
  are summed across ranks (gloo on CPU, NCCL on GPU). The update therefore equals
  the single-process update on the same global batch, up to float summation order.
- Logged: ``log.jsonl`` (one JSON object per line: train records every
  ``log_every`` steps, eval records every ``eval_every`` steps), TensorBoard when
  installed, a tqdm bar (loss, accuracy, tokens/s) and ``result.json`` at the end
  (test accuracy at the best validation step, train time, peak memory, ...).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from longattn import tasks
from longattn._atomic import atomic_write
from longattn.tasks import IGNORE

# CPU-sized defaults per task (used where a TrainConfig field is None). Tuned so the
# whole default suite fits in about an hour on 2 cores (see longattn.suite).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "listops": dict(layers=2, dim=64, heads=4, steps=1200, batch=32, lr=2e-3, warmup=100, pool="mean"),
    # Pathfinder: 2D rotary positions (the pixel above is one relative rule, (-1, 0)) and the
    # flood-fill targets as a second loss; without rotary positions and the aux loss every
    # recipe tried stayed at chance (docs/suite.md, "Pathfinder").
    "pathfinder": dict(layers=2, dim=64, heads=4, steps=1200, batch=32, lr=2e-3, warmup=100, pool="mean",
                       pos="rope2d", aux_weight=1.0),
    "recall": dict(layers=2, dim=64, heads=4, steps=1200, batch=32, lr=2e-3, warmup=100),
    "copy": dict(layers=2, dim=64, heads=4, steps=1200, batch=32, lr=2e-3, warmup=100),
    "copy_masked": dict(layers=2, dim=64, heads=4, steps=1200, batch=32, lr=2e-3, warmup=100),
    # Digits: 1297 training images are few for attention without a spatial prior; learned
    # positions, lr 5e-3 and dropout 0.2 over 1000 steps take full attention from 44% (sinusoidal,
    # lr 2e-3, 400 steps) to 96% (docs/suite.md, "Digits")
    "digits": dict(layers=2, dim=64, heads=4, steps=1000, batch=32, lr=5e-3, warmup=50, pool="mean",
                   pos="learned", dropout=0.2),
}
GENERIC_DEFAULTS: dict[str, Any] = dict(layers=2, dim=64, heads=4, steps=1000, batch=32, lr=1e-3, warmup=100,
                                        pool="mean", pos="sinusoidal", aux_weight=0.0, dropout=0.0)

_HEAD_OF_KIND = {"classify": "classify", "tokens": "tokens", "lm": "lm"}

CKPT_MAGIC = b"LONGATTN-CHECKPOINT\n"
CKPT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or from another format version."""


@dataclass
class TrainConfig:
    """One training run. Fields left None take the task's default (:data:`TASK_DEFAULTS`)."""

    task: str = "listops"
    task_options: dict = field(default_factory=dict)  # overrides of the task config
    data_seed: int = 0
    mechanism: Any = "full"  # registry name or per-head list
    mechanism_params: dict = field(default_factory=dict)
    layers: int | None = None
    dim: int | None = None
    heads: int | None = None
    steps: int | None = None
    batch: int | None = None  # global batch (all ranks together)
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dropout: float | None = None  # None: the task's default
    pool: str | None = None
    pos: str | None = None  # positional encoding (longattn.model); None: the task's default
    aux_weight: float | None = None  # weight of the task's per-token aux targets (0 = off; None: task default)
    causal: bool | None = None  # causal attention; None: only for "lm" tasks (a recurrence reads any task causally)
    seed: int = 0
    eval_every: int = 200
    eval_batch: int = 128
    max_eval: int = 0  # evaluate on at most this many validation examples (0 = all)
    ckpt_every: int = 200
    log_every: int = 10
    out: str | None = None
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    sequence_parallel: bool = False  # ranks share every sequence (longattn.distributed), not the batch
    stop_after: int | None = None  # stop after this step without a final save (simulates a kill)

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the task's defaults."""
        d = {**GENERIC_DEFAULTS, **TASK_DEFAULTS.get(self.task, {})}
        vals = {k: (d[k] if getattr(self, k) is None and k in d else getattr(self, k))
                for k in (f.name for f in dataclasses.fields(self))}
        return TrainConfig(**vals)

    def model_signature(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed under this config."""
        keys = ("task", "task_options", "data_seed", "mechanism", "mechanism_params", "layers", "dim",
                "heads", "batch", "pool", "pos", "seed", "dropout", "steps", "lr", "warmup", "aux_weight")
        keys += ("causal",) if self.causal is not None else ()  # (older checkpoints have no such key)
        return json.loads(json.dumps({k: getattr(self, k) for k in keys}, default=str))


# ---------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=dev)


# ---------------------------------------------------------------- data order
def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Indices of the global batch of ``step``: consecutive slices of per-epoch permutations."""
    start = step * batch
    epoch, offset = divmod(start, n)
    out: list[np.ndarray] = []
    need = batch
    while need > 0:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset : offset + need]
        out.append(take)
        need -= len(take)
        epoch, offset = epoch + 1, 0
    return np.concatenate(out)


class Batches:
    """A task split as tensors; hands out (x, mask, y) for a set of indices."""

    def __init__(self, data: tasks.TaskData, device: torch.device) -> None:
        self.x = torch.from_numpy(data.x)
        self.mask = torch.from_numpy(data.mask)
        self.y = torch.from_numpy(data.y)
        self.lengths = self.mask.sum(1)
        self.padded = not bool(self.mask.all())
        self.device = device
        self.per_token = self.y.dim() == 2
        self.aux = None if data.aux is None else torch.from_numpy(data.aux)

    def __len__(self) -> int:
        return self.x.shape[0]

    def get(self, idx: np.ndarray, length: int) -> tuple[Tensor, Tensor | None, Tensor]:
        i = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        x = self.x[i, :length].to(self.device)
        mask = self.mask[i, :length].to(self.device) if self.padded else None
        y = self.y[i, :length] if self.per_token else self.y[i]
        return x, mask, y.to(self.device)

    def get_aux(self, idx: np.ndarray, length: int) -> Tensor:
        """Auxiliary targets [len(idx), length] of rows ``idx`` (IGNORE = none)."""
        if self.aux is None:
            raise ValueError("this split has no aux targets")
        return self.aux[torch.from_numpy(np.asarray(idx, dtype=np.int64)), :length].to(self.device)

    def trim(self, idx: np.ndarray) -> int:
        """Length covering every real token of the rows ``idx`` (padding beyond is dropped)."""
        return int(self.lengths[torch.from_numpy(np.asarray(idx, dtype=np.int64))].max()) if self.padded \
            else self.x.shape[1]

    def count(self, idx: np.ndarray) -> int:
        """Labelled items in rows ``idx`` (sequences, or labelled positions)."""
        if not self.per_token:
            return len(idx)
        return int((self.y[torch.from_numpy(np.asarray(idx, dtype=np.int64))] != IGNORE).sum())


# ---------------------------------------------------------------- model
def build_model(cfg: TrainConfig, task_cfg: Any, kind: str) -> nn.Module:
    from longattn.model import ModelConfig, Transformer

    mcfg = ModelConfig(
        vocab_size=task_cfg.vocab_size, max_len=task_cfg.seq_len, dim=cfg.dim, depth=cfg.layers,
        heads=cfg.heads, mechanism=cfg.mechanism, mechanism_params=dict(cfg.mechanism_params),
        causal=kind == "lm" if cfg.causal is None else cfg.causal, head=_HEAD_OF_KIND[kind],
        num_classes=task_cfg.num_classes,
        pool=cfg.pool or "mean", pos=cfg.pos, dropout=cfg.dropout,
        grid_width=getattr(task_cfg, "side", None) if cfg.pos == "rope2d" else None,
        aux_classes=tasks.get(cfg.task).aux_classes if cfg.aux_weight else 0,
    )
    return Transformer(mcfg)


def loss_and_correct(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over labelled items and the number predicted right."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    y = y.reshape(-1)
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == y) & (y != IGNORE)).sum()
    return loss, correct


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: header (magic, JSON with version/size/sha256), payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = json.dumps({"version": CKPT_VERSION, "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"
    atomic_write(path, lambda f: f.write(CKPT_MAGIC + header + payload))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint; :class:`CheckpointError` if it is not whole and valid."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    raw = path.read_bytes()
    if not raw.startswith(CKPT_MAGIC):
        raise CheckpointError(f"{path} is not a longattn checkpoint (bad magic); refusing to load it")
    rest = raw[len(CKPT_MAGIC):]
    nl = rest.find(b"\n")
    try:
        header = json.loads(rest[:nl])
        version, size, digest = header["version"], int(header["size"]), header["sha256"]
    except Exception:
        raise CheckpointError(f"{path} has a damaged header; refusing to load it") from None
    if version != CKPT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this longattn reads "
                              f"version {CKPT_VERSION}")
    payload = rest[nl + 1:]
    if len(payload) != size:
        raise CheckpointError(f"{path} is truncated or padded: payload is {len(payload)} bytes, the header "
                              f"says {size}; refusing to load a partial checkpoint")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt (SHA-256 mismatch); refusing to load it")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- memory
def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, data: Batches, d: Dist, batch: int, limit: int = 0) -> dict[str, float]:
    """Loss and accuracy over (the first ``limit`` rows of) a split, sharded over ranks."""
    was = model.training
    model.eval()
    n = len(data) if not limit else min(limit, len(data))
    tot = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss sum, correct, count
    # the same rows in order of length: each batch is trimmed to its longest row, so
    # this wastes little on padding
    rows = np.argsort(data.lengths[:n].numpy(), kind="stable") if data.padded else np.arange(n)
    for start in range(0, n, batch):
        gidx = rows[start : start + batch]
        idx = gidx[d.rank :: d.world]
        if len(idx) == 0:
            continue
        x, mask, y = data.get(idx, data.trim(gidx))
        loss, correct = loss_and_correct(model(x, key_padding_mask=mask), y)
        tot += torch.stack([loss.double(), correct.double(), torch.tensor(float((y != IGNORE).sum()),
                                                                           dtype=torch.float64,
                                                                           device=d.device)])
    d.all_sum(tot)
    model.train(was)
    count = max(tot[2].item(), 1.0)
    return {"loss": tot[0].item() / count, "acc": tot[1].item() / count}


# ---------------------------------------------------------------- training
class _Log:
    def __init__(self, out: Path | None, main: bool, resume_step: int | None) -> None:
        self.path = out / "log.jsonl" if out is not None and main else None
        self.tb = None
        if self.path is None:
            return
        if resume_step is not None and self.path.exists():
            # drop what the killed run logged after its last checkpoint
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            prefix = rec.get("split", "train")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0.1 of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on vectors: biases, norms) and its warm-up + cosine schedule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.warmup, cfg.steps))
    return opt, sched


def _load_splits(cfg: TrainConfig, task_cfg: Any, d: Dist) -> dict[str, tasks.TaskData]:
    """Every split; rank 0 generates (and caches) first, the others then read the cache."""
    splits: dict[str, tasks.TaskData] = {}
    for turn in (0, 1):
        if (d.rank == 0) == (turn == 0):
            splits = {s: tasks.load(cfg.task, s, seed=cfg.data_seed, config=task_cfg) for s in tasks.SPLITS}
        d.barrier()
    return splits


@dataclass
class _Progress:
    """What a checkpoint carries besides the model, optimizer and scheduler."""

    step: int = 0
    best: float = -1.0
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    tokens_seen: int = 0


def _restore(path: Path, cfg: TrainConfig, model: nn.Module, opt: Any, sched: Any, d: Dist) -> _Progress:
    """Load a checkpoint written under the same settings into model/opt/sched; its progress."""
    st = load_checkpoint(path, map_location=d.device)
    if st["signature"] != cfg.model_signature():
        diff = {k: (st["signature"].get(k), v) for k, v in cfg.model_signature().items()
                if st["signature"].get(k) != v}
        raise ValueError(f"cannot resume {path}: the run's settings differ (saved, now): {diff}")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    _set_rng_state(st["rng"][d.rank] if d.rank < len(st["rng"]) else st["rng"][0])
    return _Progress(step=st["step"], best=st["best"], best_state=st["best_state"], history=st["history"],
                     elapsed=st["elapsed"], tokens_seen=st["tokens_seen"])


def _save(path: Path | None, cfg: TrainConfig, model: nn.Module, opt: Any, sched: Any, prog: _Progress,
          d: Dist) -> None:
    rng = [_rng_state()]
    if d.world > 1:  # every rank's RNG (dropout masks differ per rank)
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if d.main and path is not None:
        save_checkpoint(path, {
            "signature": cfg.model_signature(), "step": prog.step, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
            "best": prog.best, "best_state": prog.best_state, "history": prog.history,
            "elapsed": prog.elapsed, "tokens_seen": prog.tokens_seen,
        })
    d.barrier()


def _train_step(model: nn.Module, opt: Any, sched: Any, train_data: Batches, step: int, cfg: TrainConfig,
                d: Dist) -> tuple[Tensor, int]:
    """One update on the global batch of ``step``: ([loss sum, correct, count, aux loss sum, aux count]
    over all ranks, tokens). With ``cfg.aux_weight`` the loss adds that weight times the mean
    cross-entropy of the task's per-token aux targets."""
    params = list(model.parameters())
    gidx = batch_indices(step, len(train_data), cfg.batch, cfg.seed)
    idx = gidx if cfg.sequence_parallel else gidx[d.rank :: d.world]
    length = train_data.trim(gidx)
    x, mask, y = train_data.get(idx, length)
    count = train_data.count(gidx)  # labelled items in the GLOBAL batch
    aux_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    aux_count = 1
    if cfg.sequence_parallel:  # this rank's slice of every sequence (longattn.distributed)
        from longattn.distributed import sequence_parallel_loss
        loss_sum, correct = sequence_parallel_loss(model, x, mask, y, loss_and_correct, ignore_index=IGNORE)
        loss = loss_sum / count
    elif cfg.aux_weight:
        logits, aux_logits = model.forward_with_aux(x, key_padding_mask=mask)
        loss_sum, correct = loss_and_correct(logits, y)
        aux = train_data.get_aux(gidx, length)  # the GLOBAL batch's targets: this rank's rows, and the count
        aux_sum, _ = loss_and_correct(aux_logits, aux[d.rank :: d.world])
        aux_count = max(int((aux != IGNORE).sum()), 1)
        loss = loss_sum / count + cfg.aux_weight * aux_sum / aux_count
    else:
        loss_sum, correct = loss_and_correct(model(x, key_padding_mask=mask), y)
        loss = loss_sum / count
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if d.world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p in params:
            n = p.numel()
            p.grad = flat[off : off + n].view_as(p).clone()
            off += n
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    share = lambda n: torch.tensor(float(n) / d.world, dtype=torch.float64, device=d.device)  # noqa: E731
    stats = d.all_sum(torch.stack([loss_sum.detach().double(), correct.double(), share(count),
                                   aux_sum.detach().double(), share(aux_count)]))
    return stats, int(train_data.lengths[torch.from_numpy(gidx)].sum())


def _test(model: nn.Module, prog: _Progress, test_data: Batches, cfg: TrainConfig, d: Dist
          ) -> tuple[dict[str, float], dict[str, float]]:
    """(test metrics at the best validation step, test metrics of the final weights)."""
    final_test = evaluate(model, test_data, d, cfg.eval_batch)
    if prog.best_state is None or all(torch.equal(v, prog.best_state[k]) for k, v in model.state_dict().items()):
        return final_test, final_test  # the best validation step is the last one
    final_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(prog.best_state)
    test = evaluate(model, test_data, d, cfg.eval_batch)
    model.load_state_dict(final_state)
    return test, final_test


@dataclass
class _Job:
    """One training job's parts, as :func:`train` sets them up."""

    d: Dist
    out: Path | None
    task_cfg: Any
    splits: dict[str, tasks.TaskData]
    data: tuple[Batches, Batches, Batches]  # train, val, test
    model: nn.Module
    opt: Any
    sched: Any
    prog: _Progress
    ckpt_path: Path | None
    log: _Log
    rss0: float | None


def train(cfg: TrainConfig, model_factory: Callable[[TrainConfig, Any, str], nn.Module] | None = None
          ) -> dict[str, Any]:
    """Run one training job; returns the result dict (also written to ``out/result.json``)."""
    cfg = cfg.resolved()
    job = _setup(cfg, model_factory)
    bar = None
    if cfg.progress and job.d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=job.prog.step, desc=f"{cfg.task}/{_mech_name(cfg.mechanism)}",
                   dynamic_ncols=True, file=sys.stderr)
    try:
        stopped = _loop(job, cfg, bar)
    finally:
        if bar is not None:
            bar.close()
    if stopped is not None:
        job.log.close()
        return {"stopped_at": stopped}
    return _finish(job, cfg)


def _setup(cfg: TrainConfig, model_factory: Callable[[TrainConfig, Any, str], nn.Module] | None) -> _Job:
    """Checks, processes, data, the seeded model, optimizer, a resumed checkpoint, the log."""
    d = setup_distributed(cfg.device)
    if cfg.batch % d.world and not cfg.sequence_parallel:
        raise ValueError(f"batch ({cfg.batch}) must be divisible by the number of processes ({d.world})")
    if cfg.resume and not cfg.out:
        raise ValueError("resume=True needs out= (the run directory holding checkpoint.pt)")
    out = Path(cfg.out) if cfg.out else None
    spec = tasks.get(cfg.task)
    _check_aux(cfg, spec)
    task_cfg = spec.make_config(**cfg.task_options)
    splits = _load_splits(cfg, task_cfg, d)
    data = tuple(Batches(splits[s], d.device) for s in tasks.SPLITS)

    seed_everything(cfg.seed)
    rss0 = _status_mb("VmRSS")
    _reset_peak_rss()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    model = (model_factory or build_model)(cfg, task_cfg, spec.kind).to(d.device)
    if d.world > 1:  # identical start on every rank
        for p in model.state_dict().values():
            dist.broadcast(p, 0)
    opt, sched = make_optimizer(model, cfg)
    prog = _Progress()
    ckpt_path = out / "checkpoint.pt" if out else None
    resume_step = None
    if cfg.resume and ckpt_path is not None and ckpt_path.exists():
        prog = _restore(ckpt_path, cfg, model, opt, sched, d)
        resume_step = prog.step
    elif cfg.resume and d.main:
        print(f"[longattn] no checkpoint in {out}; starting from step 0", file=sys.stderr)
    if out is not None and d.main:
        out.mkdir(parents=True, exist_ok=True)
    log = _Log(out, d.main, resume_step)
    if out is not None and d.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    return _Job(d, out, task_cfg, splits, data, model, opt, sched, prog, ckpt_path, log, rss0)  # type: ignore[arg-type]


def _loop(job: _Job, cfg: TrainConfig, bar: Any) -> int | None:
    """Train from ``job.prog.step`` to ``cfg.steps``: log a window every ``log_every``
    steps, validate every ``eval_every`` (keeping the best weights), checkpoint every
    ``ckpt_every``. Returns the step it stopped at (``stop_after``), else None."""
    prog, model = job.prog, job.model
    model.train()
    win = torch.zeros(5, dtype=torch.float64, device=job.d.device)  # loss, correct, count, aux loss, aux count
    win_tokens, win_t0 = 0, time.perf_counter()
    while prog.step < cfg.steps:
        t0 = time.perf_counter()
        stats, ntok = _train_step(model, job.opt, job.sched, job.data[0], prog.step, cfg, job.d)
        prog.step += 1
        step = prog.step
        win += stats
        win_tokens += ntok
        prog.tokens_seen += ntok
        prog.elapsed += time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            _log_window(job, cfg, win, win_tokens / max(time.perf_counter() - win_t0, 1e-9), bar)
            win.zero_()
            win_tokens, win_t0 = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _validate(job, cfg)
        if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps:
            return step
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save(job.ckpt_path, cfg, model, job.opt, job.sched, prog, job.d)
    return None


def _log_window(job: _Job, cfg: TrainConfig, win: Tensor, tokens_per_s: float, bar: Any) -> None:
    """One log record of the steps since the last: mean loss, accuracy (and aux loss)."""
    rec = {"step": job.prog.step, "loss": win[0].item() / win[2].item(), "acc": win[1].item() / win[2].item(),
           "lr": job.sched.get_last_lr()[0], "tokens_per_s": tokens_per_s, "time": job.prog.elapsed}
    if cfg.aux_weight:
        rec["aux_loss"] = win[3].item() / win[4].item()
    job.log.write(rec)
    if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")


def _validate(job: _Job, cfg: TrainConfig) -> None:
    """Evaluate on the validation split; keep the weights of the best accuracy."""
    prog = job.prog
    ev = evaluate(job.model, job.data[1], job.d, cfg.eval_batch, cfg.max_eval)
    prog.history.append({"step": prog.step, **ev})
    job.log.write({"step": prog.step, "split": "val", **ev, "time": prog.elapsed})
    if ev["acc"] > prog.best:
        prog.best = ev["acc"]
        prog.best_state = {k: v.detach().clone() for k, v in job.model.state_dict().items()}


def _finish(job: _Job, cfg: TrainConfig) -> dict[str, Any]:
    """Peak memory, the test metrics (best validation weights and final ones), the
    result dict, written to ``out/result.json`` by the main process."""
    d, prog, model, test_data = job.d, job.prog, job.model, job.data[2]
    if d.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(d.device) / 2**20
    else:
        hwm = _status_mb("VmHWM")
        peak = (hwm - job.rss0) if (hwm is not None and job.rss0 is not None) else float("nan")
    test, final_test = _test(model, prog, test_data, cfg, d)
    result = {
        "task": cfg.task, "mechanism": cfg.mechanism, "mechanism_params": cfg.mechanism_params,
        "steps": prog.step, "test_acc": test["acc"], "test_loss": test["loss"], "final_test_acc": final_test["acc"],
        "best_val_acc": prog.best, "val_history": prog.history, "train_time_s": prog.elapsed,
        "tokens_per_s": prog.tokens_seen / max(prog.elapsed, 1e-9), "peak_mem_mb": peak,
        "params": sum(p.numel() for p in model.parameters()),
        "majority_baseline": tasks.majority_baseline(job.splits["test"]),
        "test_items": test_data.count(np.arange(len(test_data))), "world_size": d.world,
        "seq_len": job.task_cfg.seq_len, "config": dataclasses.asdict(cfg),
    }
    if job.out is not None and d.main:
        job.log.write({"step": prog.step, "split": "test", **test, "time": prog.elapsed})
        _atomic_write_text(job.out / "result.json", json.dumps(result, indent=2, default=str))
    job.log.close()
    result["model"] = model
    return result


def _check_aux(cfg: TrainConfig, spec: tasks.TaskSpec) -> None:
    """aux_weight must be a number >= 0, and > 0 only for a task with aux targets and batch parallelism."""
    w = cfg.aux_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"aux_weight must be a finite number >= 0, got {w!r}")
    if w and not spec.aux_classes:
        raise ValueError(f"aux_weight={w}: task {spec.name!r} gives no aux targets (set aux_weight=0)")
    if w and cfg.sequence_parallel:
        raise ValueError(f"aux_weight={w} is not supported with sequence_parallel=True (set aux_weight=0)")


def _mech_name(m: Any) -> str:
    if isinstance(m, str):
        return m
    return "+".join(x if isinstance(x, str) else x[0] for x in m)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


# ---------------------------------------------------------------- CLI
def parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["a=1", "b=x,y"]`` -> {"a": 1, "b": "x,y"}; values parsed as JSON when they parse."""
    outd: dict[str, Any] = {}
    for item in items or []:
        for part in [item] if item.count("=") == 1 else item.split(";"):
            if "=" not in part:
                raise ValueError(f"{what} must be KEY=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            try:
                outd[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                outd[k.strip()] = v
    return outd


def parse_mechanism(text: str) -> Any:
    """``"local"`` -> "local"; ``"local,full"`` -> ["local", "full"] (one per head group)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="listops", help="task name (see longattn.tasks.names())")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="override a task option")
    p.add_argument("--mechanism", default="full", help="mechanism name, or a comma list for per-head groups")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="mechanism parameter")
    for name, typ in (("layers", int), ("dim", int), ("heads", int), ("steps", int), ("batch", int),
                      ("lr", float), ("warmup", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help=f"default: per task ({name})")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=None, help="default: per task (dropout)")
    p.add_argument("--pool", choices=("mean", "cls"), default=None)
    p.add_argument("--pos", default=None, help="positional encoding; default: per task (sinusoidal, "
                   "rope for pathfinder)")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="weight of the task's per-token aux targets (0 = off); default: per task")
    p.add_argument("--causal", action="store_true", default=None,
                   help="causal attention on any task (default: only language-model tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--max-eval", type=int, default=0, help="validate on at most this many examples (0 = all)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="under torchrun: every rank holds a slice of every sequence (longattn.distributed)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        task=args.task, task_options=parse_kv(args.task_option, "--task-option"),
        data_seed=args.data_seed, mechanism=parse_mechanism(args.mechanism),
        mechanism_params=parse_kv(args.param, "--param"), layers=args.layers, dim=args.dim,
        heads=args.heads, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, dropout=args.dropout, pool=args.pool, pos=args.pos,
        aux_weight=args.aux_weight, causal=getattr(args, "causal", None), seed=args.seed,
        eval_every=args.eval_every, max_eval=args.max_eval, ckpt_every=args.ckpt_every, log_every=args.log_every,
        out=getattr(args, "out", None), resume=getattr(args, "resume", False), device=args.device,
        progress=not args.no_progress, sequence_parallel=getattr(args, "sequence_parallel", False),
    )


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    res = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: res[k] for k in ("task", "mechanism", "steps", "test_acc", "best_val_acc",
                                              "majority_baseline", "train_time_s", "peak_mem_mb")},
                         default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a small Transformer with one mechanism on one task")
    add_train_arguments(p)
    p.add_argument("--out", default=None, help="run directory (checkpoints, log.jsonl, result.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(run=_run)
