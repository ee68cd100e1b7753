"""Transformer / EncoderDecoder built from ModelConfig: shapes, masks, errors, training."""

from __future__ import annotations

import pytest
import torch

from longattn import registry
from longattn.layers import label_smoothing_cross_entropy
from longattn.model import EncoderDecoder, ModelConfig, Transformer


def need(name: str) -> None:
    if name not in registry.names():
        pytest.skip(f"mechanism {name!r} not registered yet")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids oversubscription on a shared CPU (40x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=20, max_len=64, dim=32, depth=2, heads=4)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("head,shape", [("lm", (2, 9, 20)), ("classify", (2, 5)), ("tokens", (2, 9, 5))])
@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "rope", "alibi", "none"])
def test_output_shapes(head, shape, pos):
    m = Transformer(small(head=head, num_classes=5, pos=pos))
    out = m(torch.randint(0, 20, (2, 9)))
    assert out.shape == shape
    out.float().sum().backward()


def test_lm_is_causal_and_defaults():
    cfg = small(head="lm")
    assert cfg.is_causal and not small(head="classify").is_causal
    m = Transformer(cfg).eval()
    x = torch.randint(0, 20, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(m(x)[:, :7], m(x2)[:, :7])
    assert not torch.allclose(m(x)[:, 7:], m(x2)[:, 7:])
    assert m.head.weight is m.tok_emb.weight  # tied


@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_classifier_ignores_padding(norm, pool):
    m = Transformer(small(head="classify", num_classes=3, norm=norm, pool=pool, global_tokens=1)).double()
    x = torch.randint(0, 20, (3, 10))
    kpm = torch.ones(3, 10, dtype=torch.bool)
    kpm[0, 6:] = False
    kpm[2, 2:] = False
    x2 = torch.where(kpm, x, torch.randint(0, 20, x.shape))
    for mode in (False, True):
        m.train(mode)
        torch.testing.assert_close(m(x, key_padding_mask=kpm), m(x2, key_padding_mask=kpm))
    # mean pooling counts real positions only: a padded copy of a short sequence agrees with it alone
    if norm != "batch":
        m.eval()
        torch.testing.assert_close(m(x[2:, :2]), m(x[2:], key_padding_mask=kpm[2:]))


def test_cls_token_is_global_with_full():
    m = Transformer(small(head="classify", pool="cls"))
    assert m.n_prefix == 1 and m.prefix_global


def test_per_head_mechanism_list_model():
    mech = ["full", ("local2d", {"height": 3, "width": 4})]
    m = Transformer(small(head="tokens", num_classes=2, mechanism=mech))
    assert m(torch.randint(0, 20, (2, 12))).shape == (2, 12, 2)


def test_continuous_input_with_frequency_encoding_and_image_local2d():
    """An 8x8 one-channel image as a pixel sequence through exact 2D local attention."""
    cfg = small(input="continuous", in_dim=1, freq_bands=4, head="classify", num_classes=10,
                mechanism="local2d", mechanism_params={"height": 8, "width": 8, "radius_h": 1, "radius_w": 1})
    m = Transformer(cfg)
    assert m.tok_emb.in_features == 1 * (1 + 2 * 4)
    img = torch.rand(2, 8, 8)
    out = m(img.reshape(2, 64, 1))
    assert out.shape == (2, 10)
    out.sum().backward()
    with pytest.raises(ValueError, match="float features"):
        m(torch.randint(0, 3, (2, 64)))


def test_audio_frames_with_local_window():
    """Audio as frame features (e.g. 40 mel bins) with a windowed pattern, per-frame labels."""
    need("local")
    cfg = small(input="continuous", in_dim=40, head="tokens", num_classes=4,
                mechanism="local", mechanism_params={"before": 4, "after": 4})
    m = Transformer(cfg).eval()
    frames = torch.randn(2, 50, 40)
    out = m(frames)
    assert out.shape == (2, 50, 4)
    # 2 layers of a +-4 window: frame 0 cannot depend on frame 30
    f2 = frames.clone()
    f2[:, 30:] += 3.0
    torch.testing.assert_close(m(f2)[:, :10], out[:, :10])


def test_bad_configurations():
    with pytest.raises(ValueError, match="divisible"):
        small(dim=30, heads=4)
    with pytest.raises(ValueError, match="head must be one of"):
        small(head="regress")
    with pytest.raises(ValueError, match="pos must be one of"):
        small(pos="xyz")
    with pytest.raises(ValueError, match="norm must be one of"):
        small(norm="group")
    with pytest.raises(ValueError, match="unknown mechanism"):
        Transformer(small(mechanism="nope"))
    with pytest.raises(ValueError, match="causal"):
        small(head="lm", global_tokens=2)
    with pytest.raises(ValueError, match="alibi"):
        Transformer(small(pos="alibi", mechanism="local2d", mechanism_params={"height": 2, "width": 2}))
    with pytest.raises(ValueError, match="global"):
        Transformer(small(head="classify", global_tokens=1, mechanism="local2d",
                          mechanism_params={"height": 2, "width": 2}))
    with pytest.raises(TypeError, match="unknown parameter"):
        Transformer(small(mechanism_params={"radius": 3}))
    with pytest.raises(ValueError, match="max_len"):
        Transformer(small(pos="learned", max_len=8))(torch.randint(0, 20, (1, 9)))


def test_encoder_decoder_shapes_causality_and_padding():
    m = EncoderDecoder(small(), src_vocab_size=30).eval()
    src = torch.randint(0, 30, (2, 11))
    tgt = torch.randint(0, 20, (2, 7))
    out = m(src, tgt)
    assert out.shape == (2, 7, 20)
    tgt2 = tgt.clone()
    tgt2[:, 4:] = torch.randint(0, 20, (2, 3))
    torch.testing.assert_close(m(src, tgt2)[:, :4], out[:, :4])
    spm = torch.ones(2, 11, dtype=torch.bool)
    spm[1, 8:] = False
    src2 = torch.where(spm, src, torch.randint(0, 30, src.shape))
    torch.testing.assert_close(m(src, tgt, spm), m(src2, tgt, spm))
    assert m.greedy(src, bos=1, max_new_tokens=3).shape == (2, 4)
    with pytest.raises(ValueError, match="cross"):
        EncoderDecoder(small(), cross_mechanism="local2d", cross_params={"height": 2, "width": 2})


def test_tiny_lm_learns_copy_task():
    """[a1..a6, SEP, a1..a6]: the loss on the copied half falls far below chance (ln 8)."""
    torch.manual_seed(0)
    L, V = 6, 8
    m = Transformer(ModelConfig(vocab_size=V + 1, max_len=2 * L + 1, dim=32, depth=2, heads=4,
                                head="lm", pos="learned", mlp_ratio=2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)

    def batch(b=16):
        a = torch.randint(0, V, (b, L))
        seq = torch.cat((a, torch.full((b, 1), V), a), 1)
        tgt = seq[:, 1:].clone()
        tgt[:, : L] = -100                  # score only the copied half
        return seq[:, :-1], tgt

    losses = []
    for step in range(300):
        x, y = batch()
        loss = label_smoothing_cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step > 50 and sum(losses[-10:]) / 10 < 0.1:
            break
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert start > 1.8, start
    assert end < 0.4, f"copy loss fell only from {start:.2f} to {end:.2f} in {len(losses)} steps"
