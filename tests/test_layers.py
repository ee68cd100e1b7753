"""Multi-head attention over any mechanism, positional encodings, norms, blocks.

References are written here independently: projections from the layer's weight
tensors and the dense masked oracle in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn import registry
from longattn.layers import (
    GraphAttention,
    LayerNorm,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    SequenceBatchNorm,
    SinusoidalPositionalEncoding,
    EncoderBlock,
    alibi_bias,
    alibi_slopes,
    frequency_encoding,
    label_smoothing_cross_entropy,
    sinusoidal_table,
)
from longattn.ops.reference import dense_attention
from longattn.registry import Mechanism, Param
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak

D64 = torch.float64


def has(name: str) -> bool:
    return name in registry.names()


def need(name: str) -> None:
    if not has(name):
        pytest.skip(f"mechanism {name!r} not registered yet")


def proj(mha: MultiHeadAttention, x, ctx=None):
    """q, k, v [B, H, N, D] from the layer's own weights, written out by hand."""
    ctx = x if ctx is None else ctx
    H, Dh = mha.heads, mha.head_dim

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], H, Dh).permute(0, 2, 1, 3)

    q = split(x @ mha.q_proj.weight.T + mha.q_proj.bias)
    k = split(ctx @ mha.k_proj.weight.T + mha.k_proj.bias)
    v = split(ctx @ mha.v_proj.weight.T + mha.v_proj.bias)
    return q, k, v


def merge(mha: MultiHeadAttention, o):
    B, H, N, Dh = o.shape
    o = o.permute(0, 2, 1, 3).reshape(B, N, H * Dh)
    return o @ mha.out_proj.weight.T + mha.out_proj.bias


def band_mask(n: int, before: int, after: int) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j >= i - before) & (j <= i + after)


def grid_mask(h: int, w: int, rh: int, rw: int) -> torch.Tensor:
    p = torch.arange(h * w)
    r, c = p // w, p % w
    return ((r[:, None] - r[None]).abs() <= rh) & ((c[:, None] - c[None]).abs() <= rw)


# mechanisms whose visibility we can write by hand: name -> (params, mask(N))
HAND_MASKS = {
    "full": ({}, lambda n: None),
    "local": ({"before": 3, "after": 2}, lambda n: band_mask(n, 3, 2)),
    "local2d": ({"height": 4, "width": 6, "radius_h": 1, "radius_w": 2}, lambda n: grid_mask(4, 6, 1, 2)),
}
N = 24  # = 4 * 6 for local2d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ multi-head equality
@pytest.mark.parametrize("name", sorted(HAND_MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_mha_equals_hand_reference(name, causal):
    need(name)
    params, mask = HAND_MASKS[name]
    mha = MultiHeadAttention(32, 4, name, causal=causal, **params).to(D64)
    x = torch.randn(2, N, 32, dtype=D64)
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[1, -5:] = False
    q, k, v = proj(mha, x)
    ref = merge(mha, dense_attention(q, k, v, mask(N), causal=causal, key_padding_mask=kpm))
    out = mha(x, key_padding_mask=kpm)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :-5], ref[1, :-5])  # padded queries: undefined output
    # gradients of the layer's weights agree with the hand reference too
    g1 = torch.autograd.grad(out[:, :-5].sum(), mha.q_proj.weight)[0]
    g2 = torch.autograd.grad(ref[:, :-5].sum(), mha.q_proj.weight)[0]
    torch.testing.assert_close(g1, g2)


def _exact_functional_cases():
    for spec in registry.specs():
        if spec.learned or not spec.exact or spec.module is not None:
            continue
        params = dict(HAND_MASKS.get(spec.name, ({}, None))[0])
        if any(p.required and p.name not in params for p in spec.params):
            continue
        yield spec.name, params


@pytest.mark.parametrize("case", list(_exact_functional_cases()), ids=lambda c: c[0])
def test_mha_equals_functional_op_for_every_registered_exact_mechanism(case):
    """The layer equals longattn.attention on its own projections, for every exact mechanism."""
    name, params = case
    mha = MultiHeadAttention(32, 4, name, **params).to(D64)
    x = torch.randn(2, N, 32, dtype=D64)
    q, k, v = proj(mha, x)
    ref = merge(mha, longattn.attention(q, k, v, name, **params))
    torch.testing.assert_close(mha(x), ref)


def test_per_head_groups_each_equal_their_mechanism_alone():
    items = ["full", ("local2d", HAND_MASKS["local2d"][0])]
    masks = [None, grid_mask(4, 6, 1, 2)]
    if has("local"):
        items.append(("local", HAND_MASKS["local"][0]))
        masks.append(band_mask(N, 3, 2))
    heads = 2 * len(items)
    mha = MultiHeadAttention(8 * heads, heads, items, causal=False).to(D64)
    assert mha.mechanisms == [i if isinstance(i, str) else i[0] for i in items]
    x = torch.randn(2, N, 8 * heads, dtype=D64)
    q, k, v = proj(mha, x)
    outs = []
    for g, m in enumerate(masks):
        s = slice(2 * g, 2 * g + 2)
        outs.append(dense_attention(q[:, s], k[:, s], v[:, s], m))
    torch.testing.assert_close(mha(x), merge(mha, torch.cat(outs, 1)))


def test_causal_layer_leaks_nothing():
    for name in ("full", "local2d", "local"):
        if not has(name):
            continue
        mha = MultiHeadAttention(16, 2, name, causal=True, **HAND_MASKS[name][0]).to(D64)
        x = torch.randn(1, 1, N, 16, dtype=D64)
        assert_no_causal_leak(lambda q, k, v: mha(q[:, 0])[:, None], x, x, x, t=9)


def test_self_attention_padding_never_changes_real_outputs():
    mha = MultiHeadAttention(16, 2, "full").to(D64)
    x = torch.randn(2, 10, 16, dtype=D64)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 6:] = False
    x2 = x.clone()
    x2[0, 6:] = torch.randn(4, 16, dtype=D64) * 10
    torch.testing.assert_close(mha(x, key_padding_mask=kpm)[0, :6], mha(x2, key_padding_mask=kpm)[0, :6])


def test_cross_attention_equals_reference_and_padding():
    mha = MultiHeadAttention(16, 2, "full", kv_dim=12).to(D64)
    x = torch.randn(2, 5, 16, dtype=D64)
    ctx = torch.randn(2, 9, 12, dtype=D64)
    kpm = torch.rand(2, 9) > 0.3
    kpm[:, 0] = True
    q, k, v = proj(mha, x, ctx)
    ref = merge(mha, dense_attention(q, k, v, key_padding_mask=kpm))
    torch.testing.assert_close(mha(x, ctx, key_padding_mask=kpm), ref)
    assert_padding_no_leak(lambda q, k, v, m: mha(q[:, 0], k[:, 0], key_padding_mask=m)[:, None],
                           x[:, None], ctx[:, None], ctx[:, None], kpm)


def test_cross_attention_refused_by_self_only_mechanism():
    mha = MultiHeadAttention(16, 2, "local2d", height=2, width=3)
    with pytest.raises(ValueError, match="cross-attention"):
        mha(torch.randn(1, 6, 16), torch.randn(1, 6, 16))


# ------------------------------------------------------------------ global tokens
@pytest.fixture
def band_with_globals(monkeypatch):
    """A stand-in pattern mechanism with a ``global_idx`` parameter (the registry contract)."""
    seen = {}

    def fn(q, k, v, *, causal, key_padding_mask, scale, radius=1, global_idx=()):
        seen["global_idx"] = tuple(global_idx)
        n = q.shape[2]
        m = band_mask(n, radius, radius)
        g = torch.zeros(n, dtype=torch.bool)
        g[list(global_idx)] = True
        m = m | g[:, None] | g[None, :]
        return dense_attention(q, k, v, m, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    spec = Mechanism(name="_test_band", fn=fn, params=(Param("radius", 1), Param("global_idx", ())),
                     family="pattern", causal=True, cross=False)
    registry.get("full")  # load the package first
    monkeypatch.setitem(registry._REGISTRY, "_test_band", spec)
    return seen


def test_learned_global_tokens_are_global_and_stripped(band_with_globals):
    mha = MultiHeadAttention(16, 2, "_test_band", global_tokens=2, radius=1).to(D64)
    x = torch.randn(1, 12, 16, dtype=D64)
    out = mha(x)
    assert out.shape == x.shape
    assert band_with_globals["global_idx"] == (0, 1)
    # every position sees the global tokens: changing them moves every output
    with torch.no_grad():
        mha.global_emb.add_(torch.randn_like(mha.global_emb))
    assert ((mha(x) - out).abs().amax(-1) > 1e-9).all()


def test_model_level_global_positions_see_and_are_seen(band_with_globals):
    mha = MultiHeadAttention(16, 2, "_test_band", radius=1, global_idx=(7,)).to(D64)
    x = torch.randn(1, 12, 16, dtype=D64, requires_grad=True)
    out = mha(x, n_global=1)
    assert band_with_globals["global_idx"] == (0, 7)      # the user's index kept
    jac0 = torch.autograd.grad(out[0, 0].sum(), x, retain_graph=True)[0][0].abs().sum(-1)
    assert (jac0 > 0).all(), "global position 0 must see every position"
    far = torch.autograd.grad(out[0, 4].sum(), x)[0][0].abs().sum(-1)
    assert far[0] > 0 and far[7] > 0, "every position must see the global positions"
    assert far[10] == 0, "a non-global far position must stay invisible (band pattern)"


def test_global_tokens_with_full_and_refused_elsewhere():
    mha = MultiHeadAttention(16, 2, "full", global_tokens=3)
    assert mha(torch.randn(2, 7, 16), key_padding_mask=torch.ones(2, 7, dtype=torch.bool)).shape == (2, 7, 16)
    with pytest.raises(ValueError, match="global"):
        MultiHeadAttention(16, 2, "local2d", height=2, width=3, global_tokens=1)
    with pytest.raises(ValueError, match="causal"):
        MultiHeadAttention(16, 2, "full", causal=True, global_tokens=1)


# ------------------------------------------------------------------ ALiBi, RoPE, dropout
def test_alibi_bias_formula_and_layer():
    slopes = alibi_slopes(8)
    torch.testing.assert_close(slopes, torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))
    s6 = alibi_slopes(6)  # non power of two: the 4-head slopes, then every other 8-head slope
    torch.testing.assert_close(s6, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    b = alibi_bias(slopes, 3, 5)
    assert b.shape == (1, 8, 3, 5)
    assert b[0, 1, 2, 4].item() == pytest.approx(-0.25 * 2)
    mha = MultiHeadAttention(16, 2, "full", alibi=True, causal=True).to(D64)
    x = torch.randn(1, 6, 16, dtype=D64)
    q, k, v = proj(mha, x)
    ref = merge(mha, dense_attention(q, k, v, causal=True, bias=alibi_bias(alibi_slopes(2), 6, 6).to(D64)))
    torch.testing.assert_close(mha(x), ref)
    with pytest.raises(ValueError, match="alibi"):
        MultiHeadAttention(16, 2, "local2d", height=2, width=3, alibi=True)


def test_rope_formula_and_relative_property():
    rope = RotaryEmbedding(4, base=100.0)
    x = torch.randn(1, 1, 3, 4, dtype=D64)
    out = rope.rotate(x, offset=5)
    for n in range(3):
        p = 5 + n
        for i in range(2):
            th = p * 100.0 ** (-2 * i / 4)
            a, b = x[0, 0, n, 2 * i], x[0, 0, n, 2 * i + 1]
            assert out[0, 0, n, 2 * i].item() == pytest.approx((a * math.cos(th) - b * math.sin(th)).item())
            assert out[0, 0, n, 2 * i + 1].item() == pytest.approx((a * math.sin(th) + b * math.cos(th)).item())
    rope = RotaryEmbedding(8)
    q = torch.randn(1, 1, 1, 8, dtype=D64)
    k = torch.randn(1, 1, 1, 8, dtype=D64)

    def score(i, j):
        return (rope.rotate(q, offset=i) * rope.rotate(k, offset=j)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-9, abs=1e-9)
    assert score(0, 0) == pytest.approx((q * k).sum().item())
    assert abs(score(7, 3) - score(7, 4)) > 1e-6


def test_rope_in_layer_equals_hand_reference():
    mha = MultiHeadAttention(16, 2, "full", rope=True).to(D64)
    x = torch.randn(2, 7, 16, dtype=D64)
    q, k, v = proj(mha, x)
    r = RotaryEmbedding(8)
    torch.testing.assert_close(mha(x), merge(mha, dense_attention(r.rotate(q), r.rotate(k), v)))


def test_attention_dropout_train_only_and_refused_without_param():
    mha = MultiHeadAttention(16, 2, "full", attn_dropout=0.5)
    x = torch.randn(2, 9, 16)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(16, 2, "local2d", height=3, width=3, attn_dropout=0.1)


# ------------------------------------------------------------------ bad configurations
def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        MultiHeadAttention(16, 2, "nope")
    with pytest.raises(TypeError, match="unknown parameter"):
        MultiHeadAttention(16, 2, "full", window=3)
    with pytest.raises(ValueError, match="divisible by the number of mechanism groups"):
        MultiHeadAttention(24, 4, ["full", "full", "full"])
    with pytest.raises(TypeError, match="inside the list"):
        MultiHeadAttention(16, 2, ["full", "full"], dropout=0.1)
    with pytest.raises(TypeError, match="list item"):
        MultiHeadAttention(16, 2, ["full", 3])
    with pytest.raises(ValueError, match=r"x must be \[B, N, 16\]"):
        MultiHeadAttention(16, 2)(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="set by the layer"):
        MultiHeadAttention(16, 2, "full", bias=torch.zeros(1))


def test_causal_refused_for_non_causal_mechanism(monkeypatch):
    registry.get("full")
    spec = Mechanism(name="_test_nc", fn=lambda *a, **k: None, causal=False)
    monkeypatch.setitem(registry._REGISTRY, "_test_nc", spec)
    with pytest.raises(ValueError, match="cannot be causal"):
        MultiHeadAttention(16, 2, "_test_nc", causal=True)


# ------------------------------------------------------------------ graph layer
def test_graph_attention_layer_equals_edge_masked_reference():
    need("graph")
    n = 7
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 2, 0], [1, 2, 3, 4, 5, 6, 0, 0, 0]])
    layer = GraphAttention(16, 2).to(D64)
    x = torch.randn(n, 16, dtype=D64)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[edge_index[1], edge_index[0]] = True          # query i = row 1, key j = row 0
    q, k, v = proj(layer, x[None])
    ref = merge(layer, dense_attention(q, k, v, mask))[0]
    torch.testing.assert_close(layer(x, edge_index), ref)


# ------------------------------------------------------------------ positional encodings
def test_sinusoidal_table_formula():
    t = sinusoidal_table(5, 6, offset=2)
    for p in range(5):
        for i in range(3):
            ang = (p + 2) / 10000 ** (2 * i / 6)
            assert t[p, 2 * i].item() == pytest.approx(math.sin(ang), abs=1e-6)
            assert t[p, 2 * i + 1].item() == pytest.approx(math.cos(ang), abs=1e-6)
    x = torch.zeros(1, 5, 6)
    torch.testing.assert_close(SinusoidalPositionalEncoding(6)(x, offset=2)[0], t)


def test_learned_positions_and_max_len():
    pe = LearnedPositionalEncoding(4, max_len=8)
    x = torch.zeros(2, 3, 4)
    torch.testing.assert_close(pe(x, offset=5)[1], pe.table.weight[5:8])
    with pytest.raises(ValueError, match="max_len"):
        pe(torch.zeros(1, 9, 4))


def test_frequency_encoding_formula():
    x = torch.tensor([[0.3, -1.2]], dtype=D64)
    out = frequency_encoding(x, 3)
    expect = [0.3, -1.2]
    for l in range(3):
        expect += [math.sin(2 ** l * 0.3), math.sin(2 ** l * -1.2), math.cos(2 ** l * 0.3), math.cos(2 ** l * -1.2)]
    torch.testing.assert_close(out[0], torch.tensor(expect, dtype=D64))
    assert frequency_encoding(x, 0) is x
    with pytest.raises(ValueError, match="bands"):
        frequency_encoding(x, -1)


# ------------------------------------------------------------------ norms and loss
def test_rmsnorm_and_layernorm_formulas():
    x = torch.randn(2, 3, 8, dtype=D64)
    rms = RMSNorm(8).to(D64)
    torch.testing.assert_close(rms(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6))
    ln = LayerNorm(8).to(D64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x, None), (x - mu) / torch.sqrt(var + 1e-5))
    assert rms(x.half()).dtype == torch.float16


def test_batchnorm_train_statistics_ignore_padding_and_eval_uses_running():
    bn = SequenceBatchNorm(4, momentum=0.5).to(D64)
    x = torch.randn(3, 6, 4, dtype=D64)
    kpm = torch.ones(3, 6, dtype=torch.bool)
    kpm[0, 4:] = False
    kpm[2, 1:] = False
    real = x[kpm]                                           # [R, 4]
    mean, var = real.mean(0), real.var(0, unbiased=False)
    out = bn(x, kpm)
    torch.testing.assert_close(out[kpm], (real - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(bn.running_mean, 0.5 * mean)
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * real.var(0, unbiased=True))
    # padded values change neither the real outputs nor the running statistics
    bn2 = SequenceBatchNorm(4, momentum=0.5).to(D64)
    x2 = torch.where(kpm[..., None], x, torch.randn_like(x) * 100)
    torch.testing.assert_close(bn2(x2, kpm)[kpm], out[kpm])
    torch.testing.assert_close(bn2.running_var, bn.running_var)
    # eval: running statistics, position by position
    bn.eval()
    y = torch.randn(2, 5, 4, dtype=D64)
    torch.testing.assert_close(bn(y), (y - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5))
    torch.testing.assert_close(bn(y[:, :2]), bn(y)[:, :2])


@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
@pytest.mark.parametrize("prenorm", [True, False])
def test_padded_positions_never_change_real_outputs_in_any_norm(norm, prenorm):
    blk = EncoderBlock(16, 2, "full", norm=norm, prenorm=prenorm).to(D64)
    x = torch.randn(3, 8, 16, dtype=D64)
    kpm = torch.ones(3, 8, dtype=torch.bool)
    kpm[1, 5:] = False
    x2 = torch.where(kpm[..., None], x, torch.randn_like(x) * 50)
    for mode in (True, False):
        blk.train(mode)
        torch.testing.assert_close(blk(x, kpm)[kpm], blk(x2, kpm)[kpm])


def test_label_smoothing_cross_entropy_matches_torch():
    logits = torch.randn(4, 5, 7, dtype=D64)
    target = torch.randint(0, 7, (4, 5))
    target[0, :3] = -100
    for eps in (0.0, 0.1, 0.3):
        ref = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), label_smoothing=eps, ignore_index=-100)
        torch.testing.assert_close(label_smoothing_cross_entropy(logits, target, eps), ref)
    # smoothing by hand on one row: (1-eps) * nll + eps * mean(-log p)
    lp = torch.log_softmax(logits[1, 1], -1)
    hand = 0.8 * -lp[target[1, 1]] + 0.2 * -lp.mean()
    torch.testing.assert_close(label_smoothing_cross_entropy(logits[1, 1:2], target[1, 1:2], 0.2), hand)
    all_ignored = torch.full((2, 3), -1)
    assert label_smoothing_cross_entropy(logits[:2, :3], all_ignored, 0.1, ignore_index=-1).item() == 0.0
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothing_cross_entropy(logits, target, 1.5)


# ------------------------------------------------------------------ every registered mechanism
def _every_mechanism():
    for spec in registry.specs():
        if spec.name.startswith("_test"):
            continue
        params = dict(HAND_MASKS.get(spec.name, ({}, None))[0])
        if any(p.required and p.name not in params for p in spec.params):
            continue
        yield spec.name, params


@pytest.mark.parametrize("case", list(_every_mechanism()), ids=lambda c: c[0])
def test_every_registered_mechanism_runs_in_the_layer(case):
    """Forward + backward with padding, causal where allowed; learned ones own a submodule."""
    name, params = case
    spec = registry.get(name)
    for causal in ([True] if spec.causal_only else [False, True] if spec.causal else [False]):
        mha = MultiHeadAttention(32, 4, name, causal=causal, **params)
        x = torch.randn(2, N, 32, requires_grad=True)
        kpm = torch.ones(2, N, dtype=torch.bool)
        kpm[0, -3:] = False
        out = mha(x, key_padding_mask=kpm)
        assert out.shape == x.shape and torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        if spec.module is not None:  # built by registry.build, registered as a submodule
            assert mha.groups[0].impl in list(mha.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer(dtype):
    mha = MultiHeadAttention(16, 2, "full", rope=True)
    x = torch.randn(2, 9, 16)
    ref = mha(x)
    out = mha.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_layer_adds_nothing_quadratic():
    """MultiHeadAttention around local2d at 128 x 128 = 16384 positions, forward + backward:
    far below one N x N fp32 score map per head (4 heads: 4 GiB)."""
    from longattn.testing import peak_memory_mb

    setup = """
from longattn.layers import MultiHeadAttention
mha = MultiHeadAttention(64, 4, "local2d", rope=True, height=128, width=128)
x = torch.randn(1, 128 * 128, 64, requires_grad=True)
"""
    peak = peak_memory_mb(setup, "out = mha(x); out.sum().backward()")
    n = 128 * 128
    assert peak < n * n * 4 * 4 / 2 ** 20 / 16, f"peak {peak:.0f} MiB looks quadratic"


def test_rope_2d_scores_depend_on_the_2d_offset_only():
    """Axial 2D RoPE (grid width W): q.k after rotation depends on (row, column) offsets,
    not on where the pair sits; 1D RoPE does not have this (a row break is +1 there too).
    Hand-written rotation of the first channel pair (row axis) and of the first pair of the
    column half."""
    W, D = 5, 8
    rope = RotaryEmbedding(D, base=100.0, grid_width=W)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, D, generator=g,
                                                                                  dtype=torch.float64)

    def score(pq: int, pk: int, r=rope) -> float:
        a = r.rotate(q.expand(1, 1, 1, D), positions=torch.tensor([pq]))
        b = r.rotate(k.expand(1, 1, 1, D), positions=torch.tensor([pk]))
        return float((a * b).sum())

    # (row, col) offset (1, -1): pixel 6 -> 10 and 13 -> 17 (rows 1->2, 2->3; cols 1->0, 3->2)
    assert abs(score(10, 6) - score(17, 13)) < 1e-12
    # same 1D distance 1, different 2D offsets: (0, +1) within a row vs (+1, -4) across a row break
    assert abs(score(7, 6) - score(10, 9)) > 1e-3
    one_d = RotaryEmbedding(D, base=100.0)
    assert abs(score(7, 6, one_d) - score(10, 9, one_d)) < 1e-12
    # hand-written: position 13 = (row 2, col 3); pair 0 turns by 2 rad, pair 2 (col half) by 3 rad
    x = torch.zeros(1, 1, 1, D, dtype=torch.float64)
    x[..., 0] = x[..., 4] = 1.0
    out = rope.rotate(x, positions=torch.tensor([13]))[0, 0, 0]
    torch.testing.assert_close(out[[0, 1, 4, 5]], torch.tensor([math.cos(2), math.sin(2), math.cos(3), math.sin(3)],
                                                               dtype=torch.float64))
    with pytest.raises(ValueError, match="head_dim % 4"):
        RotaryEmbedding(6, grid_width=W)


def test_rope_2d_model_needs_the_image_width():
    from longattn.model import ModelConfig

    with pytest.raises(ValueError, match="grid_width"):
        ModelConfig(vocab_size=8, max_len=64, dim=32, heads=2, pos="rope2d")
    with pytest.raises(ValueError, match="rope_grid"):
        MultiHeadAttention(32, 2, rope_grid=8)
