"""Associative recall and multi-query associative recall (MQAR).

Ba et al. 2016 (associative recall); Arora et al. 2023, Zoology (MQAR). The sequence
starts with ``pairs`` key-value pairs (distinct keys), then filler tokens among
which ``queries`` keys reappear; at each query position the label is the value
that key was paired with, elsewhere -100::

    k3 v7 k1 v2 k9 v4 . . k1 . . . k9 .      labels at the two queries: v2, v4

One query per sequence is plain associative recall. A model solves it by matching
the query to its earlier key (content) and reading the token after it (position):
a long-range, content-based lookup that fixed local patterns cannot do when the
pair is far away. Tokens: 0 pad, 1 filler, keys 2..K+1, values K+2..K+V+1; labels
are value indices 0..V-1. Bidirectional (``kind="tokens"``).

``fused_pairs=True`` (the default) writes each pair as one token ``(k, v)``
(tokens K+2 .. K+2+K*V-1, after the keys), followed by a filler so the layout and
the distances stay those of the two-token form::

    (k3,v7) . (k1,v2) . (k9,v4) . . . k1 . . . k9 .

The lookup is the same long-range, content-based match of a query to its pair,
without the positional first step (copy the value onto its key) whose learning
plateau is described below; the two-token layout is ``fused_pairs=False``.

Learning dynamics (measured, 2-layer dim-64 full attention, CPU): the model first
learns which values are present (accuracy ~ 1/pairs, e.g. ~20% at 8 pairs) and
then sits on that plateau until the two-step circuit (copy the value onto its key,
then match query to key) forms -- the induction-head phase change. An independent
``torch.nn.TransformerEncoder`` shows the same plateau, so it is not a model bug.
At the default layout it had not broken after 3000 steps; at 16 keys/values, 4 pairs,
length 32 it broke at ~2500-3000 steps and reached 46-59% by 4000-5000 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longattn.tasks import IGNORE, TaskData, TaskSpec, register_task

FILLER = 1


@dataclass(frozen=True)
class RecallConfig:
    num_keys: int = 32
    num_values: int = 32
    pairs: int = 8
    queries: int = 8
    seq_len: int = 64
    fused_pairs: bool = True
    n_train: int = 8000
    n_val: int = 1000
    n_test: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.pairs <= self.num_keys:
            raise ValueError(f"pairs must be in [1, num_keys={self.num_keys}], got {self.pairs}")
        if self.num_values < 2:
            raise ValueError(f"num_values must be >= 2, got {self.num_values}")
        if not 1 <= self.queries <= self.seq_len - 2 * self.pairs:
            raise ValueError(
                f"queries must be in [1, seq_len - 2*pairs = {self.seq_len - 2 * self.pairs}], got {self.queries}"
            )

    @property
    def vocab_size(self) -> int:
        if self.fused_pairs:
            return 2 + self.num_keys + self.num_keys * self.num_values
        return 2 + self.num_keys + self.num_values

    @property
    def num_classes(self) -> int:
        return self.num_values

    def key_token(self, k: np.ndarray | int) -> np.ndarray | int:
        return 2 + k

    def value_token(self, v: np.ndarray | int) -> np.ndarray | int:
        return 2 + self.num_keys + v

    def pair_token(self, k: np.ndarray | int, v: np.ndarray | int) -> np.ndarray | int:
        """The one token of pair (k, v) in the fused layout."""
        return 2 + self.num_keys + k * self.num_values + v


def generate(cfg: RecallConfig, split: str, seed: int) -> TaskData:
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    rng = np.random.default_rng(seed)
    P, N = cfg.pairs, cfg.seq_len
    x = np.full((n, N), FILLER, dtype=np.int64)
    y = np.full((n, N), IGNORE, dtype=np.int64)
    for i in range(n):
        keys = rng.choice(cfg.num_keys, size=P, replace=False)
        vals = rng.integers(cfg.num_values, size=P)
        if cfg.fused_pairs:
            x[i, 0 : 2 * P : 2] = cfg.pair_token(keys, vals)
        else:
            x[i, 0 : 2 * P : 2] = cfg.key_token(keys)
            x[i, 1 : 2 * P : 2] = cfg.value_token(vals)
        pos = 2 * P + np.sort(rng.choice(N - 2 * P, size=cfg.queries, replace=False))
        which = rng.choice(P, size=cfg.queries, replace=cfg.queries > P)
        x[i, pos] = cfg.key_token(keys[which])
        y[i, pos] = vals[which]
    return TaskData(x=x, mask=np.ones_like(x, dtype=bool), y=y)


SPEC = register_task(
    TaskSpec(
        name="recall",
        config=RecallConfig,
        generate=generate,
        kind="tokens",
        version=2,
        summary="multi-query associative recall: key-value pairs, then queries; label = the value",
        paper="Ba et al. 2016; Arora et al. 2023 (Zoology, MQAR)",
    )
)
