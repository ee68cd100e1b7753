"""ListOps (Nangia & Bowman 2018; the LRA setting of Tay et al. 2021).

Nested prefix expressions over the digits 0-9 with four operators::

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->  9

MAX, MIN, MED (median; for an even count the floor of the mean of the two middle
values, ``int(numpy.median)``), SM (sum modulo 10). Trees are at most
``max_depth`` operators deep with ``min_args``..``max_args`` arguments per operator;
the label is the value (10 classes). LRA used 500 < length < 2000 tokens; the CPU
default here is 64-256 tokens.

Generation: draw a target length T uniformly in [min_len, max_len], grow a tree
whose token count cannot exceed T (each operator splits its budget at random among
its arguments), and keep it if it has at least ``min_len`` tokens. Cost: O(T) per
sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from longattn.tasks import IGNORE, TaskData, TaskSpec, pad_sequences, register_task

OPS = ("MAX", "MIN", "MED", "SM")
VOCAB = ["<pad>"] + [str(d) for d in range(10)] + [f"[{op}" for op in OPS] + ["]"]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}

Tree = Union[int, tuple]  # a digit, or (op, [children])


@dataclass(frozen=True)
class ListOpsConfig:
    min_len: int = 64
    max_len: int = 256
    max_depth: int = 10
    min_args: int = 2
    max_args: int = 10
    leaf_prob: float = 0.15  # chance that an argument with room for a sub-expression is a digit
    n_train: int = 8000
    n_val: int = 1000
    n_test: int = 1000

    def __post_init__(self) -> None:
        if not 5 <= self.min_len <= self.max_len:
            raise ValueError(f"need 5 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if not 2 <= self.min_args <= self.max_args:
            raise ValueError(f"need 2 <= min_args <= max_args, got {self.min_args}, {self.max_args}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def seq_len(self) -> int:
        return self.max_len


def evaluate(tree: Tree) -> int:
    """Value of a tree (the generator's own evaluator; tests use an independent parser)."""
    if isinstance(tree, (int, np.integer)):
        return int(tree)
    op, args = tree
    vals = [evaluate(a) for a in args]
    if op == "MAX":
        return max(vals)
    if op == "MIN":
        return min(vals)
    if op == "MED":
        return int(np.median(vals))
    return sum(vals) % 10


def to_tokens(tree: Tree) -> list[str]:
    if isinstance(tree, (int, np.integer)):
        return [str(int(tree))]
    op, args = tree
    out = [f"[{op}"]
    for a in args:
        out += to_tokens(a)
    out.append("]")
    return out


def closing_values(tree: Tree) -> list[int]:
    """Per-token training targets aligned with :func:`to_tokens`: at each ``]`` the value
    of the expression it closes (the last one is the label), IGNORE at every other token."""
    if isinstance(tree, (int, np.integer)):
        return [IGNORE]
    out = [IGNORE]
    for a in tree[1]:
        out += closing_values(a)
    return out + [evaluate(tree)]


def _grow(rng: np.random.Generator, budget: int, depth: int, cfg: ListOpsConfig, root: bool) -> Tree:
    """A tree with at most ``budget`` tokens; ``depth`` = operators above it."""
    need = 2 + cfg.min_args  # smallest operator expression
    if budget < need or depth >= cfg.max_depth or (not root and rng.random() < cfg.leaf_prob):
        return int(rng.integers(10))
    op = OPS[int(rng.integers(len(OPS)))]
    inner = budget - 2
    k = int(rng.integers(cfg.min_args, min(cfg.max_args, inner) + 1))
    # a random composition of `inner` into k positive parts
    cuts = np.sort(rng.choice(inner - 1, size=k - 1, replace=False) + 1) if k > 1 else np.array([], int)
    sizes = np.diff(np.concatenate([[0], cuts, [inner]]))
    return (op, [_grow(rng, int(s), depth + 1, cfg, False) for s in sizes])


def sample(rng: np.random.Generator, cfg: ListOpsConfig) -> Tree:
    """One tree with min_len <= tokens <= max_len (rejection on the lower bound)."""
    for _ in range(10_000):
        target = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        tree = _grow(rng, target, 0, cfg, True)
        if len(to_tokens(tree)) >= cfg.min_len:
            return tree
    raise RuntimeError(f"could not draw a ListOps tree of >= {cfg.min_len} tokens with {cfg}")


def generate(cfg: ListOpsConfig, split: str, seed: int) -> TaskData:
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    rng = np.random.default_rng(seed)
    seqs, labels, aux = [], [], np.full((n, cfg.max_len), IGNORE, dtype=np.int64)
    for i in range(n):
        tree = sample(rng, cfg)
        seqs.append([TOKEN_ID[t] for t in to_tokens(tree)])
        labels.append(evaluate(tree))
        values = closing_values(tree)
        aux[i, : len(values)] = values
    x, mask = pad_sequences(seqs, cfg.max_len)
    return TaskData(x=x, mask=mask, y=np.asarray(labels, dtype=np.int64), aux=aux)


def root_operator_baseline(train: TaskData, test: TaskData) -> float:
    """Accuracy on ``test`` of a rule with no model: read the first token (the root
    operator) and answer that operator's most common label in ``train``. It measures
    the cue a model learns first; only accuracy above it shows brackets evaluated."""
    best = {int(op): int(np.bincount(train.y[train.x[:, 0] == op]).argmax()) for op in np.unique(train.x[:, 0])}
    fallback = int(np.bincount(train.y).argmax())
    guess = np.array([best.get(int(op), fallback) for op in test.x[:, 0]])
    return float((guess == test.y).mean())


def detokenize(ids: np.ndarray) -> str:
    """Token ids (padding dropped) back to text, e.g. ``"[MAX 2 9 ]"``."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != 0)


SPEC = register_task(TaskSpec(
    name="listops", config=ListOpsConfig, generate=generate, kind="classify", aux_classes=10,
    version=2,  # v2: splits carry ``aux`` (closing_values)
    summary="nested MAX/MIN/MED/SM expressions over digits; label = value (10 classes)",
    paper="Nangia & Bowman 2018; Tay et al. 2021 (LRA)",
))
