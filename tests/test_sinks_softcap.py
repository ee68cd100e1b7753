"""Learned sinks and score caps (issue 31 item 2) in the exact engine and ``full``:
outputs and gradients (d sinks included) against the float64 dense oracle, at lengths
that are not multiples of any block size, causal or not, padded, GQA, packed documents
and decode steps; the API's capability checks."""

from __future__ import annotations

import pytest
import torch

import longattn
import longattn.ops._softmax as bs
from longattn.ops.local2d import neighborhood
from longattn.ops.reference import dense_attention
from longattn.ops.sparse import with_globals

B, H, HKV, N, D = 2, 4, 2, 67, 8

MECHS = {
    "local": dict(before=9, after=5),
    "bigbird": dict(block=16, random_blocks=1, global_blocks=1),
    "sparse_transformer_fixed": dict(l=16, c=3),
    "full": {},
}
TERMS = {"sinks": (True, None), "softcap": (False, 2.5), "both": (True, 4.0)}


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5).requires_grad_()


def _inputs(nq: int = N, hkv: int = HKV, seed: int = 0):
    return _leaf(B, H, nq, D, seed=seed), _leaf(B, hkv, N, D, seed=seed + 1), _leaf(B, hkv, N, D, seed=seed + 2)


def _mask(name: str, causal: bool) -> torch.Tensor | None:
    return None if name == "full" else with_globals(name, **MECHS[name]).mask(N, H, causal)[None]


def _padding() -> torch.Tensor:
    kpm = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.3
    kpm[1, 40:] = False  # a right-padded row too
    return kpm


def _check(out, ref, leaves, tol=1e-10):
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    assert (out - ref).abs().max().item() < tol, "output differs from the oracle"
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() < tol, f"gradient of input {i} differs from the oracle"


@pytest.mark.parametrize("name", list(MECHS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("terms", list(TERMS))
def test_equals_oracle_padded_gqa(name, causal, terms):
    with_sinks, cap = TERMS[terms]
    q, k, v = _inputs()
    sinks = _leaf(H, seed=7) if with_sinks else None
    kpm = _padding()
    out = longattn.attention(q, k, v, name, causal=causal, key_padding_mask=kpm, sinks=sinks, softcap=cap,
                             **MECHS[name])
    ref = dense_attention(q, k, v, _mask(name, causal), causal=causal, key_padding_mask=kpm, sinks=sinks,
                          softcap=cap)
    _check(out, ref, (q, k, v) + ((sinks,) if with_sinks else ()))


@pytest.mark.parametrize("name", ["local", "full"])
def test_decode_step_bottom_right(name):
    q, k, v = _inputs(nq=3)
    sinks = _leaf(H, seed=7)
    out = longattn.attention(q, k, v, name, causal=True, sinks=sinks, softcap=3.0, **MECHS[name])
    mask = None if name == "full" else with_globals(name, **MECHS[name]).mask(N, H, True)[None, :, -3:]
    ref = dense_attention(q, k, v, mask, causal=True, sinks=sinks, softcap=3.0)
    _check(out, ref, (q, k, v, sinks))


@pytest.mark.parametrize("name", ["local", "full"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_documents(name, causal):
    """Each document alone through the oracle: the sink joins every document's softmax."""
    q, k, v = _inputs(hkv=H)
    sinks = _leaf(H, seed=7)
    seg = torch.tensor([[0] * 20 + [1] * 30 + [2] * 17, [0] * 67])
    out = longattn.attention(q, k, v, name, causal=causal, segment_ids=seg, sinks=sinks, softcap=2.0,
                             **MECHS[name])
    parts = []
    for b, bounds in ((0, [(0, 20), (20, 50), (50, 67)]), (1, [(0, 67)])):
        row = []
        for a, e in bounds:
            mask = None if name == "full" else with_globals(name, **MECHS[name]).mask(e - a, H, causal)[None]
            x = [t[b : b + 1, :, a:e] for t in (q, k, v)]
            row.append(dense_attention(*x, mask, causal=causal, sinks=sinks, softcap=2.0))
        parts.append(torch.cat(row, 2))
    _check(out, torch.cat(parts, 0), (q, k, v, sinks))


def test_local2d_with_sinks_and_softcap():
    hh, ww = 5, 7  # N = 35
    q, k, v = (_leaf(1, 2, hh * ww, D, seed=s) for s in range(3))
    sinks = _leaf(2, seed=7)
    out = longattn.attention(q, k, v, "local2d", causal=True, height=hh, width=ww, radius_h=1, radius_w=2,
                             sinks=sinks, softcap=2.0)
    mask = neighborhood(hh, ww, 1, 2).mask(hh * ww, 2, True)[None]
    _check(out, dense_attention(q, k, v, mask, causal=True, sinks=sinks, softcap=2.0), (q, k, v, sinks))


def test_rows_without_keys_give_zeros_with_a_sink():
    q, k, v = _inputs()
    sinks = _leaf(H, seed=7)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0] = False  # batch row 0 sees no key at all
    out = longattn.attention(q, k, v, "local", key_padding_mask=kpm, sinks=sinks, **MECHS["local"])
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    dq, ds = torch.autograd.grad(out.sum(), (q, sinks))
    assert torch.isfinite(dq).all() and torch.isfinite(ds).all()


def test_full_with_bias_and_sinks_matches_hand_formula():
    """A float bias and a bool (keep) bias with a sink: softmax over [scores, sink]."""
    q, k, v = _inputs(hkv=H)
    sinks = _leaf(H, seed=7)
    fbias = torch.randn(1, H, N, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[..., 0] = True  # every row keeps a key
    for bias in (fbias, keep):
        out = longattn.attention(q, k, v, "full", bias=bias, sinks=sinks, softcap=3.0)
        s = 3.0 * torch.tanh(q @ k.transpose(-1, -2) * D**-0.5 / 3.0)
        s = s + bias if bias.dtype != torch.bool else s.masked_fill(~bias, float("-inf"))
        s = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, N, 1)], -1)
        ref = torch.softmax(s, -1)[..., :-1] @ v
        _check(out, ref, (q, k, v, sinks))


def test_api_capabilities_and_checks():
    q, k, v = _inputs(hkv=H)
    with pytest.raises(ValueError, match=r"sinks is not supported by mechanism 'linformer'.*'local'"):
        longattn.attention(q, k, v, "linformer", sinks=torch.zeros(H))
    with pytest.raises(ValueError, match=r"softcap is not supported by mechanism 'lsh'.*'full'"):
        longattn.attention(q, k, v, "lsh", softcap=5.0)
    with pytest.raises(ValueError, match=r"softcap must be a finite float > 0, got -1"):
        longattn.attention(q, k, v, "local", softcap=-1.0)
    with pytest.raises(ValueError, match=r"sinks must have shape \[H\] = \[4\]"):
        longattn.attention(q, k, v, "full", sinks=torch.zeros(2))
    for name in ("full", "local", "bigbird", "pattern", "local2d"):
        spec = longattn.get(name).describe()
        assert spec["sinks"] and spec["softcap"], name
    assert not longattn.get("linformer").describe()["sinks"]


def test_fast_path_runs_no_math_kernel(monkeypatch):
    """Without sinks and softcap the CPU engine stays on the flash kernel."""
    def boom(*a, **kw):
        raise AssertionError("math kernel used on the fast path")

    monkeypatch.setattr(bs, "tile_forward", boom)
    monkeypatch.setattr(bs, "tile_backward", boom)
    q, k, v = _inputs()
    out = longattn.attention(q, k, v, "local", causal=True, **MECHS["local"])
    out.sum().backward()
