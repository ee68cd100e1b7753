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


def test_attention_maps_of_a_model_follow_the_pattern():
    from longattn.model import ModelConfig, Transformer
    from longattn.viz import attention_maps

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, max_len=40, dim=32, depth=2, heads=4,
                                    mechanism="local", mechanism_params={"before": 3, "after": 2},
                                    head="tokens", num_classes=5))
    maps = attention_maps(model, torch.randint(1, 20, (1, 40)))
    assert len(maps) == 2 and maps[0].shape == (4, 40, 40)
    band = P.Local(3, 2).mask(40)[0]
    for a in maps:
        assert torch.allclose(a.sum(-1), torch.ones(4, 40), atol=1e-5)  # softmax rows
        assert a[:, ~band].abs().max() < 1e-6 and (a[:, band] > 0).all()


def test_show_checkpoint_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--task", "recall", "--mechanism", "full", "--steps", "4", "--eval-every", "2",
                 "--ckpt-every", "2", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "att.png"
    assert main(["show", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    assert mpimg.imread(out).shape[0] > 100
