"""Copy: ``w SEP w``, loss on the copied half only.

A classic memory task (Graves et al. 2014, Neural Turing Machines; used for
efficient attention in Kitaev et al. 2020, Reformer, "duplication"). Position
L+1+i must fetch token i, a fixed offset of L+1 back: a long-range positional
lookup that windows shorter than L cannot do.

Two forms, one registration each:

- ``copy`` (``kind="lm"``, causal): input ``w SEP w[:-1]``, label at position t is
  the next token, kept only for t >= L (the copied half), -100 elsewhere; the model
  must be causal, otherwise the answer is in plain view.
- ``copy_masked`` (``kind="tokens"``, bidirectional): input ``w SEP MASK...MASK``,
  labels at the masked positions are w.

Tokens: 0 pad, 1 SEP, 2 MASK, symbols 3..V+2; labels are token ids (lm) or symbol
ids (masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longattn.tasks import IGNORE, TaskData, TaskSpec, register_task

SEP, MASK, FIRST = 1, 2, 3


@dataclass(frozen=True)
class CopyConfig:
    length: int = 32  # |w|
    symbols: int = 16
    n_train: int = 8000
    n_val: int = 1000
    n_test: int = 1000

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.symbols < 2:
            raise ValueError(f"symbols must be >= 2, got {self.symbols}")

    @property
    def vocab_size(self) -> int:
        return FIRST + self.symbols

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def seq_len(self) -> int:
        return 2 * self.length


@dataclass(frozen=True)
class CopyMaskedConfig(CopyConfig):
    @property
    def num_classes(self) -> int:
        return self.symbols

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 1


def _words(cfg: CopyConfig, split: str, seed: int) -> np.ndarray:
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    return np.random.default_rng(seed).integers(cfg.symbols, size=(n, cfg.length))


def generate(cfg: CopyConfig, split: str, seed: int) -> TaskData:
    w = _words(cfg, split, seed)
    n, L = w.shape
    full = np.concatenate([w + FIRST, np.full((n, 1), SEP), w + FIRST], axis=1)  # [n, 2L+1]
    x = full[:, :-1].copy()
    y = np.full_like(x, IGNORE)
    y[:, L:] = full[:, L + 1 :]  # the copied half: next token of positions L..2L-1
    return TaskData(x=x.astype(np.int64), mask=np.ones_like(x, dtype=bool), y=y.astype(np.int64))


def generate_masked(cfg: CopyConfig, split: str, seed: int) -> TaskData:
    w = _words(cfg, split, seed)
    n, L = w.shape
    x = np.concatenate([w + FIRST, np.full((n, 1), SEP), np.full((n, L), MASK)], axis=1)
    y = np.full_like(x, IGNORE)
    y[:, L + 1 :] = w
    return TaskData(x=x.astype(np.int64), mask=np.ones_like(x, dtype=bool), y=y.astype(np.int64))


SPEC = register_task(
    TaskSpec(
        name="copy",
        config=CopyConfig,
        generate=generate,
        kind="lm",
        summary="w SEP w, causal; loss on the copied half",
        paper="Graves et al. 2014; Kitaev et al. 2020",
    )
)
SPEC_MASKED = register_task(
    TaskSpec(
        name="copy_masked",
        config=CopyMaskedConfig,
        generate=generate_masked,
        kind="tokens",
        summary="w SEP MASK..MASK, bidirectional; labels = w at the masked positions",
        paper="Graves et al. 2014; Kitaev et al. 2020",
    )
)
