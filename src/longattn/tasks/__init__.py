"""Long-range task generators: ListOps, Pathfinder, associative recall, copy, digits.

Every task is a deterministic function of a config and a seed, so a run is
reproducible and its data can be cached on disk. The registry maps a name to a
:class:`TaskSpec` (generator, default config, kind)::

    >>> from longattn import tasks
    >>> data = tasks.load("listops", "train")           # cached under ~/.cache/longattn/tasks
    >>> data.x.shape, data.y.shape, tasks.get("listops").kind
    ((4000, 256), (4000,), 'classify')

A split is a :class:`TaskData`: ``x`` int64 [n, N] token ids (0 is padding), ``mask``
bool [n, N] (True = a real token) and ``y`` int64, either [n] (``kind="classify"``)
or [n, N] with -100 where no loss is taken (``kind="tokens"``: one label per
position, bidirectional; ``kind="lm"``: same layout, but the model must be causal).
A task may also give ``aux`` int64 [n, N]: per-token intermediate targets (-100 = none)
that the trainer can add as a second loss while training (``TrainConfig.aux_weight``);
they are never used to score a model. Pathfinder's say which lit pixels are joined to a
marker, the flood fill the label is a yes/no question about.

Caching: ``$LONGATTN_CACHE`` or ``~/.cache/longattn/tasks``; one ``.npz`` per split,
named by a hash of (task, config, split, generator version), written to a temporary
file and moved into place with ``os.replace`` so a killed writer never leaves a
half-written file behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

SPLITS = ("train", "val", "test")
IGNORE = -100
"""Label value of positions that carry no loss (``torch.nn.CrossEntropyLoss`` default)."""


@dataclass
class TaskData:
    """One split of a task.

    Attributes:
        x: int64 [n, N] token ids, 0 = padding.
        mask: bool [n, N], True = a real token.
        y: int64 [n] (classify) or [n, N] (tokens / lm, -100 = no label).
        aux: None, or int64 [n, N] intermediate targets for training only (-100 = none).
    """

    x: np.ndarray
    mask: np.ndarray
    y: np.ndarray
    aux: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.mask.shape != self.x.shape:
            raise ValueError(f"x {self.x.shape} and mask {self.mask.shape} must be equal [n, N]")
        if self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"y {self.y.shape} must have {self.x.shape[0]} rows")
        if self.aux is not None and self.aux.shape != self.x.shape:
            raise ValueError(f"aux {self.aux.shape} must be [n, N] = {self.x.shape}, like x")


@dataclass(frozen=True)
class TaskSpec:
    """What the registry knows of a task.

    Attributes:
        name: registry key, e.g. ``"listops"``.
        config: dataclass type of the task's configuration; its defaults are the
            CPU-sized setting. It must have ``n_train``, ``n_val``, ``n_test`` and
            properties ``vocab_size``, ``num_classes`` and ``seq_len`` (padded length).
        generate: ``generate(cfg, split, seed) -> TaskData``; deterministic.
        kind: ``"classify"`` (one label per sequence), ``"tokens"`` (one label per
            position, bidirectional) or ``"lm"`` (per position, causal model).
        summary: one line for tables.
        paper: where the task comes from.
        version: bump when the generator's output changes (invalidates caches).
        aux_classes: classes of the split's ``aux`` targets (0 = the task gives none).
    """

    name: str
    config: type
    generate: Callable[[Any, str, int], TaskData]
    kind: str
    summary: str = ""
    paper: str = ""
    version: int = 1
    aux_classes: int = 0

    @property
    def causal(self) -> bool:
        return self.kind == "lm"

    def make_config(self, **overrides: Any) -> Any:
        """The default config with ``overrides``; unknown names raise TypeError."""
        fields = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"task {self.name!r} got unknown option(s) {unknown}; it accepts {sorted(fields)}")
        return self.config(**overrides)


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.kind not in ("classify", "tokens", "lm"):
        raise ValueError(f"kind must be 'classify', 'tokens' or 'lm', got {spec.kind!r}")
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _TASKS[spec.name] = spec
    return spec


def get(name: str) -> TaskSpec:
    """The spec of task ``name``; TypeError / ValueError (listing the tasks) otherwise."""
    from longattn.registry import lookup

    _load()
    return lookup(_TASKS, name, "task")


def names() -> list[str]:
    _load()
    return list(_TASKS)


def _load() -> None:
    from longattn.tasks import copy, digits, listops, pathfinder, recall  # noqa: F401


def split_seed(seed: int, split: str) -> int:
    """A seed per split, so train/val/test are independent draws."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def cache_dir() -> Path:
    env = os.environ.get("LONGATTN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "longattn" / "tasks"


def config_key(spec: TaskSpec, cfg: Any, split: str, seed: int) -> str:
    blob = json.dumps(
        {"task": spec.name, "v": spec.version, "cfg": dataclasses.asdict(cfg), "split": split, "seed": seed},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load(
    name: str,
    split: str = "train",
    *,
    seed: int = 0,
    config: Any | None = None,
    cache: str | os.PathLike | None | bool = None,
    **overrides: Any,
) -> TaskData:
    """Split ``split`` of task ``name``, generated once and cached.

    Args:
        name: a registered task (:func:`names`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: data seed; the same seed gives the same data, bit for bit.
        config: a ready config (else the default with ``overrides``).
        cache: cache directory; ``None`` = :func:`cache_dir`, ``False`` = no cache.
    """
    spec = get(name)
    if config is None:
        config = spec.make_config(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if cache is False:
        return spec.generate(config, split, split_seed(seed, split))
    root = Path(cache) if cache not in (None, True) else cache_dir()
    path = root / f"{spec.name}-{split}-{config_key(spec, config, split, seed)}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return TaskData(x=z["x"], mask=z["mask"], y=z["y"], aux=z["aux"] if "aux" in z.files else None)
        except Exception:  # a damaged cache file is regenerated, never trusted
            pass
    data = spec.generate(config, split, split_seed(seed, split))
    _atomic_save(path, data)
    return data


def _atomic_save(path: Path, data: TaskData) -> None:
    """Write ``data`` as an .npz cache file atomically (:func:`longattn._atomic.atomic_write`)."""
    from longattn._atomic import atomic_write

    extra = {} if data.aux is None else {"aux": data.aux}
    atomic_write(path, lambda f: np.savez(f, x=data.x, mask=data.mask, y=data.y, **extra))


def pad_sequences(seqs: list[list[int]] | list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists with 0 to ``length``: (x int64 [n, length], mask bool)."""
    x = np.zeros((len(seqs), length), dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has length {len(s)} > {length}")
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    return x, mask


def majority_baseline(data: TaskData) -> float:
    """Accuracy of always answering the most frequent label (over labelled positions)."""
    y = data.y[data.y != IGNORE]
    if y.size == 0:
        return 0.0
    return float(np.bincount(y).max() / y.size)


__all__ = [
    "TaskData", "TaskSpec", "SPLITS", "IGNORE", "register_task", "get", "names", "load",
    "cache_dir", "split_seed", "pad_sequences", "majority_baseline",
]
