"""``dsa``: DeepSeek Sparse Attention (DeepSeek-AI 2025, DeepSeek-V3.2-Exp), a learned mechanism.

A *lightning indexer* scores every (query t, key s) pair cheaply,

    I(t, s) = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s),      j = 1 .. Hi index heads,

and each query attends, with one exact softmax (:func:`longattn.ops.given_keys.
given_keys_apply`), to its ``topk`` highest-scored visible tokens (ties to the lower
position; causal: s <= t). The selection is shared by every head and is not
differentiated. Here the indexer reads the attention layer's own tensors (the module gets
q, k, v only): q^I_t = (concatenated query heads of t) W_q [H*D -> Hi*Di], the weights
w_t = (concatenated query heads) W_w [H*D -> Hi] / sqrt(Hi), and one shared index key
k^I_s = (mean of the kv heads of s) W_k [D -> Di]. As in the paper the indexer's input is
detached: it learns only from :func:`indexer_loss`,

    L_I = sum_t KL(p_t || softmax(I_t)),

p_t = the main attention's distribution at t summed over heads and L1-normalised, both
over the selected tokens (sparse stage) or over every visible token (``warmup=True``:
dense main attention, the indexer trained by this loss alone, as the paper's warm-up).
:func:`indexer_loss` returns the sum divided by the number of query rows.

Cost: index scores in chunks of queries ([chunk, Hi, Nk], never Nq x Nk at once), time
O(Nq * Nk * Hi * Di) for the indexer (cheap heads, as in the paper) plus
O(Nq * topk * D) per head for the attention; memory O(Nq * topk). The module stores the
loss of its last training call in ``last_indexer_loss`` (add it to the training loss).
Decode (Nq < Nk, bottom-right): query r is position Nk - Nq + r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from longattn.ops._checks import check_bool, check_int, check_qkv, default_scale
from longattn.ops._csr import bag_sum, key_major, sddmm_into
from longattn.ops.dense import full_attention
from longattn.ops.given_keys import SlotPlan, given_keys_apply
from longattn.ops.nsa import register_learned_select, top_indices
from longattn.registry import Param

#: index scores (per chunk of queries, all index heads) one chunk may hold (elements)
INDEX_ELEMENTS = 1 << 22

#: (query, selected token) pairs one chunk of the sparse indexer loss holds
CSR_ROWS_EDGES = 1 << 20

WEIGHT_NAMES = ("index_q", "index_k", "index_w")


def dsa_weights(heads: int, head_dim: int, index_heads: int, index_dim: int, *,
                seed: int | None = 0) -> dict[str, Tensor]:
    """Initial indexer weights (fp32, from ``seed``): ``index_q`` [H, D, Hi * Di],
    ``index_k`` [D, Di], ``index_w`` [H, D, Hi], each N(0, 1 / fan_in)."""
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    fan = (heads * head_dim) ** -0.5
    return {
        "index_q": torch.randn(heads, head_dim, index_heads * index_dim, generator=g) * fan,
        "index_k": torch.randn(head_dim, index_dim, generator=g) * head_dim ** -0.5,
        "index_w": torch.randn(heads, head_dim, index_heads, generator=g) * fan,
    }


def index_inputs(q: Tensor, k: Tensor, weights: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Indexer queries, keys and weights from (detached) q [B, H, Nq, D], k [B, Hkv, Nk, D]:
    q^I [B, Nq, Hi, Di], k^I [B, Nk, Di], w [B, Nq, Hi], in at least fp32."""
    work = torch.promote_types(q.dtype, torch.float32)
    qd, kd = q.detach().to(work), k.detach().to(work)
    Hi = weights["index_w"].shape[-1]
    qi = torch.einsum("bhnd,hde->bne", qd, weights["index_q"].to(work))
    wi = torch.einsum("bhnd,hde->bne", qd, weights["index_w"].to(work)) * Hi ** -0.5
    ki = kd.mean(1) @ weights["index_k"].to(work)
    return qi.view(*qi.shape[:2], Hi, -1), ki, wi


def index_scores(qi: Tensor, ki: Tensor, wi: Tensor) -> Tensor:
    """I(t, s) = sum_j w[t, j] ReLU(q^I[t, j] . k^I[s]): qi [B, C, Hi, Di], ki [B, Nk, Di],
    wi [B, C, Hi] -> [B, C, Nk]. Memory C * Hi * Nk."""
    B, C, Hi, Di = qi.shape
    r = torch.matmul(qi.reshape(B, C * Hi, Di), ki.transpose(-1, -2))  # one matmul per chunk
    r = torch.relu(r) if r.requires_grad else r.relu_()  # in place (no new C * Hi * Nk buffer) when no grad
    return torch.matmul(wi.unsqueeze(-2), r.view(B, C, Hi, -1)).squeeze(-2)


def _visible(c0: int, c1: int, Nq: int, Nk: int, causal: bool, key_padding_mask: Tensor | None,
             device: torch.device) -> Tensor:
    """bool [B|1, C, Nk]: keys query rows c0..c1 (positions Nk - Nq + r) may see."""
    pos = torch.arange(c0, c1, device=device) + (Nk - Nq)
    keys = torch.arange(Nk, device=device)
    vis = (keys[None, :] <= pos[:, None]) if causal else torch.ones(c1 - c0, Nk, dtype=torch.bool, device=device)
    vis = vis.unsqueeze(0)
    return vis & key_padding_mask[:, None, :] if key_padding_mask is not None else vis


def _chunk(B: int, Hi: int, Nq: int, Nk: int) -> int:
    return max(1, min(Nq, INDEX_ELEMENTS // max(1, B * (Hi + 4) * Nk)))


def _hide(sc: Tensor, c0: int, c1: int, Nq: int, Nk: int, causal: bool, key_padding_mask: Tensor | None) -> None:
    """-inf, in place, where query rows c0..c1 may not see the key of sc [B, C, hi]: padding,
    and (causal) keys after the row's position, which lie in the last C columns only."""
    hi = sc.shape[-1]
    if key_padding_mask is not None:
        sc.masked_fill_(~key_padding_mask[:, None, :hi], float("-inf"))
    if causal:
        off = Nk - Nq
        lo = max(0, c0 + off + 1)  # every key before lo is visible to every row of the chunk
        if lo < hi:
            pos = torch.arange(c0, c1, device=sc.device) + off
            late = torch.arange(lo, hi, device=sc.device)[None, :] > pos[:, None]
            sc[..., lo:hi].masked_fill_(late, float("-inf"))


def select_tokens(qi: Tensor, ki: Tensor, wi: Tensor, *, topk: int, causal: bool,
                  key_padding_mask: Tensor | None) -> Tensor:
    """The ``topk`` best visible tokens per query: long [B, Nq, min(topk, Nk)] (in no set
    order), -1 = none (fewer visible tokens). Ties go to the lower position. No gradient."""
    B, Nq, Hi, _ = qi.shape
    Nk = ki.shape[1]
    out = torch.empty(B, Nq, min(topk, Nk), dtype=torch.long, device=qi.device)
    C = _chunk(B, Hi, Nq, Nk)
    with torch.no_grad():
        for c0 in range(0, Nq, C):
            c1 = min(Nq, c0 + C)
            hi = min(Nk, c1 + Nk - Nq) if causal else Nk  # causal: no key past the chunk's last row
            sc = index_scores(qi[:, c0:c1], ki[:, :hi], wi[:, c0:c1])
            _hide(sc, c0, c1, Nq, Nk, causal, key_padding_mask)
            top = top_indices(sc, None, topk)
            out[:, c0:c1] = F.pad(top, (0, out.shape[-1] - top.shape[-1]), value=-1)
    return out


def _kl_rows(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """sum over rows of KL(target || softmax(logits)) on the valid slots ([..., T]); a row with
    no valid slot adds 0."""
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), -1)
    logq = torch.where(valid, logq, torch.zeros_like(logq))
    t = torch.where(valid, target, torch.zeros_like(target))
    logt = torch.log(t.clamp_min(torch.finfo(t.dtype).tiny))
    return (t * (logt - logq)).sum()


def _main_probs(s: Tensor, valid: Tensor) -> Tensor:
    """Scores [B, H, C, T] masked by valid [B, 1, C, T] -> per-head softmax summed over heads,
    L1-normalised: [B, C, T] (zeros for a row with nothing)."""
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = (p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)).sum(1)
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _loss_chunk(qi: Tensor, wi: Tensor, ki: Tensor, q: Tensor, k: Tensor, vis: Tensor, scale: float) -> Tensor:
    """KL summed over one chunk of rows, dense over ``vis`` [B, C, Nk] (the warm-up)."""
    B, H, C, D = q.shape
    Hkv = k.shape[1]
    logits = index_scores(qi, ki, wi)
    with torch.no_grad():
        s = torch.matmul(q.view(B, Hkv, H // Hkv, C, D), k.unsqueeze(2).transpose(-1, -2)).view(B, H, C, -1) * scale
        target = _main_probs(s, vis.unsqueeze(1))
    return _kl_rows(logits, target, vis)


def _sparse_rows(idx: Tensor, see: tuple[int, bool, Tensor | None], c0: int, c1: int, b: int,
                 ) -> tuple[Tensor, Tensor]:
    """Slots of rows c0..c1 of batch row b as (col [C * T], ok [C, T]): -1 slots and keys
    the query may not see are not ok (and point at key 0). ``see`` = (Nk - Nq, causal,
    key_padding_mask): visibility of the slots themselves, O(C T)."""
    off, causal, kpm = see
    i = idx[b, c0:c1]
    safe = i.clamp(min=0)
    ok = i >= 0
    if causal:
        ok &= safe <= (torch.arange(c0, c1, device=i.device) + off)[:, None]
    if kpm is not None:
        ok &= kpm[b][safe]
    return torch.where(ok, safe, torch.zeros_like(safe)).reshape(-1), ok


def _row_softmax(x: Tensor, ok: Tensor) -> Tensor:
    """softmax over the ok slots of each row of x [C, T] (rows with none: zeros)."""
    x = x.masked_fill(~ok, float("-inf"))
    m = x.amax(-1, keepdim=True)
    p = torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _sparse_kl_rows(q: Tensor, k: Tensor, qi: Tensor, ki: Tensor, wi: Tensor, col: Tensor, ok: Tensor,
                    b: int, c0: int, c1: int, scale: float, weights: Tensor | None,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KL summed over rows c0..c1 of batch row b and its gradients wrt (qi rows, ki, wi rows):
    sampled products over the rows' slots (no gathered copy), written by hand:
    dKL/dI = softmax(I) - p; I = sum_j w_j relu(r_j), r_j = qi_j . ki. The main attention's
    p comes from ``weights`` [B, Nq, T] (its weights summed over heads, as the forward
    recorded them) or, if None, from the sampled products q_h . k_j here."""
    C, T = ok.shape
    Hi = qi.shape[2]
    offs = torch.arange(0, C * T + 1, T, device=qi.device)
    if weights is None:
        target = q.new_zeros(C, T)
        H, Hkv = q.shape[1], k.shape[1]
        buf = q.new_empty(C * T)
        for h in range(H):
            s = sddmm_into(buf, offs, col, q[b, h, c0:c1], k[b, h // (H // Hkv)], scale).view(C, T)
            target += _row_softmax(s, ok)
    else:
        target = torch.where(ok, weights[b, c0:c1].to(qi.dtype), 0)
    target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
    qj = qi[b, c0:c1].transpose(0, 1).contiguous()  # [Hi, C, Di]
    r = torch.stack([sddmm_into(q.new_empty(C * T), offs, col, qj[j], ki[b], 1.0).view(C, T)
                     for j in range(Hi)])  # [Hi, C, T]
    logits = (torch.relu(r) * wi[b, c0:c1].T.unsqueeze(-1)).sum(0)
    logq = torch.log_softmax(logits.masked_fill(~ok, float("-inf")), -1)
    has = target > 0
    kl = torch.where(has, target * (torch.log(target.clamp_min(torch.finfo(target.dtype).tiny)) - logq), 0).sum()
    dI = torch.where(ok, torch.exp(logq) - target, 0)
    dI = torch.where(ok.any(-1, keepdim=True), dI, 0)
    dwi = (dI.unsqueeze(0) * torch.relu(r)).sum(-1).T  # [C, Hi]
    dr = dI.unsqueeze(0) * wi[b, c0:c1].T.unsqueeze(-1) * (r > 0)  # [Hi, C, T]
    perm, rows, trow = key_major(col, ki.shape[1], T)
    dqi = torch.stack([bag_sum(ki[b], col, offs, dr[j].reshape(-1)) for j in range(Hi)], 1)  # [C, Hi, Di]
    dki = sum(bag_sum(qj[j], rows, trow, dr[j].reshape(-1).index_select(0, perm)) for j in range(Hi))
    return kl, dqi, dki, dwi


class _SparseIndexerKL(torch.autograd.Function):
    """sum over rows of KL(p_t || softmax(I_t)) over each row's slots, with its gradient to
    qi, ki, wi computed in the forward (the loss is a leaf of the training loss; the backward
    scales it). q, k: the main attention's (no gradient)."""

    @staticmethod
    def forward(ctx, qi, ki, wi, q, k, idx, see, scale, weights):  # type: ignore[override]
        B, Nq = idx.shape[:2]
        C = max(1, min(Nq, CSR_ROWS_EDGES // max(1, idx.shape[-1])))
        total = qi.new_zeros(())
        dqi, dki, dwi = torch.zeros_like(qi), torch.zeros_like(ki), torch.zeros_like(wi)
        for c0 in range(0, Nq, C):
            c1 = min(Nq, c0 + C)
            for b in range(B):
                col, ok = _sparse_rows(idx, see, c0, c1, b)
                kl, gq, gk, gw = _sparse_kl_rows(q, k, qi, ki, wi, col, ok, b, c0, c1, scale, weights)
                total += kl
                dqi[b, c0:c1] = gq
                dki[b] += gk
                dwi[b, c0:c1] = gw
        ctx.save_for_backward(dqi, dki, dwi)
        return total

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        dqi, dki, dwi = ctx.saved_tensors
        return dqi * g, dki * g, dwi * g, None, None, None, None, None, None


def indexer_loss(
    q: Tensor, k: Tensor, qi: Tensor, ki: Tensor, wi: Tensor, *, indices: Tensor | None = None,
    causal: bool = False, key_padding_mask: Tensor | None = None, scale: float | None = None,
    attention_weights: Tensor | None = None,
) -> Tensor:
    """The DSA indexer loss: mean over query rows of KL(p_t || softmax(I_t)) (a scalar).

    q [B, H, Nq, D], k [B, Hkv, Nk, D] (the main attention's; no gradient reaches them);
    qi, ki, wi from :func:`index_inputs` (the gradient flows to the indexer weights).
    ``indices`` [B, Nq, T] (-1 = empty): the sparse stage, KL over each row's selected
    tokens; None: the warm-up, KL over every visible token (causal, key padding).
    ``attention_weights`` [B, Nq, T] (sparse stage only): the main attention's weights on
    the slots of ``indices``, summed over heads (recorded by its forward through
    ``SlotPlan.weights``); None: computed here from q and k.
    Sparse: sampled products over the selected slots only (no gathered copy), the gradient
    to qi, ki, wi written by hand, O(Nq * T * (H * D + Hi * Di)). Warm-up: chunks of rows
    under activation checkpointing, memory one chunk ([chunk, Nk] scores), never Nq x Nk,
    O(Nq * Nk * (H * D + Hi * Di)).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    s = default_scale(scale, D)
    qd, kd = q.detach(), k.detach()
    work = qi.dtype
    if indices is not None:
        see = (Nk - Nq, causal, None if key_padding_mask is None else key_padding_mask.to(q.device))
        total = _SparseIndexerKL.apply(qi, ki, wi, qd.to(work), kd.to(work), indices, see, s, attention_weights)
        return total / (B * Nq)
    C = max(1, _chunk(B, max(qi.shape[2], H), Nq, Nk))
    total = qi.new_zeros(())
    for c0 in range(0, Nq, C):
        c1 = min(Nq, c0 + C)
        vis = _visible(c0, c1, Nq, Nk, causal, key_padding_mask, q.device).expand(B, -1, -1)
        args = (qi[:, c0:c1], wi[:, c0:c1], ki, qd[:, :, c0:c1].to(work), kd.to(work), vis, s)
        if torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad or wi.requires_grad):
            total = total + torch.utils.checkpoint.checkpoint(_loss_chunk, *args, use_reentrant=False)
        else:
            total = total + _loss_chunk(*args)
    return total / (B * Nq)


def check_weights(weights: object, H: int, D: int) -> dict[str, Tensor]:
    """The indexer weights dict checked (shapes as :func:`dsa_weights`); errors name it."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of tensors {list(WEIGHT_NAMES)}, got {type(weights).__name__}")
    for name in WEIGHT_NAMES:
        t = weights.get(name)
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"weights[{name!r}] must be a floating tensor, got {type(t).__name__}")
    wq, wk, ww = (weights[n] for n in WEIGHT_NAMES)
    ok = (wq.dim() == 3 and tuple(wq.shape[:2]) == (H, D) and wk.dim() == 2 and wk.shape[0] == D
          and ww.dim() == 3 and tuple(ww.shape[:2]) == (H, D) and wq.shape[2] == ww.shape[2] * wk.shape[1])
    if not ok:
        raise ValueError(f"weights must have shapes index_q [H={H}, D={D}, Hi*Di], index_k [D, Di], "
                         f"index_w [H, D, Hi]; got {[list(weights[n].shape) for n in WEIGHT_NAMES]}")
    return weights


def _check_params(topk: object, index_heads: object, index_dim: object, warmup: object) -> None:
    check_int("topk", topk, minimum=1)
    check_int("index_heads", index_heads, minimum=1)
    check_int("index_dim", index_dim, minimum=1)
    check_bool("warmup", warmup)


def dsa_forward(
    q: Tensor, k: Tensor, v: Tensor, weights: dict[str, Tensor], *, causal: bool, key_padding_mask: Tensor | None,
    scale: float | None, topk: int, warmup: bool, with_loss: bool,
) -> tuple[Tensor, Tensor | None]:
    """(out [B, H, Nq, Dv], indexer loss or None): the main attention (sparse over the
    indexer's top-k tokens, or dense when ``warmup``) and, if ``with_loss``, its indexer loss.
    Inputs already checked."""
    qi, ki, wi = index_inputs(q, k, weights)
    idx = None
    weights = None
    if warmup:
        out = full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    else:
        idx = select_tokens(qi, ki, wi, topk=topk, causal=causal, key_padding_mask=key_padding_mask)
        weights = qi.new_zeros(idx.shape) if with_loss else None
        out = _attend_selected(q, k, v, idx, default_scale(scale, q.shape[-1]), weights)
    loss = None
    if with_loss:
        loss = indexer_loss(q, k, qi, ki, wi, indices=idx, causal=causal, key_padding_mask=key_padding_mask,
                            scale=scale, attention_weights=weights)
    return out, loss


def _attend_selected(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, weights: Tensor | None) -> Tensor:
    """Exact attention of each query over its selected tokens idx [B, Nq, T] (-1 = none;
    distinct and visible by construction of :func:`select_tokens`, so no sort or mask is
    needed), one list for every head; the forward adds the weights summed over heads into
    ``weights`` [B, Nq, T] when given."""
    ok = idx >= 0
    safe = idx.clamp(min=0)
    plan = SlotPlan(lambda c0, c1: (safe[:, None, None, c0:c1], ok[:, None, None, c0:c1]), idx.shape[-1],
                    shared=True, weights=weights)
    return given_keys_apply(q, k, v, plan, scale=scale)


def dsa_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, topk: int = 64, index_heads: int = 4, index_dim: int = 32, warmup: bool = False,
    weights: dict[str, Tensor] | None = None, seed: int | None = 0,
) -> Tensor:
    """DeepSeek Sparse Attention (see the module docstring).

    q [B, H, Nq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv]; H % Hkv == 0; Nq <= Nk (the
    queries are the last Nq positions). ``weights``: the indexer (:func:`dsa_weights`
    shapes; None: initial ones from ``seed``). Returns [B, H, Nq, Dv] in q's dtype; never
    an Nq x Nk tensor unless ``warmup`` (dense main attention by design).
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False, gqa=True,
                  bottom_right=True)
    _check_params(topk, index_heads, index_dim, warmup)
    w = dsa_weights(d.H, d.D, index_heads, index_dim, seed=seed) if weights is None else weights
    w = {n: t.to(q.device) for n, t in check_weights(w, d.H, d.D).items() if n in WEIGHT_NAMES}
    default_scale(scale, d.D)
    out, _ = dsa_forward(q, k, v, w, causal=causal, key_padding_mask=key_padding_mask, scale=scale, topk=topk,
                         warmup=warmup, with_loss=False)
    return out


class DSAAttention(nn.Module):
    """Module form of :func:`dsa_attention`: owns the lightning indexer. In training (with
    gradients on) each call stores its indexer loss in ``last_indexer_loss`` (a scalar with a
    gradient to the indexer weights only); add it to the loss. ``warmup`` may be switched
    between calls (warm-up: dense attention; then sparse)."""

    def __init__(self, heads: int, head_dim: int, topk: int = 64, index_heads: int = 4, index_dim: int = 32,
                 warmup: bool = False, weights: dict[str, Tensor] | None = None, seed: int | None = 0) -> None:
        super().__init__()
        _check_params(topk, index_heads, index_dim, warmup)
        init = dsa_weights(heads, head_dim, index_heads, index_dim, seed=seed) if weights is None else weights
        init = check_weights(init, heads, head_dim)
        for n in WEIGHT_NAMES:
            setattr(self, n, nn.Parameter(init[n].detach().clone().float()))
        self.heads, self.head_dim, self.topk, self.warmup = heads, head_dim, topk, warmup
        self.last_indexer_loss: Tensor | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
        d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False, gqa=True,
                      bottom_right=True)
        if d.H != self.heads or d.D != self.head_dim:
            raise ValueError(f"q must have heads={self.heads} and head_dim={self.head_dim}, got {tuple(q.shape)}")
        default_scale(scale, d.D)
        w = {n: getattr(self, n) for n in WEIGHT_NAMES}
        with_loss = self.training and torch.is_grad_enabled()
        out, loss = dsa_forward(q, k, v, w, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                topk=self.topk, warmup=self.warmup, with_loss=with_loss)
        self.last_indexer_loss = loss
        return out

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, topk={self.topk}, warmup={self.warmup}"


# registered here, after the module class it builds
register_learned_select(
    "dsa", dsa_attention, DSAAttention, weights=("dsa_weights", "indexer"),
    paper="DeepSeek-AI 2025, DeepSeek-V3.2-Exp (DeepSeek Sparse Attention)",
    summary="lightning indexer picks top-k tokens per query, exact attention over them",
    params=(Param("topk", 64, "tokens each query attends to (chosen by the lightning indexer)"),
            Param("index_heads", 4, "indexer heads Hi"), Param("index_dim", 32, "indexer head width Di"),
            Param("warmup", False, "warm-up stage: dense main attention (the indexer learns by its KL loss)")),
)
