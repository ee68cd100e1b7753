"""``nsa``: Native Sparse Attention (Yuan et al., DeepSeek 2025, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention"), a learned mechanism.

Three branches per query, mixed by learned gates:

- **compressed**: keys and values of every block of ``block`` positions (blocks start
  every ``stride`` positions, ``stride <= block``; only full blocks) are compressed into
  one token each by a *learned weighted pooling with an intra-block position embedding*:
  k~_i = sum_t a_t (k_{i*stride+t} + pk_t), a = softmax(pool_k) [block] (the same for
  values with pool_v, pv). The weights are shared by every head; at the start (pool
  logits 0) a compressed token is the block mean. A query attends (one softmax) to the
  compressed tokens; causally only to fully past ones (block end <= its position).
- **selected**: the compressed branch's attention probabilities score the key blocks of
  ``block`` positions (a compressed token counts for every block it overlaps), summed
  over the query heads of a kv-head group (``shared=True``: one selection per group, as
  in the paper) or per query head. Each query sees its ``topk`` best earlier blocks plus
  its own block (causally clipped) and the first block, attended exactly (one softmax)
  on whole key blocks by the block engine of :mod:`longattn.ops.topk_blocks`
  (:func:`~longattn.ops.topk_blocks.make_tiles`: work grouped by key block). The selection is not differentiated.
- **window**: exact attention over the query's last ``window`` keys (non-causal:
  |j - i| < window), by the ``local`` pattern engine.

Gates g = sigmoid(q_h . W_h + b_h) [3] per query head (from the query itself, the layer
owning q only): out = g_cmp o_cmp + g_slc o_slc + g_win o_win.

Cost per head: compressed scores [chunk, N / stride] (never Nq x Nk), selection
O(Nq * N / block), attention O(Nq * ((topk + 2) * block + window + N / stride) * D);
memory O(Nq * topk + N / stride * D) plus bounded chunks. Decode (Nq < Nk, bottom-right):
query r is position Nk - Nq + r, so a step equals the last row of the full call.
Key padding: padded keys are zeroed before pooling; a compressed token or a block with no
real key is never seen or selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.ops._checks import check_bool, check_int, check_qkv, default_scale
from longattn.ops.block_tiles import TopkBlocksFunction, make_tiles
from longattn.ops.sparse import local_attention
from longattn.ops.topk_blocks import top_blocks
from longattn.registry import Param, register

#: compressed scores (and probabilities) one chunk of queries may hold (elements)
SCORE_ELEMENTS = 1 << 21
#: work of one batch of selected-block tiles (half of block_tiles' TILE_ELEMENTS: nsa keeps its
#: compressed and window branches alive meanwhile; at N=16384, H=8, D=64 the peak of forward +
#: backward goes from 516 to 506 MiB)
SELECT_ELEMENTS = 1 << 21

#: the learned tensors of the functional form (see :func:`nsa_weights`)
WEIGHT_NAMES = ("pool_k", "pool_v", "pos_k", "pos_v", "gate_w", "gate_b")


def n_compressed(Nk: int, block: int, stride: int) -> int:
    """Number of full compression blocks (start i * stride, length ``block``) in Nk keys."""
    return 0 if Nk < block else (Nk - block) // stride + 1


def nsa_weights(heads: int, head_dim: int, block: int, *, value_dim: int | None = None,
                seed: int | None = 0) -> dict[str, Tensor]:
    """Initial NSA weights: pool logits 0 (mean pooling), position embeddings N(0, 0.02)
    [block, D] / [block, Dv], gate weights N(0, 0.02 / sqrt(D)) [H, D, 3], gate biases 0 [H, 3]
    (all gates start near 0.5). fp32, deterministic from ``seed``."""
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    Dv = head_dim if value_dim is None else value_dim
    return {
        "pool_k": torch.zeros(block), "pool_v": torch.zeros(block),
        "pos_k": torch.randn(block, head_dim, generator=g) * 0.02,
        "pos_v": torch.randn(block, Dv, generator=g) * 0.02,
        "gate_w": torch.randn(heads, head_dim, 3, generator=g) * (0.02 / head_dim ** 0.5),
        "gate_b": torch.zeros(heads, 3),
    }


def compress(x: Tensor, pool: Tensor, pos: Tensor, *, block: int, stride: int,
             key_padding_mask: Tensor | None) -> Tensor:
    """Learned weighted pooling of blocks: x [B, Hkv, Nk, d] -> [B, Hkv, nc, d].

    Token i = sum_t a_t (x[i * stride + t] + pos[t]), a = softmax(pool); padded keys count
    as zeros. Differentiable in x, pool and pos; O(Nk * d * block / stride).
    """
    B, Hkv, Nk, d = x.shape
    nc = n_compressed(Nk, block, stride)
    if key_padding_mask is not None:
        x = x * key_padding_mask[:, None, :, None].to(x.dtype)
    if nc == 0:
        return x.new_zeros(B, Hkv, 0, d)
    a = torch.softmax(pool.to(torch.promote_types(pool.dtype, torch.float32)), -1).to(x.dtype)
    win = x[:, :, : (nc - 1) * stride + block].unfold(2, block, stride)  # [B, Hkv, nc, d, block]
    return torch.matmul(win, a) + a @ pos.to(x.dtype)


@dataclass(frozen=True)
class _Sel:
    """What the compressed pass needs to see and to select (see :class:`_Compressed`)."""

    Nk: int
    block: int
    stride: int
    topk: int
    causal: bool
    shared: bool
    scale: float
    cvalid: Tensor | None  # bool [B, nc]: the compressed token holds a real key
    bvalid: Tensor | None  # bool [B, nb]: the key block holds a real key


def _visible(c0: int, c1: int, Nq: int, nc: int, sel: _Sel, device: torch.device) -> Tensor:
    """bool [B|1, 1, 1, C, nc]: compressed tokens query rows c0..c1 may see."""
    pos = torch.arange(c0, c1, device=device) + (sel.Nk - Nq)
    end = torch.arange(nc, device=device) * sel.stride + sel.block - 1
    vis = (end[None, :] <= pos[:, None]) if sel.causal else torch.ones(c1 - c0, nc, dtype=torch.bool,
                                                                         device=device)
    vis = vis.view(1, 1, 1, c1 - c0, nc)
    if sel.cvalid is not None:
        vis = vis & sel.cvalid.view(sel.cvalid.shape[0], 1, 1, 1, nc)
    return vis


def top_indices(scores: Tensor, visible: Tensor | None, topk: int) -> Tensor:
    """The ``topk`` best visible entries of scores [..., n] (visible: bool, broadcastable;
    None: ``scores`` are finite where visible and -inf elsewhere, used in place)
    -> long [..., min(topk, n)] in no set order, -1 = none (fewer visible entries).

    The same choice as :func:`longattn.ops.topk_blocks.top_blocks` (ties to the lower
    index), faster: one ``torch.topk``, and only rows whose k-th score ties with an unpicked
    visible entry (e.g. ReLU zeros) are redone by ``top_blocks``.
    """
    K = min(topk, scores.shape[-1])
    if K == 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    if visible is None:  # masked already: -inf where not visible (scores themselves are finite)
        s = scores
    else:
        visible = visible.expand_as(scores)
        s = scores.masked_fill(~visible, float("-inf"))
    vals, idx = s.topk(K, -1, sorted=False)  # (unsorted: ~30 % faster at K = 512 of 16384)
    thr = vals.amin(-1, keepdim=True)
    tied = torch.isfinite(thr[..., 0]) & ((s == thr).sum(-1) > (vals == thr).sum(-1))
    idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        vis = torch.isfinite(scores[rows]) if visible is None else visible[rows]
        idx[rows] = top_blocks(scores[rows], vis, topk)
    return idx


def _select(prob: Tensor, c0: int, Nq: int, sel: _Sel) -> Tensor:
    """Top blocks from compressed probabilities prob [B, Hkv, R, C, nc] -> [B, Hkv, Rg, C, K]."""
    B, Hkv, R, C, nc = prob.shape
    nb = -(-sel.Nk // sel.block)
    score = prob.sum(2, keepdim=True) if sel.shared else prob
    start = torch.arange(nc, device=prob.device) * sel.stride
    j0, j1 = start // sel.block, (start + sel.block - 1) // sel.block
    blocks = score.new_zeros(*score.shape[:-1], nb)
    blocks.index_add_(-1, j0, score)
    two = j1 != j0  # a token over two blocks counts for both
    if bool(two.any()):
        blocks.index_add_(-1, j1[two], score[..., two])
    own = (torch.arange(c0, c0 + C, device=prob.device) + (sel.Nk - Nq)) // sel.block
    ar = torch.arange(nb, device=prob.device)
    cand = ((ar < own[:, None]) if sel.causal else (ar != own[:, None])) & (ar > 0)
    cand = cand.view(1, 1, 1, C, nb)
    if sel.bvalid is not None:
        cand = cand & sel.bvalid.view(B, 1, 1, 1, nb)
    return top_indices(blocks, cand, sel.topk)


def _span(c1: int, Nq: int, nc: int, sel: _Sel) -> int:
    """Compressed tokens rows before c1 may see: all, or causally those ending by row c1 - 1."""
    if not sel.causal:
        return nc
    last = c1 - 1 + sel.Nk - Nq
    return max(0, min(nc, (last - sel.block + 1) // sel.stride + 1)) if last >= sel.block - 1 else 0


def _chunk(B: int, H: int, nc: int, Nq: int) -> int:
    return max(1, min(Nq, SCORE_ELEMENTS // max(1, B * H * max(nc, 1))))


class _Compressed(torch.autograd.Function):
    """Attention over the compressed tokens (chunks of queries, backward recomputes the
    scores from the saved log-sum-exp), returning (out, selected blocks) in one pass."""

    @staticmethod
    def forward(ctx, q, kc, vc, sel):  # type: ignore[override]
        B, H, Nq, D = q.shape
        Hkv, nc, Dv = kc.shape[1], kc.shape[2], vc.shape[-1]
        work = torch.promote_types(q.dtype, torch.float32)
        qv = q.view(B, Hkv, H // Hkv, Nq, D)
        kt, vw = kc.to(work).unsqueeze(2).transpose(-1, -2), vc.to(work).unsqueeze(2)
        out = q.new_empty(B, Hkv, H // Hkv, Nq, Dv)
        lse = torch.empty(B, Hkv, H // Hkv, Nq, dtype=work, device=q.device)
        picks = []
        for c0 in range(0, Nq, _chunk(B, H, nc, Nq)):
            c1 = min(Nq, c0 + _chunk(B, H, nc, Nq))
            hi = _span(c1, Nq, nc, sel)
            s = torch.matmul(qv[:, :, :, c0:c1].to(work), kt[..., :hi]) * sel.scale
            s = s.masked_fill(~_visible(c0, c1, Nq, nc, sel, q.device)[..., :hi], float("-inf"))
            m = s.amax(-1, keepdim=True) if hi else s.new_zeros(*s.shape[:-1], 1)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(s - m)
            den = p.sum(-1, keepdim=True)
            prob = p / den.clamp_min(torch.finfo(work).tiny)
            out[:, :, :, c0:c1] = torch.matmul(prob, vw[:, :, :, :hi]).to(out.dtype)
            lse[:, :, :, c0:c1] = torch.where(den > 0, m + torch.log(den), torch.full_like(m, float("inf")))[..., 0]
            picks.append(_select(prob, c0, Nq, sel))
        ctx.save_for_backward(q, kc, vc, out, lse)
        ctx.sel = sel
        blocks = torch.cat(picks, 3)
        ctx.mark_non_differentiable(blocks)
        return out.view(B, H, Nq, Dv), blocks

    @staticmethod
    def backward(ctx, dout, _dblocks):  # type: ignore[override]
        q, kc, vc, out, lse = ctx.saved_tensors
        sel = ctx.sel
        B, H, Nq, D = q.shape
        Hkv, nc, Dv = kc.shape[1], kc.shape[2], vc.shape[-1]
        R = H // Hkv
        work = lse.dtype
        qv, dov = q.view(B, Hkv, R, Nq, D), dout.reshape(B, Hkv, R, Nq, Dv)
        kw, vw = kc.to(work).unsqueeze(2), vc.to(work).unsqueeze(2)
        dq = torch.empty_like(q).view(B, Hkv, R, Nq, D)
        dk = torch.zeros(B, Hkv, nc, D, dtype=work, device=q.device)
        dv = torch.zeros(B, Hkv, nc, Dv, dtype=work, device=q.device)
        C = _chunk(B, H, nc, Nq)
        for c0 in range(0, Nq, C):
            c1 = min(Nq, c0 + C)
            qc, doc = qv[:, :, :, c0:c1].to(work), dov[:, :, :, c0:c1].to(work)
            hi = _span(c1, Nq, nc, sel)
            kh, vh = kw[..., :hi, :], vw[..., :hi, :]
            s = torch.matmul(qc, kh.transpose(-1, -2)) * sel.scale
            s = s.masked_fill(~_visible(c0, c1, Nq, nc, sel, q.device)[..., :hi], float("-inf"))
            p = torch.exp(s - lse[:, :, :, c0:c1, None])
            delta = (doc * out[:, :, :, c0:c1].to(work)).sum(-1, keepdim=True)
            ds = p * (torch.matmul(doc, vh.transpose(-1, -2)) - delta)
            dq[:, :, :, c0:c1] = (torch.matmul(ds, kh) * sel.scale).to(dq.dtype)
            dv[:, :, :hi] += torch.matmul(p.transpose(-1, -2), doc).sum(2)
            dk[:, :, :hi] += (torch.matmul(ds.transpose(-1, -2), qc) * sel.scale).sum(2)
        return dq.view(B, H, Nq, D), dk.to(kc.dtype), dv.to(vc.dtype), None


def _block_valid(key_padding_mask: Tensor | None, unit: int, step: int, count: int) -> Tensor | None:
    """bool [B, count]: window i (keys i * step ... i * step + unit - 1) holds a real key."""
    if key_padding_mask is None:
        return None
    if count == 0:
        return key_padding_mask.new_zeros(key_padding_mask.shape[0], 0)
    pad = max(0, (count - 1) * step + unit - key_padding_mask.shape[1])
    m = F.pad(key_padding_mask, (0, pad))
    return m.unfold(1, unit, step)[:, :count].any(-1)


def check_weights(weights: object, H: int, D: int, Dv: int, block: int) -> dict[str, Tensor]:
    """The NSA weights dict checked against the shapes; TypeError/ValueError naming it."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of tensors {list(WEIGHT_NAMES)}, got {type(weights).__name__}")
    shapes = {"pool_k": (block,), "pool_v": (block,), "pos_k": (block, D), "pos_v": (block, Dv),
              "gate_w": (H, D, 3), "gate_b": (H, 3)}
    for name, shape in shapes.items():
        t = weights.get(name)
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"weights[{name!r}] must be a floating tensor {list(shape)}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"weights[{name!r}] must have shape {list(shape)}, got {list(t.shape)}")
    return weights


def register_learned_select(
    name: str, fn: Callable[..., Tensor], module: type[nn.Module], *, weights: tuple[str, str],
    paper: str, summary: str, params: tuple[Param, ...],
) -> None:
    """Register a learned select-then-attend mechanism (nsa, dsa): ``params`` plus the
    ``weights`` / ``seed`` parameters (``weights`` = (the function that builds the weight
    dictionary, which tensors they are)) and the capabilities these mechanisms share:
    trained weights, causal self-attention, grouped kv heads, bottom-right aligned, no
    packed documents, sub-quadratic."""
    weights_fn, what = weights
    params = (*params,
              Param("weights", None, f"dict of {what} tensors (see {weights_fn}); None: initial ones from seed"),
              Param("seed", 0, f"seed of the initial {what} tensors when weights is None"))
    register(name, params=params, family="select", exact=False, causal=True, learned=True, cross=False,
             subquadratic=True, gqa=True, bottom_right=True, packed=False, paper=paper, summary=summary,
             module=module)(fn)


def _check_params(block: object, stride: object, topk: object, window: object, shared: object) -> int:
    """Validate the hyper-parameters; return the stride (default ``block``)."""
    check_int("block", block, minimum=1)
    if stride is None:
        stride = block
    check_int("stride", stride, minimum=1)
    if stride > block:  # type: ignore[operator]
        raise ValueError(f"stride must be <= block ({block}) so every key is in a compressed block, got {stride}")
    check_int("topk", topk, minimum=0)
    check_int("window", window, minimum=0)
    check_bool("shared", shared)
    return int(stride)  # type: ignore[arg-type]


def nsa_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, block: int = 32, stride: int | None = None, topk: int = 16, window: int = 128,
    shared: bool = True, weights: dict[str, Tensor] | None = None, seed: int | None = 0,
) -> Tensor:
    """Native Sparse Attention (see the module docstring).

    q [B, H, Nq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv]; H % Hkv == 0; Nq <= Nk (the
    queries are the last Nq positions). ``weights``: the learned tensors (differentiable),
    :func:`nsa_weights` shapes. Returns [B, H, Nq, Dv] in q's dtype. Never an Nq x Nk tensor.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False, gqa=True,
                  bottom_right=True)
    stride = _check_params(block, stride, topk, window, shared)
    w = nsa_weights(d.H, d.D, block, value_dim=d.Dv, seed=seed) if weights is None else weights
    w = {n: t.to(q.device) for n, t in check_weights(w, d.H, d.D, d.Dv, block).items() if n in WEIGHT_NAMES}
    s = default_scale(scale, d.D)
    kc = compress(k, w["pool_k"], w["pos_k"], block=block, stride=stride, key_padding_mask=key_padding_mask)
    vc = compress(v, w["pool_v"], w["pos_v"], block=block, stride=stride, key_padding_mask=key_padding_mask)
    nc, nb = kc.shape[2], -(-d.Nk // block)
    sel = _Sel(d.Nk, block, stride, topk, causal, shared or d.H == d.Hkv, s,
               _block_valid(key_padding_mask, block, stride, nc), _block_valid(key_padding_mask, block, block, nb))
    o_cmp, blocks = _Compressed.apply(q.contiguous(), kc.contiguous(), vc.contiguous(), sel)
    tiles = make_tiles(blocks, H=d.H, Nq=d.Nq, Nk=d.Nk, block=block, sink_tokens=block, window=0, causal=causal,
                       elements=SELECT_ELEMENTS, own_apart=key_padding_mask is None, key_padding_mask=key_padding_mask)
    o_slc = TopkBlocksFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), None, tiles, s, key_padding_mask)
    g = torch.sigmoid(torch.einsum("bhnd,hdg->bhng", q, w["gate_w"].to(q.dtype))
                      + w["gate_b"].to(q.dtype)[None, :, None, :])
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc
    if window > 0:
        o_win = local_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=s,
                                before=window - 1, after=0 if causal else window - 1)
        out = out + g[..., 2:3] * o_win
    return out


class NSAAttention(nn.Module):
    """Module form of :func:`nsa_attention`: owns the pooling logits, the intra-block
    position embeddings and the per-head gates (shared by every kv head)."""

    def __init__(self, heads: int, head_dim: int, block: int = 32, stride: int | None = None, topk: int = 16,
                 window: int = 128, shared: bool = True, weights: dict[str, Tensor] | None = None,
                 seed: int | None = 0) -> None:
        super().__init__()
        self.stride = _check_params(block, stride, topk, window, shared)
        check_int("heads", heads, minimum=1)
        check_int("head_dim", head_dim, minimum=1)
        init = nsa_weights(heads, head_dim, block, seed=seed) if weights is None else weights
        init = check_weights(init, heads, head_dim, head_dim, block)
        for n in WEIGHT_NAMES:
            setattr(self, n, nn.Parameter(init[n].detach().clone().float()))
        self.heads, self.head_dim, self.block = heads, head_dim, block
        self.topk, self.window, self.shared = topk, window, shared

    def weight_dict(self) -> dict[str, Tensor]:
        """The learned tensors as the functional form's ``weights``."""
        return {n: getattr(self, n) for n in WEIGHT_NAMES}

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
        return nsa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                             block=self.block, stride=self.stride, topk=self.topk, window=self.window,
                             shared=self.shared, weights=self.weight_dict())

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, block={self.block}, stride={self.stride}, "
                f"topk={self.topk}, window={self.window}, shared={self.shared}")


# registered here, after the module class it builds
register_learned_select(
    "nsa", nsa_attention, NSAAttention, weights=("nsa_weights", "learned"),
    paper="Yuan et al. 2025 (DeepSeek), Native Sparse Attention",
    summary="learned block compression + top-k blocks chosen by it + sliding window, sigmoid-gated",
    params=(Param("block", 32, "compression / selection block length"),
            Param("stride", None, "distance between compression blocks (<= block; None: block)"),
            Param("topk", 16, "earlier key blocks selected per query (besides its own and the first block)"),
            Param("window", 128, "sliding-window branch: the query's last positions (0: no window branch)"),
            Param("shared", True, "one selection per kv-head group (scores summed over its query heads)")),
)
