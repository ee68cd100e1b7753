"""Image classification as a pixel sequence: scikit-learn's 8 x 8 digits.

The 1797 handwritten digits of ``sklearn.datasets.load_digits`` (UCI optical
recognition of handwritten digits; the data ships inside scikit-learn, nothing is
downloaded), read row by row as a sequence of 64 intensity tokens, like LRA's
sequential CIFAR "Image" task (Tay et al. 2021) at toy scale. ``upsample`` = s
resizes to 8s x 8s by bilinear interpolation (sequence length 64 s^2), making the
same task longer. Intensities 0..16 are quantised to ``levels`` tokens 1..levels
(0 = padding). The train/val/test split is a fixed permutation drawn from
``shuffle_seed`` (the same for every split and every run seed).

Needs scikit-learn (``pip install longattn[data]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longattn.tasks import TaskData, TaskSpec, register_task


@dataclass(frozen=True)
class DigitsConfig:
    upsample: int = 1
    levels: int = 17
    n_val: int = 250
    n_test: int = 250
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        if self.upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {self.upsample}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")

    @property
    def n_train(self) -> int:
        return 1797 - self.n_val - self.n_test

    @property
    def vocab_size(self) -> int:
        return self.levels + 1

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def seq_len(self) -> int:
        return 64 * self.upsample**2


def _resize(img: np.ndarray, s: int) -> np.ndarray:
    """Bilinear resize of [n, 8, 8] to [n, 8s, 8s] (pixel centres aligned)."""
    if s == 1:
        return img
    src = np.arange(8)
    dst = (np.arange(8 * s) + 0.5) / s - 0.5
    rows = np.stack([np.interp(dst, src, r) for r in img.reshape(-1, 8)]).reshape(img.shape[0], 8, 8 * s)
    cols = np.stack([np.interp(dst, src, c) for c in rows.transpose(0, 2, 1).reshape(-1, 8)])
    return cols.reshape(img.shape[0], 8 * s, 8 * s).transpose(0, 2, 1)


def generate(cfg: DigitsConfig, split: str, seed: int) -> TaskData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install 'longattn[data]'") from e
    d = load_digits()
    order = np.random.default_rng(cfg.shuffle_seed).permutation(len(d.target))
    bounds = {"test": (0, cfg.n_test), "val": (cfg.n_test, cfg.n_test + cfg.n_val),
              "train": (cfg.n_test + cfg.n_val, len(order))}[split]
    idx = order[bounds[0] : bounds[1]]
    img = _resize(d.images[idx].astype(np.float64) / 16.0, cfg.upsample)
    x = 1 + np.clip(np.rint(img * (cfg.levels - 1)), 0, cfg.levels - 1).astype(np.int64)
    x = x.reshape(len(idx), -1)
    return TaskData(x=x, mask=np.ones_like(x, dtype=bool), y=d.target[idx].astype(np.int64))


SPEC = register_task(
    TaskSpec(
        name="digits",
        config=DigitsConfig,
        generate=generate,
        kind="classify",
        summary="8x8 handwritten digits (scikit-learn) as a pixel sequence (10 classes)",
        paper="Alpaydin & Kaynak 1998 (UCI); cf. LRA Image, Tay et al. 2021",
    )
)
