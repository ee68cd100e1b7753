"""Sparse Sinkhorn attention (Tay, Bahri, Yang, Metzler & Juan 2020, "Sparse Sinkhorn Attention").

The sequence is cut into n_b blocks of ``block_size``. A small sorting network
scores block pairs from pooled block summaries,

    R[i, j] = (s^q_i W_q) . (s^k_j W_k) / sqrt(sort_dim),

s^q_i = mean query of block i, s^k_j = mean (real) key of block j, W_q, W_k
[H, D, sort_dim] (the SortNet; a bilinear form keeps it independent of the
sequence length). Sinkhorn normalisation in log space (``iters`` rounds of row then
column log-normalisation of (R + gumbel * g) / temperature, g ~ Gumbel(0, 1)) gives
a soft permutation P [n_b, n_b]. Query block i attends to its own block and to its
*sorted* block, the soft-permuted keys/values sum_j P[i, j] K_j, V_j: 2 * block_size
keys per query.

Causal: the sort may only draw from strictly past blocks (R masked to j < i; block 0
has no sorted block), the own block is attended causally, and the query summary of
block i is the query at its first position (the only one every member may see).
Column normalisation would mix in the scores of *future* rows (a leak), so causal
Sinkhorn normalises rows only: P[i] = softmax over past blocks (the paper's causal
Sinkhorn balancing, made strictly causal).

Key padding: padded keys/values are zeroed before mixing; slot t of the sorted block
of i carries the mass m[i, t] = sum_j P[i, j] [key t of block j is real] and gets
score bias log m (masked where m = 0), so padded keys get no weight. With a hard
permutation this is exact masking.

Cost per head: O(N * block_size * D) for the attention plus O(n_b^2 * block_size * D)
= O(N^2 D / block_size) for mixing the blocks (as in the paper); memory
O(N * block_size + n_b^2). Never an N x N tensor.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_number, check_qkv, default_scale
from longattn.ops._chunked import ceil_div, chunk_attention
from longattn.ops._softmax import exp_floor, work_dtype
from longattn.ops.lsh import by_head_groups
from longattn.registry import Param, register


def _safe_lse(x: Tensor, dim: int) -> Tensor:
    """logsumexp (keepdim) that gives 0 for all -inf slices, so x - lse stays -inf there.

    NaN-free in the forward and the gradient.
    """
    m = x.amax(dim, keepdim=True).detach()
    m = m.masked_fill(torch.isinf(m), 0.0)
    z = torch.exp(x - m).sum(dim, keepdim=True)
    out = m + torch.log(z.clamp_min(torch.finfo(z.dtype).tiny))
    return torch.where(z > 0, out, torch.zeros_like(out))


def sinkhorn(log_p: Tensor, iters: int, *, rows_only: bool = False) -> Tensor:
    """Log-space Sinkhorn normalisation of [..., n, n] scores (-inf = forbidden).

    ``iters`` rounds of row then column normalisation; ``rows_only`` normalises rows
    once (a softmax per row). Rows/columns with no allowed entry stay -inf.
    Returns log P.
    """
    if rows_only:
        return log_p - _safe_lse(log_p, -1)
    for _ in range(iters):
        log_p = log_p - _safe_lse(log_p, -1)
        log_p = log_p - _safe_lse(log_p, -2)
    return log_p


def random_sort_net(heads: int, dim: int, sort_dim: int, seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """Random SortNet weights (W_q, W_k), each [heads, dim, sort_dim], from ``seed``."""
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    wq = torch.randn(heads, dim, sort_dim, generator=g) * dim ** -0.5
    wk = torch.randn(heads, dim, sort_dim, generator=g) * dim ** -0.5
    return wq, wk


def block_scores(
    qb: Tensor, kb: Tensor, valid: Tensor, qvalid: Tensor, wq: Tensor, wk: Tensor, causal: bool,
) -> Tensor:
    """SortNet scores R [B, H, n_b, n_b] from blocked q, k [B, H, n_b, b, D].

    valid [B, n_b, b]: real tokens (key_padding_mask and positions < N); qvalid
    [n_b, b]: positions < N. Both summaries pool real positions only, so padded
    tokens (queries included) move no real output. Causal: the query at the first
    real position of the block (every real member of the block may see it).
    """
    valid = valid & qvalid
    # means as [1, b] @ [b, D] products: autograd keeps only the (input) blocks, no
    # [B, H, n_b, b, D] product
    wmean = valid.to(kb.dtype)
    wmean = (wmean / wmean.sum(-1, keepdim=True).clamp_min(1.0))[:, None, :, None, :]  # [B, 1, n_b, 1, b]
    sk = torch.matmul(wmean, kb).squeeze(3)
    if causal:
        first = valid.to(torch.int8).argmax(-1)  # [B, n_b]: first real position (0 if none)
        idx = first[:, None, :, None, None].expand(qb.shape[0], qb.shape[1], -1, 1, qb.shape[-1])
        sq = qb.gather(3, idx).squeeze(3) * valid.any(-1)[:, None, :, None].to(qb.dtype)
    else:
        sq = torch.matmul(wmean, qb).squeeze(3)
    u = torch.einsum("bhid,hds->bhis", sq, wq.to(qb.dtype))
    w = torch.einsum("bhjd,hds->bhjs", sk, wk.to(qb.dtype))
    return torch.matmul(u, w.transpose(-1, -2)) / math.sqrt(wq.shape[-1])


def sinkhorn_permutation(
    scores: Tensor, *, iters: int, temperature: float, gumbel: float, causal: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Soft block permutation P [B, H, n_b, n_b] from SortNet scores (see module docstring)."""
    return _normalise(_with_gumbel(scores, gumbel, generator), temperature, iters, causal)


def _with_gumbel(x: Tensor, gumbel: float, generator: torch.Generator | None) -> Tensor:
    if gumbel > 0:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x + gumbel * -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    return x


def _normalise(x: Tensor, temperature: float, iters: int, causal: bool) -> Tensor:
    """P from (noisy) scores: temperature, causal mask, log-space Sinkhorn, exp."""
    x = x / temperature
    if causal:
        nb = x.shape[-1]
        past = torch.ones(nb, nb, dtype=torch.bool, device=x.device).tril(-1)
        x = x.masked_fill(~past, float("-inf"))
    log_p = sinkhorn(x, iters, rows_only=causal)
    # tiny entries are flushed to 0 (denormals would slow the block mixing ~20x)
    return torch.exp(torch.nn.functional.threshold(log_p, exp_floor(log_p.dtype), float("-inf")))


def _check_sort_net(sort_net: object, H: int, D: int) -> tuple[Tensor, Tensor]:
    if not (isinstance(sort_net, (tuple, list)) and len(sort_net) == 2
            and all(isinstance(w, Tensor) for w in sort_net)):
        raise TypeError("sort_net must be a pair of tensors (W_q, W_k), each [H, D, sort_dim]")
    wq, wk = sort_net
    if wq.dim() != 3 or tuple(wq.shape[:2]) != (H, D) or wq.shape != wk.shape:
        raise ValueError(
            f"sort_net weights must both have shape [H, D, sort_dim] = [{H}, {D}, S], "
            f"got {tuple(wq.shape)} and {tuple(wk.shape)}"
        )
    return wq, wk


class SinkhornAttention(nn.Module):
    """Module form of :func:`sinkhorn_attention`; owns the SortNet (W_q, W_k parameters).

    Gumbel noise of scale ``gumbel`` is added in training only.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        block_size: int = 64,
        iters: int = 8,
        temperature: float = 0.75,
        gumbel: float = 1.0,
        sort_dim: int = 32,
        sort_net: tuple[Tensor, Tensor] | None = None,
        permutation: Tensor | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        _check_hyper(block_size, iters, temperature, gumbel)
        check_int("sort_dim", sort_dim, minimum=1)
        if sort_net is None:
            wq, wk = random_sort_net(heads, head_dim, sort_dim, seed)
        else:
            wq, wk = (w.detach().clone().float() for w in _check_sort_net(sort_net, heads, head_dim))
        self.wq, self.wk = nn.Parameter(wq), nn.Parameter(wk)
        self.heads, self.head_dim = heads, head_dim
        self.block_size, self.iters = block_size, iters
        self.temperature, self.gumbel = float(temperature), float(gumbel)
        self.register_buffer("permutation", permutation, persistent=permutation is not None)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
        key_padding_mask: Tensor | None = None, scale: float | None = None,
    ) -> Tensor:
        return sinkhorn_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            block_size=self.block_size, iters=self.iters, temperature=self.temperature,
            gumbel=self.gumbel if self.training else 0.0, sort_net=(self.wq, self.wk),
            permutation=self.permutation, seed=None,
        )

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, block_size={self.block_size}, "
                f"iters={self.iters}, temperature={self.temperature}, gumbel={self.gumbel}")


def _check_hyper(block_size: int, iters: int, temperature: float, gumbel: float) -> None:
    check_int("block_size", block_size, minimum=1)
    check_int("iters", iters, minimum=0)
    check_number("temperature", temperature, above=0)
    check_number("gumbel", gumbel, minimum=0)


def _block_permutation(qb: Tensor, kb: Tensor, validb: Tensor, qvalid: Tensor, causal: bool, *, iters: int,
                       temperature: float, gumbel: float, sort_dim: int, sort_net: tuple[Tensor, Tensor] | None,
                       permutation: Tensor | None, seed: int | None) -> Tensor:
    """The soft block permutation P [B, H, n_b, n_b] of :func:`sinkhorn_attention`: the
    caller's ``permutation`` (checked, broadcast, strictly lower-triangular if causal), or
    the Sinkhorn-normalised block scores of the sort net (Gumbel noise drawn once).
    qb, kb [B, H, n_b, b, D]; validb bool [B, n_b, b]; qvalid bool [n_b, b]."""
    B, H, nb = qb.shape[:3]
    D = qb.shape[-1]
    dev, work = qb.device, qb.dtype
    if permutation is None:
        if sort_net is None:
            sort_net = random_sort_net(H, D, sort_dim, seed)
        wq, wk = _check_sort_net(sort_net, H, D)
        scores = block_scores(qb, kb, validb, qvalid, wq.to(dev), wk.to(dev), causal)
        gen = None if seed is None or gumbel == 0 else torch.Generator().manual_seed(int(seed) + 1)
        x = _with_gumbel(scores, float(gumbel), gen)  # drawn once, outside the checkpoint
        if torch.is_grad_enabled() and x.requires_grad:
            # the 2 * iters normalisations keep ~10 [B, H, n_b, n_b] tensors each for the
            # backward (N = 16384, b = 64, H = 8: ~170 MiB): recompute them instead
            P = torch.utils.checkpoint.checkpoint(_normalise, x, float(temperature), iters, causal,
                                                  use_reentrant=False)
        else:
            P = _normalise(x, float(temperature), iters, causal)
    else:
        if not isinstance(permutation, Tensor):
            raise TypeError(f"permutation must be a Tensor [B|1, H|1, {nb}, {nb}], got "
                            f"{type(permutation).__name__}")
        if permutation.dim() != 4 or tuple(permutation.shape[-2:]) != (nb, nb):
            raise ValueError(f"permutation must have shape [B|1, H|1, {nb}, {nb}] "
                             f"(n_b = ceil(N / block_size)), got {tuple(permutation.shape)}")
        P = permutation.to(device=dev, dtype=work).expand(B, H, nb, nb)
        if causal:
            P = P * torch.ones(nb, nb, dtype=work, device=dev).tril(-1)
    return P


@register(
    "sinkhorn",
    params=(
        Param("block_size", 64, "block length; each query sees its block and its sorted block"),
        Param("iters", 8, "Sinkhorn iterations (non-causal)"),
        Param("temperature", 0.75, "Sinkhorn temperature (lower = harder permutation)"),
        Param("gumbel", 0.0, "scale of Gumbel noise added to the sort scores (0 = none)"),
        Param("sort_dim", 32, "width of the random SortNet when sort_net is not given"),
        Param("sort_net", None, "SortNet weights (W_q, W_k), each [H, D, sort_dim]"),
        Param("permutation", None, "fixed block permutation [B|1, H|1, n_b, n_b] (skips the SortNet)"),
        Param("seed", 0, "seed of the random SortNet and of the Gumbel noise"),
    ),
    family="sinkhorn",
    exact=False,
    causal=True,
    learned=True,
    cross=False,
    subquadratic=True,
    paper="Tay et al. 2020, Sparse Sinkhorn Attention",
    summary="blocks + learned SortNet, log-space Sinkhorn soft permutation; own + sorted block",
    module=SinkhornAttention,
)
def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_size: int = 64,
    iters: int = 8,
    temperature: float = 0.75,
    gumbel: float = 0.0,
    sort_dim: int = 32,
    sort_net: tuple[Tensor, Tensor] | None = None,
    permutation: Tensor | None = None,
    seed: int | None = 0,
) -> Tensor:
    """Sparse Sinkhorn attention. q, k [B,H,N,D], v [B,H,N,Dv] -> [B,H,N,Dv].

    See the module docstring for the semantics.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    s = default_scale(scale, d.D)
    _check_hyper(block_size, iters, temperature, gumbel)
    B, H, N, D, Dv = d.B, d.H, d.Nq, d.D, d.Dv
    b = block_size
    nb = ceil_div(N, b)
    Np = nb * b
    work = work_dtype(q.dtype)
    dev = q.device
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    valid = torch.ones(B, N, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask
    if Np > N:
        pad = (0, 0, 0, Np - N)
        qw, kw, vw = (torch.nn.functional.pad(x, pad) for x in (qw, kw, vw))
        valid = torch.nn.functional.pad(valid, (0, Np - N), value=False)
    qb = qw.reshape(B, H, nb, b, D)
    kb = kw.reshape(B, H, nb, b, D)
    vb = vw.reshape(B, H, nb, b, Dv)
    validb = valid.reshape(B, nb, b)
    qvalid = (torch.arange(Np, device=dev) < N).reshape(nb, b)

    P = _block_permutation(qb, kb, validb, qvalid, causal, iters=iters, temperature=temperature, gumbel=gumbel,
                           sort_dim=sort_dim, sort_net=sort_net, permutation=permutation, seed=seed)

    def heads(h0: int, h1: int) -> Tensor:
        # soft-permuted (sorted) blocks; padded keys/values are zeroed before mixing
        Hg = h1 - h0
        Pg, qg, kg, vg = P[:, h0:h1], qb[:, h0:h1], kb[:, h0:h1], vb[:, h0:h1]
        vmask = validb[:, None, :, :, None].to(work)
        sk = torch.einsum("bhij,bhjtd->bhitd", Pg, kg * vmask)
        sv = torch.einsum("bhij,bhjtd->bhitd", Pg, vg * vmask)
        mass = torch.einsum("bhij,bjt->bhit", Pg, validb.to(work))  # [B, Hg, nb, b]

        own = validb[:, None, :, None, :].expand(B, 1, nb, b, b)
        if causal:
            own = own & torch.ones(b, b, dtype=torch.bool, device=dev).tril()
        ninf = torch.full((), float("-inf"), dtype=work, device=dev)
        own_bias = torch.where(own, torch.zeros((), dtype=work, device=dev), ninf)
        log_mass = torch.where(mass > 0, torch.log(mass.clamp_min(torch.finfo(work).tiny)), ninf)
        bias = torch.cat([own_bias.expand(B, Hg, nb, b, b),
                          log_mass[:, :, :, None, :].expand(B, Hg, nb, b, b)], -1)
        keys = torch.cat([kg, sk], dim=3)
        vals = torch.cat([vg, sv], dim=3)
        out, _ = chunk_attention(qg, keys, vals, bias, s)
        return out.reshape(B, Hg, Np, Dv)[:, :, :N]

    # head groups under checkpointing (P is computed for all heads above, so the
    # Gumbel draws do not depend on the grouping): the peak is one group's mixed
    # blocks, bias and attention buffers
    return by_head_groups(heads, B, H, Np, max(D, Dv)).to(q.dtype)
