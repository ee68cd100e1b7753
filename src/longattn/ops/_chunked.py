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
  (:data:`longattn.ops._softmax.flash_fwd`, look-back keys as a
  zero-copy strided view); its backward, given the merged output and lse, is the
  exact gradient of the merged softmax. Elsewhere :func:`chunk_attention` runs it
  (a test holds the two engines equal). The masks (padding, causal windows, self,
  round counts) come from :class:`ChunkVisibility`, one slice of chunks at a time,
  forward and backward: O(R N) per-row tables, never a mask over every chunk.

Causal mode of :func:`sorted_chunk_attention` is *strictly* causal. With plain
equal chunks the keys a query sees would depend on how many *future* tokens fell
into earlier groups (they shift the chunk boundaries), which is a leak. So with
``causal=True`` a query i sees the keys j <= i of its own group whose slot in the
sorted order is at most ``chunk`` slots before its own, i.e. its ``chunk`` most
recent same-group predecessors (plus itself): a set that depends on tokens <= i
only. The look-back chunk always covers that window.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.ops._softmax import exp_ as _exp_
from longattn.ops._softmax import merge_by_lse, work_dtype
from longattn.ops._softmax import flash_bwd as _flash_bwd
from longattn.ops._softmax import flash_fwd as _flash
from longattn.ops._softmax import flash_ok as _flash_ok

_SLICE_ELEMS = 1 << 22  # score entries per slice: caps the transient score/prob tensors


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
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, *, look_back: bool = False,
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


#: score entries per flash call of the sorted-chunk engine: small enough that the
#: slices reuse heap memory (no page faults on fresh mappings) and stay in cache
_FLASH_SLICE = 1 << 19


def uniform_bias(c: int, w: int, exclude_self: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The additive mask [c, w] every chunk starts from: every key visible but, with
    ``exclude_self``, the token itself (the diagonal of the own chunk, the last c keys)."""
    b = torch.zeros(c, w, dtype=dtype, device=device)
    if exclude_self:
        b[:, w - c :].diagonal().fill_(float("-inf"))
    return b


def _row_keys(t: Tensor, g0: int, g1: int, c: int, look_back: bool) -> Tensor:
    """Per-row values t [G * c, ...] of the keys of groups g0:g1: [g1 - g0, w, ...] (the
    rows of the look-back chunk, then the own chunk; group 0's missing look-back rows
    hold t's first rows and must be masked). A view where possible."""
    if not look_back:
        return t[g0 * c : g1 * c].view(g1 - g0, c, *t.shape[1:])
    if g0 == 0:
        t = torch.cat([t[:c], t[: g1 * c]])
        start = 0
    else:
        start = (g0 - 1) * c
    inner = t.stride()[1:]
    return t.as_strided((g1 - g0, 2 * c, *t.shape[1:]), (c * t.stride(0), t.stride(0), *inner),
                        t.storage_offset() + start * t.stride(0))


class ChunkVisibility:
    """Which keys each query of the sorted-chunk layout sees, as additive masks built one
    slice of chunks at a time (never a [G, c, w] tensor over every chunk).

    Built from per-row tables of the sorted layout (G = B * H * R * C chunks of c rows;
    O(R N) memory): the token of each row, its validity, its group and, for ``dedup``,
    where it sits in the other rounds. :meth:`bias` gives a slice's mask: 0 = visible,
    -inf = hidden, -log n for a pair visible in n rounds (``dedup``: merging the rounds by
    their log-sum-exp then counts it once). Hidden: padded keys, other groups' or future
    keys (``causal``: the ``chunk`` most recent same-group predecessors and the token
    itself), the token itself (``exclude_self``), the missing look-back chunk of each
    sequence's first chunk.
    """

    def __init__(self, perm: Tensor, slot: Tensor, group: Tensor, valid: Tensor | None, *, chunk: int,
                 causal: bool, look_back: bool, exclude_self: bool, dedup: bool) -> None:
        B, H, R, Np = perm.shape
        self.c, self.C = chunk, Np // chunk
        self.w = 2 * chunk if look_back else chunk
        self.causal, self.look_back, self.exclude_self = causal, look_back, exclude_self

        def at(table: Tensor) -> Tensor:  # table [B, H, R, Np] by token -> [G * c] by sorted row
            return torch.gather(table, 3, perm).reshape(-1)

        self.valid = None if valid is None else at(valid[:, None, None, :].expand(B, H, R, Np))
        self.tok = self.grp = self.pos = None
        if causal:
            self.tok, self.grp = perm.reshape(-1), at(group)
            self.pos = torch.arange(Np, device=perm.device).repeat(B * H * R)  # slot of each row
        # per other round: where each row's token sits there (causal: slot and group; else
        # its chunk, as float32: see _rounds_bias)
        self.others: list[tuple[Tensor, Tensor | None]] = []
        for shift in range(1, R if dedup else 1):
            other_slot = at(torch.roll(slot, shift, dims=2))  # query round r vs round r - shift
            if causal:
                self.others.append((other_slot, at(torch.roll(group, shift, dims=2))))
            else:
                self.others.append((torch.div(other_slot, chunk, rounding_mode="floor").to(torch.float32), None))
        # a row may see no key at all: padding, causal windows, or a chunk of one token without itself
        self.may_be_empty = valid is not None or causal or (exclude_self and chunk == 1)
        self._base: dict[tuple, Tensor] = {}

    def base(self, dtype: torch.dtype, device: torch.device, rounds: int = 1) -> Tensor:
        """The mask every chunk starts from [c, w], less log(rounds) on the visible entries."""
        key = (dtype, str(device), rounds)
        if key not in self._base:
            self._base[key] = uniform_bias(self.c, self.w, self.exclude_self, dtype, device) - math.log(rounds)
        return self._base[key]

    def bias(self, g0: int, g1: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Additive mask [g1 - g0, 1, c, w] of chunks g0:g1, and the rows that see no key
        ([g1 - g0, c] bool; None when no row can be empty)."""
        c, n = self.c, g1 - g0
        base = self.base(dtype, device)
        bias = self._rounds_bias(g0, g1, base)
        hide = self._hidden(g0, g1)
        if hide is not None:
            bias = bias.masked_fill_(hide, float("-inf")) if bias is not None else base.masked_fill(hide, float("-inf"))
        if bias is None:
            bias = base.expand(n, c, self.w)
        first = [g - g0 for g in range(-(-g0 // self.C) * self.C, g1, self.C)] if self.look_back else []
        if first:  # a sequence's first chunk has no look-back chunk
            bias = bias.clone() if bias.stride(0) == 0 else bias
            bias[first, :, : self.w - c] = float("-inf")
        empty = torch.isneginf(bias).all(-1) if self.may_be_empty else None
        return bias[:, None], empty

    def _pair(self, t: Tensor, g0: int, g1: int) -> tuple[Tensor, Tensor]:
        """A per-row table at the queries [n, c, 1] and at the keys [n, 1, w] of chunks g0:g1."""
        q = t[g0 * self.c : g1 * self.c].view(g1 - g0, self.c, 1)
        return q, _row_keys(t, g0, g1, self.c, self.look_back)[:, None, :]

    def _hidden(self, g0: int, g1: int) -> Tensor | None:
        hide = None
        if self.valid is not None:
            vq, vk = self._pair(self.valid, g0, g1)
            hide = ~(vq & vk)
        if self.causal:
            tq, tk = self._pair(self.tok, g0, g1)
            gq, gk = self._pair(self.grp, g0, g1)
            sq, sk = self._pair(self.pos, g0, g1)
            h = (tk > tq) | (gk != gq) | (sk < sq - self.c)
            hide = h if hide is None else hide.logical_or_(h)
        return hide

    def _rounds_bias(self, g0: int, g1: int, base: Tensor) -> Tensor | None:
        """base - log(rounds in which each pair is visible) [n, c, w] (a fresh tensor), or
        None with one round. Non-causal: a key is in the query's chunk or look-back chunk
        of the other round iff the chunk difference d is 0 or 1, i.e. |d - 1/2| <= 1/2 (one
        subtraction, abs and compare over the [n, c, w] slice)."""
        if not self.others:
            return None
        count = None
        for where, grp in self.others:
            aq, ak = self._pair(where, g0, g1)
            if self.causal:
                gq, gk = self._pair(grp, g0, g1)
                hit = (gq == gk) & (ak <= aq) & (ak >= aq - self.c)
            elif self.look_back:
                hit = ((aq - 0.5) - ak).abs_().le(0.5)
            else:
                hit = aq == ak
            if len(self.others) == 1:  # two rounds: seen in one or both
                return torch.where(hit, self.base(base.dtype, base.device, 2), base)
            count = hit.to(base.dtype) if count is None else count.add_(hit)
        return count.add_(1.0).log_().neg_().add_(base)


def _slice_keys(x: Tensor, g0: int, g1: int, c: int, look_back: bool) -> Tensor:
    """Keys of groups g0:g1 from the flat sorted rows x [G * c, D]: [g1 - g0, 1, w, D]
    (:func:`_row_keys`: with look-back, group g sees rows (g - 1) c .. (g + 1) c as a
    zero-copy view; the first group's missing look-back rows are always masked)."""
    return _row_keys(x, g0, g1, c, look_back)[:, None]


class _SortedRounds(torch.autograd.Function):
    """R rounds of chunk attention in sorted orders, merged by log-sum-exp.

    Inputs in sorted-chunk layout: q, k [B, H, R, C, c, D], v [.., Dv]; vis: the
    :class:`ChunkVisibility` of the layout (masks built per slice of chunks); unsort:
    int64 [B * H * R * Np] rows of the sorted layout in token order. Returns the merged
    output [B, H, Np, Dv] and log-sum-exp [B, H, Np] (-inf where no round sees a key; not
    differentiable) in token order.

    PyTorch's fused CPU flash kernel does the chunks, a bounded slice of them per
    call (look-back keys as zero-copy views). The backward calls its backward with
    the *merged* output and log-sum-exp of each query: that is the exact gradient of
    one softmax over the union of the rounds' keys, so no gradient through the
    per-round lse is needed.
    """

    @staticmethod
    def forward(ctx, q, k, v, vis, unsort, scale):
        B, H, R, C, c, D = q.shape
        Dv = v.shape[-1]
        Np = C * c
        G = B * H * R * C
        qf, kf, vf = q.reshape(G, 1, c, D), k.reshape(G * c, D), v.reshape(G * c, Dv)
        o = q.new_empty(G, c, Dv)
        l = None
        step = max(1, _FLASH_SLICE // (c * vis.w))
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            bias, empty = vis.bias(g0, g1, q.dtype, q.device)
            os_, ls = _flash(qf[g0:g1], _slice_keys(kf, g0, g1, c, vis.look_back),
                             _slice_keys(vf, g0, g1, c, vis.look_back), 0.0, False, attn_mask=bias, scale=scale)
            if l is None:
                l = ls.new_empty(G, c)
            o[g0:g1] = os_[:, 0]
            l[g0:g1] = ls[:, 0]
            if empty is not None:
                l[g0:g1].masked_fill_(empty, float("-inf"))  # rows with no key
        ctx.lse_dtype = l.dtype
        l = l.to(q.dtype)
        outs = o.reshape(-1, Dv).index_select(0, unsort).reshape(B, H, R, Np, Dv)
        lses = l.reshape(-1).index_select(0, unsort).reshape(B, H, R, Np)
        del o, l
        out, lse = merge_by_lse(outs, lses, dim=2)
        ctx.save_for_backward(q, k, v, unsort, out, lse)
        ctx.scale, ctx.vis = scale, vis
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, g_out, _g_lse):
        q, k, v, unsort, out, lse = ctx.saved_tensors
        vis = ctx.vis
        B, H, R, C, c, D = q.shape
        Dv = v.shape[-1]
        Np = C * c
        G = B * H * R * C
        look_back = vis.look_back
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
        dq = torch.empty(G, c, D, dtype=q.dtype, device=q.device)
        dk = torch.zeros(G * c, D, dtype=k.dtype, device=k.device)
        dv = torch.zeros(G * c, Dv, dtype=v.dtype, device=v.device)
        step = max(1, _FLASH_SLICE // (c * vis.w))
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            dqs, dks, dvs = _flash_bwd(
                gs[g0:g1], qf[g0:g1], _slice_keys(kf, g0, g1, c, look_back),
                _slice_keys(vf, g0, g1, c, look_back), os_[g0:g1], ls[g0:g1], 0.0, False,
                attn_mask=vis.bias(g0, g1, q.dtype, q.device)[0], scale=ctx.scale,
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
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), None, None, None


@torch.no_grad()
def _sort_tokens(group: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Order the tokens of each round by (group, position).

    group: int64 [B, H, R, Np]; valid: bool [B, Np]. Invalid (padded) tokens go into one
    last group, sorted after every real token. Returns (that group, perm: the token at
    each slot, slot: each token's slot, both [B, H, R, Np], rows: flat rows of a
    [B * H * Np] token layout in sorted order [B * H * R * Np], unsort: rows of the
    sorted [B * H * R * Np] layout back in token order). Cost O(R N log N)."""
    B, H, R, Np = group.shape
    dev = group.device
    n_groups = int(group.max().item()) + 1 if group.numel() else 1
    group = torch.where(valid[:, None, None, :], group, n_groups)
    pos = torch.arange(Np, device=dev)
    perm = torch.argsort(group * Np + pos, dim=-1)  # [B, H, R, Np] token at slot
    slot = torch.empty_like(perm)
    slot.scatter_(-1, perm, pos.expand_as(perm))  # slot of token
    base = (torch.arange(B * H, device=dev) * Np).reshape(B, H, 1, 1)
    rows = (perm + base).reshape(-1)
    base_r = (torch.arange(B * H * R, device=dev) * Np).reshape(B, H, R, 1)
    unsort = (slot + base_r).reshape(-1)
    return group, perm, slot, rows, unsort


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
        group, perm, slot, rows, unsort = _sort_tokens(group, valid)

    qs = q.reshape(-1, D).index_select(0, rows).reshape(B, H, R, C, chunk, D)
    ks = k.reshape(-1, D).index_select(0, rows).reshape(B, H, R, C, chunk, D)
    vs = v.reshape(-1, Dv).index_select(0, rows).reshape(B, H, R, C, chunk, Dv)

    use_lb = look_back or causal
    with torch.no_grad():
        vis = ChunkVisibility(perm, slot, group, None if key_valid is None and not pad else valid,
                              chunk=chunk, causal=causal, look_back=use_lb, exclude_self=exclude_self,
                              dedup=dedup and R > 1)
    if _flash_ok(q):
        out, lse = _SortedRounds.apply(qs, ks, vs, vis, unsort, scale)
        return out[:, :, :N], lse[:, :, :N]
    with torch.no_grad():
        bias = vis.bias(0, B * H * R * C, q.dtype, dev)[0].reshape(B, H, R, C, chunk, vis.w)
    out, lse = chunk_attention(qs, ks, vs, bias, scale, look_back=use_lb)
    out = out.reshape(B, H, R, Np, Dv)
    lse = lse.reshape(B, H, R, Np)
    # back to token order, then merge the rounds
    out = out.reshape(-1, Dv).index_select(0, unsort).reshape(B, H, R, Np, Dv)
    lse = lse.reshape(-1).index_select(0, unsort).reshape(B, H, R, Np)
    out, lse = merge_by_lse(out, lse, dim=2)
    return out[:, :, :N], lse[:, :, :N]


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
