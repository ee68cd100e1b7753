"""Shared test helpers (issue 30, step 5): inputs, named closeness, gradient checks.

Import them in a test module with ``from conftest import make_qkv, assert_close,
assert_grads_match`` (pytest puts ``tests/`` on ``sys.path``), or take the fixtures of
the same names. Every helper is independent of the code under test: it draws inputs
and compares tensors, nothing more.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

D64 = torch.float64


def make_qkv(
    B: int = 2,
    H: int = 2,
    Hkv: int | None = None,
    Nq: int = 37,
    Nk: int | None = None,
    D: int = 8,
    Dv: int | None = None,
    *,
    dtype: torch.dtype = D64,
    seed: int = 0,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], standard normal.

    Drawn in float64 from ``torch.Generator().manual_seed(seed)`` in the order q, k, v,
    then cast to ``dtype`` (so the fp16 / bf16 / fp32 inputs of one seed are roundings
    of the same float64 values). Defaults: Hkv = H, Nk = Nq, Dv = D. ``requires_grad``:
    each is a leaf that requires grad (after the cast).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    Hkv = H if Hkv is None else Hkv
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    for name, value in (("B", B), ("H", H), ("Hkv", Hkv), ("Nq", Nq), ("Nk", Nk), ("D", D), ("Dv", Dv)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv))
    out = tuple(torch.randn(s, generator=g, dtype=D64).to(dtype).requires_grad_(requires_grad) for s in shapes)
    return out  # type: ignore[return-value]


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| in float64 (0.0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close(actual: Tensor, expected: Tensor, *, atol: float = 1e-9, rtol: float = 0.0,
                 name: str = "output") -> None:
    """Fail unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere; the
    message names the tensor and gives the max abs difference. Shapes must be equal;
    NaN/inf positions must agree (NaN == NaN)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    fin = torch.isfinite(a) & torch.isfinite(e)
    agree = fin | (a == e) | (a.isnan() & e.isnan())  # inf == inf, NaN with NaN
    if not agree.all():
        raise AssertionError(f"{name}: non-finite values differ at {int((~agree).sum())} positions")
    err = (a - e).abs().where(fin, torch.zeros_like(a))
    bound = atol + rtol * e.abs().where(fin, torch.zeros_like(e))
    if (err > bound).any():
        worst = err.max().item()
        raise AssertionError(f"{name}: max abs difference {worst:.3g} exceeds atol={atol:g}, rtol={rtol:g}")


def loss_weights(shape: Sequence[int], *, seed: int = 3, dtype: torch.dtype = D64) -> Tensor:
    """A fixed random w for ``loss = (out * w).sum()`` (standard normal, float64 draw)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=D64).to(dtype)


def _grads(out: Tensor, inputs: Sequence[Tensor], w: Tensor) -> list[Tensor]:
    gs = torch.autograd.grad((out * w.to(out.dtype)).sum(), list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if gi is None else gi for x, gi in zip(inputs, gs)]


def assert_grads_match(
    fn: Callable[..., Tensor],
    ref: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    *,
    atol: float = 1e-9,
    rtol: float = 0.0,
    seed: int = 3,
    names: Sequence[str] = ("q", "k", "v"),
) -> None:
    """``fn(*inputs)`` equals ``ref(*inputs)``, and so do their gradients.

    Each side runs on its own detached leaf copies of ``inputs``; the loss is
    ``(out * w).sum()`` with one fixed random ``w`` (:func:`loss_weights`), and
    d loss / d input is compared for every input (an input a side does not read has a
    zero gradient). Messages name the tensor: ``out``, ``dq``, ``dk``, ``dv``.
    Cost: two forward and two backward passes.
    """
    leaves = [[x.detach().clone().requires_grad_(True) for x in inputs] for _ in range(2)]
    out, expected = fn(*leaves[0]), ref(*leaves[1])
    assert_close(out, expected, atol=atol, rtol=rtol, name="out")
    w = loss_weights(out.shape, seed=seed)
    for nm, a, b in zip(names, _grads(out, leaves[0], w), _grads(expected, leaves[1], w)):
        assert_close(a, b, atol=atol, rtol=rtol, name=f"d{nm}")


@pytest.fixture
def qkv_factory() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """:func:`make_qkv` as a fixture."""
    return make_qkv
