"""Each Pattern owns its point predicate (``Pattern.mask_mod``, issue 30): it equals
the pattern's ``visible`` point by point, and a new Pattern runs on Flex's BlockMask
without any edit of the Flex modules."""

from __future__ import annotations

import pytest
import torch

from longattn.patterns import (
    INF, Band, Grouping, Local, Pattern, PerHead, PointContext, RandomBlocks, Strided, make, point_int,
)

N, HEADS = 37, 4  # not a multiple of any block size used below


def _cases() -> list[Pattern]:
    return [
        make("full"), make("causal"), make("local", before=3, after=5), make("dilated", radius=2, dilation=3),
        make("strided", stride=5), make("block_diagonal", block=6), make("global", indices=[0, 11, 40]),
        RandomBlocks(2, 5, seed=3), make("sparse_transformer_strided", l=6),
        make("sparse_transformer_fixed", l=6, c=2, mode="union"), make("longformer", window=4, global_indices=[2]),
        make("bigbird", block=5, random_blocks=1), PerHead([Local(2, 2), Strided(4)]), Local(6, 6) & Strided(3),
    ]


@pytest.mark.parametrize("causal", [False, True])
def test_mask_mod_equals_visible(causal):
    i = torch.arange(N)[None, :, None]
    j = torch.arange(N)[None, None, :]
    h = torch.arange(HEADS)[:, None, None]
    for p in _cases():
        p.prepare(N, HEADS, causal)
        fn, kind = p.mask_mod(PointContext(HEADS, causal, N, (N,)))
        got = fn(i, j, h, torch.zeros_like(i), i).expand(HEADS, N, N)
        if causal:
            got = got & (j <= i)
        assert not kind.startswith("custom"), (p, kind)  # built-ins have a kind shared by their instances
        assert torch.equal(got, p.mask(N, HEADS, causal)), (p, causal)


def test_global_mask_mod_hand_drawn():
    """global_tokens([0]) at N = 8 (row 0 and column 0), drawn by hand."""
    fn, _ = make("global", indices=[0]).mask_mod(PointContext(1, False, 8, (8,)))
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    rows = ["########"] + ["#......."] * 7
    want = torch.tensor([[c == "#" for c in row] for row in rows])
    assert torch.equal(fn(i, j, torch.zeros(()), torch.zeros(()), i), want)


class _EveryThirdBefore(Pattern):
    """A pattern the Flex modules never heard of: j <= i and (i - j) % 3 == 0."""

    def visible(self, i, j, h):
        return ((i - j) % 3 == 0) & (j <= i)

    def components(self, n, heads, rows=None):
        return [Band(INF, 0, Grouping("residue", 3))]

    def mask_mod(self, ctx):
        d = point_int(3)
        return (lambda i, j, h, b, gi: ((i - j) % d == 0) & (j <= i)), "every_third_before"


def test_new_pattern_runs_on_flex_by_its_mask_mod():
    flex = pytest.importorskip("longattn.ops.flex")
    if not flex.flex_available():  # pragma: no cover
        pytest.skip("this torch has no FlexAttention")
    n = 29
    bm = flex.block_mask_for(_EveryThirdBefore(), n, 1, block=8)
    assert bm.mask_mod.longattn_kind[0] == "every_third_before"
    want = torch.tensor([[(a - b) % 3 == 0 and b <= a for b in range(n)] for a in range(n)])
    assert torch.equal(flex.expand_block_mask(bm)[0, 0], want)
