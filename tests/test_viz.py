"""Pictures: files are written, parse as PNG, and show the pattern's mask."""

from __future__ import annotations

import matplotlib.image as mpimg
import torch

from longattn import patterns as P
from longattn.cli import main
from longattn.viz import distinct_heads, pattern_gallery


def test_show_command_writes_png(tmp_path):
    out = tmp_path / "local.png"
    assert main(["show", "local", "before=2", "after=1", "--n", "32", "--out", str(out)]) == 0
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100


def test_distinct_heads_groups_identical_heads():
    panels = distinct_heads(P.SparseTransformerStrided(4), 16, 4, causal=False)
    assert [p[0] for p in panels] == ["heads 0-1", "heads 2-3"]
    assert torch.equal(panels[0][1], P.Local(3, 0).mask(16)[0])
    assert [p[0] for p in distinct_heads(P.Local(1, 1), 8, 4, False)] == ["all heads"]


def test_gallery_draws_every_named_pattern(tmp_path):
    paths = pattern_gallery(tmp_path, n=32)
    names = {p.stem for p in paths}
    assert set(P.PATTERNS) <= names
    assert all(p.stat().st_size > 1000 for p in paths)
