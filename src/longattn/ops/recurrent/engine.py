"""The chunked engine of the recurrent family: forward and hand-written backward.

One engine serves every member. Heads are already expanded (q, k [B, H, N, Dk],
v [B, H, N, Dv]) and the inputs are in the working dtype (float32 or float64):

    S_t = diag(exp(g_t)) S_{t-1}                       (decay; g [.., Dg], Dg = 1 or Dk)
    S_t += k_t u_t^T,  u_t = beta_t (v_t - S_t^T k_t)  (delta rule)  or  u_t = v_t
    o_t = S_t^T q_t                                    (q already scaled)

Chunks of C positions (Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; Yang et al. 2025, "Gated Delta Networks"). With
Gam_i the log-decay cumulated from the chunk start to i (inclusive) and S0 the
state entering the chunk, the WY/UT form is

    A = tril(diag(beta) (K Kᵀ ⊙ decay ratios), -1),  T = (I + A)^-1
    U = T diag(beta) V - T diag(beta) (exp(Gam) ⊙ K) S0             (delta)
    O = (exp(Gam) ⊙ Q) S0 + tril(Q Kᵀ ⊙ decay ratios) U
    S_C = diag(exp(Gam_C)) S0 + (exp(Gam_C - Gam) ⊙ K)ᵀ U

Every exponent is <= 0: a decay ratio exp(Gam_i - Gam_j) is only formed for i >= j
(per-channel decays: see :func:`pair`). The state is carried by a loop over chunks
(O(N/C) small matmuls); everything else is batched over all chunks. Cost
O(N C (Dk + Dv) + N Dk Dv) time (+ O(N C^2) for the triangular solve), memory
O(N (C + Dk + Dv) + N/C Dk Dv): no N x N tensor.

Packed documents: ``run`` [B, N], a run index per position; the state is cut at
every change, by 0/1 masks on the terms (the decays are never altered, so no
exponent grows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import Tensor

_SUB = 16  # sub-block of the per-channel pair products (rows share a decay reference)


# ----------------------------------------------------------------------------- pair products


def _decay_matrix(G: Tensor, strict: bool) -> Tensor:
    """exp(G_i - G_j) on j < i (strict) or j <= i, 0 above: G [.., C] -> [.., C, C]."""
    C = G.shape[-1]
    keep = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    return torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~keep, float("-inf")))


def _blocks(C: int) -> int:
    return _SUB if C % _SUB == 0 and C > _SUB else C


def _off_parts(x: Tensor, y: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-channel off-diagonal factors. Row block r (rows [r s, r s + s)) is referenced
    to G at its first row: xh = x exp(G_i - G_rs) and yh[r] = y exp(min(G_rs - G_j, 0))
    (exact for the columns j < r s that use it; the clamp keeps the rest finite)."""
    *lead, C, D = x.shape
    s = _blocks(C)
    nb = C // s
    Gb = G.reshape(*lead, nb, s, D)
    ref = Gb[..., :1, :]  # [.., nb, 1, D]
    ex = torch.exp(Gb - ref)
    ey = torch.exp((ref - G[..., None, :, :]).clamp(max=0.0))  # [.., nb, C, D]
    cols = torch.arange(C, device=x.device)
    colmask = (cols[None, :] < (torch.arange(nb, device=x.device) * s)[:, None]).to(x.dtype)  # [nb, C]
    return x.reshape(*lead, nb, s, D) * ex, y[..., None, :, :] * ey, ex, ey, colmask


def _diag_exp(Gb: Tensor, t: int, strict: bool) -> Tensor:
    """exp(G_i - G_j) for column t of every diagonal block (rows i in the block, j its
    t-th row), 0 for rows above it: [.., nb, s, D]."""
    s = Gb.shape[-2]
    e = torch.exp((Gb - Gb[..., t : t + 1, :]).clamp(max=0.0))
    rows = torch.arange(s, device=Gb.device)
    ok = (rows > t) if strict else (rows >= t)
    return e * ok.to(Gb.dtype)[:, None]


def pair(x: Tensor, y: Tensor, G: Tensor, strict: bool) -> Tensor:
    """M_ij = sum_c x_ic y_jc exp(G_ic - G_jc) for j < i (strict) or j <= i, else 0.

    x, y: [.., C, D]; G: [.., C, Dg] cumulated log-decays (non-increasing in i),
    Dg = 1 (scalar decay: one C x C matmul) or D (per channel). Per channel, the
    rows go by sub-blocks of s = 16: the blocks left of the diagonal are one matmul
    with the decay folded into x and y against the block's first row (exponents
    <= 0); the diagonal blocks are summed column by column (s passes over x).
    Cost O(C^2 D) per chunk; returns [.., C, C].
    """
    if G.shape[-1] == 1:
        return torch.matmul(x, y.mT) * _decay_matrix(G[..., 0], strict)
    *lead, C, D = x.shape
    s = _blocks(C)
    nb = C // s
    xh, yh, _, _, colmask = _off_parts(x, y, G)
    m = torch.matmul(xh, yh.mT) * colmask[:, None, :]  # [.., nb, s, C]
    xb, yb, Gb = (t.reshape(*lead, nb, s, D) for t in (x, y, G))
    diag = torch.stack([(xb * yb[..., t : t + 1, :] * _diag_exp(Gb, t, strict)).sum(-1) for t in range(s)], -1)
    mv = m.view(*lead, nb, s, nb, s)
    torch.diagonal(mv, dim1=-4, dim2=-2).add_(diag.movedim(-3, -1))
    return m.view(*lead, C, C)


def pair_bwd(dm: Tensor, x: Tensor, y: Tensor, G: Tensor, strict: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dy, dG) of :func:`pair` given dM [.., C, C]. M depends on G only
    through G_i - G_j, so dG = x ⊙ dx - y ⊙ dy (summed over channels when Dg = 1)."""
    if G.shape[-1] == 1:
        dmd = dm * _decay_matrix(G[..., 0], strict)
        dx, dy = torch.matmul(dmd, y), torch.matmul(dmd.mT, x)
        return dx, dy, ((x * dx).sum(-1) - (y * dy).sum(-1))[..., None]
    *lead, C, D = x.shape
    s = _blocks(C)
    nb = C // s
    xh, yh, ex, ey, colmask = _off_parts(x, y, G)
    dmo = dm.view(*lead, nb, s, C) * colmask[:, None, :]
    dx = (torch.matmul(dmo, yh) * ex).view(*lead, C, D)
    dy = (torch.matmul(dmo.mT, xh) * ey).sum(-3)
    xb, yb, Gb = (t.reshape(*lead, nb, s, D) for t in (x, y, G))
    dd = torch.diagonal(dm.view(*lead, nb, s, nb, s), dim1=-4, dim2=-2).movedim(-1, -3)  # [.., nb, s, s]
    dxb = dx.view(*lead, nb, s, D)
    dyb = dy.view(*lead, nb, s, D)
    for t in range(s):
        e = _diag_exp(Gb, t, strict)
        dxb += dd[..., :, t, None] * yb[..., t : t + 1, :] * e
        dyb[..., t, :] += (dd[..., :, t, None] * xb * e).sum(-2)
    return dx, dy, x * dx - y * dy


# ----------------------------------------------------------------------------- chunk layout


@dataclass
class Chunks:
    """Inputs cut into chunks [B, H, nc, C, .] and the derived decays and masks."""

    Q: Tensor
    K: Tensor
    V: Tensor
    Beta: Tensor | None  # [B, H, nc, C, 1]
    G: Tensor  # cumulated log-decay in the chunk, [B, H, nc, C, Dg]
    same: Tensor | None  # [B, 1, nc, C, C] same document (packed), float
    alive: Tensor | None  # [B, 1, nc, C, 1] the entering state reaches position i
    reach: Tensor | None  # [B, 1, nc, C, 1] position j reaches the chunk's end state
    N: int

    @property
    def delta(self) -> bool:
        return self.Beta is not None

    def decays(self) -> tuple[Tensor, Tensor, Tensor]:
        """(exp(Gam) [.., C, Dg], exp(Gam_C - Gam) [.., C, Dg], exp(Gam_C) [.., nc, Dg]), masked."""
        last = self.G[..., -1:, :]
        eq, ek, ec = torch.exp(self.G), torch.exp(last - self.G), torch.exp(last[..., 0, :])
        if self.alive is not None:
            eq = eq * self.alive
            ek = ek * self.reach
            ec = ec * self.alive[..., -1, :]
        return eq, ek, ec


def chunk_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, run: Tensor | None,
                 C: int) -> Chunks:
    """Pad N up to a multiple of C (zero q, k, v, beta, g: padded steps change nothing)
    and reshape to chunks; g [B, H, N, Dg], beta [B, H, N] or None, run [B, N] or None."""
    B, H, N, _ = q.shape
    nc = -(-N // C)
    pad = nc * C - N

    def cut(x: Tensor) -> Tensor:
        if pad:
            x = Fn.pad(x, (0, 0, 0, pad))
        return x.reshape(*x.shape[:2], nc, C, x.shape[-1])

    G = cut(g).cumsum(-2)
    Beta = None if beta is None else cut(beta[..., None])
    same = alive = reach = None
    if run is not None:
        if pad:
            run = torch.cat([run, run[:, -1:].expand(B, pad)], 1)
        rc = run.view(B, 1, nc, C)
        prev = torch.cat([rc[:, :, :1, 0], rc[:, :, :-1, -1]], -1)  # [B, 1, nc]
        alive = (rc == prev[..., None]).to(q.dtype)[..., None]
        reach = (rc == rc[..., -1:]).to(q.dtype)[..., None]
        same = (rc[..., :, None] == rc[..., None, :]).to(q.dtype)
    return Chunks(cut(q), cut(k), cut(v), Beta, G, same, alive, reach, N)


def _masked(m: Tensor, same: Tensor | None) -> Tensor:
    return m if same is None else m * same


def _solve(L: Tensor, b: Tensor, upper: bool = False) -> Tensor:
    return torch.linalg.solve_triangular(L, b, upper=upper, unitriangular=True)


def _to_dg(x: Tensor, Dg: int) -> Tensor:
    """A per-channel gradient [.., D] summed to the decay's width Dg (1 or D)."""
    return x.sum(-1, keepdim=True) if Dg == 1 else x


# ----------------------------------------------------------------------------- forward


def _wy(c: Chunks, eq: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """(W, U~, L): U = U~ - W S0 per chunk; L = I + A (delta rule), or (None, V, None)."""
    if not c.delta:
        return None, c.V, None
    A = _masked(pair(c.K * c.Beta, c.K, c.G, strict=True), c.same)
    L = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    rhs = torch.cat([c.Beta * (c.K * eq), c.Beta * c.V], -1)
    sol = _solve(L, rhs)
    Dk = c.K.shape[-1]
    return sol[..., :Dk], sol[..., Dk:], L


def _scan(W: Tensor | None, Ut: Tensor, Kb: Tensor, ec: Tensor, s0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The state across chunks: (states entering each chunk [.., nc, Dk, Dv], U, final state)."""
    nc = Ut.shape[-3]
    states = s0.new_empty(*s0.shape[:-2], nc, *s0.shape[-2:])
    U = Ut if W is None else torch.empty_like(Ut)
    S = s0
    for i in range(nc):
        states[..., i, :, :] = S
        if W is not None:
            U[..., i, :, :] = Ut[..., i, :, :] - torch.matmul(W[..., i, :, :], S)
        S = ec[..., i, :, None] * S + torch.matmul(Kb[..., i, :, :].mT, U[..., i, :, :])
    return states, U, S


def chunk_fwd(c: Chunks, s0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward over chunks. Returns (o [B, H, N, Dv], final state, the states entering
    each chunk [B, H, nc, Dk, Dv], U [B, H, nc, C, Dv]); :func:`chunk_bwd` recomputes
    the last two."""
    eq, ek, ec = c.decays()
    W, Ut, _ = _wy(c, eq)
    states, U, sN = _scan(W, Ut, c.K * ek, ec, s0)
    P = _masked(pair(c.Q, c.K, c.G, strict=False), c.same)
    O = torch.matmul(c.Q * eq, states) + torch.matmul(P, U)
    B, H = O.shape[:2]
    return O.reshape(B, H, -1, O.shape[-1])[:, :, : c.N], sN, states, U


# ----------------------------------------------------------------------------- backward


@dataclass
class Grads:
    """Gradients in chunk layout [B, H, nc, C, .] (dBeta [.., C, 1]) and of the initial state."""

    dQ: Tensor
    dK: Tensor
    dV: Tensor
    dG: Tensor  # of the cumulated decays (turned into dg by the caller)
    dBeta: Tensor | None
    ds0: Tensor


def _scan_bwd(dU: Tensor, Qh: Tensor, dO: Tensor, W: Tensor | None, Kb: Tensor, U: Tensor, states: Tensor,
              ec: Tensor, dSN: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse of :func:`_scan`: adds the state's share to dU in place; returns (dKb,
    d exp(Gam_C) per chunk [.., nc, Dk], the initial state's gradient). The per-chunk
    state gradients are used in the loop and never stored ([nc, Dk, Dv] saved twice)."""
    nc = dU.shape[-3]
    dKb = torch.empty_like(Kb)
    dec = states.new_empty(*states.shape[:-1])
    dS = dSN
    for i in reversed(range(nc)):
        dKb[..., i, :, :] = torch.matmul(U[..., i, :, :], dS.mT)
        dec[..., i, :] = (states[..., i, :, :] * dS).sum(-1)
        dU[..., i, :, :] += torch.matmul(Kb[..., i, :, :], dS)
        nxt = ec[..., i, :, None] * dS + torch.matmul(Qh[..., i, :, :].mT, dO[..., i, :, :])
        if W is not None:
            nxt = nxt - torch.matmul(W[..., i, :, :].mT, dU[..., i, :, :])
        dS = nxt
    return dKb, dec, dS


def _wy_bwd(c: Chunks, eq: Tensor, W: Tensor, Ut: Tensor, L: Tensor, dW: Tensor, dUt: Tensor,
            g: Grads) -> None:
    """Back through U~ = L^-1 (beta V), W = L^-1 (beta exp(Gam) K), L = I + A: adds to g."""
    Dk = c.K.shape[-1]
    R = _solve(L.mT, torch.cat([dW, dUt], -1), upper=True)
    dRk, dRv = R[..., :Dk], R[..., Dk:]
    dA = _masked(-(torch.matmul(dRk, W.mT) + torch.matmul(dRv, Ut.mT)), c.same)
    Kq = c.K * eq
    g.dK += c.Beta * dRk * eq
    g.dG += _to_dg(c.Beta * dRk * Kq, c.G.shape[-1])
    g.dV = c.Beta * dRv
    dbeta = (dRk * Kq).sum(-1, keepdim=True) + (dRv * c.V).sum(-1, keepdim=True)
    dx, dy, dGa = pair_bwd(dA, c.K * c.Beta, c.K, c.G, strict=True)
    g.dK += c.Beta * dx + dy
    g.dG += dGa
    g.dBeta = dbeta + (dx * c.K).sum(-1, keepdim=True)


def chunk_bwd(c: Chunks, s0: Tensor, dO: Tensor, dSN: Tensor) -> Grads:
    """Gradients of :func:`chunk_fwd` given dO [B, H, N, Dv] and the final state's dSN.

    Recomputes what the forward computed (the WY factors, the states entering each
    chunk and U: one more forward loop over chunks, so the forward saves nothing but
    its inputs); one reverse loop over chunks carries the state's gradient.
    """
    Dg = c.G.shape[-1]
    eq, ek, ec = c.decays()
    W, Ut, L = _wy(c, eq)
    Kb, Qh = c.K * ek, c.Q * eq
    states, U, _ = _scan(W, Ut, Kb, ec, s0)
    B, H, nc, C, _ = c.Q.shape
    pad = nc * C - c.N
    dO = (Fn.pad(dO, (0, 0, 0, pad)) if pad else dO).reshape(B, H, nc, C, -1)
    P = _masked(pair(c.Q, c.K, c.G, strict=False), c.same)
    dP = _masked(torch.matmul(dO, U.mT), c.same)
    dU = torch.matmul(P.mT, dO)
    dQh = torch.matmul(dO, states.mT)
    dKb, dec, ds0 = _scan_bwd(dU, Qh, dO, W, Kb, U, states, ec, dSN)
    g = Grads(dQ=dQh * eq, dK=dKb * ek, dV=dU, dG=_to_dg(dQh * Qh - dKb * Kb, Dg), dBeta=None, ds0=ds0)
    dGc = _to_dg((dKb * Kb).sum(-2) + dec * ec, Dg)  # [.., nc, Dg]
    if W is not None:
        _wy_bwd(c, eq, W, Ut, L, -torch.matmul(dU, states.mT), dU, g)
    dx, dy, dGp = pair_bwd(dP, c.Q, c.K, c.G, strict=False)
    g.dQ += dx
    g.dK += dy
    g.dG += dGp
    g.dG[..., -1, :] += dGc
    return g


def unchunk(x: Tensor, N: int) -> Tensor:
    """[B, H, nc, C, D] -> [B, H, N, D] (padding dropped)."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])[:, :, :N]


def decay_grad(dG: Tensor, N: int) -> Tensor:
    """d loss / d g from the gradient of the in-chunk cumulated decays: a reverse cumsum."""
    return unchunk(dG.flip(-2).cumsum(-2).flip(-2), N)
