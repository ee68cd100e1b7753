"""The autograd.Function over the chunked engine, run a few heads at a time.

Heads are independent, so the forward and the backward walk over slices of q/k heads
(with their Hv/Hk value heads each). A slice holds about ``SLICE_ELEMENTS`` elements
per [B, h, N, D] tensor, which bounds every temporary of the engine (the WY system,
the chunk states, the pair products) by the slice, not by the whole input.

Nothing but the inputs is saved: the backward recomputes a slice's chunk states and
U (one more pass of the state loop, O(N Dk Dv)) just before it needs them, so the
saved tensors are the raw q, k, v, g, beta (no normalised or expanded copies, no
[N/C, Dk, Dv] states). The preparation of q and k (L2 norm, scale, expansion to the
value heads) runs per slice and has its own hand-written backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from longattn.ops.recurrent.engine import Chunks, chunk_bwd, chunk_fwd, chunk_inputs, decay_grad, unchunk

SLICE_ELEMENTS = 1 << 22  # elements of one [B, h, N, D] tensor of a slice (16 MiB in float32)


@dataclass(frozen=True)
class QKPrep:
    """How raw q, k [B, h, N, Dk] become the engine's: L2-normalised (``l2norm``: x /
    sqrt(|x|^2 + eps)), q scaled, each head repeated ``group`` = Hv/Hk times, in ``work``."""

    scale: float
    l2norm: bool
    group: int
    work: torch.dtype
    eps: float = 1e-6

    def _norm(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.l2norm:
            return x, None
        r = torch.rsqrt((x * x).sum(-1, keepdim=True) + self.eps)
        return x * r, r

    def _expand(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.group, 1) if self.group > 1 else x

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(q, k) ready for the engine: [B, h group, N, Dk] in ``work``."""
        qn, _ = self._norm(q.to(self.work))
        kn, _ = self._norm(k.to(self.work))
        return self._expand(qn * self.scale), self._expand(kn)

    def backward(self, q: Tensor, k: Tensor, dqe: Tensor, dke: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients wrt raw q, k (in ``work``) from those wrt the engine's q, k."""
        return self._back(q, dqe, self.scale), self._back(k, dke, 1.0)

    def _back(self, x: Tensor, dy: Tensor, scale: float) -> Tensor:
        if self.group > 1:
            dy = dy.unflatten(1, (-1, self.group)).sum(2)
        dy = dy * scale if scale != 1.0 else dy
        x = x.to(self.work)
        xn, r = self._norm(x)
        if r is None:
            return dy
        # y = x r, r = (|x|^2 + eps)^-1/2:  dx = r dy - r xn (xn . dy)
        return r * (dy - xn * (xn * dy).sum(-1, keepdim=True))


def head_slices(B: int, Hk: int, N: int, D: int, group: int) -> Iterator[tuple[slice, slice]]:
    """(q/k head slice, value head slice) pairs covering every head, each slice about
    ``SLICE_ELEMENTS`` elements of a [B, h group, N, D] tensor (at least one q/k head)."""
    per = max(1, SLICE_ELEMENTS // max(1, B * N * D * group))
    for a in range(0, Hk, per):
        b = min(Hk, a + per)
        yield slice(a, b), slice(a * group, b * group)


class ChunkedRecurrence(torch.autograd.Function):
    """o, final state = the recurrence over raw q, k [B, Hk, N, Dk], v [B, Hv, N, Dv];
    g [B, Hv, N, Dg] (work dtype), beta [B, Hv, N] or None, s0 [B, Hv, Dk, Dv] or None,
    run [B, N] or None; o in v's dtype, the final state in ``prep.work``."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, run, chunk, prep):  # type: ignore[override]
        B, Hk, N, Dk = q.shape
        Hv, Dv = v.shape[1], v.shape[-1]
        o = v.new_empty(B, Hv, N, Dv)
        sN = q.new_empty(B, Hv, Dk, Dv, dtype=prep.work)
        for hs, vs in head_slices(B, Hk, N, max(Dk, Dv), prep.group):
            c = _slice_chunks(q, k, v, g, beta, run, hs, vs, chunk, prep)
            out, sN[:, vs], _, _ = chunk_fwd(c, _slice_state(s0, vs, c))
            o[:, vs] = out
        ctx.save_for_backward(q, k, v, g, beta, s0, run)
        ctx.chunk, ctx.prep = chunk, prep
        return o, sN

    @staticmethod
    def backward(ctx, dO, dSN):  # type: ignore[override]
        q, k, v, g, beta, s0, run = ctx.saved_tensors
        prep, chunk = ctx.prep, ctx.chunk
        B, Hk, N, Dk = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg = torch.empty_like(g)
        dbeta = None if beta is None else torch.empty_like(beta)
        ds0 = q.new_empty(v.shape[0], v.shape[1], Dk, v.shape[-1], dtype=prep.work)
        for hs, vs in head_slices(B, Hk, N, max(Dk, v.shape[-1]), prep.group):
            c = _slice_chunks(q, k, v, g, beta, run, hs, vs, chunk, prep)
            gr = chunk_bwd(c, _slice_state(s0, vs, c), dO[:, vs].to(prep.work), dSN[:, vs].to(prep.work))
            dqs, dks = prep.backward(q[:, hs], k[:, hs], unchunk(gr.dQ, N), unchunk(gr.dK, N))
            dq[:, hs], dk[:, hs], dv[:, vs] = dqs, dks, unchunk(gr.dV, N)
            dg[:, vs] = decay_grad(gr.dG, N)
            if dbeta is not None:
                dbeta[:, vs] = unchunk(gr.dBeta, N)[..., 0]
            ds0[:, vs] = gr.ds0
        return dq, dk, dv, dg, dbeta, (None if s0 is None else ds0.to(s0.dtype)), None, None, None


def _slice_chunks(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, run: Tensor | None,
                  hs: slice, vs: slice, chunk: int, prep: QKPrep) -> Chunks:
    qe, ke = prep.forward(q[:, hs], k[:, hs])
    return chunk_inputs(qe, ke, v[:, vs].to(prep.work), g[:, vs], None if beta is None else beta[:, vs], run, chunk)


def _slice_state(s0: Tensor | None, vs: slice, c: Chunks) -> Tensor:
    if s0 is None:
        B, h = c.Q.shape[:2]
        return c.Q.new_zeros(B, h, c.Q.shape[-1], c.V.shape[-1])
    return s0[:, vs]
