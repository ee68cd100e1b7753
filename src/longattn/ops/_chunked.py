"""Chunked softmax attention: the engine shared by lsh, clustered and sinkhorn.

Two pieces:

- :func:`chunk_attention`: every query chunk attends to its own small set of keys
  (``q [G, c, D]`` over ``k [G, w, D]``), with an additive bias (0 / -inf / any
  finite value). Returns the output *and* the log-sum-exp of every row, both
  differentiable (a custom autograd function: the backward recomputes the
  scores, so only q, k, v, the bias, out and lse are kept). Cost O(G c w D).
- :func:`sorted_chunk_attention`: tokens are ordered by (group, position) -
  group = LSH bucket or k-means cluster, one order per round - cut into equal
  chunks, and each chunk attends to itself and (optionally) the chunk before it.
  Cost O(R N c D) time, O(R N c) memory: never an N x N tensor.

Causal mode of :func:`sorted_chunk_attention` is *strictly* causal. With plain
equal chunks the keys a query sees would depend on how many *future* tokens fell
into earlier groups (they shift the chunk boundaries), which is a leak. So with
``causal=True`` a query i sees the keys j <= i of its own group whose slot in the
sorted order is at most ``chunk`` slots before its own, i.e. its ``chunk`` most
recent same-group predecessors (plus itself): a set that depends on tokens <= i
only. The look-back chunk always covers that window.
"""

from __future__ import annotations

import torch
from torch import Tensor


_SLICE_ELEMS = 1 << 22  # score entries per slice: caps the transient score/prob tensors


def _scores(q, k, mask, count, bias, scale):
    """Masked scores of one slice: q [g, c, D] k [g, w, D] -> [g, c, w]."""
    s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    if bias is not None:
        s += bias
    if count is not None:
        s -= torch.log(count.to(s.dtype))
    return s.masked_fill_(~mask, float("-inf"))


_EXP_FLOOR = -80.0


def _exp_(x: Tensor) -> Tensor:
    """In-place exp that flushes weights below e^-80 to 0.

    Such weights are below float32 resolution next to the row's largest (which is 1),
    and left alone they become denormal numbers that slow the CPU matmuls ~20x.
    """
    return torch.nn.functional.threshold_(x, _EXP_FLOOR, float("-inf")).exp_()


def _keys(x: Tensor, g0: int, g1: int, look_back: bool) -> Tensor:
    """Keys of groups g0:g1: x[g0:g1], or [x[g-1] | x[g]] with look-back (x[-1] for g=0)."""
    if not look_back:
        return x[g0:g1]
    prev = x[g0 - 1 : g1 - 1] if g0 > 0 else torch.cat([x[-1:], x[: g1 - 1]])
    return torch.cat([prev, x[g0:g1]], dim=1)


class _ChunkAttn(torch.autograd.Function):
    """softmax(q k^T * scale + bias - log count, masked) v per group, returning (out, lse).

    q [G, c, D]; k, v [G, c, .] with look-back (keys of group g are groups g-1 and g,
    so w = 2c) or [G, w, .] without; mask bool [G, c, w]; count int8 [G, c, w] or
    None; bias float [G, c|1, w] or None (differentiable). Rows with no visible key
    give out = 0 and lse = -inf. Runs in slices of the group axis, and the backward
    recomputes the scores: memory is q, k, v, mask (+ count), out and lse.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, count, bias, scale, look_back):
        G, c, _ = q.shape
        w = mask.shape[-1]
        step = max(1, _SLICE_ELEMS // (c * w))
        out = q.new_empty(G, c, v.shape[-1])
        lse = q.new_empty(G, c)
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            b = None if bias is None else bias.expand(G, c, w)[g0:g1]
            cnt = None if count is None else count[g0:g1]
            s = _scores(q[g0:g1], _keys(k, g0, g1, look_back), mask[g0:g1], cnt, b, scale)
            m = s.amax(-1, keepdim=True)
            m.masked_fill_(torch.isinf(m), 0.0)
            p = _exp_(s.sub_(m))
            z = p.sum(-1, keepdim=True)
            torch.bmm(p, _keys(v, g0, g1, look_back), out=out[g0:g1])
            out[g0:g1].div_(z.clamp_min(torch.finfo(z.dtype).tiny))
            lse[g0:g1] = (m + torch.log(z)).squeeze(-1)
        ctx.save_for_backward(q, k, v, mask, count, bias, out, lse)
        ctx.scale, ctx.look_back, ctx.step = scale, look_back, step
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[5]
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, mask, count, bias, out, lse = ctx.saved_tensors
        scale, look_back, step = ctx.scale, ctx.look_back, ctx.step
        G, c, _ = q.shape
        w = mask.shape[-1]
        if g_out is None:
            g_out = torch.zeros_like(out)
        delta = (g_out * out).sum(-1)
        if g_lse is not None:
            delta = delta - g_lse
        lse_b = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dbias = torch.zeros_like(bias) if ctx.bias_grad else None
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            kk, vv = _keys(k, g0, g1, look_back), _keys(v, g0, g1, look_back)
            b = None if bias is None else bias.expand(G, c, w)[g0:g1]
            cnt = None if count is None else count[g0:g1]
            p = _scores(q[g0:g1], kk, mask[g0:g1], cnt, b, scale)
            p = _exp_(p.sub_(lse_b[g0:g1, :, None]))
            go = g_out[g0:g1]
            dvs = torch.bmm(p.transpose(1, 2), go)
            ds = torch.bmm(go, vv.transpose(1, 2)).sub_(delta[g0:g1, :, None]).mul_(p)
            if dbias is not None:  # d score = d bias (summed where the bias is broadcast)
                dbias[g0:g1] += ds.sum(1, keepdim=True) if dbias.shape[1] == 1 else ds
            torch.bmm(ds, kk, out=dq[g0:g1])
            dks = torch.bmm(ds.transpose(1, 2), q[g0:g1])
            if look_back:
                # keys [c:] are group g's own, keys [:c] belong to group g-1
                dk[g0:g1] += dks[:, c:]
                dv[g0:g1] += dvs[:, c:]
                lo = max(g0, 1)
                dk[lo - 1 : g1 - 1] += dks[lo - g0 :, :c]
                dv[lo - 1 : g1 - 1] += dvs[lo - g0 :, :c]
                # (group 0's look-back keys are always masked: their gradient is 0)
            else:
                dk[g0:g1] += dks
                dv[g0:g1] += dvs
        dq.mul_(scale)
        dk.mul_(scale)
        return dq, dk, dv, None, None, dbias, None, None


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    scale: float,
    *,
    bias: Tensor | None = None,
    count: Tensor | None = None,
    look_back: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of each query chunk over its own keys.

    Args:
        q: [..., c, D]. Without look-back k: [..., w, D], v: [..., w, Dv]. With
            ``look_back`` k, v: [..., c, .] and the keys of chunk g are chunks g-1
            and g along the flattened leading dims (w = 2c); the first chunk's
            look-back keys must be masked by the caller.
        mask: bool [..., c, w], True = visible.
        scale: score scale.
        bias: float additive scores [..., c or 1, w] (leading dims broadcastable),
            or None; differentiable.
        count: int8 [..., c, w] or None: scores are lowered by log(count).

    Returns:
        out [..., c, Dv] (zeros for rows with no visible key) and lse [..., c]
        (-inf for those rows). Both carry gradients (lse too, so parts may be
        merged by their log-sum-exp).
    """
    lead = q.shape[:-2]
    c, D = q.shape[-2:]
    w = mask.shape[-1]
    Dv = v.shape[-1]
    kv_len = c if look_back else w
    if bias is not None:
        bias = bias.expand(*lead, *bias.shape[-2:]).reshape(-1, *bias.shape[-2:])
        if bias.shape[1] not in (1, c):
            raise ValueError(f"bias must be [..., {c} or 1, {w}], got {tuple(bias.shape)}")
    out, lse = _ChunkAttn.apply(
        q.reshape(-1, c, D), k.reshape(-1, kv_len, D), v.reshape(-1, kv_len, Dv),
        mask.reshape(-1, c, w), None if count is None else count.reshape(-1, c, w),
        bias, scale, look_back,
    )
    return out.reshape(*lead, c, Dv), lse.reshape(*lead, c)


def merge_by_lse(outs: Tensor, lses: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Merge softmax parts: sum_r softmax_r(lse_r) * out_r along ``dim``.

    outs [..., R, ..., Dv] and lses (outs without the last dim). Parts with
    lse = -inf get no weight; if every part is -inf the result is 0 and the
    merged lse -inf. Differentiable (through lse too) and NaN-free.
    """
    m = lses.amax(dim, keepdim=True).detach()
    m = m.masked_fill(torch.isinf(m), 0.0)
    w = torch.exp(lses - m)
    z = w.sum(dim, keepdim=True)
    w = w / z.clamp_min(torch.finfo(z.dtype).tiny)
    out = (outs * w.unsqueeze(-1)).sum(dim)
    lse = (m + torch.log(z)).squeeze(dim)
    return out, lse


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, H, N, D], idx [B, H, R, M] token ids -> [B, H, R, M, D]."""
    B, H, N, D = x.shape
    R, M = idx.shape[-2:]
    flat = idx.reshape(B, H, R * M, 1).expand(B, H, R * M, D)
    return torch.gather(x, 2, flat).reshape(B, H, R, M, D)


def _with_look_back(x: Tensor, dim: int) -> Tensor:
    """Concatenate the previous chunk before each chunk: [.., C, c, ..] -> [.., C, 2c, ..].

    ``dim`` is the chunk axis (C); the slot axis is ``dim + 1``. Chunk 0 gets the
    last chunk (the caller marks those keys invalid).
    """
    return torch.cat([torch.roll(x, 1, dims=dim), x], dim=dim + 1)


def sorted_chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Tensor,
    *,
    chunk: int,
    scale: float,
    key_valid: Tensor | None,
    causal: bool,
    look_back: bool,
    exclude_self: bool,
    dedup: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention inside chunks of the (group, position)-sorted sequence, per round.

    Args:
        q, k: [B, H, N, D]; v: [B, H, N, Dv] (already in the working dtype).
        group: int64 [B, H, R, N] in [0, n_groups): each token's bucket/cluster
            in each of R rounds (orders).
        chunk: chunk length c (>= 1).
        key_valid: bool [B, N] (True = real token) or None. Padded tokens are
            absent: never a key, and as queries they see nothing (out 0, lse -inf).
        causal: strictly causal same-group window (see the module docstring).
        look_back: non-causal only; also attend to the previous chunk.
        exclude_self: a token never attends to itself (the caller handles the
            "self only if nothing else" rule from the returned lse).
        dedup: when R > 1, weight each (query, key) pair by 1 / (number of rounds
            in which it is visible), so that merging the rounds by their lse gives
            exactly the softmax over the union of the rounds' key sets.

    Returns:
        out [B, H, R, N, Dv] and lse [B, H, R, N] in token order; lse is -inf for
        a query that sees no key in that round (its out is 0).
    """
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    R = group.shape[2]
    dev = q.device
    C = -(-N // chunk)
    Np = C * chunk
    pad = Np - N

    valid = torch.ones(B, N, dtype=torch.bool, device=dev) if key_valid is None else key_valid
    if pad:
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        group = torch.nn.functional.pad(group, (0, pad))
    with torch.no_grad():
        # invalid (padded) tokens go into one last group: sorted after every real token
        n_groups = int(group.max().item()) + 1 if group.numel() else 1
        group = torch.where(valid[:, None, None, :], group, n_groups)
        pos = torch.arange(Np, device=dev)
        perm = torch.argsort(group * Np + pos, dim=-1)  # [B, H, R, Np] token at slot
        slot = torch.empty_like(perm)
        slot.scatter_(-1, perm, pos.expand_as(perm))  # slot of token

    qs = _gather_tokens(q, perm).reshape(B, H, R, C, chunk, D)
    ks = _gather_tokens(k, perm).reshape(B, H, R, C, chunk, D)
    vs = _gather_tokens(v, perm).reshape(B, H, R, C, chunk, Dv)

    use_lb = look_back or causal
    with torch.no_grad():
        mask, count = _sorted_mask(
            perm, slot, group, valid, chunk=chunk, causal=causal, look_back=use_lb,
            exclude_self=exclude_self, dedup=dedup and R > 1,
        )
    out, lse = chunk_attention(qs, ks, vs, mask, scale, count=count, look_back=use_lb)
    out = out.reshape(B, H, R, Np, Dv)
    lse = lse.reshape(B, H, R, Np)
    # back to token order
    out = torch.gather(out, 3, slot[..., None].expand(B, H, R, Np, Dv))[:, :, :, :N]
    lse = torch.gather(lse, 3, slot)[:, :, :, :N]
    return out, lse


def _sorted_mask(
    perm: Tensor, slot: Tensor, group: Tensor, valid: Tensor, *, chunk: int, causal: bool,
    look_back: bool, exclude_self: bool, dedup: bool,
) -> tuple[Tensor, Tensor | None]:
    """Visibility [B, H, R, C, c, w] (and round counts) of the sorted-chunk layout."""
    B, H, R, Np = perm.shape
    C = Np // chunk
    shape = (B, H, R, C, chunk)

    def at(table: Tensor, idx: Tensor) -> Tensor:  # table [B,H,R,Np] read at token ids idx
        return torch.gather(table, 3, idx.reshape(B, H, R, -1)).reshape(idx.shape)

    def lb(x: Tensor) -> Tensor:
        return _with_look_back(x, 3) if look_back else x

    tq = perm.reshape(shape)
    tk = lb(tq)
    valid_t = valid[:, None, None, :].expand(B, H, R, Np)
    kvalid = lb(at(valid_t, tq))
    if look_back:
        kvalid[:, :, :, 0, :chunk] = False  # chunk 0 has no previous chunk
    mask = kvalid[..., None, :] & at(valid_t, tq)[..., :, None]
    if exclude_self:
        mask &= tq[..., :, None] != tk[..., None, :]
    if causal:
        mask &= tk[..., None, :] <= tq[..., :, None]
        mask &= at(group, tq)[..., :, None] == at(group, tk)[..., None, :]
        sq, sk = at(slot, tq), at(slot, tk)
        mask &= sk[..., None, :] >= (sq - chunk)[..., :, None]
    if not dedup:
        return mask, None
    count = torch.zeros(mask.shape, dtype=torch.int8, device=mask.device)
    for r2 in range(R):
        sl2 = slot[:, :, r2 : r2 + 1].expand(B, H, R, Np)
        aq, ak = at(sl2, tq), at(sl2, tk)
        if causal:
            g2 = group[:, :, r2 : r2 + 1].expand(B, H, R, Np)
            hit = at(g2, tq)[..., :, None] == at(g2, tk)[..., None, :]
            hit &= ak[..., None, :] <= aq[..., :, None]
            hit &= ak[..., None, :] >= (aq - chunk)[..., :, None]
        else:
            cq = torch.div(aq, chunk, rounding_mode="floor")[..., :, None]
            ck = torch.div(ak, chunk, rounding_mode="floor")[..., None, :]
            hit = ck == cq
            if look_back:
                hit |= ck == cq - 1
        count += hit
    count.masked_fill_(~mask, 1)
    return mask, count


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (accumulate in fp32), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def unit(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ||x|| along the last dim (safe at 0)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "chunk_attention", "merge_by_lse", "sorted_chunk_attention", "work_dtype", "unit",
    "ceil_div",
]
