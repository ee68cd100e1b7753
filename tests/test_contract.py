"""The contract every registered mechanism is held to (docs/design.md sections 1 and 3),
one parametrised test per check over ``registry.names()``, filtered by the capability
fields of :class:`longattn.registry.Mechanism` (issue 30, step 5):

1. causal: nothing after position t reaches an output row <= t (values and gradients);
2. padding: changing padded keys/values changes no output;
3. a row with every key padded gives zeros (and finite gradients), never NaN;
4. fp16 / bf16 inputs give finite outputs of the input dtype, near the fp32 output;
5. bad input (rank, batch, a float mask) raises ValueError/TypeError naming the argument;
6. exact mechanisms equal the float64 dense masked oracle, outputs and gradients;
7. ``gqa``: k/v with fewer heads equal the call with k/v repeated;
8. sub-quadratic mechanisms build no N x N tensor (one subprocess memory probe).

Sizes are tiny and no multiple of any block size (N = 45 = 5 x 9 for local2d).
A check that does not apply skips, naming the capability.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import Tensor

import longattn
from conftest import assert_close, assert_grads_match, make_qkv
from longattn import patterns as P
from longattn import registry
from longattn.ops.reference import dense_attention
from longattn.ops.sparse import with_globals
from longattn.suite import MECHANISM_PARAMS
from longattn.testing import assert_no_causal_leak, assert_padding_no_leak, peak_memory_mb

D64 = torch.float64
B, H, N, D = 2, 2, 45, 8
NAMES = registry.names()


def grid(n: int) -> tuple[int, int]:
    """local2d's image for length n: height * width = n, height the largest divisor
    <= sqrt(n) (45 -> 5 x 9)."""
    height = max(h for h in range(1, int(n ** 0.5) + 1) if n % h == 0)
    return height, n // height


@functools.lru_cache(maxsize=None)
def _ring_edges(n: int) -> Tensor:
    """Query i reads keys i, i - 1, i - 3 and i + 2 (mod n): edges (key -> query), [2, 4n]."""
    dst = torch.arange(n).repeat_interleave(4)
    src = (dst + torch.tensor([0, -1, -3, 2]).repeat(n)) % n
    return torch.stack([src, dst])


def _extra_params(name: str, n: int) -> dict[str, Any]:
    """Parameters beyond suite.MECHANISM_PARAMS: required inputs, small index heads."""
    table: dict[str, dict[str, Any]] = {
        "local2d": {"radius_h": 1, "radius_w": 2},
        "pattern": {"pattern": P.Local(5, 2) | P.GlobalTokens([3])},
        "global": {"indices": (0, 7)},
        "additive": {"block": 16},
        "dsa": {"topk": 12, "index_heads": 2, "index_dim": 4},
    }
    out = dict(table.get(name, {}))
    if name == "local2d":
        out["height"], out["width"] = grid(n)
    if name == "graph":
        out["edge_index"] = _ring_edges(n)
    return out


def params_of(name: str, n: int = N) -> dict[str, Any]:
    """CPU-sized parameters of ``name`` at length n: suite.MECHANISM_PARAMS (task
    placeholders resolved), :func:`_extra_params`, and chunk_size 16 where declared."""
    spec = registry.get(name)
    out: dict[str, Any] = {}
    for key, value in MECHANISM_PARAMS.get(name, {}).items():
        out[key] = n if value == "{seq_len}" else value
    out.update(_extra_params(name, n))
    if "chunk_size" in spec.param_names and "chunk_size" not in out:
        out["chunk_size"] = 16
    return out


@functools.lru_cache(maxsize=None)
def _module(name: str, n: int, dtype: torch.dtype, heads: int, head_dim: int, rounded_to: torch.dtype,
            ) -> torch.nn.Module:
    """The module of ``name`` (seed 0: the same weights for every dtype), its weights
    rounded to ``rounded_to`` and then held in ``dtype`` (as ``model.to(dtype)`` does)."""
    torch.manual_seed(0)
    mod = registry.build(name, heads=heads, head_dim=head_dim, **params_of(name, n))
    return mod.to(rounded_to).to(dtype).eval()


def call(name: str, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
         key_padding_mask: Tensor | None = None, weights_rounded_to: torch.dtype | None = None) -> Tensor:
    """Mechanism ``name`` on q, k, v as a model calls it: the functional form with
    :func:`params_of`, or (learned) its module, in q's dtype, through :func:`registry.run`
    (which repeats K/V for mechanisms without ``gqa``). Causal-only mechanisms run
    causal. ``weights_rounded_to``: round a module's weights through this dtype first
    (the fp32 reference of a half-precision module)."""
    spec = registry.get(name)
    causal = causal or spec.causal_only
    if spec.module is None:
        return longattn.attention(q, k, v, name, causal=causal, key_padding_mask=key_padding_mask,
                                  **params_of(name, k.shape[-2]))
    heads = q.shape[1] if q.dim() == 4 else H
    mod = _module(name, k.shape[-2], q.dtype, heads, q.shape[-1], weights_rounded_to or q.dtype)
    return registry.run(spec, lambda q, k, v, kpm: mod(q, k, v, causal=causal, key_padding_mask=kpm),
                        q, k, v, causal=causal, key_padding_mask=key_padding_mask, segment_ids=None)


# Defects this contract finds, each an xfail(strict=True) until fixed (then the XPASS
# fails: delete the entry). Key: (check, mechanism, case or None). Empty: the recurrent
# modules' half-precision gates and check-before-convolution were fixed.
KNOWN_DEFECTS: dict[tuple[str, str, str | None], str] = {}  # (check, mechanism, case) -> reason


def known_defect(request: pytest.FixtureRequest, check: str, name: str, case: str | None = None) -> None:
    """Mark this case xfail(strict=True) if KNOWN_DEFECTS lists it."""
    reason = KNOWN_DEFECTS.get((check, name, case))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def _padding_mask() -> Tensor:
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, [3, 17, 30]] = False  # holes inside a row
    kpm[1, -11:] = False  # a right-padded row
    return kpm


# ------------------------------------------------------------------- 1. causal leak
@pytest.mark.parametrize("name", NAMES)
def test_causal_leaks_nothing_from_the_future(name: str) -> None:
    spec = registry.get(name)
    if not spec.causal:
        pytest.skip(f"{name}: capability causal=False")
    q, k, v = make_qkv(B, H, H, N, N, D)
    for t in (0, 20, N - 2):
        # atol: float64 rounding (summation order may depend on how the future groups), no leak
        assert_no_causal_leak(lambda q, k, v: call(name, q, k, v, causal=True), q, k, v, t, atol=1e-12)


# ------------------------------------------------------------------ 2. padding leak
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_padded_keys_change_no_output(name: str, causal: bool) -> None:
    spec = registry.get(name)
    if causal and not spec.causal:
        pytest.skip(f"{name}: capability causal=False")
    if not causal and spec.causal_only:
        pytest.skip(f"{name}: capability causal_only=True")
    q, k, v = make_qkv(B, H, H, N, N, D)
    assert_padding_no_leak(lambda q, k, v, m: call(name, q, k, v, causal=causal, key_padding_mask=m),
                           q, k, v, _padding_mask())


# ------------------------------------------------------------- 3. fully masked rows
@pytest.mark.parametrize("name", NAMES)
def test_fully_padded_row_gives_zeros_not_nan(name: str) -> None:
    q, k, v = make_qkv(B, H, H, N, N, D, requires_grad=True)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1] = False
    out = call(name, q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all(), f"{name}: non-finite output with a fully padded row"
    assert out[1].abs().max().item() == 0.0, f"{name}: fully padded row gives {out[1].abs().max().item():g}, not 0"
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for nm, g in zip("qkv", grads):
        assert g is None or torch.isfinite(g).all(), f"{name}: d{nm} is not finite"


# ------------------------------------------------------------------ 4. half dtypes
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_finite_and_near_fp32(request: pytest.FixtureRequest, name: str,
                                                dtype: torch.dtype) -> None:
    known_defect(request, "half", name)
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=dtype)
    kpm = _padding_mask()
    out = call(name, q, k, v, key_padding_mask=kpm)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype} for {dtype} inputs"
    assert torch.isfinite(out).all(), f"{name}: non-finite {dtype} output"
    ref = call(name, q.float(), k.float(), v.float(), key_padding_mask=kpm, weights_rounded_to=dtype)
    assert_close(out, ref, atol=HALF_TOL[dtype], rtol=HALF_TOL[dtype], name=f"{name} {dtype} out")


# ------------------------------------------------------------------- 5. bad input
def _bad(case: str) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None, str]:
    """(q, k, v), key_padding_mask, a regex the error message must match."""
    q, k, v = make_qkv(B, H, H, N, N, D)
    if case == "rank3_q":
        return (q[0], k, v), None, r"\bq\b"
    if case == "batch":
        return (q, k[:1], v[:1]), None, r"\bk\b|\bv\b|batch"
    return (q, k, v), torch.ones(B, N, dtype=D64), r"key_padding_mask"


@pytest.mark.parametrize("case", ["rank3_q", "batch", "float_mask"])
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_names_the_argument(request: pytest.FixtureRequest, name: str, case: str) -> None:
    known_defect(request, "bad_input", name, case)
    (q, k, v), kpm, pattern = _bad(case)
    with pytest.raises((ValueError, TypeError), match=pattern):
        call(name, q, k, v, key_padding_mask=kpm)


# ------------------------------------------------------------- 6. the dense oracle
def _oracle_mask(name: str, causal: bool) -> Tensor | None:
    """The visible set [1, H, N, N] (True = visible) the mechanism promises, drawn
    from the pattern's predicate or by hand (local2d, graph); None: every key."""
    spec, params = registry.get(name), params_of(name)
    if name == "full":
        return None
    if name == "pattern":
        return params["pattern"].mask(N, H, causal)[None]
    if name == "local2d":
        r, c = torch.arange(N) // params["width"], torch.arange(N) % params["width"]
        near = ((r[:, None] - r[None]).abs() <= params["radius_h"]) & ((c[:, None] - c[None]).abs() <= params["radius_w"])
        return near.expand(1, H, N, N)
    if name == "graph":
        m = torch.zeros(N, N, dtype=torch.bool)
        m[params["edge_index"][1], params["edge_index"][0]] = True  # edge (key -> query)
        return m.expand(1, H, N, N)
    pat_params = {k: v for k, v in params.items() if k not in ("backend",)}
    pat_params.update({k: v for k, v in spec.defaults().items() if k not in pat_params and k != "backend"})
    return with_globals(spec.pattern, **pat_params).mask(N, H, causal)[None]


def _exact_names() -> list[str]:
    return [s.name for s in registry.specs() if s.exact]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", _exact_names())
def test_exact_mechanism_equals_dense_oracle(name: str, causal: bool) -> None:
    spec = registry.get(name)
    if spec.pattern is None and name not in ("full", "pattern", "local2d", "graph"):
        pytest.skip(f"{name}: exact, but its scores are not q.k (pattern=None; held by its own tests)")
    mask = _oracle_mask(name, causal)
    kpm = _padding_mask()
    assert_grads_match(lambda q, k, v: call(name, q, k, v, causal=causal, key_padding_mask=kpm),
                       lambda q, k, v: dense_attention(q, k, v, mask, causal=causal, key_padding_mask=kpm),
                       make_qkv(B, H, H, N, N, D), atol=1e-10)


# ------------------------------------------------------------------------- 7. GQA
@pytest.mark.parametrize("name", NAMES)
def test_grouped_kv_heads_equal_repeated_kv(name: str) -> None:
    spec = registry.get(name)
    if not spec.gqa:
        pytest.skip(f"{name}: capability gqa=False (K/V are repeated by registry.run)")
    q, k, v = make_qkv(B, 4, 2, N, N, D)

    def repeated(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return call(name, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))

    assert_grads_match(lambda q, k, v: call(name, q, k, v), repeated, (q, k, v), atol=1e-10)


# ----------------------------------------------------------------- 8. memory probe
MEM_N, MEM_H, MEM_D = 8192, 2, 16  # one N x N float32 score tensor per head: 256 MiB
MEM_LIMIT_MB = 256  # one N x N float32 tensor alone


def _subquadratic_names() -> list[str]:
    return [s.name for s in registry.specs() if s.subquadratic]


def _probe_peak_mb(names: list[str]) -> float:
    """Peak RSS growth (MiB) of forward + backward of every mechanism in ``names`` in
    turn at N = MEM_N, in a fresh process (:func:`longattn.testing.peak_memory_mb`).
    An N x N float32 tensor (256 MiB) is mmap-ed fresh, so any one shows in the peak."""
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parent)
    setup = f"""
import sys
sys.path.insert(0, {tests_dir!r})
from test_contract import call
q, k, v = (torch.randn(1, {MEM_H}, {MEM_N}, {MEM_D}, requires_grad=True) for _ in range(3))
"""
    # between mechanisms: drop the gradients and hand freed heap back (malloc_trim), so
    # that the peak is the largest single mechanism's, not the allocator's drift
    run = (f"import ctypes\ntrim = ctypes.CDLL('libc.so.6').malloc_trim\nfor name in {names!r}:\n"
           "    call(name, q, k, v).sum().backward()\n    q.grad = k.grad = v.grad = None\n    trim(0)\n")
    return peak_memory_mb(setup, run)


def test_no_subquadratic_mechanism_builds_an_n_by_n_tensor() -> None:
    """All sub-quadratic mechanisms in one process (~10 s on one core); the slow test
    below runs them one per process when this fails, to name the culprit."""
    peak = _probe_peak_mb(_subquadratic_names())
    assert peak < MEM_LIMIT_MB, (f"peak {peak:.0f} MiB at N={MEM_N} (an N x N float32 tensor per head is "
                                 f"{MEM_N * MEM_N * 4 / 2**20:.0f} MiB): run the slow per-mechanism probe")


@pytest.mark.slow
@pytest.mark.parametrize("name", _subquadratic_names())
def test_mechanism_builds_no_n_by_n_tensor(name: str) -> None:
    peak = _probe_peak_mb([name])
    assert peak < MEM_LIMIT_MB, f"{name}: peak {peak:.0f} MiB at N={MEM_N}"
