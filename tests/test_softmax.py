"""The shared softmax numerics (longattn.ops._softmax) against a float64 dense oracle."""

from __future__ import annotations

import pytest
import torch

from longattn.ops import _softmax as S


def _oracle(q, k, v, vis, scale):
    """Dense float64 masked softmax: (out, lse); a row with no visible key -> 0, -inf."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    return p @ v.double(), lse


def _case(M=7, K=13, D=5, Dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, M, D, generator=g), torch.randn(2, 3, K, D, generator=g)
    v = torch.randn(2, 3, K, Dv, generator=g)
    vis = torch.rand(1, 3, M, K, generator=g) < 0.5
    vis[..., 2, :] = False  # a row that sees nothing
    return q, k, v, vis


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("safe", [False, True])
def test_tile_forward_backward_equal_oracle_and_dead_row_is_zero(softcap, safe):
    q, k, v, vis = _case()
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    o, lse = S.tile_forward(qd, kd, vd, 0.0, False, attn_mask=vis, scale=0.4, softcap=softcap, safe=safe)
    if softcap is None:
        ref, ref_lse = _oracle(qd, kd, vd, vis, 0.4)
    else:  # the cap on the scores: scale q so that q k^T * 0.4 is capped by hand
        s = softcap * torch.tanh((qd @ kd.transpose(-1, -2)) * 0.4 / softcap)
        s = s.masked_fill(~vis, float("-inf"))
        ref_lse = torch.logsumexp(s, -1)
        ref = torch.where(torch.isneginf(ref_lse)[..., None], 0.0, torch.exp(s - ref_lse[..., None])) @ vd
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    assert torch.isneginf(lse[..., 2]).all() and (o[..., 2, :] == 0).all()
    torch.testing.assert_close(lse[..., [0, 1, 3]], ref_lse[..., [0, 1, 3]], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), (qd, kd, vd))
    lse_b = lse.detach().masked_fill(torch.isneginf(lse.detach()), float("inf"))  # the kernels' convention
    got = S.tile_backward(g, qd, kd, vd, o.detach(), lse_b, 0.0, False, attn_mask=vis, scale=0.4,
                          softcap=softcap, safe=safe)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_flash_kernel_matches_math_kernel_on_live_rows():
    q, k, v, vis = _case(M=9, K=11)
    fwd, _ = S.kernels(q.device)
    assert fwd is S.flash_fwd
    o, lse = fwd(q, k, v, 0.0, False, attn_mask=S.additive_mask(vis, q.dtype), scale=0.3)
    ref, ref_lse = _oracle(q, k, v, vis, 0.3)
    live = vis.any(-1).expand_as(ref_lse)
    torch.testing.assert_close(o.double()[live], ref[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], rtol=1e-5, atol=1e-5)


def test_merges_of_key_halves_equal_one_softmax():
    q, k, v, vis = _case(M=6, K=17)
    ref, ref_lse = _oracle(q, k, v, vis, 0.5)
    parts = [_oracle(q, k[..., a:b, :], v[..., a:b, :], vis[..., a:b], 0.5) for a, b in ((0, 8), (8, 17))]
    out, lse = S.merge_by_lse(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), dim=0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse)  # -inf where no key at all
    o_acc, l_acc = parts[0][0].clone(), parts[0][1].clone()
    o_acc, l_acc = S.merge_running_(o_acc, l_acc, parts[1][0].clone(), parts[1][1])
    torch.testing.assert_close(o_acc, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l_acc, ref_lse)
    assert not torch.isnan(o_acc).any()


def test_pad_head_dim_keeps_scores_and_outputs():
    q, k, v, vis = _case(D=5, Dv=3)
    qp, kp, vp = S.pad_head_dim(q, k, v)
    assert qp.shape[-1] == kp.shape[-1] == vp.shape[-1] == 5
    out, _ = _oracle(qp, kp, vp, vis, 0.5)
    torch.testing.assert_close(out[..., :3], _oracle(q, k, v, vis, 0.5)[0])
    qp, kp, vp = S.pad_head_dim(*_case(D=3, Dv=6)[:3])
    assert qp.shape[-1] == kp.shape[-1] == vp.shape[-1] == 6


def test_add_sinks_equals_a_zero_value_key_and_its_gradient():
    q, k, v, vis = _case(M=5, K=9)
    sinks = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    o, lse = _oracle(q, k, v, vis, 0.5)
    O, L = S.add_sinks(o.clone(), lse[..., None].clone(), sinks.detach())
    # oracle: one more key per head with logit sinks[h] and value 0
    s = (q.double() @ k.double().transpose(-1, -2) * 0.5).masked_fill(~vis, float("-inf"))
    s = torch.cat([s, sinks.view(1, 3, 1, 1).expand(2, 3, 5, 1)], -1)
    ref = torch.softmax(s, -1)[..., :-1] @ v.double()
    torch.testing.assert_close(O, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), sinks)[0]
    torch.testing.assert_close(S.sink_grad(g, O, L, sinks.detach()), want, rtol=1e-9, atol=1e-10)
