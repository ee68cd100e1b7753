"""Pathfinder (Linsley et al. 2018; Pathfinder-32/64/128 in LRA, Tay et al. 2021).

A W x W image holds two marker disks and several curvy paths. Label 1 when the
markers sit at the two ends of the same path, 0 when they end two different paths.
Positives and negatives hold the same number of paths (a positive's second marker
path is replaced by one more distractor), so counting pixels does not give the
answer. The model reads the image row by row: one token per pixel (W*W tokens of
quantised intensity, ``patch=1``, the LRA form), or one token per ``patch`` x ``patch``
tile (``(W/patch)^2`` tokens; the token is the tile's pixel pattern, ``levels^(patch^2)``
codes), which keeps the picture and its long paths but shortens the sequence.

Drawing (our own generator from the task's description): a path is a random walk
of unit steps whose heading turns by at most ``max_turn`` radians per step; each
new pixel must stay ``margin`` pixels from the border and must not touch (8-way)
any other path or an older part of its own path, so two paths never join. Markers
are 3 x 3 disks centred on path ends, touching no other path. Every image is checked by a flood fill
before it is kept (positives connected, negatives not). Cost: O(W * paths) per
image, plus the O(W^2) check.

Each split also carries ``aux`` (:func:`joined_targets`): per token, is it on a path
that holds a marker? That flood fill is what the label asks a yes/no question about;
the trainer can learn it as a second loss (``TrainConfig.aux_weight``), which is what
lets full attention leave the 0.693 plateau on a CPU budget (README, "Pathfinder").
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from longattn.tasks import IGNORE, TaskData, TaskSpec, register_task


@dataclass(frozen=True)
class PathfinderConfig:
    size: int = 32
    path_len: int = 0  # pixels per path; 0 = 3/4 of size
    distractors: int = 2  # unmarked paths in a negative (a positive has one more); distractors + 2 paths in all
    max_turn: float = 0.5  # radians per unit step
    margin: int = 2
    levels: int = 2  # intensity levels (0 = padding, unused here)
    patch: int = 1  # pixels per token side: 1 = one token per pixel; 2 = one per 2x2 tile (16 codes)
    marker_token: bool = False  # marker pixels get their own value (LRA: markers are path-bright)
    n_train: int = 8000
    n_val: int = 1000
    n_test: int = 1000

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size}")
        if self.distractors < 1:
            raise ValueError(f"distractors must be >= 1, got {self.distractors}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        if self.patch < 1 or self.size % self.patch:
            raise ValueError(f"patch must be >= 1 and divide size ({self.size}), got {self.patch}")
        if self.digits ** (self.patch * self.patch) > 2**16:
            raise ValueError(f"{self.digits}^(patch^2) = {self.digits}^{self.patch ** 2} tile codes is too many "
                             "for a token vocabulary (at most 65536)")

    @property
    def length(self) -> int:
        return self.path_len or (3 * self.size) // 4

    @property
    def side(self) -> int:
        """Tokens per image row."""
        return self.size // self.patch

    @property
    def digits(self) -> int:
        """Values a pixel can take: the intensity levels, plus one for markers with ``marker_token``."""
        return self.levels + int(self.marker_token)

    @property
    def vocab_size(self) -> int:
        return self.digits ** (self.patch * self.patch) + 1

    @property
    def num_classes(self) -> int:
        return 2

    @property
    def seq_len(self) -> int:
        return self.side * self.side


def _walk(rng: np.random.Generator, grid: list[list[int]], pid: int, cfg: PathfinderConfig) -> list[tuple[int, int]] | None:
    """Draw one path into ``grid`` (pixel -> path id, 0 = empty); None if it got stuck.

    ``grid`` is a list of rows of Python ints, not an array: this loop runs ~20 steps per
    path and ~70 paths per kept image, and numpy's per-element indexing dominated it."""
    W, m, length = cfg.size, cfg.margin, cfg.length
    y0, x0 = rng.uniform(m, W - 1 - m, size=2)
    y, x = float(y0), float(x0)
    theta = rng.uniform(0, 2 * math.pi)
    pix = [(round(y), round(x))]
    if not _free(grid, pix[0], pid, pix, W, m):
        return None
    grid[pix[0][0]][pix[0][1]] = pid
    tries = 0
    while len(pix) < length:
        t = theta + rng.uniform(-cfg.max_turn, cfg.max_turn)
        ny, nx = y + math.sin(t), x + math.cos(t)
        p = (round(ny), round(nx))
        if p == pix[-1]:
            y, x, theta = ny, nx, t
            continue
        if _free(grid, p, pid, pix, W, m):
            y, x, theta = ny, nx, t
            pix.append(p)
            grid[p[0]][p[1]] = pid
            tries = 0
        else:
            tries += 1
            theta += rng.uniform(-1.0, 1.0)  # look around
            if tries > 20:
                for qy, qx in pix:
                    grid[qy][qx] = 0
                return None
    return pix


def _free(grid: list[list[int]], p: tuple[int, int], pid: int, pix: list[tuple[int, int]], W: int, m: int) -> bool:
    """May ``p`` join path ``pid``: inside the margin, and its 3 x 3 block holds no other
    path and no pixel of this one but its last two."""
    py, px = p
    if not (m <= py < W - m and m <= px < W - m):
        return False
    recent = pix[-2:]
    for qy in (py - 1, py, py + 1):
        row = grid[qy]
        for qx in (px - 1, px, px + 1):
            o = row[qx]
            if o and (o != pid or (qy, qx) not in recent):
                return False
    return True


def reach(img: np.ndarray, seeds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """bool [W, W]: the lit pixels joined to any of ``seeds`` by an 8-connected run of lit
    pixels (breadth-first flood fill, O(W^2))."""
    W = img.shape[0]
    seen = np.zeros(img.shape, dtype=bool)
    queue = deque(s for s in seeds if img[s] > 0)
    for s in queue:
        seen[s] = True
    while queue:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < W and 0 <= nx < W and not seen[ny, nx] and img[ny, nx] > 0:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return seen


def draw(rng: np.random.Generator, cfg: PathfinderConfig, positive: bool) -> tuple[np.ndarray, tuple, tuple]:
    """One image (float32 [W, W] in [0, 1]) and its two marker centres."""
    W = cfg.size
    for _ in range(1000):
        grid = [[0] * W for _ in range(W)]
        n_paths = cfg.distractors + 2
        paths = []
        for pid in range(1, n_paths + 1):
            p = None
            for _ in range(50):
                p = _walk(rng, grid, pid, cfg)
                if p is not None:
                    break
            if p is None:
                break
            paths.append(p)
        if len(paths) < n_paths:
            continue
        owner = np.array(grid, dtype=np.int32)
        a_path = paths[0]
        if positive:
            ma, mb = a_path[0], a_path[-1]
            pa, pb = 1, 1
        else:
            b_path = paths[1]
            ma = a_path[0] if rng.random() < 0.5 else a_path[-1]
            mb = b_path[0] if rng.random() < 0.5 else b_path[-1]
            pa, pb = 1, 2
        # a marker (3x3) must not touch another path: its 5x5 surround holds only its own
        if any(
            np.setdiff1d(owner[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3], [0, pid]).size
            for (cy, cx), pid in ((ma, pa), (mb, pb))
        ):
            continue
        img = (owner > 0).astype(np.float32)
        for cy, cx in (ma, mb):
            img[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = 1.0
        if bool(reach(img, (ma,))[mb]) == positive:
            return img, ma, mb
    raise RuntimeError(f"could not draw a Pathfinder image with {cfg}")


def quantise(img: np.ndarray, levels: int) -> np.ndarray:
    """Intensities in [0, 1] -> tokens 1..levels (0 is padding)."""
    return 1 + np.clip(np.rint(img * (levels - 1)), 0, levels - 1).astype(np.int64)


def tokens(img: np.ndarray, cfg: PathfinderConfig, markers: tuple = ()) -> np.ndarray:
    """Image [W, W] in [0, 1] -> token row [(W/patch)^2]: each tile's pixel values read as
    the digits of a base-``cfg.digits`` number (row-major inside the tile), plus 1 (0 is
    padding). With ``cfg.marker_token`` the 3 x 3 disks around ``markers`` (centres)
    take the extra value ``levels``."""
    q = quantise(img, cfg.levels) - 1  # 0..levels-1
    if cfg.marker_token:
        for cy, cx in markers:
            q[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = cfg.levels
    p, s = cfg.patch, cfg.side
    tiles = q.reshape(s, p, s, p).transpose(0, 2, 1, 3).reshape(s * s, p * p)
    weights = cfg.digits ** np.arange(p * p - 1, -1, -1, dtype=np.int64)
    return 1 + tiles @ weights


def joined_targets(img: np.ndarray, markers: tuple, cfg: PathfinderConfig) -> np.ndarray:
    """Per-token training targets [(W/patch)^2]: 1 where the token's lit pixels touch a
    path joined to a marker, 0 where they are lit but on no marked path, IGNORE where the
    token is dark. The label asks whether one such path holds both markers."""
    joined = reach(img, markers)
    p, s = cfg.patch, cfg.side
    tiles = lambda a: a.reshape(s, p, s, p).transpose(0, 2, 1, 3).reshape(s * s, p * p).any(1)  # noqa: E731
    return np.where(tiles(img > 0), tiles(joined).astype(np.int64), IGNORE)


def generate(cfg: PathfinderConfig, split: str, seed: int) -> TaskData:
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)  # balanced
    x = np.empty((n, cfg.seq_len), dtype=np.int64)
    aux = np.empty((n, cfg.seq_len), dtype=np.int64)
    for i in range(n):
        img, ma, mb = draw(rng, cfg, bool(labels[i]))
        x[i] = tokens(img, cfg, (ma, mb))
        aux[i] = joined_targets(img, (ma, mb), cfg)
    return TaskData(x=x, mask=np.ones_like(x, dtype=bool), y=labels, aux=aux)


def image(row: np.ndarray, cfg: PathfinderConfig) -> np.ndarray:
    """Token row -> float image [W, W] in [0, 1] (for tests and pictures); undoes :func:`tokens`
    (marker pixels read as full intensity)."""
    p, s = cfg.patch, cfg.side
    codes = np.asarray(row, dtype=np.int64).reshape(s * s) - 1
    digits = (codes[:, None] // cfg.digits ** np.arange(p * p - 1, -1, -1, dtype=np.int64)) % cfg.digits
    img = np.minimum(digits, cfg.levels - 1).reshape(s, s, p, p).transpose(0, 2, 1, 3).reshape(cfg.size, cfg.size)
    return img / (cfg.levels - 1)


SPEC = register_task(
    TaskSpec(
        name="pathfinder",
        config=PathfinderConfig,
        generate=generate,
        kind="classify",
        summary="are the two markers joined by one path? W x W pixels as tokens (2 classes)",
        paper="Linsley et al. 2018; Tay et al. 2021 (LRA)",
        version=2,  # v2: splits carry ``aux`` (joined_targets)
        aux_classes=2,
    )
)
