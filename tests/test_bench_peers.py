"""The benchmark peers of the newer rows (local2d, nystrom, clustered, sinkhorn).

Where a peer computes the same thing as ours it is run beside ours on the same
q, k, v and held equal; where it cannot (its own clustering or sorting), it is run
for its shape only, and the comment says why. A peer that fails must reach the
report as failed, with its error; a missing one as not installed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from longattn import patterns as P
from longattn.bench import cases, harness, report
from longattn.api import build


def _neighborhood(n: int) -> P.Neighborhood2D:
    s = cases.settings("local2d", n, 1, 16)
    return P.Neighborhood2D(s["height"], s["width"], s["radius_h"], s["radius_w"])


# ----------------------------------------------------------------------- flex:local2d


@pytest.mark.parametrize("n", [1024, 2560])
def test_flex_local2d_mask_mod_equals_neighborhood2d(n):
    # 2560 = 20 rows of 128: rows 15 apart exist, so the row radius (7) is tested too
    mm = cases._flex_mask_mod("local2d", n, 2)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    assert torch.equal(mm(0, 0, i, j), _neighborhood(n).mask(n, 1)[0])


def test_flex_local2d_refuses_n_off_the_grid():
    with pytest.raises(ValueError, match="height \\* width"):
        cases._flex_mask_mod("local2d", 2000, 2)


def test_flex_local2d_block_mask_attention_equals_local2d():
    # Flex's uncompiled path with the peer's mask_mod and block size (the compiled
    # peer itself is run in the slow test below)
    if not cases._flex_available():
        pytest.skip("no FlexAttention here")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, heads, d = 2048, 2, 16  # 16 rows: the row radius cuts
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=False)
    for causal in (False, True):
        base = cases._flex_mask_mod("local2d", n, heads)
        mm = (lambda b, h, i, j: base(b, h, i, j) & (j <= i)) if causal else base
        bm = create_block_mask(mm, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu", BLOCK_SIZE=128)
        with torch.no_grad():
            got = flex_attention(q, k, v, block_mask=bm)
        want = cases.build_ours("local2d", n, heads, d, causal)(q, k, v)
        assert torch.allclose(got, want, atol=1e-5), (causal, (got - want).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_flex_local2d_peer_equals_local2d(causal):
    # the peer exactly as the benchmark builds it (torch.compile'd Flex: ~15 s to compile)
    if not cases._flex_available():
        pytest.skip("no FlexAttention here")
    n, heads, d = 2048, 2, 16
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=False)
    peer = cases.PEERS["flex:local2d"].build(n, heads, d, causal)
    with torch.no_grad():
        got = peer(q, k, v)
    want = cases.build_ours("local2d", n, heads, d, causal)(q, k, v)
    assert torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------- natten


def test_natten_peer_equals_local2d_away_from_the_border():
    pytest.importorskip("natten")
    # NATTEN shifts its window inwards at the image border (always 15 x 15 keys), ours
    # is cut off there: equal only for queries at least the radius from every edge
    n, heads, d = 2048, 2, 16
    s = cases.settings("local2d", n, heads, d)
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=False)
    with torch.no_grad():
        got = cases.PEERS["natten"].build(n, heads, d, False)(q, k, v)
    want = cases.build_ours("local2d", n, heads, d, False)(q, k, v)
    r, c = torch.arange(n) // s["width"], torch.arange(n) % s["width"]
    inner = ((r >= s["radius_h"]) & (r < s["height"] - s["radius_h"])
             & (c >= s["radius_w"]) & (c < s["width"] - s["radius_w"]))
    assert inner.any()
    assert torch.allclose(got[:, :, inner], want[:, :, inner], atol=1e-5)


# ----------------------------------------------------------------------- nystrom-attention


def test_nystrom_attention_peer_equals_nystrom_with_its_pinv_iterations():
    pytest.importorskip("nystrom_attention")
    # same landmarks (means of 64 segments of N/64), same formula; its pseudo-inverse is
    # 6 iterations started from A^T / (max column sum * max row sum) over *all* heads at
    # once, ours per head: so it is held equal to ours (pinv_iters=6) one head at a time
    n, heads, d = 1024, 3, 16
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=False)
    m = cases.SETTINGS["nystrom"].params["landmarks"]
    ours = build("nystrom", heads=heads, head_dim=d, landmarks=m, pinv_iters=cases.NYSTROM_PEER_PINV_ITERS)
    want = ours(q, k, v)
    for h in range(heads):
        sl = slice(h, h + 1)
        got = cases.PEERS["nystrom-attention"].build(n, 1, d, False)(q[:, sl], k[:, sl], v[:, sl])
        assert torch.allclose(got, want[:, sl], atol=1e-5, rtol=1e-4), (h, (got - want[:, sl]).abs().max())


def test_nystrom_attention_peer_runs_at_bench_shape_and_trains():
    pytest.importorskip("nystrom_attention")
    n, heads, d = 512, 2, 16
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=True)
    out = cases.PEERS["nystrom-attention"].build(n, heads, d, False)(q, k, v)
    assert out.shape == (1, heads, n, d) and torch.isfinite(out).all()
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="causal"):
        cases.PEERS["nystrom-attention"].build(n, heads, d, True)


# ----------------------------------------------------------------------- routing-transformer, sinkhorn-transformer


# Peers that do not compute what ours does, so no equality; only that they run,
# train and give finite outputs of the right shape:
# - routing-transformer: its clusters take the top-512 queries/keys nearest each
#   k-means centroid (initialised from the data), ours cuts the (cluster, position)
#   order into equal chunks;
# - sinkhorn-transformer with its own sort net: raw block-mean scores with Gumbel
#   noise vs our random SortNet (equality given one permutation is tested below).
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("peer,module", [("routing-transformer", "routing_transformer"),
                                         ("sinkhorn-transformer", "sinkhorn_transformer")])
def test_peer_without_an_equal_computation_runs(peer, module, causal):
    pytest.importorskip(module)
    n, heads, d = 1024, 2, 16
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=True)
    out = cases.PEERS[peer].build(n, heads, d, causal)(q, k, v)
    assert out.shape == (1, heads, n, d) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_sinkhorn_transformer_peer_equals_sinkhorn_given_one_permutation_and_v_equal_k():
    pytest.importorskip("sinkhorn_transformer")
    from longattn.ops.sinkhorn import sinkhorn_attention

    # the block attention itself (own block + sorted block, 2 x 256 keys) is ours once
    # both are handed the same hard block permutation. With v = k only: 0.11.4 reshapes
    # the sorted *keys* into the sorted bucket's values (b_v_r = b_k_r.reshape(...)),
    # which the v != k assertion shows
    n, heads, d = 1024, 2, 16
    b = cases.SETTINGS["sinkhorn"].params["block_size"]
    nb = n // b
    perm = torch.stack([torch.eye(nb)[torch.randperm(nb, generator=torch.Generator().manual_seed(h))]
                        for h in range(heads)])  # [H, nb, nb]

    class FixedSort(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, topk: int = 1) -> torch.Tensor:
            return perm.repeat(q.shape[0] // heads, 1, 1)

    peer = cases.PEERS["sinkhorn-transformer"].build(n, heads, d, False)
    peer.module.sort_net = FixedSort()
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=False)
    ours = sinkhorn_attention(q, k, k, block_size=b, permutation=perm[None])
    assert torch.allclose(peer(q, k, k), ours, atol=1e-5)
    ours_v = sinkhorn_attention(q, k, v, block_size=b, permutation=perm[None])
    assert not torch.allclose(peer(q, k, v), ours_v, atol=1e-2)


# ----------------------------------------------------------------------- failing and missing peers


def test_new_peers_are_listed_beside_their_mechanisms():
    new = {"flex:local2d": "local2d", "natten": "local2d", "nystrom-attention": "nystrom",
           "routing-transformer": "clustered", "sinkhorn-transformer": "sinkhorn"}
    for name, mech in new.items():
        assert cases.PEERS[name].equals == mech and cases.PEERS[name].note
    mechs = ["local2d", "nystrom", "clustered", "sinkhorn"]
    # every one either runs or is listed as missing, never neither
    listed = set(cases.peer_names(None, mechs)) | set(cases.missing_peers(None, mechs))
    assert set(new) <= listed


def test_missing_natten_is_listed_with_its_install_hint(monkeypatch):
    gone = dataclasses.replace(cases.PEERS["natten"], available=lambda: False)
    monkeypatch.setitem(cases.PEERS, "natten", gone)
    assert "natten" in cases.missing_peers(None, ["local2d"])
    assert "natten" not in cases.peer_names(None, ["local2d"])
    table = report.skipped_table({"results": [], "peers_missing": ["natten"]})
    assert "`natten` (peer)" in table and "not installed" in table and "no-build-isolation" in table


def test_a_peer_that_raises_is_an_error_with_its_reason(monkeypatch, tmp_path):
    # the child of the sweep, run in this process so that the failing peer is seen
    def broken(n: int, heads: int, dim: int, causal: bool):
        raise RuntimeError("peer exploded\nsecond line | with a pipe")

    peer = dataclasses.replace(cases.PEERS["routing-transformer"], build=broken, available=lambda: True)
    monkeypatch.setitem(cases.PEERS, "routing-transformer", peer)
    case = {"mechanism": "clustered", "peer": "routing-transformer", "n": 128, "mode": "fwd", "batch": 1,
            "heads": 2, "dim": 16, "dtype": "float32", "causal": False, "threads": 1, "warmup": 1,
            "min_repeats": 1, "max_repeats": 1, "min_time_s": 0.0, "soft_timeout_s": 10.0}
    out = tmp_path / "res.json"
    harness._child(case, str(out))
    res = json.loads(out.read_text())
    assert res["status"] == "error" and "RuntimeError: peer exploded" in res["reason"]
    # the report keeps it, on one table row
    rec = {"mechanism": "routing-transformer", "n": 128, "mode": "fwd", "status": "error",
           "reason": res["reason"]}
    table = report.skipped_table({"results": [rec], "peers_missing": []})
    row = [ln for ln in table.splitlines() if "routing-transformer" in ln]
    assert len(row) == 1 and "| error |" in row[0] and "peer exploded second line \\| with a pipe" in row[0]


def test_a_failing_peer_reaches_the_report_through_the_sweep():
    pytest.importorskip("sinkhorn_transformer")
    # N = 128 is not a multiple of its bucket size (256): its build raises in the case's
    # own process, and the sweep records the error instead of dropping the row
    cfg = harness.BenchConfig(mechanisms=["sinkhorn"], peers=["sinkhorn-transformer"], ns=[128], modes=["fwd"],
                              threads=1, warmup=1, min_repeats=1, max_repeats=1, min_time_s=0.0,
                              timeout_s=120, matmul_n=128)
    doc = harness.sweep(cfg, progress=False)
    (rec,) = [r for r in doc["results"] if r["mechanism"] == "sinkhorn-transformer"]
    assert rec["status"] == "error" and rec["kind"] == "peer"
    assert "ValueError" in rec["reason"] and "multiple of its bucket size" in rec["reason"]
    md = report.bench_markdown(doc)
    assert "| `sinkhorn-transformer` | 128 | fwd | error | ValueError" in md


# ----------------------------------------------------------------------- selection and recurrent rows


def _gated_delta_by_token(q, k, v, g, beta):
    """The gated delta rule one token at a time in float64 (docs/design.md section 10):
    q, k L2-normalised, S = exp(g_t) S, S += k_t (beta_t (v_t - S^T k_t))^T, o_t = S^T q_t / sqrt(D)."""
    q, k, v, g, beta = (t.detach().double() for t in (q, k, v, g, beta))
    q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() / q.shape[-1] ** 0.5
    k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    B, H, N, D = q.shape
    S = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(N):
        S = S * g[:, :, t, None, None].exp()
        kt, vt = k[:, :, t], v[:, :, t]
        err = vt - torch.einsum("bhd,bhde->bhe", kt, S)
        S = S + torch.einsum("bhd,bhe->bhde", kt, beta[:, :, t, None] * err)
        out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(out, 2)


@pytest.mark.slow  # imports transformers (~10-15 s on a busy 2-core machine)
def test_transformers_gated_delta_peer_equals_the_token_recurrence_and_ours():
    pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    n, heads, d = 70, 2, 8  # 70: not a multiple of the chunk (64)
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=True)
    torch.manual_seed(0)
    peer = cases.PEERS["transformers-gdn"].build(n, heads, d, True)
    torch.manual_seed(0)  # the same gate weights: the sweep seeds every case's process alike
    ours = cases.build_ours("gated_delta", n, heads, d, True)
    g, beta, _ = peer.module(k)
    want = _gated_delta_by_token(q, k, v, g, beta)
    got = peer(q, k, v)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(ours(q, k, v).double(), want, atol=1e-5)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    grads_ours = torch.autograd.grad(ours(q, k, v).sum(), (q, k, v))
    for a, b in zip(grads, grads_ours):
        assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="causal only"):
        cases.PEERS["transformers-gdn"].build(n, heads, d, False)


@pytest.mark.parametrize("causal", [True, False])
def test_native_sparse_attention_peer_runs_and_trains(causal):
    pytest.importorskip("native_sparse_attention_pytorch")
    n, heads, d = 150, 2, 16  # not a multiple of the block (64)
    q, k, v = cases.make_inputs(1, heads, n, d, torch.float32, train=True)
    out = cases.PEERS["native-sparse-attention"].build(n, heads, d, causal)(q, k, v)
    assert out.shape == (1, heads, n, d) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    if causal:  # its attention is causal: the first 100 outputs ignore a change after them
        q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
        v2[:, :, 100:] += 1.0
        again = cases.PEERS["native-sparse-attention"].build(n, heads, d, True)(q2, k2, v2)
        assert torch.allclose(again[:, :, :100], out.detach()[:, :, :100], atol=1e-5)


def test_nsa_peer_memory_estimate_skips_it_before_it_runs():
    case = {"mechanism": "nsa", "peer": "native-sparse-attention", "n": 16384, "mode": "train", "batch": 1,
            "heads": 8, "dim": 64, "dtype": "float32"}
    # the gathered k and v blocks, 2 x [1, 8, 16384, 7, 64, 64] fp32, are 30 GB alone
    assert cases.estimate_bytes(case) > 7e9
    from longattn.bench import flops

    fwd = flops.forward_flops("nsa", cases.settings("nsa", 16384, 8, 64), n=16384, batch=1, heads=8, dim=64,
                              causal=True)
    assert cases.estimate_bytes(case) > 3 * cases.estimate_bytes({**case, "peer": None}, fwd)  # ours: no gather


def test_causal_only_rows_sit_out_non_causal_sweeps():
    cfg = harness.BenchConfig(mechanisms=["gated_delta"], peers=["transformers-gdn"], ns=[96], modes=["fwd"],
                              threads=1, warmup=0, min_repeats=1, max_repeats=1, min_time_s=0.0,
                              timeout_s=60, matmul_n=64)
    if not cases.PEERS["transformers-gdn"].available():
        pytest.skip("transformers not installed")
    assert [c.label for c in harness.plan_cases(cfg)] == ["gated_delta"]
    assert harness.peers_left_out(cfg)[0]["peer"] == "transformers-gdn"
    doc = harness.sweep(cfg, progress=False)
    (rec,) = doc["results"]
    assert rec["status"] == "skipped" and "causal only" in rec["reason"]
    assert "causal only" in report.skipped_table(doc)


@pytest.mark.parametrize("name", ["topk_blocks", "nsa", "dsa", "gated_delta"])
def test_new_families_run_as_a_bench_case(name, tmp_path):
    # the sweep's child, in this process: settings, build, forward + backward, timing
    from longattn.bench import flops

    if name not in cases.mechanism_names():
        pytest.skip(f"{name} is not registered")
    case = {"mechanism": name, "peer": None, "n": 100, "mode": "train", "batch": 1, "heads": 2, "dim": 16,
            "dtype": "float32", "causal": True, "threads": 1, "warmup": 0, "min_repeats": 1, "max_repeats": 1,
            "min_time_s": 0.0, "soft_timeout_s": 30.0}
    harness._child(case, str(tmp_path / "res.json"))
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["status"] == "ok", res.get("reason")
    assert flops.forward_flops(name, cases.settings(name, 100, 2, 16), n=100, batch=1, heads=2, dim=16,
                               causal=True) > 0


@pytest.mark.slow  # six case processes, transformers imported in one (~20 s on a busy 2-core machine)
def test_new_families_and_their_peers_run_in_a_causal_sweep():
    pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    mechs = [m for m in ("full", "topk_blocks", "nsa", "dsa", "gated_delta") if m in cases.mechanism_names()]
    cfg = harness.BenchConfig(mechanisms=mechs, peers=["transformers-gdn"], ns=[96], modes=["train"],
                              causal=True, threads=1, warmup=0, min_repeats=1, max_repeats=1, min_time_s=0.0,
                              timeout_s=120, matmul_n=64)
    doc = harness.sweep(cfg, progress=False)
    got = {r["mechanism"]: r for r in doc["results"]}
    assert set(got) == {*mechs, "transformers-gdn"}
    for name, r in got.items():
        assert r["status"] == "ok", (name, r.get("reason"))
        assert r["flops"] and r["flops"] > 0, name
