"""FlexAttention block masks built from pattern components (issue 19).

The dense expansion of every BlockMask (full blocks all visible, partial blocks
AND-ed with its mask_mod, the rest invisible) must equal the dense predicate mask,
with padding and documents applied by an independent reference below. On the CPU,
compiled Flex has a forward only: it is held to the float64 dense reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from longattn.patterns import GlobalTokens, Local, PerHead, RandomBlocks, Strided, make

flex = pytest.importorskip("longattn.ops.flex")
if not flex.flex_available():  # pragma: no cover
    pytest.skip("this torch has no FlexAttention", allow_module_level=True)

from longattn.ops.flex import block_mask_for, expand_block_mask, flex_pattern_attention  # noqa: E402
from longattn.ops.reference import dense_attention  # noqa: E402

PATTERNS = {
    "local": lambda: make("local", before=40, after=50),
    "local_narrow": lambda: make("local", before=3, after=0),
    "dilated": lambda: make("dilated", radius=3, dilation=4),
    "strided": lambda: make("strided", stride=7),
    "strided_wide": lambda: make("strided", stride=70),
    "block_diagonal": lambda: make("block_diagonal", block=70),
    "global": lambda: make("global", indices=(0, 5, 77)),
    "random": lambda: make("random", blocks_per_row=2, block=32, seed=3),
    "bigbird": lambda: make("bigbird", block=16),
    "longformer": lambda: make("longformer", window=24),
    "longformer_dilated": lambda: make("longformer", window=24, dilation=3),
    "st_strided_heads": lambda: make("sparse_transformer_strided", l=12),
    "st_strided_union": lambda: make("sparse_transformer_strided", l=12, mode="union"),
    "st_fixed_heads": lambda: make("sparse_transformer_fixed", l=40, c=3),
    "st_fixed_union": lambda: make("sparse_transformer_fixed", l=40, c=3, mode="union"),
    "union": lambda: Local(5, 5) | Strided(33) | GlobalTokens([7]),
    "intersection": lambda: Local(60, 60) & Strided(3),
    "per_head": lambda: PerHead([Local(5, 5), Strided(9)]),
    "per_head_random": lambda: PerHead([RandomBlocks(2, 16, seed=1), Local(20, 0) | GlobalTokens([0])]),
    "full": lambda: make("full"),
    "causal": lambda: make("causal"),
}


def _docs(ids: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for x in range(1, len(ids) + 1):
        if x == len(ids) or ids[x] != ids[x - 1]:
            out.append((s, x - s))
            s = x
    return out


def reference_mask(p, n, heads, causal, kpm=None, seg=None, q_len=None):
    """[B, H, q_len, n]: each document's own pattern mask on the diagonal, padding cut."""
    B = max((x.shape[0] for x in (kpm, seg) if x is not None), default=1)
    m = torch.zeros(B, heads, n, n, dtype=torch.bool)
    for b in range(B):
        for s, L in _docs(seg[b].tolist()) if seg is not None else [(0, n)]:
            m[b, :, s : s + L, s : s + L] = p.mask(L, heads, causal)
    if kpm is not None:
        m &= kpm[:, None, None, :]
    return m[:, :, n - (q_len or n) :]


def _inputs(n: int, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(B, n, generator=g) > 0.2
    kpm[-1, : n // 3] = False  # a run of padding: fully padded key blocks
    seg = torch.cumsum((torch.rand(B, n, generator=g) < 0.02).long(), 1)
    seg[-1] = torch.arange(n) // 150  # documents of 150 (and a shorter last one)
    return kpm, seg


def _check_mask(p, n, heads, block, causal, kp, sg, q_len):
    bm = block_mask_for(p, n, heads, causal=causal, block=block, key_padding_mask=kp, segment_ids=sg, q_len=q_len)
    B = next((x.shape[0] for x in (kp, sg) if x is not None), 1)
    got = expand_block_mask(bm, B, heads)
    ref = reference_mask(p, n, heads, causal, kp, sg, q_len)
    assert torch.equal(got, ref.expand_as(got)), (p, n, causal, kp is not None, sg is not None, q_len)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_block_mask_equals_predicate(name):
    """Every pattern: plain; causal + padding + bottom-right; documents + padding."""
    p = PATTERNS[name]()
    n = 160
    kpm, seg = _inputs(n)
    _check_mask(p, n, 2, 16, False, None, None, None)
    _check_mask(p, n, 2, 16, True, kpm, None, n // 3)
    _check_mask(p, n, 2, 16, False, kpm, seg, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_block_mask_equals_predicate_all_cases(name):
    p = PATTERNS[name]()
    for n, block in ((200, 16), (333, 32)):
        kpm, seg = _inputs(n)
        for causal in (False, True):
            for kp, sg, q_len in ((None, None, None), (kpm, None, None), (None, seg, None), (kpm, seg, None),
                                  (None, None, n // 3), (kpm, seg, n // 2)):
                _check_mask(p, n, 2, block, causal, kp, sg, q_len)


def test_default_block_and_one_query():
    p = make("bigbird", block=64)
    for q_len in (None, 1):
        bm = block_mask_for(p, 300, 2, causal=True, q_len=q_len)
        assert torch.equal(expand_block_mask(bm, 1, 2), reference_mask(p, 300, 2, True, q_len=q_len))


def test_full_blocks_where_every_pair_is_visible():
    # a wide window: the interior blocks are full, two partial blocks on the edges
    bm = block_mask_for(make("local", before=64, after=64), 512, 1, block=16, compact=True)
    assert int(bm.full_kv_num_blocks.max()) >= 7 and int(bm.kv_num_blocks.max()) <= 2
    # full attention: every block full
    bm = block_mask_for(make("full"), 512, 1, block=32)
    assert int(bm.kv_num_blocks.sum()) == 0 and int(bm.full_kv_num_blocks.sum()) == 16 * 16
    # bigbird's window gathers: the diagonal block is covered by two gather rows, full
    bm = block_mask_for(make("bigbird", block=16, random_blocks=0, global_blocks=0), 256, 1, block=32)
    assert torch.equal(bm.full_kv_num_blocks.flatten(), torch.ones(8, dtype=torch.int32))
    # global rows and columns of whole blocks: full
    bm = block_mask_for(make("global", indices=range(32)), 256, 1, block=32)
    assert int(bm.kv_num_blocks.sum()) == 0 and int(bm.full_kv_num_blocks.sum()) == 8 + 7
    # padding or a document boundary inside a key block: never full
    kpm = torch.ones(1, 512, dtype=torch.bool)
    kpm[0, 100] = False
    bm = block_mask_for(make("full"), 512, 1, block=32, key_padding_mask=kpm)
    assert int(bm.kv_num_blocks.sum()) == 16 and int((bm.full_kv_indices[0, 0, :, :15] == 3).sum()) == 0


def test_transposed_lists_match():
    p = make("bigbird", block=16)
    kpm, seg = _inputs(200)
    bm = block_mask_for(p, 200, 2, causal=True, block=32, key_padding_mask=kpm, segment_ids=seg, compact=True)
    for num, idx, qnum, qidx in ((bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices),
                                 (bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_q_num_blocks, bm.full_q_indices)):
        B, H, QB = num.shape
        KB = qnum.shape[-1]
        a = torch.zeros(B, H, QB, KB, dtype=torch.bool)
        t = torch.zeros(B, H, KB, QB, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for r in range(QB):
                    a[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = True
                for c in range(KB):
                    t[b, h, c, qidx[b, h, c, : qnum[b, h, c]].long()] = True
        assert torch.equal(a, t.transpose(-1, -2))


def test_compact_lists_are_short():
    bm = block_mask_for(make("local", before=256, after=256), 1 << 16, 1, compact=True)
    assert bm.kv_indices.shape[-1] == 2 and bm.full_kv_indices.shape[-1] == 3
    bm = block_mask_for(make("local", before=256, after=256), 4096, 1)  # CPU default: padded
    assert bm.kv_indices.shape[-1] == 32


_BUILD_1M = textwrap.dedent(
    """
    import json, resource, sys, time
    from longattn.ops.flex import block_mask_for
    from longattn.patterns import make
    out = {}
    for name, n in json.loads(sys.argv[1]):
        p = make("local", before=256, after=256) if name == "local" else make(name)
        block_mask_for(p, 4096, 1, compact=True)  # imports and caches warm
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        bm = block_mask_for(p, n, 1, compact=True)
        dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        blocks = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
        out[f"{name}@{n}"] = dict(seconds=dt, peak_mb=(r1 - r0) / 1024, blocks=blocks)
    print(json.dumps(out))
    """
)


def _build_in_subprocess(cases):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _BUILD_1M, json.dumps(cases)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_construction_at_one_million_is_linear():
    """N = 2^20: an N x N bool predicate would be 2^40 bits (128 GiB); the build is
    O(visible blocks): local in well under a second and a few MB."""
    n = 1 << 20
    got = _build_in_subprocess([["local", n], ["bigbird", 1 << 17]])
    loc = got[f"local@{n}"]
    assert loc["blocks"] == 5 * (n // 128) - 6
    assert loc["peak_mb"] < 100 and loc["seconds"] < 10, loc
    bb = got[f"bigbird@{1 << 17}"]
    assert bb["peak_mb"] < 200 and bb["seconds"] < 10, bb


@pytest.mark.slow
def test_construction_bigbird_one_million():
    """BigBird at N = 2^20: the global row block sees every key block, so the
    rectangular kv_indices [QB, KB] of the BlockMask format costs 8192^2 int32 (256 MB)
    per list; still orders of magnitude below the 128 GiB of an N x N bit mask."""
    n = 1 << 20
    bb = _build_in_subprocess([["bigbird", n]])[f"bigbird@{n}"]
    assert bb["peak_mb"] < 2048 and bb["seconds"] < 60, bb


# ----------------------------------------------------------------------------------------
# Compiled Flex forward on the CPU against the float64 reference
# ----------------------------------------------------------------------------------------


def _reference(q, k, v, p, causal, kpm, seg, scale=None):
    B, H, nq, _ = q.shape
    n = k.shape[2]
    g = H // k.shape[1]
    kk, vv = (x.repeat_interleave(g, 1).double() for x in (k, v))
    m = reference_mask(p, n, H, causal, kpm, seg, nq)
    qq = torch.nn.functional.pad(q.double(), (0, 0, n - nq, 0))
    full = torch.zeros(m.shape[0], H, n, n, dtype=torch.bool)
    full[:, :, n - nq :] = m
    return dense_attention(qq, kk, vv, full, scale=scale)[:, :, n - nq :]


def _check_forward(p, *, n=200, H=2, Hkv=2, nq=None, causal=False, kpm=None, seg=None, D=16):
    torch.manual_seed(0)
    nq = nq or n
    B = 2
    q = torch.randn(B, H, nq, D)
    k, v = (torch.randn(B, Hkv, n, D) for _ in range(2))
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    with torch.no_grad():
        out = flex_pattern_attention(q, k, v, p, causal=causal, key_padding_mask=kpm, segment_ids=seg,
                                     enable_gqa=H != Hkv)
    assert sum(counters["graph_break"].values()) == breaks, "Flex fell back to eager"
    ref = _reference(q, k, v, p, causal, kpm, seg)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    return out, ref


def test_flex_forward_local_padding_and_empty_rows():
    n = 200
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, :120] = False  # early queries of row 1 see no real key: zeros, not NaN
    out, ref = _check_forward(make("local", before=20, after=5), n=n, kpm=kpm)
    assert float(out[1, :, :90].abs().max()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bigbird_padding", "st_fixed_causal_gqa", "per_head_bottom_right", "longformer_segments"])
def test_flex_forward_more(case):
    kpm, seg = _inputs(256)
    if case == "bigbird_padding":
        _check_forward(make("bigbird", block=32), n=256, kpm=kpm)
    elif case == "st_fixed_causal_gqa":
        _check_forward(make("sparse_transformer_fixed", l=32, c=4), n=256, H=4, Hkv=2, causal=True)
    elif case == "per_head_bottom_right":
        _check_forward(PerHead([Local(9, 0), Strided(17)]), n=256, nq=77, causal=True)
    else:
        _check_forward(make("longformer", window=16), n=256, seg=seg, kpm=kpm)


def test_cpu_backward_is_refused_clearly():
    q = torch.randn(1, 1, 8, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        flex_pattern_attention(q, q.detach(), q.detach(), make("local", before=2, after=2))


def test_bad_arguments():
    p = make("local", before=2, after=2)
    with pytest.raises(ValueError, match="q_len"):
        block_mask_for(p, 10, 1, q_len=11)
    with pytest.raises(ValueError, match="key_padding_mask"):
        block_mask_for(p, 10, 1, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="pattern"):
        block_mask_for("local", 10, 1)
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_pattern_attention(q, k, k, p)


def test_registry_backend_choice():
    """backend='flex' through a registered mechanism equals the engine (forward, CPU);
    'auto' stays on the engine off CUDA; a bad name and a CPU backward are refused."""
    import longattn

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        a = longattn.attention(q, k, v, "local", before=20, after=3, backend="flex")
        b = longattn.attention(q, k, v, "local", before=20, after=3, backend="engine")
        c = longattn.attention(q, k, v, "local", before=20, after=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(b, c)
    with pytest.raises(ValueError, match="backend"):
        longattn.attention(q, k, v, "local", backend="triton")
    with pytest.raises(NotImplementedError, match="backward"):
        longattn.attention(q.requires_grad_(), k, v, "local", backend="flex")
