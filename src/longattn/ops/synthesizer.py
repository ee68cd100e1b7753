"""Synthesizer: attention weights synthesised without query-key dot products.

Tay et al. 2020, "Synthesizer: Rethinking Self-Attention in Transformer Models".

- ``dense``: a per-position two-layer MLP maps token i's vector to its whole row of
  scores, B_i = W2 relu(W1 x_i + b1) + b2 in R^max_len (first Nk entries used).
- ``random``: a score matrix R [H, max_len, max_len] per head, input independent,
  trainable or fixed.
- ``factorized_dense``: A_i = Wa x_i + ba in R^a, B_i = Wb x_i + bb in R^b,
  row = (A_i outer B_i) flattened (a * b >= max_len): O(a + b) outputs per token.
- ``factorized_random``: R = R1 R2^T with R1, R2 [H, max_len, r].
- ``mix``: scores = (1 - mix) * synthetic + mix * (q k^T * scale) (the paper's
  mixture with dot-product attention).

The per-position input x_i is the head's query vector q_i (the mechanism sees no
other per-token input); keys enter only through ``mix``. Scores are Nq x Nk by
nature: the Synthesizer is exempt from the sub-quadratic rule (docs/design.md section 1).
Cost O(Nq Nk Dv + Nq hidden max_len).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.ops._module import MechanismModule
from longattn.registry import Param, register

__all__ = ["synthesizer_attention", "SynthesizerAttention", "synthesizer_weights", "KINDS"]

KINDS = ("dense", "random", "factorized_dense", "factorized_random")
_NEEDS = {
    "dense": ("w1", "b1", "w2", "b2"),
    "random": ("R",),
    "factorized_dense": ("wa", "ba", "wb", "bb"),
    "factorized_random": ("R1", "R2"),
}


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def _factor_sizes(max_len: int, rank: int) -> tuple[int, int]:
    """(a, b) for factorized_dense: b = rank, a = ceil(max_len / b)."""
    return -(-max_len // rank), rank


def synthesizer_weights(
    kind: str,
    heads: int,
    head_dim: int,
    max_len: int,
    *,
    hidden: int | None = None,
    rank: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Freshly initialised learned tensors of a synthesizer ``kind`` (per head).

    dense: w1 [H, D, hidden], b1 [H, hidden], w2 [H, hidden, L], b2 [H, L];
    random: R [H, L, L]; factorized_dense: wa [H, D, a], ba [H, a], wb [H, D, b],
    bb [H, b]; factorized_random: R1, R2 [H, L, rank]. L = max_len.
    """
    _check_kind(kind)
    H, D, L = heads, head_dim, max_len
    hid = hidden or D

    def g(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=generator) * std

    if kind == "dense":
        return {"w1": g(H, D, hid, std=D ** -0.5), "b1": torch.zeros(H, hid),
                "w2": g(H, hid, L, std=hid ** -0.5), "b2": torch.zeros(H, L)}
    if kind == "random":
        return {"R": g(H, L, L, std=1.0)}
    if kind == "factorized_dense":
        a, b = _factor_sizes(L, rank)
        return {"wa": g(H, D, a, std=D ** -0.5), "ba": torch.ones(H, a),
                "wb": g(H, D, b, std=D ** -0.5), "bb": torch.ones(H, b)}
    return {"R1": g(H, L, rank, std=rank ** -0.25), "R2": g(H, L, rank, std=rank ** -0.25)}


_CACHE: dict[tuple, dict[str, Tensor]] = {}


def _fixed_weights(kind: str, H: int, D: int, L: int, hidden: int | None, rank: int, seed: int):
    key = (kind, H, D, L, hidden, rank, seed)
    if key not in _CACHE:
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = synthesizer_weights(
            kind, H, D, L, hidden=hidden, rank=rank, generator=torch.Generator().manual_seed(seed)
        )
    return _CACHE[key]


def _per_head(t: Tensor, H: int, name: str, dims: int) -> Tensor:
    """Accept a shared tensor (``dims`` dims) or a per-head one (``dims + 1``, first = H)."""
    if t.dim() == dims:
        return t.unsqueeze(0)
    if t.dim() == dims + 1 and t.shape[0] == H:
        return t
    raise ValueError(f"weights[{name!r}] must have {dims} dims or [H={H}, ...], got {tuple(t.shape)}")


def _synthetic_scores(kind: str, w: dict[str, Tensor], x: Tensor, Nk: int) -> Tensor:
    """Scores [B|1, H, Nq, Nk] of ``kind`` from the per-position inputs x [B, H, Nq, D]."""
    B, H, Nq, D = x.shape
    dt = x.dtype

    def P(name: str, dims: int) -> Tensor:
        return _per_head(w[name], H, name, dims).to(device=x.device, dtype=dt)

    if kind == "random":
        R = P("R", 2)
        _check_len(R.shape[-2], Nq, "Nq")
        _check_len(R.shape[-1], Nk, "Nk")
        return R[None, :, :Nq, :Nk]
    if kind == "factorized_random":
        R1, R2 = P("R1", 2), P("R2", 2)
        _check_len(R1.shape[-2], Nq, "Nq")
        _check_len(R2.shape[-2], Nk, "Nk")
        return torch.matmul(R1[:, :Nq], R2[:, :Nk].transpose(-1, -2))[None]
    if kind == "dense":
        w1, b1, w2, b2 = P("w1", 2), P("b1", 1), P("w2", 2), P("b2", 1)
        _check_len(w2.shape[-1], Nk, "Nk")
        h = torch.relu(torch.matmul(x, w1[None]) + b1[None, :, None, :])
        return torch.matmul(h, w2[None, :, :, :Nk]) + b2[None, :, None, :Nk]
    wa, ba, wb, bb = P("wa", 2), P("ba", 1), P("wb", 2), P("bb", 1)
    a = torch.matmul(x, wa[None]) + ba[None, :, None, :]  # [B, H, Nq, a]
    b = torch.matmul(x, wb[None]) + bb[None, :, None, :]  # [B, H, Nq, b]
    _check_len(a.shape[-1] * b.shape[-1], Nk, "Nk")
    return (a[..., :, None] * b[..., None, :]).flatten(-2)[..., :Nk]


def _check_len(max_len: int, n: int, what: str) -> None:
    if n > max_len:
        raise ValueError(f"sequence length {what}={n} exceeds the synthesizer's max_len {max_len}")


def synthesizer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    kind: str = "random",
    max_len: int = 512,
    hidden: int | None = None,
    rank: int = 8,
    mix: float | Tensor | None = None,
    trainable: bool = True,
    weights: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> Tensor:
    """Synthesizer attention. q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] -> [B,H,Nq,Dv].

    softmax(synthetic scores [+ mix * q k^T * scale], causal/padding masked) V.
    Fully masked rows give zeros. Nq, Nk <= max_len of the weights.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    s = default_scale(scale, d.D)
    _check_kind(kind)
    check_int("rank", rank, minimum=1)
    if weights is None:
        check_int("max_len", max_len, minimum=1)
        check_int("seed", seed)
        if hidden is not None:
            check_int("hidden", hidden, minimum=1)
        weights = _fixed_weights(kind, d.H, d.D, max_len, hidden, rank, seed)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of tensors, got {type(weights).__name__}")
    missing = [n for n in _NEEDS[kind] if n not in weights]
    if missing:
        raise ValueError(f"weights for kind={kind!r} lack {missing} (needs {list(_NEEDS[kind])})")
    work = torch.promote_types(q.dtype, torch.float32)
    scores = _synthetic_scores(kind, weights, q.to(work), d.Nk)  # [B|1, H, Nq, Nk]
    if mix is not None:
        m = mix.to(work) if isinstance(mix, Tensor) else torch.tensor(float(mix), dtype=work)
        if not isinstance(mix, Tensor) and not 0.0 <= float(mix) <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix!r}")
        dot = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * s
        scores = (1 - m) * scores + m * dot
    # Masks stay in their small broadcast shapes ([Nq, Nk] causal, [B, 1, 1, Nk] padding):
    # at N=1024 a [B, H, N, N] mask costs as much as the attention itself.
    bias, alive = _mask_bias(d.B, d.Nq, d.Nk, causal, key_padding_mask, work, q.device)
    if bias is not None:
        scores = scores + bias
    p = torch.softmax(scores, -1)
    if alive is not None:
        p = p * alive.to(work)
    if p.shape[0] == 1 and d.B > 1:  # shared scores (random kinds): one softmax for the batch
        return torch.einsum("hij,bhjd->bhid", p[0], v.to(work)).to(q.dtype)
    return torch.matmul(p, v.to(work)).to(q.dtype)


def _mask_bias(B: int, Nq: int, Nk: int, causal: bool, key_padding_mask: Tensor | None, dtype: torch.dtype,
               device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(additive bias broadcastable to [B, 1, Nq, Nk] or None, alive [B, 1, Nq, 1] or None).

    Rows with no visible key get a zero bias (a finite softmax) and alive = False
    (their probabilities are zeroed, so they return zeros, not NaN).
    """
    if not causal and key_padding_mask is None:
        return None, None
    neg = torch.tensor(float("-inf"), dtype=dtype, device=device)
    bias = torch.zeros((), dtype=dtype, device=device)
    alive = None
    if causal:
        upper = torch.ones(Nq, Nk, dtype=torch.bool, device=device).triu(1)
        bias = bias + torch.where(upper, neg, 0.0)  # [Nq, Nk]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device)
        bias = bias + torch.where(kpm, 0.0, neg)[:, None, None, :]  # [B, 1, Nq|1, Nk]
        if causal:  # row i sees a key iff the first real key is at or before i
            first = torch.where(kpm.any(-1), kpm.to(torch.int8).argmax(-1), Nk)
            alive = torch.arange(Nq, device=device)[None, :] >= first[:, None]  # [B, Nq]
        else:
            alive = kpm.any(-1)[:, None].expand(B, Nq)
        alive = alive[:, None, :, None]
        if bool(alive.all()):
            alive = None
        else:
            bias = bias.masked_fill(~alive, 0.0)
    return bias, alive


class SynthesizerAttention(MechanismModule):
    """Synthesizer owning its weights (per head). ``trainable=False`` keeps random
    scores fixed (a buffer); ``mix`` (a float) starts a learned mixture weight
    sigmoid(logit) with dot-product scores at that value."""

    def __init__(
        self,
        heads: int,
        head_dim: int,
        kind: str = "random",
        max_len: int = 512,
        hidden: int | None = None,
        rank: int = 8,
        mix: float | None = None,
        trainable: bool = True,
        weights: dict[str, Tensor] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = _check_kind(kind)
        check_int("max_len", max_len, minimum=1)
        check_int("rank", rank, minimum=1)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init = weights or synthesizer_weights(kind, heads, head_dim, max_len, hidden=hidden, rank=rank,
                                              generator=gen)
        self.names = _NEEDS[kind]
        fixed = kind in ("random", "factorized_random") and not trainable
        for n in self.names:
            t = init[n].detach().clone().float()
            if fixed:
                self.register_buffer(n, t)
            else:
                setattr(self, n, nn.Parameter(t))
        self.mix_logit: nn.Parameter | None = None
        if mix is not None:
            if not 0.0 < float(mix) < 1.0:
                raise ValueError(f"mix must be in (0, 1) for the learned mixture, got {mix!r}")
            self.mix_logit = nn.Parameter(torch.tensor(math.log(mix / (1 - mix))))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **call: Any) -> Tensor:
        w = {n: getattr(self, n) for n in self.names}
        mix = None if self.mix_logit is None else torch.sigmoid(self.mix_logit)
        return synthesizer_attention(q, k, v, **call, kind=self.kind, weights=w, mix=mix)


# registered here, after the module class it builds
register(
    "synthesizer",
    params=(
        Param("kind", "random", "dense | random | factorized_dense | factorized_random"),
        Param("max_len", 512, "longest sequence (width of the synthesised rows)"),
        Param("hidden", None, "hidden width of the dense MLP (default D)"),
        Param("rank", 8, "rank of factorized_random / size b of factorized_dense"),
        Param("mix", None, "weight in [0, 1] of dot-product scores mixed in (None: pure synthetic)"),
        Param("trainable", True, "module form: random scores are trained (else a fixed buffer)"),
        Param("weights", None, "dict of learned tensors (see synthesizer_weights); None: fixed from seed"),
        Param("seed", 0, "seed of the fixed weights when weights is None"),
    ),
    family="synthesizer",
    exact=False,
    causal=True,
    learned=True,
    cross=True,
    subquadratic=False,
    paper="Tay et al. 2020, Synthesizer: Rethinking Self-Attention in Transformer Models",
    summary="softmax of synthesised scores (MLP rows or random matrix), no Q-K dot product",
    module=SynthesizerAttention,
)(synthesizer_attention)
