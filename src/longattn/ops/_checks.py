"""Input checks shared by every mechanism: clear errors naming the argument."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Dims:
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    Hkv: int = 0

    def __post_init__(self) -> None:
        if not self.Hkv:
            object.__setattr__(self, "Hkv", self.H)


def check_qkv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    cross: bool = True,
    gqa: bool = False,
    bottom_right: bool = False,
) -> Dims:
    """Validate [B, H, N, D] inputs; return their dimensions.

    Raises TypeError for non-tensors or non-float dtypes and ValueError for wrong
    ranks, mismatched B/H/D/Nk, a bad ``key_padding_mask``, ``causal`` with Nq != Nk,
    or Nq != Nk where the mechanism is self-attention only (``cross=False``).
    ``gqa``: k, v may have Hkv heads with H % Hkv == 0 (grouped KV heads).
    ``bottom_right``: Nq < Nk is allowed (causal or not): the queries are the last Nq
    positions (FlashAttention's bottom-right alignment); Nq > Nk is still refused.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape [B, H, N, D] (4 dims), got {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    B, H, Nq, D = q.shape
    Bk, Hk, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if Bk != B or Bv != B or Hv != Hk or (Hk != H and not (gqa and Hk >= 1 and H % Hk == 0)):
        raise ValueError(
            f"q, k, v must agree in batch and heads"
            + (" (k and v may have fewer heads, Hkv with H % Hkv == 0)" if gqa else "")
            + f": q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if Dk != D:
        raise ValueError(f"k's last dim ({Dk}) must equal q's ({D})")
    if Nv != Nk:
        raise ValueError(f"k and v must have the same length, got {Nk} and {Nv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if Nq == 0 or Nk == 0:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={Nq}, Nk={Nk}")
    if bottom_right and Nq > Nk:
        raise ValueError(
            f"Nq ({Nq}) must be <= Nk ({Nk}): queries are the last Nq of the Nk positions"
        )
    if causal and Nq != Nk and not bottom_right:
        raise ValueError(
            f"causal=True needs self-attention lengths (Nq == Nk), got Nq={Nq}, Nk={Nk}"
        )
    if not cross and Nq != Nk and not bottom_right:
        raise ValueError(
            f"this mechanism is self-attention only: Nq ({Nq}) must equal Nk ({Nk})"
        )
    check_key_padding_mask(key_padding_mask, B, Nk)
    return Dims(B, H, Nq, Nk, D, Dv, Hk)


def check_key_padding_mask(mask: Tensor | None, B: int, Nk: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be bool (True = real token), got dtype {mask.dtype}"
        )
    if tuple(mask.shape) != (B, Nk):
        raise ValueError(
            f"key_padding_mask must have shape [B, Nk] = [{B}, {Nk}], got {tuple(mask.shape)}"
        )


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an int >= ``minimum``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def default_scale(scale: float | None, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {scale!r}")
    return float(scale)


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool; TypeError naming ``name`` otherwise (0/1 are not bools)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_number(name: str, value: object, *, above: float | None = None, minimum: float | None = None) -> float:
    """``value`` as a float, > ``above`` and >= ``minimum`` where given; ValueError naming
    ``name`` otherwise (a non-number, a bool included, is a bad value here, not a type)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and above is not None and not value > above:
        ok = False
    if ok and minimum is not None and not value >= minimum:
        ok = False
    if not ok:
        bound = f" > {above}" if above is not None else f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a number{bound}, got {value!r}")
    return float(value)
