"""FlexAttention block masks built from pattern components.

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
from longattn.ops.pattern import flex_attention as flex_impl  # noqa: E402 (where _light etc. are looked up)
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
    """BigBird at N = 2^20, the whole mask: the global row block sees every key block,
    so the rectangular kv_indices [QB, KB] of the BlockMask format costs 8192^2 int32
    (256 MB) per list; still orders of magnitude below the 128 GiB of an N x N bit
    mask. split_block_mask_for takes that row and column out (see
    test_split_block_mask_at_one_million_is_small)."""
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


# ----------------------------------------------------------------------------------------
# Heavy rows and columns outside Flex (split_block_mask_for, split=True)
# ----------------------------------------------------------------------------------------

SPLIT_PATTERNS = {
    "bigbird": lambda: make("bigbird", block=16),
    "longformer": lambda: make("longformer", window=24),
    "global": lambda: make("global", indices=(0, 5, 77, 300)),
    "per_head_global": lambda: PerHead([Local(20, 3), GlobalTokens([0, 500])]),
}


def _split_cases(n: int):
    """(causal, key_padding_mask, segment_ids, q_len): plain; causal with padding and
    bottom-right queries; documents long enough to hold heavy rows of their own."""
    kpm, _ = _inputs(n)
    seg = (torch.arange(n) // 450).expand(2, n).clone()
    seg[1, 700:] += 1
    return [(False, None, None, None), (True, kpm, None, n // 3), (False, kpm, seg, None), (True, None, seg, None)]


def _heavy_region(sbm, n: int, nq: int) -> torch.Tensor:
    m = torch.zeros(nq, n, dtype=torch.bool)
    m[sbm.heavy_rows()] = True
    m[:, sbm.heavy_keys()] = True
    return m


@pytest.mark.parametrize("name", sorted(SPLIT_PATTERNS))
def test_split_mask_is_the_predicate_without_heavy_blocks(name):
    """The light BlockMask is the predicate outside the heavy rows and columns, its
    lists narrower than the whole mask's; the kept mask_mod is the whole predicate."""
    p = SPLIT_PATTERNS[name]()
    n, H = 999, 2
    for causal, kp, sg, q_len in _split_cases(n):
        nq = q_len or n
        sbm = flex.split_block_mask_for(p, n, H, causal=causal, block=16, key_padding_mask=kp, segment_ids=sg,
                                        q_len=q_len, heavy_min_blocks=2, compact=True)
        whole = block_mask_for(p, n, H, causal=causal, block=16, key_padding_mask=kp, segment_ids=sg, q_len=q_len,
                               compact=True)
        B = next((x.shape[0] for x in (kp, sg) if x is not None), 1)
        ref = reference_mask(p, n, H, causal, kp, sg, q_len)
        heavy = _heavy_region(sbm, n, nq)
        got = expand_block_mask(sbm.block_mask, B, H)
        assert torch.equal(got, (ref & ~heavy).expand_as(got)), (name, causal, q_len)
        if kp is None and sg is None:  # the plain case: a global row and column are found, lists narrow
            assert sbm.heavy_q_blocks.numel() > 0 and sbm.heavy_k_blocks.numel() > 0
            width = lambda bm: max(bm.kv_indices.shape[-1], bm.full_kv_indices.shape[-1])  # noqa: E731
            assert width(sbm.block_mask) < width(whole) / 4
        i = torch.arange(nq)[None, None, :, None]
        j = torch.arange(n)[None, None, None, :]
        whole_pred = sbm.mask_mod(torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None], i, j)
        assert torch.equal(whole_pred.expand_as(ref), ref.expand(B, H, nq, n))


def test_no_heavy_blocks_in_uniform_patterns():
    for p in (make("local", before=40, after=40), make("strided", stride=7), make("full"), make("causal")):
        for causal in (False, True):
            sbm = flex.split_block_mask_for(p, 999, 1, causal=causal, block=16, heavy_min_blocks=2)
            assert sbm.heavy_q_blocks.numel() == 0 and sbm.heavy_k_blocks.numel() == 0, (p, causal)


def _eager_light(q, k, v, bm, scale, enable_gqa, lse):
    """Flex's uncompiled (math) path: the real Flex semantics (log-sum-exp included),
    which the CPU's compiled Flex cannot return."""
    return flex._flex_call(q, k, v, bm, scale, enable_gqa, lse)


def _dense_light(q, k, v, bm, scale, enable_gqa, lse):
    """Flex's part played by a differentiable dense softmax over the light BlockMask's
    expansion (the CPU has no Flex backward)."""
    m = expand_block_mask(bm, q.shape[0], q.shape[1])
    out, l = flex._chunk_attention(q, k, v, m, scale)
    return (out, l) if lse else out


@pytest.mark.parametrize("name", ["bigbird", "global", pytest.param("longformer", marks=pytest.mark.slow),
                                  pytest.param("per_head_global", marks=pytest.mark.slow)])
def test_split_forward_equals_reference(name, monkeypatch):
    """Flex (eager) on the light lists + heavy rows and columns merged by lse == the
    float64 dense oracle: causal and not, padding, documents, GQA, bottom-right."""
    monkeypatch.setattr(flex_impl, "_light", _eager_light)
    p = SPLIT_PATTERNS[name]()
    n = 999
    for causal, kp, sg, q_len in _split_cases(n):
        torch.manual_seed(0)
        q = torch.randn(2, 2, q_len or n, 16)
        k, v = (torch.randn(2, 1, n, 16) for _ in range(2))
        with torch.no_grad():
            out = flex_pattern_attention(q, k, v, p, causal=causal, key_padding_mask=kp, segment_ids=sg,
                                         enable_gqa=True, block=16, split=True, heavy_factor=2, heavy_min_blocks=2)
        ref = _reference(q, k, v, p, causal, kp, sg)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bigbird", "global", "per_head_global"])
def test_split_gradients_equal_reference(name, monkeypatch):
    """Outputs and q/k/v gradients of the split path (Flex's part dense here) equal
    the float64 dense oracle; a query with no visible key gives zeros and no NaN."""
    monkeypatch.setattr(flex_impl, "_light", _dense_light)
    p = SPLIT_PATTERNS[name]()
    n = 701
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, :200] = False  # early queries of row 1 see no real key (local heads)
    kpm[0, 7::3] = False
    seg = (torch.arange(n) // 351).expand(2, n).clone()
    splits = []
    for causal, kp, sg, q_len in ((False, kpm, None, None), (True, None, seg, None), (True, kpm, None, 250)):
        torch.manual_seed(1)
        nq = q_len or n
        q = torch.randn(2, 4, nq, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        sbm = flex.split_block_mask_for(p, n, 4, causal=causal, block=16, key_padding_mask=kp, segment_ids=sg,
                                        q_len=q_len, heavy_factor=2, heavy_min_blocks=2)
        splits.append(sbm.heavy_q_blocks.numel() + sbm.heavy_k_blocks.numel())
        out = flex_pattern_attention(q, k, v, p, causal=causal, key_padding_mask=kp, segment_ids=sg,
                                     enable_gqa=True, block=16, split=True, heavy_factor=2, heavy_min_blocks=2)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
        ref = _reference(qr, kr, vr, p, causal, kp, sg)
        rgrads = torch.autograd.grad(ref, (qr, kr, vr), g)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        for a, b in zip(grads, rgrads):
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    assert splits[0] > 0 and splits[1] > 0, splits  # heavy blocks were split out (plain; causal documents)


def test_engine_flex_backend_reaches_the_split(monkeypatch):
    """pattern_attention(backend='flex') goes through the split (default thresholds,
    block 128) and equals the engine."""
    import longattn

    monkeypatch.setattr(flex_impl, "_light", _eager_light)
    monkeypatch.setattr(flex_impl, "_split_default", lambda device: True)
    calls = []
    real = flex._heavy_rows_attention
    monkeypatch.setattr(flex_impl, "_heavy_rows_attention", lambda *a: calls.append(1) or real(*a))
    n = 2999
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        a = longattn.attention(q, k, v, "longformer", window=16, backend="flex")
        b = longattn.attention(q, k, v, "longformer", window=16, backend="engine")
    assert calls, "the global row block was not split out"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cpu_split_needs_the_lse_clearly():
    q = torch.randn(1, 1, 999, 16)
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
        flex_pattern_attention(q, q, q, make("bigbird", block=16), block=16, split=True, heavy_min_blocks=2)


_SPLIT_1M = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from longattn.ops.flex import split_block_mask_for
    from longattn.patterns import make
    n = int(sys.argv[1])
    p = make("bigbird", block=64, random_blocks=3, global_blocks=1)
    split_block_mask_for(p, 4096, 1, compact=True)  # imports and caches warm
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    sbm = split_block_mask_for(p, n, 1, compact=True, with_q_blocks=True)
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bm = sbm.block_mask
    idx = sum(x.numel() * x.element_size() for x in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
              bm.full_kv_indices, bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices))
    print(json.dumps(dict(seconds=dt, peak_mb=(r1 - r0) / 1024, index_mb=idx / 2**20,
                          heavy_q=sbm.heavy_q_blocks.tolist(), heavy_k=sbm.heavy_k_blocks.tolist(),
                          W=bm.kv_indices.shape[-1])))
    """
)


def test_split_block_mask_at_one_million_is_small():
    """BigBird at N = 2^20 (block 64, 3 random, 1 global; compact lists as on CUDA, with
    the backward's q lists): with its global row and column in the lists, each list
    is 8192 x 8192 int32 (512 MB of index tensors); split out, a few MB."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _SPLIT_1M, str(1 << 20)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy_q"] == [0] and got["heavy_k"] == [0], got
    assert got["index_mb"] < 16 and got["W"] <= 16, got
    assert got["peak_mb"] < 100 and got["seconds"] < 10, got


_SIDE_MEMORY = textwrap.dedent(
    """
    import json, resource
    import torch
    from longattn.ops.flex import flex_pattern_attention
    from longattn.patterns import make
    n = 1 << 15
    p = make("global", indices=range(64))  # every pair is in a heavy row or column: no Flex call
    q, k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for _ in range(3))
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = flex_pattern_attention(q, k, v, p, split=True)
    out.sum().backward()
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(peak_mb=(r1 - r0) / 1024, finite=bool(torch.isfinite(q.grad).all()))))
    """
)


def test_split_side_memory_is_not_quadratic():
    """The heavy rows and columns at N = 2^15, forward + backward: chunks recomputed in
    the backward, far below one N x N float32 score matrix (4 GiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _SIDE_MEMORY], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["peak_mb"] < 300, got


# ----------------------------------------------------------------------------------------
# Lengths off the block grid (issue 29): the CPU's compiled Flex runs on whole blocks
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,nq,causal", [(72, 72, False), (104, 33, True), (200, 200, False), (8, 3, True)])
def test_padded_block_mask_hides_the_padding(n, nq, causal):
    """pad_to_blocks: seq_lengths are whole blocks; over the real rows and keys the mask
    is the predicate at (nq, n); padded keys are never visible, so the cut last key
    block is never listed full (Flex would skip the mask_mod there)."""
    kpm, seg = _inputs(n)
    p = make("bigbird", block=16)
    bm = block_mask_for(p, n, 2, causal=causal, block=64, key_padding_mask=kpm, segment_ids=seg, q_len=nq,
                        pad_to_blocks=True)
    assert bm.seq_lengths == (-(-nq // 64) * 64, -(-n // 64) * 64)
    got = expand_block_mask(bm, 2, 2)
    ref = reference_mask(p, n, 2, causal, kpm, seg, nq)
    assert torch.equal(got[:, :, :nq, :n], ref.expand(2, 2, nq, n))
    assert not got[..., n:].any()
    last = (n - 1) // 64
    assert not (bm.full_kv_indices[bm.full_kv_num_blocks > 0] == last).any() or n % 64 == 0


def test_flex_forward_at_lengths_off_the_block_grid():
    """Compiled Flex on the CPU at N = 8 mod 16 below one block (issue 29 saw wrong rows
    and NaN at 8, 72, 104, 120), with key padding: q, k, v (and the mask's tables) are
    padded to whole blocks inside, so these lengths share one compiled kernel; each
    equals the float64 dense reference, and queries that see no real key give zeros."""
    p = make("local", before=20, after=5)
    for n in (120, 72, 8):
        kpm = torch.ones(2, n, dtype=torch.bool)
        kpm[1, : n // 2] = False  # early queries of row 1 see no real key: zeros, not NaN
        out, _ = _check_forward(p, n=n, kpm=kpm)
        if n > 8:  # a window of 5 after: queries before n // 2 - 5 see only padding
            assert float(out[1, :, : n // 2 - 5].abs().max()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("n", [24, 40, 56, 88, 104, 136, 152])
def test_flex_forward_lengths_sweep(n):
    """More lengths off the grid: causal with bottom-right queries and documents."""
    kpm, seg = _inputs(n)
    _check_forward(make("longformer", window=8), n=n, nq=n - n // 3, causal=True, kpm=kpm)
    _check_forward(make("bigbird", block=16), n=n, seg=seg)


def test_cpu_float64_is_refused_clearly():
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(TypeError, match="float64"):
        flex_pattern_attention(q, q, q, make("local", before=2, after=2))
