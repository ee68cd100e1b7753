"""Full attention: ring attention with log-sum-exp merges (flash-style backward).

K/V blocks go round the ring (isend/irecv of the next block overlapping the
computation of the current one); each block gives a partial output and its
log-sum-exp, merged in fp32 at least. The backward recomputes each block with the
merged output and lse and the K/V gradient accumulators travel with their blocks
back to their owners. Causal: a block after the rank's own is neither computed nor
sent; rank P-1 sends each finished accumulator straight to its owner.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from longattn.distributed.comms import _P2P

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_MATH_ROWS = 1 << 22  # score elements per query chunk of the math kernels (devices without flash)
#: use the plain-tensor block kernels on the CPU too (what other devices run; for tests)
FORCE_MATH = False
_TAG_HOME = 1 << 20  # message tags of the backward's finished accumulators
_TAG_LAST = 1 << 21


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive [B, 1, 1, K] bias from real-key bits [B, K] (None: every key real)."""
    if mask is None:
        return None
    return torch.zeros((), dtype=dtype, device=mask.device).expand(mask.shape).masked_fill(
        ~mask, float("-inf"))[:, None, None, :]


def _alive(mask: Tensor | None, causal: bool, M: int) -> Tensor | None:
    """[B, 1, M] rows that see at least one real key of the block (None: all of them)."""
    if mask is None:
        return None
    if causal:
        return torch.cummax(mask.to(torch.uint8), -1).values.bool()[:, None, :M]
    return mask.any(-1)[:, None, None].expand(mask.shape[0], 1, M)


def _math_scores(q, k, causal, bias, scale, i0):
    acc = _acc(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)
    if causal:
        rows = torch.arange(i0, i0 + q.shape[2], device=q.device)[:, None]
        s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > rows, float("-inf"))
    if bias is not None:
        s = s + bias.to(acc)
    return s


def _block_fwd(q, k, v, causal, mask, scale):
    """(out [B,H,M,Dv] acc dtype, lse [B,H,M] acc dtype; -inf on rows that see nothing)."""
    acc = _acc(q.dtype)
    bias = _bias(mask, q.dtype)
    if q.device.type == "cpu" and not FORCE_MATH:
        o, lse = _flash_fwd(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        o, lse = o.to(acc), lse.to(acc)
    else:
        rows = max(1, _MATH_ROWS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        os, ls = [], []
        for i0 in range(0, q.shape[2], rows):
            s = _math_scores(q[:, :, i0:i0 + rows], k, causal, bias, scale, i0)
            m = s.amax(-1, keepdim=True)
            m = m.masked_fill(torch.isinf(m), 0.0)
            p = torch.exp(s - m)
            z = p.sum(-1, keepdim=True)
            os.append(torch.matmul(p, v.to(acc)) / z.clamp_min(torch.finfo(acc).tiny))
            ls.append((m + torch.log(z)).squeeze(-1))
        o, lse = torch.cat(os, 2), torch.cat(ls, 2)
    alive = _alive(mask, causal, q.shape[2])
    if alive is not None:
        lse = lse.masked_fill(~alive, float("-inf"))
        o = o.masked_fill(~alive[..., None], 0.0)
    return o, lse


def _block_bwd(g, q, k, v, o, lse_b, causal, mask, scale):
    """(dq, dk, dv) of one block given the merged output o and lse (+inf on dead rows)."""
    bias = _bias(mask, q.dtype)
    if q.device.type == "cpu" and not FORCE_MATH:
        return _flash_bwd(g, q, k, v, o, lse_b, 0.0, causal, attn_mask=bias, scale=scale)
    acc = _acc(q.dtype)
    rows = max(1, _MATH_ROWS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for i0 in range(0, q.shape[2], rows):
        sl = slice(i0, i0 + rows)
        s = _math_scores(q[:, :, sl], k, causal, bias, scale, i0)
        p = torch.exp(s - lse_b[:, :, sl, None].to(acc))
        ga = g[:, :, sl].to(acc)
        delta = (ga * o[:, :, sl].to(acc)).sum(-1, keepdim=True)
        dv += torch.matmul(p.transpose(-1, -2), ga)
        ds = (torch.matmul(ga, v.to(acc).transpose(-1, -2)) - delta) * p
        dq[:, :, sl] = torch.matmul(ds, k.to(acc)) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q[:, :, sl].to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _merge(O: Tensor | None, L: Tensor | None, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    if O is None:
        return o, lse
    Ln = torch.logaddexp(L, lse)
    ref = torch.where(torch.isneginf(Ln), torch.zeros_like(Ln), Ln)
    return O * torch.exp(L - ref)[..., None] + o * torch.exp(lse - ref)[..., None], Ln



def _pack(k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """[B, H, n, D + Dv (+1)]: keys, values (and the real-key bit) in one message."""
    parts = [k, v]
    if mask is not None:
        parts.append(mask[:, None, :, None].to(k.dtype).expand(k.shape[0], k.shape[1], k.shape[2], 1))
    return torch.cat(parts, -1).contiguous()


def _unpack(buf: Tensor, D: int, Dv: int, masked: bool):
    mask = buf[:, 0, :, D + Dv] > 0.5 if masked else None
    return buf[..., :D], buf[..., D:D + Dv], mask


class _RingAttention(torch.autograd.Function):
    """Full attention of the rank's queries over every rank's K/V block, passed round a ring.

    Step s: rank r holds block j = (r - s) mod P. Non-causal: every block, P - 1 shifts.
    Causal: only blocks j <= r; block j is forwarded by ranks j .. P-2 only."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, causal, scale, r, P, group):
        B, H, n, D = q.shape
        Dv = v.shape[-1]
        masked = kpm is not None
        buf = _pack(k, v, kpm) if P > 1 else None
        O = L = None
        nxt, prv = (r + 1) % P, (r - 1) % P
        steps = r + 1 if causal else P
        for s in range(steps):
            # post the exchange first (receive the next block, pass ours on), then compute
            p2p, nb = _P2P(group), None
            if s + 1 < steps:
                nb = p2p.recv(torch.empty_like(buf), prv, s)
            if (r < P - 1) if causal else (s < P - 1):
                p2p.send(buf, nxt, s)
            kj, vj, mj = _unpack(buf, D, Dv, masked) if s else (k, v, kpm)
            o, lse = _block_fwd(q, kj, vj, causal and s == 0, mj, scale)
            O, L = _merge(O, L, o, lse)
            p2p.wait()
            if nb is not None:
                buf = nb
        out = O.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, L, *(() if kpm is None else (kpm,)))
        ctx.meta = (causal, scale, r, P, group, masked)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, L, *rest = ctx.saved_tensors
        causal, scale, r, P, group, masked = ctx.meta
        kpm = rest[0] if masked else None
        B, H, n, D = q.shape
        Dv = v.shape[-1]
        acc = _acc(q.dtype)
        dout = dout.contiguous()
        Lb = L.masked_fill(torch.isneginf(L), float("inf"))  # rows that saw nothing: p = 0
        if q.device.type == "cpu" and not FORCE_MATH and q.dtype != torch.float64:
            Lb = Lb.float()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        nxt, prv = (r + 1) % P, (r - 1) % P
        buf = _pack(k, v, kpm) if P > 1 else None
        dkv = torch.zeros((B, H, n, D + Dv), dtype=acc, device=q.device)
        home = None
        final = _P2P(group)
        if causal and r < P - 1:  # our finished accumulator comes straight from rank P-1
            home = final.recv(torch.empty_like(dkv), P - 1, _TAG_HOME)
        steps = r + 1 if causal else P
        for s in range(steps):
            j = (r - s) % P
            # receives of the next step are posted before any send (no cycle of waits)
            p2p, nb, nd = _P2P(group), None, None
            if s + 1 < steps:
                nb = p2p.recv(torch.empty_like(buf), prv, 2 * s + 2)
                nd = p2p.recv(torch.empty_like(dkv), prv, 2 * s + 3)
            if not causal and s == P - 1 and P > 1:
                home = p2p.recv(torch.empty_like(dkv), prv, _TAG_LAST)
            if (r < P - 1) if causal else (s < P - 1):
                p2p.send(buf, nxt, 2 * s + 2)  # the keys go on at once; their gradients after
            kj, vj, mj = _unpack(buf, D, Dv, masked) if s else (k, v, kpm)
            gq, gk, gv = _block_bwd(dout, q, kj, vj, out, Lb, causal and s == 0, mj, scale)
            dq += gq
            dkv[..., :D] += gk
            dkv[..., D:] += gv
            if causal and r == P - 1:  # the block's accumulator is complete: send it home
                if j != r:
                    final.send(dkv, j, _TAG_HOME)
                else:
                    home = dkv
            elif causal or s < P - 1:
                p2p.send(dkv, nxt, 2 * s + 3)
            elif P > 1:
                p2p.send(dkv, nxt, _TAG_LAST)
            else:
                home = dkv
            p2p.wait()
            if nb is not None:
                buf, dkv = nb, nd
        final.wait()
        dk = home[..., :D].to(k.dtype)
        dv = home[..., D:].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None



def _ring_sharded(q: Tensor, k: Tensor, v: Tensor, params: dict[str, Any], causal: bool, kpm: Tensor | None,
                  scale: float, r: int, P: int, group: Any) -> Tensor:
    """Rank r's shard [B, H, n, Dv] of full attention by the ring (``params``: those of
    ``full``, already checked; neither a bias nor dropout can be split over ranks).
    Cost per rank: (r + 1 if causal else P) blocks of n x n scores; P - 1 K/V blocks
    received (about half that when causal), the same again in the backward."""
    if params.get("bias") is not None or params.get("dropout", 0.0):
        raise ValueError("distributed 'full' attention supports neither bias nor dropout "
                         f"(got bias={'set' if params.get('bias') is not None else None}, "
                         f"dropout={params.get('dropout', 0.0)!r})")
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:  # the flash kernel wants one head size: zero columns change nothing
        w = max(D, Dv)
        q, k, v = (torch.nn.functional.pad(x, (0, w - x.shape[-1])) for x in (q, k, v))
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = _RingAttention.apply(q, k, v, kpm, causal, scale, r, P, group)
    return out[..., :Dv] if D != Dv else out
