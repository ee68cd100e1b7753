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


def _planted(n: int = 10, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """k: block 1 (positions 4-7) points along e0, the rest along e1; q along e0: the
    mean gate prefers block 1 wherever it is a candidate."""
    k = torch.zeros(1, 1, n, d)
    k[..., :, 1] = 1.0
    k[..., 4:8, :] = 0.0
    k[..., 4:8, 0] = 1.0
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 1.0
    return q, k


def test_selection_map_equals_a_hand_drawn_map():
    from longattn.viz import selection_map

    q, k = _planted()
    # causal, blocks of 4 (3 blocks), top-1, sink 1 token, window 2. Codes: 4 own block,
    # 3 selected, 2 window keys only, 1 sink keys only, 0 nothing.
    # rows 0-3: own block 0 (no earlier block to select)
    # rows 4-7: own block 1, top-1 of {0} = block 0 (the only candidate); row 4's window
    #           (positions 3, 4) reaches block 0, already selected
    # rows 8-9: own block 2, top-1 of {0, 1} = block 1 (along q); sink token 0 in block 0;
    #           row 8's window (7, 8) reaches block 1, selected
    want = torch.tensor([[4, 0, 0]] * 4 + [[3, 4, 0]] * 4 + [[1, 3, 4]] * 2)
    got = selection_map(q, k, block=4, topk=1, sink_tokens=1, window=2, causal=True)
    assert torch.equal(got, want)
    # window 2 without sinks, top-0: row 4 reads position 3 of block 0 as a window key
    got = selection_map(q, k, block=4, topk=0, window=2, causal=True)
    assert got[4].tolist() == [2, 4, 0] and got[8].tolist() == [0, 2, 4] and got[9].tolist() == [0, 0, 4]


def test_show_selection_writes_a_png(tmp_path):
    from longattn.bench.error import make_inputs
    from longattn.viz import show_selection

    q, k, _ = make_inputs("local", 1, 2, 300, 16, seed=0)
    out = show_selection(q, k, tmp_path / "sel.png", block=16, topk=3, sink_tokens=4, window=24)
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 300 and out.stat().st_size > 5000


def test_viz_imports_neither_the_trainer_nor_matplotlib():
    """``import longattn.viz`` stays light: the trainer only inside ``load_trained``
    (the checkpoint reader), matplotlib only when a picture is drawn."""
    import subprocess
    import sys

    code = ("import sys, longattn.viz; "
            "print(sorted(m for m in ('longattn.train', 'matplotlib') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
