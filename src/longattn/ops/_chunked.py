"""Chunked softmax attention: the engine shared by lsh, clustered and sinkhorn.

Two pieces:

- :func:`chunk_attention`: every query chunk attends to its own small set of keys
  (``q [G, c, D]`` over ``k [G, w, D]``), with an additive bias (0 / -inf / any
  finite value). Returns the output *and* the log-sum-exp of every row, both
  differentiable (a custom autograd function: the backward recomputes the
  scores, so only q, k, v, the bias, out and lse are kept). Cost O(G c w D).
- :func:`sorted_chunk_attention`: tokens are ordered by (group, position) -
  group = LSH bucket or k-means cluster, one order per round - cut into equal
  chunks, and each chunk attends to itself and (optionally) the chunk before it;
  the rounds are merged by their log-sum-exp. Cost O(R N c D) time, O(R N c)
  memory: never an N x N tensor. On CPU (float32/float64) every chunk of every
  round goes through one call of PyTorch's fused flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, look-back keys as a
  zero-copy strided view); its backward, given the merged output and lse, is the
  exact gradient of the merged softmax. Elsewhere :func:`chunk_attention` runs it
  (a test holds the two engines equal).

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


def exp_floor(dtype: torch.dtype) -> float:
    """Log-weights below this are flushed to 0: -30 for float32 (e^-30 ~ 1e-13, far
    below its resolution next to the row's largest weight, 1), -80 for float64."""
    return -80.0 if dtype == torch.float64 else -30.0


def _exp_(x: Tensor) -> Tensor:
    """In-place exp that flushes weights below e^exp_floor to 0.

    Left alone, such weights and the gradients they scale become denormal numbers,
    which slow the CPU matmuls ~20x.
    """
    return torch.nn.functional.threshold_(x, exp_floor(x.dtype), float("-inf")).exp_()


def _padded_front(x: Tensor) -> Tensor:
    """[G, c, D] -> flat [(G + 1) * c, D] with one zero chunk in front."""
    G, c, D = x.shape
    out = x.new_zeros((G + 1) * c, D)
    out[c:] = x.reshape(G * c, D)
    return out


def _look_back_view(flat: Tensor, g0: int, g1: int, c: int) -> Tensor:
    """Keys of groups g0:g1 with look-back, as a zero-copy view [g1 - g0, 2c, D].

    ``flat`` is :func:`_padded_front`'s layout: group g's own chunk starts at row
    (g + 1) c, so its previous chunk and itself are the 2c contiguous rows from g c.
    """
    D = flat.shape[-1]
    return flat.as_strided((g1 - g0, 2 * c, D), (c * D, D, 1), flat.storage_offset() + g0 * c * D)


class _ChunkAttn(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v per group, returning (out, lse).

    q [G, c, D]; k, v [G, c, .] with look-back (the keys of group g are groups g-1
    and g, w = 2c; group 0's first c keys are zeros and must be masked) or [G, w, .]
    without; bias float [G, c, w] (0 / -inf masks, any finite value adds;
    differentiable). Rows with no visible key give out = 0 and lse = -inf. Runs in
    slices of the group axis; the backward recomputes the scores, so the memory kept
    is q, k, v, bias, out and lse.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, look_back):
        G, c, _ = q.shape
        w = bias.shape[-1]
        step = max(1, _SLICE_ELEMS // (c * w))
        if look_back:
            k, v = _padded_front(k), _padded_front(v)
        out = q.new_empty(G, c, v.shape[-1])
        lse = q.new_empty(G, c)
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            kk, vv = _kv(k, v, g0, g1, c, look_back)
            s = torch.baddbmm(bias[g0:g1], q[g0:g1], kk.transpose(1, 2), alpha=scale)
            m = s.amax(-1, keepdim=True)
            m.masked_fill_(torch.isinf(m), 0.0)
            p = _exp_(s.sub_(m))
            z = p.sum(-1, keepdim=True)
            torch.bmm(p, vv, out=out[g0:g1])
            out[g0:g1].div_(z.clamp_min(torch.finfo(z.dtype).tiny))
            lse[g0:g1] = (m + torch.log(z)).squeeze(-1)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale, ctx.look_back, ctx.step = scale, look_back, step
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        scale, look_back, step = ctx.scale, ctx.look_back, ctx.step
        G, c, _ = q.shape
        if g_out is None:
            g_out = torch.zeros_like(out)
        delta = (g_out * out).sum(-1)
        if g_lse is not None:
            delta = delta - g_lse
        lse_b = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)  # padded-front layout with look-back
        dv = torch.zeros_like(v)
        dbias = torch.empty_like(bias) if ctx.needs_input_grad[3] else None
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            kk, vv = _kv(k, v, g0, g1, c, look_back)
            p = torch.baddbmm(bias[g0:g1], q[g0:g1], kk.transpose(1, 2), alpha=scale)
            p = _exp_(p.sub_(lse_b[g0:g1, :, None]))
            go = g_out[g0:g1]
            dvs = torch.bmm(p.transpose(1, 2), go)
            ds = torch.bmm(go, vv.transpose(1, 2)).sub_(delta[g0:g1, :, None]).mul_(p)
            if dbias is not None:
                dbias[g0:g1] = ds
            torch.bmm(ds, kk, out=dq[g0:g1])
            dks = torch.bmm(ds.transpose(1, 2), q[g0:g1])
            if look_back:  # overlapping windows: add the halves into the flat layout
                dkw = _look_back_view(dk, g0, g1, c)
                dvw = _look_back_view(dv, g0, g1, c)
                dkw[:, :c] += dks[:, :c]
                dvw[:, :c] += dvs[:, :c]
                dkw[:, c:] += dks[:, c:]
                dvw[:, c:] += dvs[:, c:]
            else:
                dk[g0:g1] = dks
                dv[g0:g1] = dvs
        dq.mul_(scale)
        dk.mul_(scale)
        if look_back:
            dk = dk[c:].reshape(G, c, -1)
            dv = dv[c:].reshape(G, c, -1)
        return dq, dk, dv, dbias, None, None


def _kv(k: Tensor, v: Tensor, g0: int, g1: int, c: int, look_back: bool) -> tuple[Tensor, Tensor]:
    if look_back:
        return _look_back_view(k, g0, g1, c), _look_back_view(v, g0, g1, c)
    return k[g0:g1], v[g0:g1]


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    scale: float,
    *,
    look_back: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of each query chunk over its own keys.

    Args:
        q: [..., c, D]. Without look-back k: [..., w, D], v: [..., w, Dv]. With
            ``look_back`` k, v: [..., c, .] and the keys of chunk g are chunks g-1
            and g along the flattened leading dims (w = 2c); the first chunk's
            look-back keys must be masked by the caller.
        bias: additive scores [..., c, w] in q's dtype: 0 / -inf for visibility,
            any finite value to reweight; differentiable.
        scale: score scale.

    Returns:
        out [..., c, Dv] (zeros for rows with no visible key) and lse [..., c]
        (-inf for those rows). Both carry gradients (lse too, so parts may be
        merged by their log-sum-exp).
    """
    lead = q.shape[:-2]
    c, D = q.shape[-2:]
    w = bias.shape[-1]
    Dv = v.shape[-1]
    kv_len = c if look_back else w
    if look_back and w != 2 * c:
        raise ValueError(f"with look_back the bias must have 2c = {2 * c} keys, got {w}")
    out, lse = _ChunkAttn.apply(
        q.reshape(-1, c, D), k.reshape(-1, kv_len, D), v.reshape(-1, kv_len, Dv),
        bias.expand(*lead, c, w).reshape(-1, c, w), scale, look_back,
    )
    return out.reshape(*lead, c, Dv), lse.reshape(*lead, c)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _flash_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


#: score entries per flash call of the sorted-chunk engine: small enough that the
#: slices reuse heap memory (no page faults on fresh mappings) and stay in cache
_FLASH_SLICE = 1 << 19


def code_bias(code: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive scores of visibility codes n (0 = hidden, n = visible in n rounds):
    -|log n| is -inf for 0, 0 for 1 and -log n above."""
    return code.to(dtype).log_().abs_().neg_()


def uniform_bias(c: int, w: int, exclude_self: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The additive mask [1, 1, c, w] that every chunk shares when nothing is padded,
    nothing is causal and no pair is counted in several rounds: every key visible
    but, with ``exclude_self``, the token itself (the diagonal of the own chunk, the
    last c keys)."""
    b = torch.zeros(c, w, dtype=dtype, device=device)
    if exclude_self:
        b[:, w - c :].diagonal().fill_(float("-inf"))
    return b[None, None]


def _slice_bias(code: Tensor | None, uniform: Tensor | None, g0: int, g1: int, C: int,
                look_back: bool, dtype: torch.dtype) -> Tensor:
    """Additive mask of groups g0:g1 ([g1 - g0, 1, c, w]): from the visibility codes, or
    the uniform mask broadcast, with the look-back keys of each sequence's first chunk
    (group g with g % C == 0: it has no previous chunk) hidden."""
    if code is not None:
        return code_bias(code[g0:g1], dtype)
    _, _, c, w = uniform.shape
    bias = uniform.expand(g1 - g0, 1, c, w)
    first = [g - g0 for g in range(-(-g0 // C) * C, g1, C)]
    if look_back and first:
        bias = bias.clone()
        bias[first, :, :, : w - c] = float("-inf")
    return bias


def _slice_keys(x: Tensor, g0: int, g1: int, c: int, look_back: bool) -> Tensor:
    """Keys of groups g0:g1 from the flat sorted rows x [G * c, D]: [g1 - g0, 1, w, D].
    With look-back, group g sees rows (g - 1) c .. (g + 1) c: a zero-copy view (the
    first group's missing look-back rows are zeros, always masked)."""
    D = x.shape[-1]
    if not look_back:
        return x[g0 * c : g1 * c].view(g1 - g0, 1, c, D)
    if g0 == 0:
        x = torch.cat([x.new_zeros(c, D), x[: g1 * c]])
        start = 0
    else:
        start = (g0 - 1) * c
    return x.as_strided((g1 - g0, 1, 2 * c, D), (c * D, c * D, D, 1), x.storage_offset() + start * D)


class _SortedRounds(torch.autograd.Function):
    """R rounds of chunk attention in sorted orders, merged by log-sum-exp.

    Inputs in sorted-chunk layout: q, k [B, H, R, C, c, D], v [.., Dv]; code int8
    [B, H, R, C, c, w] (0 = hidden, n = visible in n rounds: score - log n; w = 2c
    with look-back, else c), or None with ``uniform`` [1, 1, c, w]: one mask shared by
    every chunk (see :func:`_slice_bias`; no row may be left without a key); unsort: int64 [B * H * R * Np] rows of the sorted layout
    in token order. Returns the merged output [B, H, Np, Dv] and log-sum-exp
    [B, H, Np] (-inf where no round sees a key; not differentiable) in token order.

    PyTorch's fused CPU flash kernel does the chunks, a bounded slice of them per
    call (look-back keys as zero-copy views). The backward calls its backward with
    the *merged* output and log-sum-exp of each query: that is the exact gradient of
    one softmax over the union of the rounds' keys, so no gradient through the
    per-round lse is needed.
    """

    @staticmethod
    def forward(ctx, q, k, v, code, uniform, unsort, scale, look_back):
        B, H, R, C, c, D = q.shape
        Dv = v.shape[-1]
        Np = C * c
        G = B * H * R * C
        w = (code if code is not None else uniform).shape[-1]
        qf, kf, vf = q.reshape(G, 1, c, D), k.reshape(G * c, D), v.reshape(G * c, Dv)
        cf = code.reshape(G, 1, c, w) if code is not None else None
        o = q.new_empty(G, c, Dv)
        l = None
        step = max(1, _FLASH_SLICE // (c * w))
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            bias = _slice_bias(cf, uniform, g0, g1, C, look_back, q.dtype)
            os_, ls = _flash(qf[g0:g1], _slice_keys(kf, g0, g1, c, look_back), _slice_keys(vf, g0, g1, c, look_back),
                             0.0, False, attn_mask=bias, scale=scale)
            if l is None:
                l = ls.new_empty(G, c)
            o[g0:g1] = os_[:, 0]
            l[g0:g1] = ls[:, 0]
        ctx.lse_dtype = l.dtype
        l = l.to(q.dtype)
        if cf is not None:
            l.masked_fill_((cf[:, 0] == 0).all(-1), float("-inf"))  # rows with no key
        outs = o.reshape(-1, Dv).index_select(0, unsort).reshape(B, H, R, Np, Dv)
        lses = l.reshape(-1).index_select(0, unsort).reshape(B, H, R, Np)
        del o, l
        out, lse = merge_by_lse(outs, lses, dim=2)
        ctx.save_for_backward(q, k, v, code, uniform, unsort, out, lse)
        ctx.scale, ctx.look_back = scale, look_back
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, g_out, _g_lse):
        q, k, v, code, uniform, unsort, out, lse = ctx.saved_tensors
        B, H, R, C, c, D = q.shape
        Dv = v.shape[-1]
        Np = C * c
        G = B * H * R * C
        w = (code if code is not None else uniform).shape[-1]
        look_back = ctx.look_back
        # token-order rows -> sorted layout: the inverse of unsort
        sort = torch.empty_like(unsort)
        sort[unsort] = torch.arange(unsort.numel(), device=unsort.device)
        # row of the sorted layout -> row of [B, H, Np] (drop the round)
        tok = torch.div(sort, R * Np, rounding_mode="floor") * Np + sort % Np
        g_out = g_out.contiguous()
        gs = g_out.reshape(-1, Dv).index_select(0, tok).reshape(G, 1, c, Dv)
        os_ = out.reshape(-1, Dv).index_select(0, tok).reshape(G, 1, c, Dv)
        lse_f = lse.masked_fill(torch.isneginf(lse), 0.0)  # those rows see no key anyway
        ls = lse_f.reshape(-1).index_select(0, tok).reshape(G, 1, c).to(ctx.lse_dtype)
        del sort, tok, lse_f
        qf, kf, vf = q.reshape(G, 1, c, D), k.reshape(G * c, D), v.reshape(G * c, Dv)
        cf = code.reshape(G, 1, c, w) if code is not None else None
        dq = torch.empty(G, c, D, dtype=q.dtype, device=q.device)
        dk = torch.zeros(G * c, D, dtype=k.dtype, device=k.device)
        dv = torch.zeros(G * c, Dv, dtype=v.dtype, device=v.device)
        step = max(1, _FLASH_SLICE // (c * w))
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            dqs, dks, dvs = _flash_bwd(
                gs[g0:g1], qf[g0:g1], _slice_keys(kf, g0, g1, c, look_back),
                _slice_keys(vf, g0, g1, c, look_back), os_[g0:g1], ls[g0:g1], 0.0, False,
                attn_mask=_slice_bias(cf, uniform, g0, g1, C, look_back, q.dtype), scale=ctx.scale,
            )
            dq[g0:g1] = dqs[:, 0]
            for grad, part in ((dk, dks[:, 0]), (dv, dvs[:, 0])):
                if not look_back:
                    grad[g0 * c : g1 * c] += part.reshape(-1, grad.shape[-1])
                    continue
                # own keys, then the look-back keys (the previous group's own rows)
                grad[g0 * c : g1 * c] += part[:, c:].reshape(-1, grad.shape[-1])
                lo = max(g0, 1)
                grad[(lo - 1) * c : (g1 - 1) * c] += part[lo - g0 :, :c].reshape(-1, grad.shape[-1])
        return (dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape),
                None, None, None, None, None)


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
        out [B, H, N, Dv], the rounds merged by their log-sum-exp, and the merged
        lse [B, H, N] (not differentiable) in token order; lse is -inf for a query
        that sees no key in any round (its out is 0). float32/float64 on CPU run
        on PyTorch's fused flash kernel; other cases on :func:`chunk_attention`.
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

        # rows of the flat [B * H * Np] token layout, in sorted order, and back
        base = (torch.arange(B * H, device=dev) * Np).reshape(B, H, 1, 1)
        rows = (perm + base).reshape(-1)
        base_r = (torch.arange(B * H * R, device=dev) * Np).reshape(B, H, R, 1)
        unsort = (slot + base_r).reshape(-1)

    qs = q.reshape(-1, D).index_select(0, rows).reshape(B, H, R, C, chunk, D)
    ks = k.reshape(-1, D).index_select(0, rows).reshape(B, H, R, C, chunk, D)
    vs = v.reshape(-1, Dv).index_select(0, rows).reshape(B, H, R, C, chunk, Dv)

    use_lb = look_back or causal
    code = uniform = None
    if _flash_ok(q) and key_valid is None and not pad and not causal and not (dedup and R > 1) \
            and (chunk > 1 or not exclude_self):
        # every chunk sees the same mask: no per-entry visibility tensor at all
        uniform = uniform_bias(chunk, 2 * chunk if use_lb else chunk, exclude_self, q.dtype, dev)
    else:
        with torch.no_grad():
            mask, count = _sorted_mask(
                perm, slot, group, valid, chunk=chunk, causal=causal, look_back=use_lb,
                exclude_self=exclude_self, dedup=dedup and R > 1,
            )
            # visibility code: 0 hidden, n = visible in n rounds (score - log n in each)
            code = mask.to(torch.int8) if count is None else count
            del mask, count
    if _flash_ok(q):
        out, lse = _SortedRounds.apply(qs, ks, vs, code, uniform, unsort, scale, use_lb)
        return out[:, :, :N], lse[:, :, :N]
    with torch.no_grad():
        bias = code_bias(code, q.dtype)
        del code
    out, lse = chunk_attention(qs, ks, vs, bias, scale, look_back=use_lb)
    out = out.reshape(B, H, R, Np, Dv)
    lse = lse.reshape(B, H, R, Np)
    # back to token order, then merge the rounds
    out = out.reshape(-1, Dv).index_select(0, unsort).reshape(B, H, R, Np, Dv)
    lse = lse.reshape(-1).index_select(0, unsort).reshape(B, H, R, Np)
    out, lse = merge_by_lse(out, lse, dim=2)
    return out[:, :, :N], lse[:, :, :N]


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
    if exclude_self:  # each token is once in its round's order: self is the own-chunk diagonal
        mask[..., :, tk.shape[-1] - chunk :].diagonal(dim1=-2, dim2=-1).fill_(False)
    if causal:
        mask &= tk[..., None, :] <= tq[..., :, None]
        mask &= at(group, tq)[..., :, None] == at(group, tk)[..., None, :]
        sq, sk = at(slot, tq), at(slot, tk)
        mask &= sk[..., None, :] >= (sq - chunk)[..., :, None]
    if not dedup:
        return mask, None
    # rounds visible in = 1 (its own round) + hits in the other rounds
    count = torch.ones(mask.shape, dtype=torch.int8, device=mask.device)
    for shift in range(1, R):
        sl2 = torch.roll(slot, shift, dims=2)  # query round r vs round r - shift
        aq, ak = at(sl2, tq), at(sl2, tk)
        if causal:
            g2 = torch.roll(group, shift, dims=2)
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
    count.masked_fill_(~mask, 0)
    return mask, count


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (accumulate in fp32), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


class _Unit(torch.autograd.Function):
    """y = x / max(|x|, eps) with the short backward dx = (g - y <g, y>) / |x| (or
    g / eps where the norm is clamped): two passes instead of autograd's division
    and norm graphs."""

    @staticmethod
    def forward(ctx, x, eps):
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        clamped = n < eps
        n.clamp_(min=eps)
        y = x / n
        ctx.save_for_backward(y, n, clamped)
        return y

    @staticmethod
    def backward(ctx, g):
        y, n, clamped = ctx.saved_tensors
        dot = (g * y).sum(-1, keepdim=True).masked_fill_(clamped, 0.0)
        return torch.addcmul(g, y, dot, value=-1.0).div_(n), None


def unit(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ||x|| along the last dim (safe at 0: rows of norm below eps are x / eps)."""
    return _Unit.apply(x, eps)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "chunk_attention", "merge_by_lse", "sorted_chunk_attention", "work_dtype", "unit",
    "ceil_div",
]
