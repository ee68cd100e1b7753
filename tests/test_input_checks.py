"""Input checks and their corner cases (issue 29, items 3, 4, 6, 9, 10).

- packed calls (``segment_ids``) run the same input checks, with the same messages, as
  unpacked ones;
- global positions >= N are simply absent (short inputs, decode steps before them),
  held against a dense float64 oracle and against recomputation;
- ALiBi on packed rows gives each document its own positions;
- validation does not depend on what the pattern cache has seen (2 vs 2.0, 1 vs True);
- ``generate`` names the argument it refuses.

Sizes are not multiples of any block size (N = 11, documents of 5 and 6 tokens).
"""

from __future__ import annotations

import pytest
import torch

from longattn import attention
from longattn.decoding import generate, incremental_logits
from longattn.model import ModelConfig, Transformer
from longattn.ops.reference import dense_attention

D64 = torch.float64
N = 11
SEG = torch.tensor([[0] * 5 + [1] * 6, [3] * 4 + [7] * 7])  # documents 5 + 6, 4 + 7


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(B: int = 2, H: int = 2, n: int = N, D: int = 8) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(B, H, n, D, dtype=D64) for _ in range(3))


def _error(fn) -> tuple[type, str]:
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    raise AssertionError("no TypeError/ValueError was raised")


# -- item 3: segment_ids runs the checks of an unpacked call --------------------------------

def _bad_inputs(case: str) -> tuple[tuple, dict, torch.Tensor]:
    q, k, v = _qkv()
    kw: dict = {}
    seg = SEG
    if case == "transposed_mask":
        kw["key_padding_mask"] = torch.ones(N, 2, dtype=torch.bool)
    elif case == "float_mask":
        kw["key_padding_mask"] = torch.ones(2, N, dtype=D64)
    elif case == "kv_batch":
        k = k[:1]
    elif case == "rank3_q":
        q = q[0]
    elif case == "empty":
        q, k, v = (x[:, :, :0] for x in (q, k, v))
        seg = SEG[:, :0]
    return (q, k, v), kw, seg


@pytest.mark.parametrize("mechanism, params", [("local", {"before": 2, "after": 1}), ("full", {})])
@pytest.mark.parametrize("case", ["transposed_mask", "float_mask", "kv_batch", "rank3_q", "empty"])
def test_packed_call_runs_the_unpacked_checks(case, mechanism, params):
    (q, k, v), kw, seg = _bad_inputs(case)
    plain = _error(lambda: attention(q, k, v, mechanism, **kw, **params))
    packed = _error(lambda: attention(q, k, v, mechanism, segment_ids=seg, **kw, **params))
    assert packed == plain


# -- item 4: global positions >= N are not there yet ----------------------------------------

def _global_mask(n: int, idx: tuple[int, ...], window: int | None = None) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    g = torch.tensor([p for p in idx if p < n], dtype=torch.long)
    vis = torch.isin(i, g) | torch.isin(j, g)
    if window is not None:
        vis = vis | ((j - i).abs() <= window)
    return vis


CASES = [("global", {"indices": (0, 5)}, None, (0, 5)),
         ("longformer", {"window": 2, "global_indices": (0, 8)}, 2, (0, 8))]


@pytest.mark.parametrize("mechanism, params, window, idx", CASES)
def test_global_index_beyond_a_short_input_is_ignored(mechanism, params, window, idx):
    q, k, v = _qkv(n=4)
    for causal in (False, True):
        want = dense_attention(q, k, v, _global_mask(4, idx, window), causal=causal)
        got = attention(q, k, v, mechanism, causal=causal, **params)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mechanism, params, window, idx", CASES)
def test_global_index_decode_steps_equal_the_full_sequence(mechanism, params, window, idx):
    q, k, v = _qkv(H=4)
    k2, v2 = k[:, ::2], v[:, ::2]  # grouped KV heads, as a cache holds them
    want = dense_attention(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1),
                           _global_mask(N, idx, window), causal=True)
    for t in range(N):
        got = attention(q[:, :, t:t + 1], k2[:, :, :t + 1], v2[:, :, :t + 1], mechanism, causal=True, **params)
        torch.testing.assert_close(got, want[:, :, t:t + 1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mechanism, params, window, idx", CASES)
def test_global_index_model_decodes_and_takes_short_inputs(mechanism, params, window, idx):
    cfg = ModelConfig(vocab_size=13, max_len=32, dim=16, depth=2, heads=2, mechanism=mechanism,
                      mechanism_params=params)
    m = Transformer(cfg).to(D64).eval()
    x = torch.randint(0, 13, (2, N))
    with torch.no_grad():
        full = m(x)
        torch.testing.assert_close(incremental_logits(m, x), full, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m(x[:, :3]), full[:, :3], rtol=1e-9, atol=1e-9)


def test_negative_global_index_still_refused():
    q, k, v = _qkv(n=4)
    with pytest.raises(ValueError, match="indices"):
        attention(q, k, v, "global", indices=(0, -1))
    with pytest.raises(ValueError, match="global_indices"):
        attention(q, k, v, "longformer", window=1, global_indices=(-2,))


# -- item 6: ALiBi on packed rows ---------------------------------------------------------

@pytest.mark.parametrize("head", ["lm", "tokens"])
def test_alibi_packed_row_equals_each_document_alone(head):
    # documents 17 + 6 and 4 + 19: lengths 17 and 19 are run padded to 18 and 20
    n, cuts = 23, (17, 4)
    seg = torch.tensor([[0] * 17 + [1] * 6, [5] * 4 + [2] * 19])
    cfg = ModelConfig(vocab_size=13, max_len=32, dim=16, depth=2, heads=2, mechanism="full", pos="alibi",
                      head=head, num_classes=3)
    m = Transformer(cfg).to(D64).eval()
    x = torch.randint(0, 13, (2, n))
    with torch.no_grad():
        packed = m(x, segment_ids=seg)
        for b, cut in enumerate(cuts):
            for lo, hi in ((0, cut), (cut, n)):
                torch.testing.assert_close(packed[b:b + 1, lo:hi], m(x[b:b + 1, lo:hi]), rtol=1e-9, atol=1e-9)


# -- item 9: validation independent of the pattern cache ------------------------------------

def test_refusal_does_not_depend_on_cached_patterns():
    q, k, v = _qkv()
    for bad, good in (({"before": 3.0, "after": 1}, {"before": 3, "after": 1}),
                      ({"before": 2, "after": True}, {"before": 2, "after": 1})):
        name = next(p for p in bad if type(bad[p]) is not int)
        with pytest.raises(TypeError, match=name):
            attention(q, k, v, "local", **bad)
        attention(q, k, v, "local", **good)
        with pytest.raises(TypeError, match=name):
            attention(q, k, v, "local", **bad)


# -- item 10: generate's arguments --------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
    ({"temperature": "hot"}, TypeError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"top_k": 2.0}, TypeError, "top_k"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"use_cache": 1}, TypeError, "use_cache"),
    ({"generator": 0}, TypeError, "generator"),
    ({"prompt": [[1, 2]]}, TypeError, "prompt"),
    ({"prompt": torch.ones(1, 3)}, TypeError, "prompt"),
    ({"prompt": torch.ones(1, 0, dtype=torch.long)}, ValueError, "prompt"),
])
def test_generate_names_the_bad_argument(kwargs, error, name):
    m = Transformer(ModelConfig(vocab_size=13, dim=16, depth=1, heads=2)).eval()
    args = {"prompt": torch.randint(0, 13, (1, 3)), "max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=name):
        generate(m, **args)
