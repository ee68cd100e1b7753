"""``topk_blocks`` against a float64 dense oracle that makes the same selection on its
own (dense gate per block, a stable sort for the tie rule, a mask), outputs and
gradients; both gates, shared and per-head selection, sink tokens and window, GQA,
padding, bottom-right decode, packed documents, causal leakage, errors and memory."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import registry
from longattn.ops import block_tiles as BT
from longattn.ops import given_keys as GK
from longattn.ops import topk_blocks as TB
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

D64 = torch.float64


def _qkv(B, H, Hkv, N, D=6, seed=0, Nq=None, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq or N, D, generator=g, dtype=D64).requires_grad_()
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=D64).requires_grad_()
    v = torch.randn(B, Hkv, N, Dv or D, generator=g, dtype=D64).requires_grad_()
    return q, k, v


def _dense_gate(q, k, block, gate, kpm):
    """[B, H, Nq, nb] float64, NaN for a block without a real key."""
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nb = -(-Nk // block)
    real = torch.ones(B, Nk, dtype=torch.bool) if kpm is None else kpm
    out = torch.full((B, H, Nq, nb), float("nan"), dtype=D64)
    qd, kd = q.detach().double(), k.detach().double()
    for b in range(B):
        for c in range(nb):
            keys = [j for j in range(c * block, min(Nk, (c + 1) * block)) if real[b, j]]
            if not keys:
                continue
            kk = kd[b, :, keys].repeat_interleave(H // Hkv, 0)  # [H, n, D]
            if gate == "mean":
                out[b, :, :, c] = (qd[b] * kk.mean(1)[:, None]).sum(-1)
            else:
                hi, lo = kk.max(1).values[:, None], kk.min(1).values[:, None]
                out[b, :, :, c] = torch.maximum(qd[b] * hi, qd[b] * lo).sum(-1)
    return out


def _oracle_mask(q, k, *, block, topk, gate="mean", sink_tokens=0, window=0, shared=False,
                 causal=True, kpm=None):
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    R = H // Hkv
    gates = _dense_gate(q, k, block, gate, kpm)
    nb = gates.shape[-1]
    if shared:
        gates = gates.view(B, Hkv, R, Nq, nb).sum(2, keepdim=True).expand(-1, -1, R, -1, -1).reshape(B, H, Nq, nb)
    pos = torch.arange(Nq) + (Nk - Nq)
    own = pos // block
    blocks = torch.arange(nb)
    cand = (blocks < own[:, None]) if causal else (blocks != own[:, None])
    cand = cand & ~gates.isnan()
    key = torch.where(cand, -gates.nan_to_num(0.0), torch.inf)
    order = torch.sort(key, dim=-1, stable=True).indices[..., :topk]  # ties -> lower block
    chosen = torch.zeros(B, H, Nq, nb, dtype=torch.bool).scatter_(-1, order, True) & cand
    chosen |= blocks == own[:, None]
    j = torch.arange(Nk)
    mask = chosen[..., j // block] | (j < sink_tokens) | ((pos[:, None] - window < j) & (j <= pos[:, None]))
    if causal:
        mask &= j <= pos[:, None]
    return mask


def _dense(q, k, v, mask, kpm=None, sinks=None):
    H, Hkv = q.shape[1], k.shape[1]
    kr, vr = (x.repeat_interleave(H // Hkv, 1) for x in (k, v))
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    s = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, H, 1, 1).expand(*s.shape[:3], 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)[..., : k.shape[2]]
    return p @ vr


def _check(out, ref, inputs, tol=1e-10):
    assert (out - ref).abs().max().item() < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=D64)
    for name, a, b in zip("qkvs", torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        err = (a - b).abs().max().item()
        assert err < tol, f"d{name} differs by {err:g}"


CASES = {  # name: (H, Hkv, params, causal, padded); value heads of 5 (D = 6), 8 in the first case
    "mean": (4, 2, dict(block=7, topk=2), True, True),
    "bound": (4, 2, dict(block=7, topk=2, gate="bound"), True, True),
    "mean_shared_sinks_window": (4, 2, dict(block=5, topk=3, sink_tokens=3, window=6, shared=True), True, False),
    "bound_shared_mqa": (4, 1, dict(block=6, topk=2, gate="bound", shared=True, window=3), True, True),
    "mha_sinks_window": (2, 2, dict(block=9, topk=1, sink_tokens=4, window=11), True, False),
    "not_causal": (4, 2, dict(block=6, topk=2, window=4, sink_tokens=2), False, True),
    "not_causal_wide_sinks": (2, 1, dict(block=4, topk=1, window=9, sink_tokens=11, gate="bound"), False, False),
    "sinks_no_window": (4, 2, dict(block=5, topk=2, sink_tokens=7), True, False),
    "sinks_no_window_padded": (4, 2, dict(block=5, topk=2, sink_tokens=3), True, True),
    "not_causal_sinks": (2, 1, dict(block=4, topk=1, sink_tokens=6, gate="bound"), False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_dense_oracle(case, monkeypatch):
    monkeypatch.setattr(GK, "CSR_EDGES", 300)  # several attention chunks
    monkeypatch.setattr(TB, "GATE_ELEMENTS", 1000)  # several gate chunks
    monkeypatch.setattr(BT, "TILE_ELEMENTS", 1)  # one tile per flash call: every row merged across calls
    H, Hkv, params, causal, padded = CASES[case]
    N = 47  # no multiple of any block
    q, k, v = _qkv(2, H, Hkv, N, Dv=8 if case == "mean" else 5)
    kpm = (torch.rand(2, N, generator=torch.Generator().manual_seed(1)) > 0.25) if padded else None
    out = longattn.attention(q, k, v, "topk_blocks", causal=causal, key_padding_mask=kpm, **params)
    ref = _dense(q, k, v, _oracle_mask(q, k, causal=causal, kpm=kpm, **params), kpm)
    _check(out, ref, (q, k, v))


@pytest.mark.parametrize("case", list(CASES))
def test_inference_in_row_runs_equals_the_dense_oracle(case, monkeypatch):
    # without autograd the rows run in runs of one block each (CALL_PAIRS = 1), over one
    # copy of the key blocks; learned sinks included
    monkeypatch.setattr(TB, "CALL_PAIRS", 1)
    monkeypatch.setattr(BT, "TILE_ELEMENTS", 1)
    H, Hkv, params, causal, padded = CASES[case]
    N = 47
    q, k, v = _qkv(2, H, Hkv, N, Dv=8 if case == "mean" else 5, seed=3)
    kpm = (torch.rand(2, N, generator=torch.Generator().manual_seed(2)) > 0.25) if padded else None
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(4), dtype=D64)
    with torch.no_grad():
        out = longattn.attention(q, k, v, "topk_blocks", causal=causal, key_padding_mask=kpm, sinks=sinks, **params)
        ref = _dense(q, k, v, _oracle_mask(q, k, causal=causal, kpm=kpm, **params), kpm, sinks=sinks)
    assert (out - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("Nq", [48, 12])
@pytest.mark.parametrize("params", [dict(block=6, topk=2, sink_tokens=3), dict(block=6, topk=3, window=8, shared=True)])
def test_own_blocks_apart_equal_the_dense_oracle(Nq, params, monkeypatch):
    # whole query blocks aligned to the key blocks (48 keys, blocks of 6; the last 12 rows
    # bottom-right): the own blocks run as one causal call beside the tiles
    monkeypatch.setattr(BT, "TILE_ELEMENTS", 1)
    q, k, v = _qkv(2, 4, 2, 48, Nq=Nq, Dv=5, seed=7)
    sel = TB.select_blocks(q, k, gate="mean", causal=True, key_padding_mask=None,
                           **{n: params.get(n, False) for n in ("block", "topk", "shared")})
    tiles = TB.make_tiles(sel, H=4, Nq=Nq, Nk=48, block=6, sink_tokens=params.get("sink_tokens", 0),
                          window=params.get("window", 0), causal=True, own_apart=True)
    assert tiles.own_first == (48 - Nq) // 6  # the path under test is taken
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(8), dtype=D64, requires_grad=True)
    out = longattn.attention(q, k, v, "topk_blocks", causal=True, sinks=sinks, **params)
    ref = _dense(q, k, v, _oracle_mask(q, k, causal=True, **params), sinks=sinks)
    _check(out, ref, (q, k, v, sinks))


def test_ties_go_to_the_lower_block():
    # query 39 (own block 4), topk=2: block 3 gates highest, blocks 0, 1, 2 hold the same
    # keys (equal gates): blocks 3 and 0 are selected
    q, k, v = _qkv(1, 1, 1, 40)
    with torch.no_grad():
        k[:, :, 8:16] = k[:, :, 0:8]
        k[:, :, 16:24] = k[:, :, 0:8]
        k[:, :, 24:32] = k[:, :, 0:8] + 50.0 * q[:, :, 39:40].sign()
    for gate in ("mean", "bound"):
        out = longattn.attention(q, k, v, "topk_blocks", causal=True, block=8, topk=2, gate=gate)
        mask = torch.zeros(40, 40, dtype=torch.bool)
        mask[39, list(range(0, 8)) + list(range(24, 40))] = True
        ref = _dense(q, k, v, mask.expand(1, 1, 40, 40))
        assert (out[:, :, 39] - ref[:, :, 39]).abs().max() < 1e-12


def test_decode_rows_equal_the_full_call_and_learned_sinks():
    q, k, v = _qkv(1, 4, 2, 53)
    params = dict(block=8, topk=2, gate="bound", sink_tokens=2, window=5)
    full = longattn.attention(q, k, v, "topk_blocks", causal=True, **params)
    for m in (1, 10):
        part = longattn.attention(q[:, :, -m:], k, v, "topk_blocks", causal=True, **params)
        assert (part - full[:, :, -m:]).abs().max() < 1e-12
    if not registry.get("topk_blocks").describe().get("sinks"):
        pytest.skip("the registry has no learned-sinks capability")
    sinks = torch.randn(4, dtype=D64, requires_grad=True)
    out = longattn.attention(q[:, :, -7:], k, v, "topk_blocks", causal=True, sinks=sinks, **params)
    ref = _dense(q[:, :, -7:], k, v, _oracle_mask(q[:, :, -7:], k, **params), sinks=sinks)
    _check(out, ref, (q, k, v, sinks))


@pytest.mark.parametrize("gate", ["mean", "bound"])
def test_kept_summaries_grow_as_the_summaries_of_all_keys(gate):
    # keys arrive in runs of 1 to 20 (some padded): after each, the kept summaries equal
    # those of all keys so far; a changed last key, fewer keys or another batch start over
    g = torch.Generator().manual_seed(11)
    k = torch.randn(2, 3, 90, 5, generator=g, dtype=D64)
    kpm = torch.rand(2, 90, generator=g) > 0.3
    kept, n = TB.KeySummaries(7, gate), 0
    for run in (1, 4, 7, 13, 1, 1, 20, 6, 37):
        n += run
        got = kept.update(k[:, :, :n], kpm[:, :n])
        want = TB.block_summaries(k[:, :, :n], 7, kpm[:, :n], gate)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), n
    k2 = k.clone()
    k2[:, :, 89] += 1.0
    for keys, mask in ((k2, kpm), (k[:, :, :40], kpm[:, :40]), (k[:1], kpm[:1])):
        got = kept.update(keys, mask)
        assert all(torch.equal(a, b) for a, b in zip(got, TB.block_summaries(keys, 7, mask, gate)))


def _causal_cases():
    return [c for c in CASES if CASES[c][3]]


@pytest.mark.parametrize("Dv", [6, 5])
@pytest.mark.parametrize("case", _causal_cases())
def test_decode_steps_over_kept_summaries_equal_the_dense_oracle(case, Dv):
    # a cache that grows by 1 or 3 tokens per step, its summaries kept (KeySummaries):
    # each step (the gathered-keys path: the fused kernel when Dv == D, else plain tiles)
    # equals the oracle's rows, learned sinks and rows that see nothing included
    H, Hkv, params, _, padded = CASES[case]
    N = 47
    q, k, v = _qkv(2, H, Hkv, N, Dv=Dv, seed=9)
    kpm = (torch.rand(2, N, generator=torch.Generator().manual_seed(6)) > 0.25) if padded else None
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(4), dtype=D64)
    kept = registry.get("topk_blocks").key_state({"block": params["block"], "gate": params.get("gate", "mean")})
    t0 = 5
    with torch.no_grad():
        while t0 < N:
            t1 = min(N, t0 + (1 if t0 % 2 else 3))
            m = None if kpm is None else kpm[:, :t1]
            qs, ks, vs = q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1]
            out = longattn.attention(qs, ks, vs, "topk_blocks", causal=True, key_padding_mask=m, sinks=sinks,
                                     key_state=kept, **params)
            ref = _dense(qs, ks, vs, _oracle_mask(qs, ks, kpm=m, **params), m, sinks=sinks)
            assert (out - ref).abs().max().item() < 1e-10, (t0, t1)
            assert kept.length == t1
            t0 = t1


@pytest.mark.parametrize("Dv", [8, 5])
def test_a_decode_step_that_sees_no_key_gives_zeros(Dv):
    q, k, v = _qkv(1, 4, 2, 30, D=8, Dv=Dv)
    kpm = torch.zeros(1, 30, dtype=torch.bool)  # every key padded
    for sinks in (None, torch.zeros(4, dtype=D64)):
        with torch.no_grad():
            out = longattn.attention(q[:, :, -2:], k, v, "topk_blocks", causal=True, key_padding_mask=kpm,
                                     block=8, topk=2, sink_tokens=1, sinks=sinks, key_state=TB.KeySummaries(8))
        assert torch.equal(out, torch.zeros_like(out))


def test_a_decode_step_summarises_only_the_blocks_its_keys_touch(monkeypatch):
    # with kept summaries a step summarises at most one block plus its new keys; without,
    # all of them
    seen = []
    summarise = TB.block_summaries
    monkeypatch.setattr(TB, "block_summaries", lambda k, *a: seen.append(k.shape[2]) or summarise(k, *a))
    q, k, v = _qkv(1, 4, 2, 300)
    kept = TB.KeySummaries(16, "mean")
    with torch.no_grad():
        for t in range(200, 300):
            longattn.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], "topk_blocks", causal=True,
                               block=16, topk=2, key_state=kept)
        assert seen[0] == 201 and max(seen[1:]) <= 16 and len(seen) == 100
        seen.clear()
        longattn.attention(q[:, :, -1:], k, v, "topk_blocks", causal=True, block=16, topk=2)
        assert seen == [300]


def test_kept_summaries_are_refused_where_they_do_not_fit():
    q, k, v = _qkv(1, 2, 1, 30)
    with pytest.raises(ValueError, match="key_state keeps summaries of block=8"):
        longattn.attention(q, k, v, "topk_blocks", causal=True, block=6, key_state=TB.KeySummaries(8))
    with pytest.raises(TypeError, match="key_state must be a KeySummaries"):
        longattn.attention(q, k, v, "topk_blocks", causal=True, key_state={})
    with pytest.raises(ValueError, match="key_state is not supported by mechanism 'local'"):
        longattn.attention(q, k, v, "local", causal=True, key_state=TB.KeySummaries(8))
    with pytest.raises(ValueError, match="segment_ids"):
        longattn.attention(q, k, v, "topk_blocks", causal=True, key_state=TB.KeySummaries(64),
                           segment_ids=torch.zeros(1, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="gate must be one of"):
        TB.KeySummaries(8, "max")


def test_packed_documents_equal_each_document_alone():
    q, k, v = _qkv(1, 2, 1, 60)
    seg = torch.tensor([[0] * 23 + [1] * 30 + [2] * 7])
    params = dict(block=5, topk=2, window=3)
    out = longattn.attention(q, k, v, "topk_blocks", causal=True, segment_ids=seg, **params)
    s = 0
    for n in (23, 30, 7):
        qd, kd, vd = (x[:, :, s : s + n] for x in (q, k, v))
        ref = _dense(qd, kd, vd, _oracle_mask(qd, kd, **params))
        assert (out[:, :, s : s + n] - ref).abs().max() < 1e-12
        s += n


def test_causal_and_padding_leak_nothing():
    def fn(q, k, v):
        return longattn.attention(q, k, v, "topk_blocks", causal=True, block=4, topk=2, sink_tokens=1, window=3)

    assert_no_causal_leak(fn, *_qkv(1, 2, 1, 37), t=17)
    kpm = torch.rand(2, 37, generator=torch.Generator().manual_seed(2)) > 0.3
    q, k, v = (x.detach() for x in _qkv(2, 2, 2, 37))
    for causal in (False, True):
        assert_padding_no_leak(lambda q, k, v, m: longattn.attention(
            q, k, v, "topk_blocks", causal=causal, key_padding_mask=m, block=4, topk=2, gate="bound"),
            q, k, v, kpm)


@pytest.mark.parametrize(
    "params,err,match",
    [
        ({"block": 0}, ValueError, "block"),
        ({"topk": -1}, ValueError, "topk"),
        ({"topk": 1.5}, TypeError, "topk"),
        ({"gate": "max"}, ValueError, "gate"),
        ({"sink_tokens": -2}, ValueError, "sink_tokens"),
        ({"window": "8"}, TypeError, "window"),
        ({"shared": 1}, TypeError, "shared"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params, err, match):
    q, k, v = (x.detach() for x in _qkv(1, 2, 1, 20))
    with pytest.raises(err, match=match):
        longattn.attention(q, k, v, "topk_blocks", **params)


def test_memory_at_16k_is_far_below_one_score_matrix():
    # N = 16384, H = 2 over 1 kv head: one N x N fp32 score matrix per head is 1 GiB. Selection keeps
    # [N, topk] block numbers; the attention gathers (topk + 1) * block keys per query
    # in bounded chunks. Forward + backward.
    setup = """
import longattn
q = torch.randn(1, 2, 16384, 16, requires_grad=True)
k, v = (torch.randn(1, 1, 16384, 16, requires_grad=True) for _ in range(2))
"""
    run = ("out = longattn.attention(q, k, v, 'topk_blocks', causal=True, block=64, topk=2, window=16)\n"
           "out.sum().backward()")
    peak = peak_memory_mb(setup, run)
    assert peak < 500, f"peak {peak:.0f} MiB: something quadratic was built"


def test_inference_memory_at_16k_stays_in_row_runs():
    # without autograd, N = 16384, 4 query heads over 2 kv heads, sinks: one N x N fp32 score
    # matrix per head is 1 GiB; the row runs hold about CALL_PAIRS pairs at a time
    setup = """
import longattn
q = torch.randn(1, 4, 16384, 32)
k, v = (torch.randn(1, 2, 16384, 32) for _ in range(2))
"""
    run = ("with torch.no_grad():\n"
           "    out = longattn.attention(q, k, v, 'topk_blocks', causal=True, block=64, topk=8, sink_tokens=4)")
    peak = peak_memory_mb(setup, run)
    assert peak < 200, f"peak {peak:.0f} MiB: something quadratic was built"


def test_block_plan_on_given_keys_equals_the_oracle(monkeypatch):
    """The same selection as whole key blocks for ``given_keys_apply`` (the path other
    selection mechanisms build on), per query head under GQA, with padding."""
    monkeypatch.setattr(GK, "CSR_EDGES", 300)
    params = dict(block=6, topk=2, gate="bound", sink_tokens=8, window=7)
    q, k, v = _qkv(2, 4, 2, 41)
    kpm = torch.rand(2, 41, generator=torch.Generator().manual_seed(4)) > 0.2
    sel = TB.select_blocks(q, k, block=6, topk=2, gate="bound", shared=False, causal=True, key_padding_mask=kpm)
    plan = TB.block_plan(sel, Nq=41, Nk=41, block=6, sink_tokens=8, window=7, causal=True, key_padding_mask=kpm)
    out = GK.given_keys_apply(q, k, v, plan, scale=6 ** -0.5)
    ref = _dense(q, k, v, _oracle_mask(q, k, causal=True, kpm=kpm, **params), kpm)
    _check(out, ref, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    q, k, v = (x.detach() for x in _qkv(1, 2, 1, 45, D=16))
    params = dict(block=8, topk=2, window=5)
    ref = _dense(q, k, v, _oracle_mask(q, k, **params))  # the fp64 selection
    ql, kl, vl = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out = longattn.attention(ql, kl, vl, "topk_blocks", causal=True, **params)
    assert out.dtype == dtype and (out.double() - ref).abs().max().item() < 3e-2
    out.float().sum().backward()
    assert kl.grad.dtype == dtype and torch.isfinite(kl.grad.float()).all()
