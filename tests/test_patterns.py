"""Each pattern's small dense mask against a hand-drawn matrix ('#' = visible)."""

from __future__ import annotations

import pytest
import torch

from longattn import patterns as P


def drawn(text: str) -> torch.Tensor:
    rows = [r.strip() for r in text.strip().splitlines()]
    return torch.tensor([[c == "#" for c in r] for r in rows])


def show(m: torch.Tensor) -> str:
    return "\n".join("".join("#" if x else "." for x in row) for row in m.tolist())


CASES = [
    (P.Local(1, 2), 8, """
        ###.....
        ####....
        .####...
        ..####..
        ...####.
        ....####
        .....###
        ......##"""),
    (P.Local(2, 0), 8, """
        #.......
        ##......
        ###.....
        .###....
        ..###...
        ...###..
        ....###.
        .....###"""),
    (P.Dilated(1, 2), 8, """
        #.#.....
        .#.#....
        #.#.#...
        .#.#.#..
        ..#.#.#.
        ...#.#.#
        ....#.#.
        .....#.#"""),
    (P.Strided(3), 8, """
        #..#..#.
        .#..#..#
        ..#..#..
        #..#..#.
        .#..#..#
        ..#..#..
        #..#..#.
        .#..#..#"""),
    (P.GlobalTokens([0, 5]), 8, """
        ########
        #....#..
        #....#..
        #....#..
        #....#..
        ########
        #....#..
        #....#.."""),
    (P.BlockDiagonal(3), 8, """
        ###.....
        ###.....
        ###.....
        ...###..
        ...###..
        ...###..
        ......##
        ......##"""),
    (P.Causal(), 5, """
        #....
        ##...
        ###..
        ####.
        #####"""),
    # Sparse Transformer strided, l=3, union of A (0 <= i-j < 3) and B ((i-j) % 3 == 0), causal
    (P.SparseTransformerStrided(3, mode="union"), 8, """
        #.......
        ##......
        ###.....
        ####....
        .####...
        ..####..
        #..####.
        .#..####"""),
    # Sparse Transformer fixed, l=4, c=1, union: same block (causal) or j % 4 == 3 (causal)
    (P.SparseTransformerFixed(4, 1, mode="union"), 10, """
        #.........
        ##........
        ###.......
        ####......
        ...##.....
        ...###....
        ...####...
        ...#####..
        ...#...##.
        ...#...###"""),
    # Longformer: window 1 + global token 0
    (P.longformer(1, [0]), 6, """
        ######
        ###...
        ####..
        #.###.
        #..###
        #...##"""),
    # intersection: local(2, 2) and strided(2)
    (P.Local(2, 2) & P.Strided(2), 6, """
        #.#...
        .#.#..
        #.#.#.
        .#.#.#
        ..#.#.
        ...#.#"""),
]


@pytest.mark.parametrize("pattern,n,expected", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_mask_matches_hand_drawn(pattern, n, expected):
    got = pattern.mask(n)[0]
    want = drawn(expected)
    assert got.shape == want.shape
    assert torch.equal(got, want), f"\ngot:\n{show(got)}\nwant:\n{show(want)}"


def test_union_of_local_and_dilated_is_or():
    a, b = P.Local(1, 1), P.Dilated(2, 3)
    assert torch.equal((a | b).mask(12), a.mask(12) | b.mask(12))


def test_per_head_list_splits_heads():
    ph = P.PerHead([P.Local(1, 1), P.Strided(3)])
    m = ph.mask(8, heads=4)
    assert torch.equal(m[0], P.Local(1, 1).mask(8)[0]) and torch.equal(m[1], m[0])
    assert torch.equal(m[2], P.Strided(3).mask(8)[0]) and torch.equal(m[3], m[2])
    with pytest.raises(ValueError, match="divisible"):
        ph.mask(8, heads=3)


def test_random_blocks_seeded_per_head_and_reproducible():
    r = P.RandomBlocks(blocks_per_row=2, block=4, seed=7)
    m = r.mask(32, heads=3)
    # every 4x4 query block row sees exactly 2 whole key blocks
    blocks = m.view(3, 8, 4, 8, 4)
    per_block = blocks.all(-1).all(2)  # [H, qb, kb] whole blocks visible
    assert torch.equal(per_block.sum(-1), torch.full((3, 8), 2))
    assert torch.equal(blocks.any(-1).any(2), per_block)  # nothing partial
    assert not torch.equal(m[0], m[1])  # heads draw differently
    assert torch.equal(P.RandomBlocks(2, 4, seed=7).mask(32, heads=3), m)  # same seed, same draw
    assert not torch.equal(P.RandomBlocks(2, 4, seed=8).mask(32, heads=3), m)


def test_bigbird_blocks():
    m = P.bigbird(block=2, random_blocks=1, global_blocks=1, seed=0).mask(10)[0]
    i = torch.arange(10)
    window = ((i[None] // 2 - i[:, None] // 2).abs() <= 1)
    assert (m >= window).all() and m[:2].all() and m[:, :2].all()
    # each query block has exactly 3 window blocks (2 at the edges), 1 random, 1 global
    assert m.sum() <= (window | (i[:, None] < 2) | (i[None] < 2)).sum() + 10 * 2


def test_visible_count_matches_mask():
    for p in (P.Local(3, 2), P.Dilated(2, 3), P.bigbird(4, 2, 1), P.SparseTransformerFixed(4, 2)):
        for causal in (False, True):
            assert p.visible_count(37, heads=2, causal=causal, chunk=8) == int(p.mask(37, 2, causal).sum())


@pytest.mark.parametrize(
    "make,err",
    [
        (lambda: P.Local(-1, 2), ValueError),
        (lambda: P.Local(1.5, 2), TypeError),
        (lambda: P.Dilated(2, 0), ValueError),
        (lambda: P.Strided(0), ValueError),
        (lambda: P.GlobalTokens([]), ValueError),
        (lambda: P.GlobalTokens([-1]), ValueError),
        (lambda: P.SparseTransformerFixed(4, 5), ValueError),
        (lambda: P.SparseTransformerStrided(4, mode="both"), ValueError),
        (lambda: P.make("nope"), ValueError),
        (lambda: P.make("local", width=3), TypeError),
    ],
)
def test_bad_pattern_arguments(make, err):
    with pytest.raises(err):
        make()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="before"):
        P.Local(-3, 1)
    with pytest.raises(ValueError, match="dilation"):
        P.Dilated(2, 0)
