"""Fewer keys: attention over a short summary of the sequence.

- ``linformer`` (Wang et al. 2020): learned E, F [k, max_len] project keys and values
  along the sequence to k rows; softmax(Q (E K)^T) (F V). O(N k D).
- ``compressed`` (memory-compressed attention, Liu et al. 2018, "Generating Wikipedia
  by Summarizing Long Sequences"): a strided convolution (kernel = stride = c) turns
  every c keys/values into one slot. O(N (N/c + c) D); with ``slots=S`` (c = ceil(N/S))
  O(N (S + c) D), linear in N.
- ``nystrom`` (Xiong et al. 2021, Nystromformer): m landmarks (segment means),
  softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V with an iterative
  Moore-Penrose pseudo-inverse. O(N m D + m^3).

None of them builds an Nq x Nk tensor. Each reduces to full attention in its
degenerate setting (identity projections with k = N; c = 1; m = N) and tests show it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as Fn
import torch.utils.checkpoint
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.ops._module import MechanismModule
from longattn.ops._softmax import flash_fwd
from longattn.registry import Param, register

__all__ = [
    "linformer_attention",
    "LinformerAttention",
    "compressed_attention",
    "CompressedAttention",
    "nystrom_attention",
    "iterative_pinv",
]


# what the registry knows of every low-rank mechanism (linformer, compressed, nystrom)
_LOWRANK_CAPABILITIES: dict[str, Any] = dict(
    family="lowrank",
    all_keys=True,  # every query weighs every (projected) key
    exact=False, cross=True, subquadratic=True,
)


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _masked_softmax(scores: Tensor, visible: Tensor | None) -> Tensor:
    """softmax over the last dim with ``visible`` (bool, broadcastable); rows with none -> 0."""
    if visible is None:
        return torch.softmax(scores, -1)
    scores = scores.masked_fill(~visible, float("-inf"))
    any_vis = visible.any(-1, keepdim=True)
    if bool(any_vis.all()):  # the usual case: no extra full-size passes
        return torch.softmax(scores, -1)
    scores = scores.masked_fill(~any_vis, 0.0)
    return torch.softmax(scores, -1) * any_vis


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, visible: Tensor | None) -> Tensor:
    """softmax(q k^T * scale) v, keys masked by ``visible`` (bool, broadcastable to
    [B, H, 1, Nk]; None = all); a row with no visible key gives 0.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]. On the CPU in float32/64
    this is PyTorch's fused flash kernel (forward and backward): no [Nq, Nk] score
    tensor, so the low-rank mechanisms stay O(N) in memory and allocate no large
    transient buffers. Elsewhere, plain matmuls and :func:`_masked_softmax`.
    """
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and k.shape[-1] == v.shape[-1]:
        B, H = q.shape[:2]
        mask = None
        if visible is not None and not bool(visible.all()):
            mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        # the kernel reads rows through strides but needs unit stride along D
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        k, v = k.expand(B, H, -1, -1), v.expand(B, H, -1, -1)
        return flash_fwd(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[0]
    p = _masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, visible)
    return torch.matmul(p, v)


# --------------------------------------------------------------------------- linformer

_PROJ_CACHE: dict[tuple, Tensor] = {}


def _linformer_init(k: int, max_len: int, generator: torch.Generator | None = None) -> Tensor:
    """A [k, max_len] projection, N(0, 2 / (k + max_len)) (Xavier normal)."""
    std = math.sqrt(2.0 / (k + max_len))
    return torch.randn(k, max_len, generator=generator) * std


def _fixed_projection(k: int, max_len: int, seed: int) -> Tensor:
    key = (k, max_len, seed)
    if key not in _PROJ_CACHE:
        if len(_PROJ_CACHE) > 16:
            _PROJ_CACHE.clear()
        _PROJ_CACHE[key] = _linformer_init(k, max_len, torch.Generator().manual_seed(seed))
    return _PROJ_CACHE[key]


def _project(x: Tensor, P: Tensor, name: str, H: int) -> Tensor:
    """[k, L] or [H, k, L] projection of x [B, H, N, D] along N (first N columns)."""
    N = x.shape[2]
    if P.dim() not in (2, 3) or (P.dim() == 3 and P.shape[0] != H):
        raise ValueError(f"{name} must be [k, max_len] or [H={H}, k, max_len], got {tuple(P.shape)}")
    if N > P.shape[-1]:
        raise ValueError(
            f"sequence length {N} exceeds linformer max_len {P.shape[-1]} (the width of {name}); "
            f"build it with max_len >= {N}"
        )
    P = P[..., :N].to(x.dtype)
    if P.dim() == 2:
        return torch.matmul(P, x)  # [k, N] @ [B, H, N, D]
    return torch.matmul(P[None], x)


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    E: Tensor | None = None,
    F: Tensor | None = None,
    share_kv: bool = False,
    seed: int = 0,
    max_len: int = 4096,
    proj_dim: int = 256,
) -> Tensor:
    """Linformer. q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] -> [B,H,Nq,Dv].

    Padded keys/values are zeroed before the projection (so they reach no output);
    inputs shorter than max_len use the first Nk columns of E and F. Cost
    O(Nk k (D + Dv) + Nq k (D + Dv)). Causal is refused: a projection along the
    sequence mixes future keys into every projected row.
    """
    if causal:
        raise ValueError(
            "linformer cannot be causal (causal=True was given): E and F mix every "
            "position, future ones included, into each projected key"
        )
    d = check_qkv(q, k, v, causal=False, key_padding_mask=key_padding_mask)
    s = default_scale(scale, d.D)
    if E is None:
        check_int("proj_dim", proj_dim, minimum=1)
        check_int("max_len", max_len, minimum=1)
        check_int("seed", seed)
        E = _fixed_projection(proj_dim, max_len, seed)
        if F is None:
            F = E if share_kv else _fixed_projection(proj_dim, max_len, seed + 1)
    elif F is None:
        F = E
    for name, P in (("E", E), ("F", F)):
        if not isinstance(P, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(P).__name__}")
    work = _work(q.dtype)
    kw_, vw = k.to(work), v.to(work)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :, None]
        kw_ = kw_.masked_fill(~real, 0.0)
        vw = vw.masked_fill(~real, 0.0)
    kp = _project(kw_, E.to(q.device), "E", d.H)  # [B, H, k, D]
    vp = _project(vw, F.to(q.device), "F", d.H)  # [B, H, k, Dv]
    # a projected key that no real key reaches is masked: with identity projections
    # (E = I, k >= N) these are exactly the padded keys and the missing rows, so k = N
    # gives full attention
    if key_padding_mask is None:
        cols = E[..., : d.Nk]  # two reductions, no |E| temporary (64 MiB at N=65536)
        reach = ((cols.amax(-1) > 0) | (cols.amin(-1) < 0)).to(q.device)  # [k] or [H, k]
        reach = reach.expand(d.H, -1)[None]  # [1, H, k]
    else:
        real = key_padding_mask.to(work)[:, None, :, None]  # [B, 1, Nk, 1]
        reach = _project(real, E[..., : d.Nk].abs().to(q.device), "E", d.H)[..., 0] > 0  # [B, 1|H, k]
    return _softmax_attention(q.to(work), kp, vp, s, reach[:, :, None, :]).to(q.dtype)


class LinformerAttention(MechanismModule):
    """Linformer module owning E (and F unless ``share_kv``): [H, k, max_len] if
    ``headwise`` else [k, max_len] shared by the heads (k = ``proj_dim``).
    Xavier-normal init."""

    def __init__(
        self,
        heads: int,
        head_dim: int,
        proj_dim: int = 256,
        max_len: int = 4096,
        share_kv: bool = False,
        headwise: bool = False,
        E: Tensor | None = None,
        F: Tensor | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        k = check_int("proj_dim", proj_dim, minimum=1)
        check_int("max_len", max_len, minimum=1)
        self.heads, self.share_kv = heads, bool(share_kv)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def init(given: Tensor | None) -> nn.Parameter:
            if given is not None:
                return nn.Parameter(given.detach().clone().float())
            if headwise:
                return nn.Parameter(torch.stack([_linformer_init(k, max_len, gen) for _ in range(heads)]))
            return nn.Parameter(_linformer_init(k, max_len, gen))

        self.E = init(E)
        self.F = None if self.share_kv else init(F)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **call: Any) -> Tensor:
        return linformer_attention(q, k, v, **call, E=self.E, F=self.E if self.F is None else self.F)


register(
    "linformer",
    params=(
        Param("proj_dim", 256, "k: projected length (rows of E, F)"),
        Param("max_len", 4096, "longest sequence (columns of E, F)"),
        Param("share_kv", False, "one projection for keys and values (F = E)"),
        Param("E", None, "[k, max_len] or [H, k, max_len] key projection; None: fixed random from seed"),
        Param("F", None, "value projection like E; None: E if share_kv else fixed random"),
        Param("seed", 0, "seed of the fixed random projections (functional form)"),
    ),
    **_LOWRANK_CAPABILITIES,
    causal=False,
    learned=True,
    paper="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity",
    summary="softmax(Q (EK)^T)(FV): keys/values projected to k rows along the sequence",
    module=LinformerAttention,
)(linformer_attention)


# --------------------------------------------------------------------------- compressed


def _compress(
    x: Tensor, real: Tensor, c: int, weight: Tensor | None, H: int, name: str
) -> Tensor:
    """[B, H, N, D] (N a multiple of c, padded rows zero) -> [B, H, N/c, Dout].

    ``weight`` None: mean over the real positions of each window; else a strided
    Conv1d (kernel = stride = c) over the sequence, channels = D, weight
    [Dout, D, c] shared by the heads or [H, Dout, D, c] per head.
    """
    B, _, N, D = x.shape
    if weight is None:
        cnt = real.view(B, 1, N // c, c).sum(-1, dtype=x.dtype).clamp_min(1.0)  # [B, 1, S]
        return x.view(B, H, N // c, c, D).sum(3) / cnt[..., None]
    w = weight.to(x.dtype)
    if w.dim() == 3 and w.shape[1:] == (D, c):
        y = Fn.conv1d(x.reshape(B * H, N, D).transpose(1, 2), w, stride=c)  # [B*H, Dout, S]
        return y.view(B, H, w.shape[0], N // c).transpose(-1, -2)
    if w.dim() == 4 and w.shape[0] == H and w.shape[2:] == (D, c):
        y = Fn.conv1d(x.transpose(-1, -2).reshape(B, H * D, N), w.reshape(H * w.shape[1], D, c),
                      stride=c, groups=H)
        return y.view(B, H, w.shape[1], N // c).transpose(-1, -2)
    raise ValueError(f"{name} must be [Dout, D={D}, c={c}] or [H={H}, Dout, D={D}, c={c}], got {tuple(w.shape)}")


#: score elements (B * heads * query rows * (S + c)) of one checkpointed part of the
#: causal compressed attention
CAUSAL_PART_ELEMENTS = 1 << 20


def compressed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    stride: int | None = None,
    slots: int = 256,
    conv_k: Tensor | None = None,
    conv_v: Tensor | None = None,
) -> Tensor:
    """Memory-compressed attention. q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] -> [B,H,Nq,Dv].

    Keys/values are cut into windows of c (the last one zero-padded); each window
    becomes one slot (conv, or mean of its real keys). Padded keys are zeroed before
    compressing; a slot with no real key is masked.
    Causal: query i sees slot s only if the whole window of s lies before i's own
    block (s < i // c), plus the keys of its own block j in [c * (i // c), i],
    uncompressed: one softmax over both, so no query is left without keys.
    Cost O(Nq (S + c) D) time and memory with S = ceil(Nk / c) slots: linear in N
    with ``slots`` (c grows with N), O(N^2 / c) with a fixed ``stride``.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    s = default_scale(scale, d.D)
    c = _compression_stride(d.Nk, stride, slots, conv_k, conv_v)
    work = _work(q.dtype)
    kz, vz, real = _zeroed_windows(k.to(work), v.to(work), key_padding_mask, c)
    kc = _compress(kz, real, c, conv_k, d.H, "conv_k")  # [B, H, S, D]
    vc = _compress(vz, real, c, conv_v, d.H, "conv_v")  # [B, H, S, Dv]
    slot_ok = real.view(d.B, -1, c).any(-1)[:, None, None, :]  # [B, 1, 1, S]
    if not causal:
        return _softmax_attention(q.to(work), kc, vc, s, slot_ok).to(q.dtype)
    return _causal_compressed(q.to(work), kz, vz, kc, vc, real, slot_ok, c, s).to(q.dtype)


def _compression_stride(Nk: int, stride: int | None, slots: int, conv_k: Tensor | None,
                        conv_v: Tensor | None) -> int:
    """The window c of :func:`compressed_attention`: ``stride``, else the conv weights'
    kernel size, else ceil(Nk / slots); the conv weights' kernel size must equal it."""
    if stride is None:
        for w in (conv_k, conv_v):
            if w is not None:
                stride = int(w.shape[-1])
        if stride is None:
            check_int("slots", slots, minimum=1)
            stride = -(-Nk // slots)
    c = check_int("stride", stride, minimum=1)
    for name, w in (("conv_k", conv_k), ("conv_v", conv_v)):
        if w is not None and (not isinstance(w, Tensor) or w.shape[-1] != c):
            raise ValueError(f"{name} must be a conv weight with kernel size = stride = {c}, got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else w!r}")
    return c


def _zeroed_windows(k: Tensor, v: Tensor, key_padding_mask: Tensor | None, c: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """k [B, H, Nk, D], v [B, H, Nk, Dv] zero-padded to S * c rows (S = ceil(Nk / c)),
    padded keys zeroed; and ``real`` [B, S * c] (True = a real key). No copy when
    there is nothing to zero (64 MiB of k and v at N = 16384, H = 8, D = 64)."""
    B, _, Nk, _ = k.shape
    pad = -(-Nk // c) * c - Nk
    real = torch.ones(B, Nk, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    real = Fn.pad(real, (0, pad), value=False)
    if not pad and key_padding_mask is None:
        return k, v, real
    hide = ~real[:, None, :, None]
    return Fn.pad(k, (0, 0, 0, pad)).masked_fill(hide, 0.0), Fn.pad(v, (0, 0, 0, pad)).masked_fill(hide, 0.0), real


def _causal_part(qp: Tensor, kz: Tensor, vz: Tensor, kc: Tensor, vc: Tensor, vis_c: Tensor, vis_b: Tensor,
                 s: float, h: tuple[int, int], blocks: tuple[int, int]) -> Tensor:
    """Heads h = (h0, h1), query blocks (b0, b1) of causal compressed attention: the
    slots strictly before the own block, plus the own block of c keys uncompressed,
    one softmax over both. qp, kz, vz [B, H, S c, .]; kc, vc [B, H, S, .]; vis_c
    [B, 1, S c, S], vis_b [B, 1, S, c, c]. Returns [B, h1 - h0, (b1 - b0) c, Dv]."""
    (h0, h1), (b0, b1) = h, blocks
    B, Hg, nbk, S, c = qp.shape[0], h1 - h0, b1 - b0, kc.shape[2], vis_b.shape[-1]
    r0, r1 = b0 * c, b1 * c
    qg = qp[:, h0:h1, r0:r1]
    sc = torch.matmul(qg, kc[:, h0:h1].transpose(-1, -2)) * s  # [B, Hg, rows, S]
    kb = kz[:, h0:h1, r0:r1].reshape(B, Hg, nbk, c, -1)
    sb = torch.matmul(qg.reshape(B, Hg, nbk, c, -1), kb.transpose(-1, -2)) * s  # [B, Hg, nbk, c, c]
    vb = vis_b[:, :, b0:b1].expand(B, Hg, nbk, c, c).reshape(B, Hg, r1 - r0, c)
    vis = torch.cat([vis_c[:, :, r0:r1].expand(B, Hg, r1 - r0, S), vb], -1)
    p = _masked_softmax(torch.cat([sc, sb.reshape(B, Hg, r1 - r0, c)], -1), vis)
    out = torch.matmul(p[..., :S], vc[:, h0:h1])
    own = torch.matmul(p[..., S:].reshape(B, Hg, nbk, c, c), vz[:, h0:h1, r0:r1].reshape(B, Hg, nbk, c, -1))
    return out + own.reshape(B, Hg, r1 - r0, -1)


def _causal_compressed(qw: Tensor, kz: Tensor, vz: Tensor, kc: Tensor, vc: Tensor, real: Tensor,
                       slot_ok: Tensor, c: int, s: float) -> Tensor:
    """Causal compressed attention in (head, query-chunk) parts of ~CAUSAL_PART_ELEMENTS
    scores, checkpointed under autograd (all heads' [B, H, N, S + c] scores at once
    were ~800 MiB at N = 16384, H = 8, S = 256, c = 64). Returns [B, H, Nq, Dv]."""
    B, H, N = qw.shape[:3]
    S = kc.shape[2]
    i = torch.arange(S * c, device=qw.device)
    past_slot = torch.arange(S, device=qw.device)[None, :] < (i // c)[:, None]  # [S c, S]: O(N S)
    vis_c = past_slot[None, None] & slot_ok  # [B, 1, S c, S]
    vis_b = torch.ones(c, c, dtype=torch.bool, device=qw.device).tril() & real.view(B, 1, S, 1, c)
    qp = Fn.pad(qw, (0, 0, 0, S * c - N)) if S * c > N else qw
    blocks = max(1, CAUSAL_PART_ELEMENTS // max(1, B * c * (S + c)))
    ckpt = torch.is_grad_enabled() and (qw.requires_grad or kc.requires_grad or vc.requires_grad)
    single = blocks >= S and B * H * S * c * (S + c) <= CAUSAL_PART_ELEMENTS
    rows = []
    for h in [(0, H)] if single else [(h, h + 1) for h in range(H)]:
        parts = []
        for b0 in range(0, S, blocks):
            args = (qp, kz, vz, kc, vc, vis_c, vis_b, s, h, (b0, min(S, b0 + blocks)))
            parts.append(torch.utils.checkpoint.checkpoint(_causal_part, *args, use_reentrant=False)
                         if ckpt and not single else _causal_part(*args))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    return out[:, :, :N]


class CompressedAttention(MechanismModule):
    """Memory-compressed attention owning its strided convolutions.

    With ``stride=c`` the module learns conv weights [D, D, c] for keys and values
    (``per_head``: [H, D, D, c]), initialised to the window mean (plus small noise),
    as in Liu et al. 2018. With ``stride=None`` the compression is the
    parameter-free window mean with c = ceil(N / slots) (linear cost).
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        stride: int | None = None,
        slots: int = 256,
        conv_k: Tensor | None = None,
        conv_v: Tensor | None = None,
        per_head: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.stride, self.slots = stride, slots
        self.conv_k: nn.Parameter | None = None
        self.conv_v: nn.Parameter | None = None
        if stride is None:
            check_int("slots", slots, minimum=1)
            if conv_k is not None or conv_v is not None:
                raise ValueError("conv_k/conv_v need a fixed stride (stride=None uses the window mean)")
            return
        c = check_int("stride", stride, minimum=1)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def init(given: Tensor | None) -> nn.Parameter:
            if given is not None:
                return nn.Parameter(given.detach().clone().float())
            w = torch.eye(head_dim)[:, :, None].repeat(1, 1, c) / c
            w = w + torch.randn(head_dim, head_dim, c, generator=gen) * (0.02 / math.sqrt(head_dim * c))
            return nn.Parameter(w.repeat(heads, 1, 1, 1) if per_head else w)

        self.conv_k, self.conv_v = init(conv_k), init(conv_v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **call: Any) -> Tensor:
        return compressed_attention(q, k, v, **call, stride=self.stride, slots=self.slots, conv_k=self.conv_k,
                                    conv_v=self.conv_v)


register(
    "compressed",
    params=(
        Param("stride", None, "c = kernel = stride of the compression; None: c = ceil(N / slots)"),
        Param("slots", 256, "number of compressed slots when stride is None (linear cost)"),
        Param("conv_k", None, "conv weight [D, D, c] or [H, D, D, c] for keys; None: mean of the window"),
        Param("conv_v", None, "conv weight for values, like conv_k"),
    ),
    **_LOWRANK_CAPABILITIES,
    causal=True,
    learned=True,
    paper="Liu et al. 2018, Generating Wikipedia by Summarizing Long Sequences",
    summary="memory-compressed attention: strided conv (kernel = stride = c) over keys/values",
    module=CompressedAttention,
)(compressed_attention)


# --------------------------------------------------------------------------- nystrom


def iterative_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of a [..., p, m] batch (square or not) by the
    iteration of Razavi et al. 2014 used in Nystromformer:
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4, Z0 = A^T / (||A||_1 ||A||_inf)
    (Xiong et al. 2021, eq. 13; I is p x p). O(iters m^3). Converges to A^+ (zero
    rows/columns included), but slowly when A is ill-conditioned: the small singular
    values start at ~sigma^2 / (||A||_1 ||A||_inf) and need many iterations to grow
    (softmax of segment-mean landmarks, m = 16: 6 iterations are ~90% off, 20 ~1e-5)."""
    check_int("pinv_iters", iters, minimum=0)
    p = a.shape[-2]
    eye = torch.eye(p, dtype=a.dtype, device=a.device)
    n1 = a.abs().sum(-2).amax(-1)  # max column sum
    ninf = a.abs().sum(-1).amax(-1)  # max row sum
    denom = (n1 * ninf).clamp_min(torch.finfo(a.dtype).tiny)
    z = a.transpose(-1, -2) / denom[..., None, None]
    for _ in range(iters):
        az = torch.matmul(a, z)
        z = 0.25 * torch.matmul(z, 13 * eye - torch.matmul(az, 15 * eye - torch.matmul(az, 7 * eye - az)))
    return z


def landmark_pinv(a: Tensor, iters: int | None) -> Tensor:
    """pinv of the [..., Mq, Mk] landmark kernel: exact (torch.linalg.pinv in float64,
    differentiable, O(m^3)) when ``iters`` is None, else :func:`iterative_pinv`."""
    if iters is None:
        return torch.linalg.pinv(a.to(torch.float64)).to(a.dtype)
    return iterative_pinv(a, iters)


def _segment_means(x: Tensor, real: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """[B, H, N, D], real [B, N] -> (means of the real rows of m contiguous segments
    of length ceil(N / m) [B, H, M, D], segment has a real row [B, M]); M <= m."""
    B, H, N, D = x.shape
    seg = -(-N // m)
    M = -(-N // seg)
    pad = M * seg - N
    real_p = Fn.pad(real, (0, pad), value=False)
    xz = Fn.pad(x, (0, 0, 0, pad)).masked_fill(~real_p[:, None, :, None], 0.0)
    cnt = real_p.view(B, M, seg).sum(-1, dtype=x.dtype)  # [B, M]
    means = xz.view(B, H, M, seg, D).sum(3) / cnt.clamp_min(1.0)[:, None, :, None]
    return means, cnt > 0


@register(
    "nystrom",
    params=(
        Param("landmarks", 64, "number of landmarks m (segment means); capped at N"),
        Param("pinv_iters", None, "None: exact Moore-Penrose pseudo-inverse (float64 SVD, m^3); "
                                  "an int: that many iterations of the paper's iterative pinv"),
    ),
    **_LOWRANK_CAPABILITIES,
    compile_recompute=True,
    causal=False,
    paper="Xiong et al. 2021, Nystromformer",
    summary="softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V, m landmarks",
)
def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    landmarks: int = 64,
    pinv_iters: int | None = None,
) -> Tensor:
    """Nystrom attention. q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] -> [B,H,Nq,Dv].

    Landmarks are the means of m contiguous segments (of length ceil(N/m); of the
    real keys only, and for self-attention of the real queries only). Padded keys
    get no weight; key landmarks without a real key are masked. Evaluated right to
    left: softmax(Ql K^T) V first, so cost O((Nq + Nk) m D + m^3) time and
    O((Nq + Nk) m) memory. Causal is refused (landmarks mix the future).
    Cross-attention: Nq and Nk may give different landmark counts Mq != Mk (segments
    of ceil(N / m)); the landmark kernel is then Mq x Mk and its pinv Mk x Mq.

    ``pinv_iters=None`` (default): the exact pseudo-inverse. The paper's iteration
    (an int) converges slowly on these ill-conditioned kernels (m = 16: 6 iterations
    are ~90% away from the exact pinv, 20 ~1e-5), so it is opt-in.
    """
    if causal:
        raise ValueError(
            "nystrom cannot be causal (causal=True was given): its landmarks average "
            "future keys into every query's view"
        )
    d = check_qkv(q, k, v, causal=False, key_padding_mask=key_padding_mask)
    s = default_scale(scale, d.D)
    check_int("landmarks", landmarks, minimum=1)
    if pinv_iters is not None:
        check_int("pinv_iters", pinv_iters, minimum=0)
    work = _work(q.dtype)
    qw, kw_, vw = q.to(work), k.to(work), v.to(work)
    real_k = torch.ones(d.B, d.Nk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        real_k = key_padding_mask
    real_q = real_k if (key_padding_mask is not None and d.Nq == d.Nk) else torch.ones(
        d.B, d.Nq, dtype=torch.bool, device=q.device)
    ql, ql_ok = _segment_means(qw, real_q, min(landmarks, d.Nq))  # [B, H, Mq, D]
    kl, kl_ok = _segment_means(kw_, real_k, min(landmarks, d.Nk))  # [B, H, Mk, D]
    kl_vis = kl_ok[:, None, None, :]
    a = _masked_softmax(torch.matmul(ql, kl.transpose(-1, -2)) * s, kl_vis)  # [B, H, Mq, Mk]
    a = a * ql_ok[:, None, :, None]
    # softmax(Ql K^T) V and softmax(Q Kl^T) (pinv(a) bv): attention over all keys from
    # the few landmark queries, and from every query over the few landmark keys
    bv = _softmax_attention(ql, kw_, vw, s, real_k[:, None, None, :]) * ql_ok[:, None, :, None]  # [B, H, Mq, Dv]
    out = _softmax_attention(qw, kl, torch.matmul(landmark_pinv(a, pinv_iters), bv), s, kl_vis)
    return out.to(q.dtype)
