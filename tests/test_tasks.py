"""Task generators: labels recomputed independently, bounds, determinism, caching."""

from __future__ import annotations

import os

import numpy as np
import pytest

from longattn import tasks
from longattn.tasks import IGNORE


# ---------------------------------------------------------------- ListOps
def eval_listops_text(text: str) -> tuple[int, int, int]:
    """Independent evaluator: a stack machine over the token text.

    Returns (value, max operator nesting depth, max arguments of one operator).
    """
    stack: list[tuple[str, list[int]]] = []
    result = None
    depth = max_args = 0
    for tok in text.split():
        if tok.startswith("["):
            stack.append((tok[1:], []))
            depth = max(depth, len(stack))
        elif tok == "]":
            op, args = stack.pop()
            max_args = max(max_args, len(args))
            s = sorted(args)
            n = len(s)
            value = {
                "MAX": s[-1],
                "MIN": s[0],
                "MED": (s[(n - 1) // 2] + s[n // 2]) // 2,
                "SM": sum(s) % 10,
            }[op]
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        else:
            d = int(tok)
            assert 0 <= d <= 9
            if stack:
                stack[-1][1].append(d)
            else:
                result = d
    assert not stack, "unbalanced brackets"
    return result, depth, max_args


def test_listops_evaluator_hand_cases():
    assert eval_listops_text("[MAX 2 9 [MIN 4 7 ] 0 ]")[0] == 9
    assert eval_listops_text("[MED 1 2 ]")[0] == 1
    assert eval_listops_text("[MED 3 1 8 ]")[0] == 3
    assert eval_listops_text("[SM 9 9 [MAX 1 5 ] ]")[0] == 3


def test_listops_root_operator_baseline_on_a_hand_made_split():
    from longattn.tasks import TaskData, listops

    def split(texts, labels):
        seqs = [[listops.TOKEN_ID[t] for t in text.split()] for text in texts]
        x, mask = listops.pad_sequences(seqs, 8)
        return TaskData(x=x, mask=mask, y=np.asarray(labels))

    train = split(["[MAX 1 9 ]", "[MAX 9 2 ]", "[MAX 3 4 ]", "[MIN 0 5 ]", "[SM 5 5 ]", "[SM 1 1 ]", "[SM 1 1 ]"],
                  [9, 9, 4, 0, 0, 2, 2])
    # MAX -> 9, MIN -> 0, SM -> 2, MED unseen -> the most common label overall (0, 2, 9 tie: 0)
    test = split(["[MAX 1 2 ]", "[MIN 7 8 ]", "[SM 1 1 ]", "[MED 2 2 ]"], [2, 7, 2, 0])
    assert listops.root_operator_baseline(train, test) == 0.5


def test_listops_aux_targets_are_the_closed_expressions_values():
    """``aux`` at each ``]`` = the independent evaluator's value of the bracket it closes
    (the last one is the label); IGNORE everywhere else, padding included."""
    from longattn.tasks import IGNORE, listops

    cfg = listops.ListOpsConfig(min_len=20, max_len=80, max_depth=4, max_args=5, n_val=60)
    data = listops.generate(cfg, "val", 9)
    for row, aux, label in zip(data.x, data.aux, data.y):
        toks = listops.detokenize(row).split()
        opened, want = [], np.full(len(row), IGNORE)
        for k, tok in enumerate(toks):
            if tok.startswith("["):
                opened.append(k)
            elif tok == "]":
                start = opened.pop()
                want[k] = eval_listops_text(" ".join(toks[start : k + 1]))[0]
        assert np.array_equal(aux, want)
        assert aux[len(toks) - 1] == label


def test_listops_labels_lengths_depth():
    from longattn.tasks import listops

    cfg = listops.ListOpsConfig(min_len=20, max_len=80, max_depth=4, max_args=5, n_val=300)
    data = listops.generate(cfg, "val", 123)
    lengths = data.mask.sum(1)
    assert lengths.min() >= 20 and lengths.max() <= 80
    assert data.x.shape == (300, 80)
    assert (data.x[~data.mask] == 0).all() and (data.x[data.mask] != 0).all()
    for row, label in zip(data.x, data.y):
        value, depth, nargs = eval_listops_text(listops.detokenize(row))
        assert value == label
        assert 1 <= depth <= 4 and nargs <= 5
    counts = np.bincount(data.y, minlength=10)
    assert (counts > 0).sum() >= 8, counts  # labels are spread over the classes


# ---------------------------------------------------------------- Pathfinder
def _marker_centres(img: np.ndarray) -> list[tuple[int, int]]:
    """One pixel of each marker: 3x3 all-ones blocks (paths are one pixel wide), where
    touching blocks (a path curling along its own marker) count as one marker."""
    W = img.shape[0]
    cs = [(y, x) for y in range(1, W - 1) for x in range(1, W - 1) if img[y - 1 : y + 2, x - 1 : x + 2].all()]
    groups: list[list[tuple[int, int]]] = []
    for c in cs:
        near = [g for g in groups if any(abs(c[0] - d[0]) <= 1 and abs(c[1] - d[1]) <= 1 for d in g)]
        for g in near:
            groups.remove(g)
        groups.append(sum(near, []) + [c])
    return [g[0] for g in groups]


@pytest.mark.parametrize("patch", [1, 2])
def test_pathfinder_positives_connect_negatives_do_not(patch):
    ndimage = pytest.importorskip("scipy.ndimage")
    from longattn.tasks import pathfinder

    cfg = pathfinder.PathfinderConfig(size=32, n_val=60, patch=patch)
    data = pathfinder.generate(cfg, "val", 7)
    assert data.x.shape == (60, 1024 // patch**2) and set(np.unique(data.x)) <= set(range(1, 2 ** patch**2 + 1))
    assert 20 <= data.y.sum() <= 40  # balanced
    eight = np.ones((3, 3), dtype=int)
    on_pixels = {0: [], 1: []}
    for row, label in zip(data.x, data.y):
        img = pathfinder.image(row, cfg) > 0.5
        comp, ncomp = ndimage.label(img, structure=eight)
        cs = _marker_centres(img)
        assert len(cs) == 2, f"expected two markers, found {cs}"
        (a, b) = cs
        assert comp[a] > 0 and comp[b] > 0
        assert (comp[a] == comp[b]) == bool(label)
        # the same number of paths either way (a positive's second path is unmarked)
        assert ncomp == cfg.distractors + 2
        on_pixels[int(label)].append(img.sum())
    # no pixel-count shortcut: the two classes light up about as many pixels
    assert abs(np.mean(on_pixels[0]) - np.mean(on_pixels[1])) < 0.1 * np.mean(on_pixels[1])


def test_pathfinder_marker_token_marks_exactly_the_two_disks():
    """With ``marker_token`` the same drawings come out; the marker value covers two full
    3 x 3 squares of lit pixels, one on each marker the plain image shows, and every
    other pixel keeps its plain token."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from longattn.tasks import pathfinder

    plain_cfg = pathfinder.PathfinderConfig(size=16, distractors=1, n_val=12)
    cfg = pathfinder.PathfinderConfig(size=16, distractors=1, n_val=12, marker_token=True)
    plain, marked = pathfinder.generate(plain_cfg, "val", 5), pathfinder.generate(cfg, "val", 5)
    assert cfg.vocab_size == 4 and np.array_equal(plain.y, marked.y)
    for a, b in zip(plain.x, marked.x):
        assert np.array_equal(np.where(b == 3, 2, b), a)  # markers sit on lit pixels only
        disks, n = ndimage.label(b.reshape(16, 16) == 3)
        assert n == 2
        for box in ndimage.find_objects(disks):
            assert (box[0].stop - box[0].start, box[1].stop - box[1].start) == (3, 3)
        assert len(_marker_centres(a.reshape(16, 16) == 2)) == 2
        assert np.array_equal(pathfinder.image(b, cfg), pathfinder.image(a, plain_cfg))


@pytest.mark.parametrize("patch", [1, 2])
def test_pathfinder_aux_targets_are_the_marked_components(tmp_path, patch):
    """``aux`` (the flood-fill training targets): 1 on the lit tokens of a component that
    holds a marker, 0 on other lit tokens, IGNORE on dark ones; found here with scipy's
    connected-component labelling, not the generator's flood fill. They survive the cache."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from longattn import tasks
    from longattn.tasks import pathfinder

    cfg = pathfinder.PathfinderConfig(size=16, distractors=1, n_val=24, patch=patch)
    data = tasks.load("pathfinder", "val", seed=4, config=cfg, cache=tmp_path)
    again = tasks.load("pathfinder", "val", seed=4, config=cfg, cache=tmp_path)  # from the .npz
    assert again.aux is not None and np.array_equal(again.aux, data.aux)
    s = cfg.side
    for row, aux in zip(data.x, data.aux):
        img = pathfinder.image(row, cfg) > 0.5
        comp, _ = ndimage.label(img, structure=np.ones((3, 3), dtype=int))
        marked = np.isin(comp, [comp[c] for c in _marker_centres(img)]) & img
        tile = lambda a: a.reshape(s, patch, s, patch).any(axis=(1, 3)).reshape(-1)  # noqa: E731
        want = np.where(tile(img), tile(marked).astype(np.int64), tasks.IGNORE)
        assert np.array_equal(aux, want)
        assert (aux == 0).any() and (aux == 1).any()  # a distractor and a marked path in every image


def test_pathfinder_tile_tokens_are_the_pixel_tokens_regrouped():
    from longattn.tasks import pathfinder

    pixels = pathfinder.generate(pathfinder.PathfinderConfig(size=16, n_val=8), "val", 3)
    tiles = pathfinder.generate(pathfinder.PathfinderConfig(size=16, n_val=8, patch=2), "val", 3)
    assert np.array_equal(pixels.y, tiles.y)  # the same drawings
    for a, b in zip(pixels.x, tiles.x):
        bits = (a.reshape(8, 2, 8, 2) - 1).transpose(0, 2, 1, 3).reshape(64, 4)  # tiles, row-major inside
        assert np.array_equal(b, 1 + bits[:, 0] * 8 + bits[:, 1] * 4 + bits[:, 2] * 2 + bits[:, 3])
    with pytest.raises(ValueError, match="patch"):
        pathfinder.PathfinderConfig(size=30, patch=4)


# ---------------------------------------------------------------- recall, copy
def test_recall_labels_are_the_paired_values():
    from longattn.tasks import recall

    cfg = recall.RecallConfig(num_keys=10, num_values=7, pairs=5, queries=4, seq_len=30, n_val=50, fused_pairs=False)
    data = recall.generate(cfg, "val", 3)
    for row, lab in zip(data.x, data.y):
        pairs = {int(row[i]): int(row[i + 1]) for i in range(0, 10, 2)}
        assert len(pairs) == 5  # distinct keys
        qpos = np.nonzero(lab != IGNORE)[0]
        assert len(qpos) == 4 and (qpos >= 10).all()
        for p in qpos:
            value_token = pairs[int(row[p])]
            assert lab[p] == value_token - (2 + cfg.num_keys)
        others = np.setdiff1d(np.arange(10, 30), qpos)
        assert (row[others] == recall.FILLER).all()


def test_recall_fused_pair_tokens_decode_to_the_labels():
    from longattn.tasks import recall

    K, V = 10, 7
    cfg = recall.RecallConfig(num_keys=K, num_values=V, pairs=5, queries=4, seq_len=30, n_val=50)
    assert cfg.fused_pairs and cfg.vocab_size == 2 + K + K * V
    data = recall.generate(cfg, "val", 3)
    for row, lab in zip(data.x, data.y):
        # decode each pair token by hand: token 2 + K + k * V + v
        pairs = {}
        for t in row[0:10:2]:
            code = int(t) - 2 - K
            assert 0 <= code < K * V
            pairs[2 + code // V] = code % V  # key token -> value index
        assert len(pairs) == 5 and (row[1:10:2] == recall.FILLER).all()
        qpos = np.nonzero(lab != IGNORE)[0]
        assert len(qpos) == 4 and (qpos >= 10).all()
        for p in qpos:
            assert 2 <= row[p] < 2 + K and lab[p] == pairs[int(row[p])]


def test_copy_labels():
    from longattn.tasks import copy as copy_task

    cfg = copy_task.CopyConfig(length=6, symbols=5, n_val=20)
    d = copy_task.generate(cfg, "val", 1)
    assert d.x.shape == (20, 12)
    for row, lab in zip(d.x, d.y):
        w = row[:6]
        assert row[6] == copy_task.SEP
        assert (lab[:6] == IGNORE).all()
        assert list(lab[6:]) == list(w)  # position 6 (SEP) predicts w[0], ... 11 predicts w[5]
        assert list(row[7:]) == list(w[:5])
    dm = copy_task.generate_masked(copy_task.CopyMaskedConfig(length=6, symbols=5, n_val=20), "val", 1)
    assert (dm.x[:, 7:] == copy_task.MASK).all()
    assert (dm.y[:, 7:] == dm.x[:, :6] - copy_task.FIRST).all() and (dm.y[:, :7] == IGNORE).all()


def test_digits_match_sklearn():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    d = load_digits()
    parts = [tasks.load("digits", s, cache=False) for s in tasks.SPLITS]
    assert sum(len(p) for p in parts) == 1797
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    ref = {tuple(img.astype(int).ravel()): t for img, t in zip(d.images, d.target)}
    hits = sum(ref.get(tuple(row - 1)) == t for row, t in zip(x, y))
    assert hits >= 1790  # (a handful of duplicate images carry different labels)
    up = tasks.load("digits", "val", cache=False, upsample=2)
    assert up.x.shape == (250, 256)


# ---------------------------------------------------------------- registry, seeds, cache
@pytest.mark.parametrize("name", ["listops", "pathfinder", "recall", "copy", "copy_masked", "digits"])
def test_registry_determinism_and_shapes(name, tmp_path):
    spec = tasks.get(name)
    small = {"digits": {}}.get(name, {"n_val": 16})
    cfg = spec.make_config(**small)
    a = tasks.load(name, "val", seed=5, config=cfg, cache=False)
    b = tasks.load(name, "val", seed=5, config=cfg, cache=False)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.x.shape[1] == cfg.seq_len and a.x.max() < cfg.vocab_size and a.x.dtype == np.int64
    labels = a.y[a.y != IGNORE]
    assert labels.min() >= 0 and labels.max() < cfg.num_classes
    if spec.kind == "classify":
        assert a.y.shape == (len(a),)
    else:
        assert a.y.shape == a.x.shape
    if name != "digits":
        c = tasks.load(name, "val", seed=6, config=cfg, cache=False)
        assert not np.array_equal(a.x, c.x)
        t = tasks.load(name, "train", seed=5, config=spec.make_config(n_train=16, **small), cache=False)
        assert not np.array_equal(a.x[:4], t.x[:4])  # splits are different draws


def test_cache_roundtrip_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))
    a = tasks.load("recall", "val", seed=1, n_val=32)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")
    b = tasks.load("recall", "val", seed=1, n_val=32)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    # a damaged cache file is regenerated, not trusted
    (tmp_path / files[0]).write_bytes(b"garbage")
    c = tasks.load("recall", "val", seed=1, n_val=32)
    assert np.array_equal(a.x, c.x)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="bogus"):
        tasks.get("listops").make_config(bogus=1)
    with pytest.raises(ValueError, match="nope"):
        tasks.get("nope")
    with pytest.raises(ValueError, match="min_len"):
        tasks.get("listops").make_config(min_len=300, max_len=100)
    with pytest.raises(ValueError, match="queries"):
        tasks.get("recall").make_config(queries=100, seq_len=64)
    with pytest.raises(ValueError, match="split"):
        tasks.load("recall", "dev", cache=False)
