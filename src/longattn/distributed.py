"""Sequence parallelism: one sequence split over the ranks of a torch.distributed group.

    >>> # under torchrun (or any initialised process group), rank r holding positions
    >>> # [r*n, (r+1)*n) of q, k, v as [B, H, n, D]:
    >>> out = longattn.distributed.attention(q, k, v, "local", before=256, after=256)

``out`` is rank r's shard of ``longattn.attention`` over the whole sequence (to
rounding), and gradients flow back through every exchange: each exchange is a
``torch.autograd.Function`` whose backward sends the gradients back the reverse way,
so the gradient of every shard equals the single-process one.

What travels (per rank, per call; docs/design.md section 8):

- exact patterns (``local``, ``dilated``, ``strided``, ``global``, ``random``,
  ``bigbird``, ``longformer``, ``block_diagonal``, ``sparse_transformer_*``,
  ``pattern``): the rank asks the owners for exactly the key positions its queries can
  see (:func:`longattn.ops.blocksparse.needed_keys`: a halo for windows, the global
  columns, the few strided or random blocks) and receives those K/V rows and padding
  bits by one ``all_to_all_single``; the backward returns the key gradients by the
  reverse ``all_to_all_single``. The exact engine then runs on the shard's queries
  over the compact keys (``pattern_attention(..., n=N, q_start=r*n, k_positions=...)``).
- ``full``: ring attention. K/V blocks go round the ring (isend/irecv of the next block
  overlapping the computation of the current one); each block gives a partial output
  and its log-sum-exp, merged in fp32 at least. The backward recomputes each block
  with the merged output and lse (flash-style) and the K/V gradient accumulators travel
  with their blocks back to their owners.
  Causal: a block after the rank's own is fully masked, so it is neither computed nor
  sent: block j travels only along ranks j+1 .. P-1 (about half the traffic of the
  non-causal ring), and in the backward rank P-1 sends each finished accumulator
  straight to its owner instead of round the rest of the ring. The work is *not*
  rebalanced (rank r computes r + 1 blocks): the API fixes contiguous shards, and a
  zigzag layout would need the shards re-dealt; the time of causal ring attention is
  therefore that of the last rank, about P/2 times less than one process, not P.
- ``linear`` / ``performer``: per-rank state sums S = sum phi(k) [v, 1]^T (referenced
  to the rank's max key log-scale for FAVOR+), combined by ``all_reduce`` (non-causal)
  or by an ``all_gather`` of the per-rank totals and an exclusive prefix over the ranks
  before this one (causal), which then seeds the rank's chunked causal prefix sums.
  O(F Dv) bytes per rank, independent of N.
- the recurrent family (``gated_delta``, ``kda``, ``ssd``, ``gla``, ``retention``;
  causal only): a shard's state map is affine in the state entering it, S_out =
  M_r S_in + T_r; each rank computes its (T_r, M_r) in one chunked pass, they are
  all-gathered (O(P Dk (Dk + Dv)) bytes per head, independent of N) and rank r
  composes those of the ranks before it into its entering state, then runs its shard
  from it. The per-token gates (``g``, ``beta``) are given as the rank's shard, like q.

Every exchange adds its bytes to a per-process counter: :func:`comm_stats` /
:func:`reset_comm_stats`. Counted are the bytes this rank sends to and receives from
*other* ranks (its own rows are not counted); for ``all_reduce`` the 2 (P-1)/P x size
of a ring all-reduce, for ``all_gather`` (P-1) x size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.ops._checks import check_qkv, default_scale

__all__ = ["attention", "supported", "comm_stats", "reset_comm_stats", "shard", "unshard"]

PATTERN_MECHANISMS = (
    "local", "dilated", "strided", "global", "random", "bigbird", "longformer",
    "block_diagonal", "sparse_transformer_strided", "sparse_transformer_fixed", "pattern",
)
KERNEL_MECHANISMS = ("linear", "performer")
RING_MECHANISMS = ("full",)
RECURRENT_MECHANISMS = ("gated_delta", "kda", "ssd", "gla", "retention")
_SHARDED_PARAMS = ("g", "beta")  # per-token gates of the recurrent family: each rank gives its shard


def supported() -> tuple[str, ...]:
    """The mechanism names :func:`attention` accepts."""
    return PATTERN_MECHANISMS + RING_MECHANISMS + KERNEL_MECHANISMS + RECURRENT_MECHANISMS


# ----------------------------------------------------------------------------------------
# Counters and group helpers
# ----------------------------------------------------------------------------------------

_STATS = {"sent": 0, "received": 0, "messages": 0}


def comm_stats() -> dict[str, int]:
    """Bytes this process sent to / received from other ranks since the last reset."""
    return dict(_STATS)


def reset_comm_stats() -> None:
    for key in _STATS:
        _STATS[key] = 0


def _count(sent: int, received: int) -> None:
    _STATS["sent"] += int(sent)
    _STATS["received"] += int(received)
    _STATS["messages"] += 1


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, r: int) -> int:
    """Global rank of group rank r (point-to-point ops take global ranks)."""
    if group is None or group is dist.group.WORLD:
        return r
    return dist.get_global_rank(group, r)


def shard(x: Tensor, rank: int, world: int, dim: int = 2) -> Tensor:
    """Rank ``rank``'s contiguous shard of ``x`` along ``dim`` (length divisible by world)."""
    n = x.shape[dim]
    if n % world:
        raise ValueError(f"length {n} along dim {dim} is not divisible by the world size {world}")
    return x.narrow(dim, rank * (n // world), n // world)


def unshard(x: Tensor, group=None, dim: int = 2) -> Tensor:
    """The whole sequence from every rank's shard (all_gather, no gradient; for checks)."""
    _, P = _rank_size(group)
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


# ----------------------------------------------------------------------------------------
# Differentiable collectives
# ----------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x. Backward: the gradient of x is the sum over ranks of dy."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        _, P = _rank_size(group)
        b = 2 * (P - 1) * _nbytes(y) // max(P, 1)
        _count(b, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        g = dy.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        _, P = _rank_size(ctx.group)
        b = 2 * (P - 1) * _nbytes(g) // max(P, 1)
        _count(b, b)
        return g, None


class _AllGather(torch.autograd.Function):
    """[P, *x.shape]: every rank's x. Backward: rank r's x gets the sum over ranks of dy[r]."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        r, P = _rank_size(group)
        ctx.rank = r
        x = x.contiguous()
        out = x.new_empty((P, *x.shape))
        dist.all_gather(list(out.unbind(0)), x, group=group)
        _count((P - 1) * _nbytes(x), (P - 1) * _nbytes(x))
        return out

    @staticmethod
    def backward(ctx, dy):
        g = dy.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        _, P = _rank_size(ctx.group)
        b = 2 * (P - 1) * _nbytes(g) // max(P, 1)
        _count(b, b)
        return g[ctx.rank], None


def _all_to_all_rows(x: Tensor, send_counts: list[int], recv_counts: list[int], rank: int, group) -> Tensor:
    """all_to_all_single along dim 0 (x already ordered by destination rank)."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    row = _nbytes(x[:1]) if x.shape[0] else _nbytes(out[:1]) if out.shape[0] else 0
    _count(row * (sum(send_counts) - send_counts[rank]), row * (sum(recv_counts) - recv_counts[rank]))
    return out


class _FetchRows(torch.autograd.Function):
    """Rows of other ranks' shards: x [B, H, n, E] local -> [B, H, R, E] fetched rows.

    ``send_idx``: local rows to send, grouped by destination rank (``send_counts``);
    the result holds ``recv_counts[s]`` rows from each source s in rank order.
    Backward: the reverse all_to_all, then the returned gradients are added into the
    rows that were sent (a row sent to several ranks collects every contribution)."""

    @staticmethod
    def forward(ctx, x, send_idx, send_counts, recv_counts, rank, group):
        ctx.save_for_backward(send_idx)
        ctx.meta = (x.shape, send_counts, recv_counts, rank, group)
        rows = x.index_select(2, send_idx).permute(2, 0, 1, 3)  # [S, B, H, E]
        got = _all_to_all_rows(rows, send_counts, recv_counts, rank, group)
        return got.permute(1, 2, 0, 3).contiguous()

    @staticmethod
    def backward(ctx, dy):
        (send_idx,) = ctx.saved_tensors
        shape, send_counts, recv_counts, rank, group = ctx.meta
        back = _all_to_all_rows(dy.permute(2, 0, 1, 3), recv_counts, send_counts, rank, group)
        dx = dy.new_zeros(shape)
        dx.index_add_(2, send_idx, back.permute(1, 2, 0, 3))
        return dx, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------


_DIGEST_MAX = 1 << 20  # tensor parameters up to this many bytes are compared by content


def _describe(x: Any) -> str:
    """A description of a parameter value that is equal on two ranks exactly when the
    values are: repr of plain values and value-printing objects (patterns); dtype,
    shape and a content digest of tensors (up to ``_DIGEST_MAX`` bytes); the type name
    where repr would show an address (callables: compared by kind only)."""
    if isinstance(x, Tensor):
        data = x.detach().cpu().contiguous().reshape(-1)
        size = data.numel() * data.element_size()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest() \
            if size <= _DIGEST_MAX else f"{size} bytes"
        return f"tensor({data.dtype}, {tuple(x.shape)}, {digest})"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_describe(v) for v in x)
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    text = repr(x)
    return type(x).__qualname__ if " at 0x" in text else text


def _fingerprint(mechanism: Any, causal: Any, scale: Any, params: dict[str, Any], q: Any, k: Any, v: Any,
                 kpm: Any) -> dict[str, str]:
    """What every rank of one :func:`attention` call must agree on, field by field
    (shapes are compared by :func:`_check_shards`)."""
    def kind(t: Any) -> str:
        return f"{t.dtype} on {t.device.type}" if isinstance(t, Tensor) else type(t).__name__

    fp = {"mechanism": repr(mechanism), "causal": repr(causal), "scale": repr(scale),
          "q, k, v dtypes": ", ".join(kind(t) for t in (q, k, v)),
          "key_padding_mask": "None" if kpm is None else f"{kind(kpm)} {tuple(getattr(kpm, 'shape', ()))}"}
    sharded = _SHARDED_PARAMS if mechanism in RECURRENT_MECHANISMS else ()
    fp.update((f"parameter {name}", kind(params[name]) + f" {tuple(params[name].shape)}"
               if name in sharded and isinstance(params[name], Tensor) else _describe(params[name]))
              for name in sorted(params))
    return fp


def _digest(fp: dict[str, str]) -> int:
    """A process-independent int64 hash of a fingerprint (Python's hash() is salted)."""
    raw = hashlib.blake2b(repr(sorted(fp.items())).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def _disagreement(fp: dict[str, str], group) -> str:
    """Every field on which the ranks' fingerprints differ, with its value per rank
    (one ``all_gather_object``: only on the error path)."""
    every: list[dict[str, str]] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(every, fp, group=group)
    lines = []
    for key in sorted(set().union(*every), key=lambda x: (x.startswith("parameter"), x)):
        vals = [f.get(key, "(not given)") for f in every]
        if len(set(vals)) > 1:
            by = {val: [r for r, w in enumerate(vals) if w == val] for val in dict.fromkeys(vals)}
            lines.append(f"{key}: " + "; ".join(f"rank{'s' if len(rs) > 1 else ''} "
                                                 f"{', '.join(map(str, rs))}: {val}" for val, rs in by.items()))
    return "\n  ".join(lines)


def _dims(x: Any) -> list[int]:
    """[B, H, n, D] of a 4-d tensor; -1 where ``x`` has no such dimension."""
    return list(x.shape) if isinstance(x, Tensor) and x.dim() == 4 else [-1] * 4


def _check_shards(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, group,
                  fp: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world, shard length); ValueError on every rank when the shards, or the
    fingerprints ``fp`` of the call (see :func:`_fingerprint`), differ between ranks.
    One ``all_gather`` of a few int64 per rank, before any other exchange, so that a
    rank with another dtype or mechanism cannot abort or hang the others."""
    r, P = _rank_size(group)
    (B, H, n, D), (_, _, nk, _), (_, _, _, Dv) = _dims(q), _dims(k), _dims(v)
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    mine = torch.tensor([n, nk, B, H, D, Dv, int(kpm is not None), _digest(fp or {})],
                        dtype=torch.long, device=device)
    every = torch.empty(P, mine.numel(), dtype=torch.long, device=device)
    dist.all_gather(list(every.unbind(0)), mine, group=group)
    every = every.cpu()
    if (every[:, 7] != every[0, 7]).any():
        raise ValueError(
            "longattn.distributed.attention: the ranks of the group disagree on\n  "
            f"{_disagreement(fp or {}, group)}\nevery rank must call it with the same mechanism, "
            "parameters, causal, scale and dtypes"
        )
    lengths = every[:, 0].tolist()
    if len(set(lengths)) != 1 or (every[:, 1] != every[:, 0]).any():
        raise ValueError(
            f"longattn.distributed.attention needs equal shards of q, k and v on every rank: "
            f"q lengths per rank {lengths}, k lengths per rank {every[:, 1].tolist()}"
        )
    if (every[:, 2:7] != every[0, 2:7]).any():
        raise ValueError(
            "every rank must hold the same B, H, D, Dv and key_padding_mask presence; got "
            f"[B, H, D, Dv, mask] per rank {every[:, 2:7].tolist()}"
        )
    return r, P, n


# ----------------------------------------------------------------------------------------
# Exact patterns: fetch the visible keys, run the exact engine on the shard
# ----------------------------------------------------------------------------------------

_PLAN_CACHE: dict[tuple, tuple] = {}


def _resolve_pattern(mechanism: str, params: dict[str, Any]):
    from longattn import registry
    from longattn.ops.sparse import with_globals

    params = dict(params)
    backend = params.pop("backend", "auto")
    if backend not in ("auto", "engine"):
        raise ValueError(f"distributed pattern attention runs the exact engine: backend must be 'auto' or "
                         f"'engine', got {backend!r}")
    if mechanism == "pattern":
        from longattn.patterns import Pattern

        if set(params) != {"pattern"}:
            raise TypeError(f"mechanism 'pattern' takes exactly pattern=..., got {sorted(params)}")
        pat = params["pattern"]
        if not isinstance(pat, Pattern):
            raise TypeError(f"pattern must be a longattn.patterns.Pattern, got {type(pat).__name__}")
        return pat
    spec = registry.get(mechanism)
    spec.check_params(params)
    full = {k: v for k, v in {**spec.defaults(), **params}.items() if k != "backend"}
    name = spec.pattern or mechanism
    gparam = spec.global_param or "global_idx"
    gidx = full.pop(gparam, ())
    return with_globals(name, gidx, **full)


def _fetch_plan(pattern, N: int, H: int, causal: bool, r: int, P: int, n: int, group, device):
    """(needed positions, send_idx, send_counts, recv_counts), cached per shard."""
    key = (id(pattern), N, H, causal, r, P, id(group), str(device))
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0] is pattern:
        return hit[1:]
    from longattn.ops.blocksparse import needed_keys

    needed = needed_keys(pattern, N, H, causal=causal, q_start=r * n, q_stop=(r + 1) * n).to(torch.long)
    # the shard's own rows are always present (they cost no communication, and the engine
    # wants at least as many keys as queries)
    needed = torch.unique(torch.cat([needed, torch.arange(r * n, (r + 1) * n)]))
    owner = torch.div(needed, n, rounding_mode="floor")
    recv_counts = torch.bincount(owner, minlength=P)
    counts = recv_counts.to(device)
    send = torch.empty_like(counts)
    dist.all_to_all_single(send, counts, group=group)  # how many rows each rank asks of me
    send_counts = send.cpu().tolist()
    recv_counts = recv_counts.tolist()
    ask = _all_to_all_rows(needed.to(device), recv_counts, send_counts, r, group)  # positions asked of me
    send_idx = (ask - r * n).to(device)
    if len(_PLAN_CACHE) > 256:
        _PLAN_CACHE.clear()
    val = (needed.to(device), send_idx, send_counts, recv_counts)
    _PLAN_CACHE[key] = (pattern, *val)
    return val


def _pattern_sharded(q, k, v, pattern, causal, kpm, scale, r, P, n, group):
    from longattn.ops.blocksparse import pattern_attention

    B, H, _, D = q.shape
    N = n * P
    needed, send_idx, send_counts, recv_counts = _fetch_plan(pattern, N, H, causal, r, P, n, group, q.device)
    kv = _FetchRows.apply(torch.cat([k, v], -1), send_idx, send_counts, recv_counts, r, group)
    kf, vf = kv[..., :D], kv[..., D:]
    mf = None
    if kpm is not None:
        bits = kpm.to(torch.uint8).T.contiguous()[send_idx]  # [S, B]
        mf = _all_to_all_rows(bits, send_counts, recv_counts, r, group).T.bool()
    return pattern_attention(q, kf, vf, pattern, causal=causal, key_padding_mask=mf, scale=scale,
                             n=N, q_start=r * n, k_positions=needed)


# ----------------------------------------------------------------------------------------
# Full attention: the ring
# ----------------------------------------------------------------------------------------

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_MATH_ROWS = 1 << 22  # score elements per query chunk of the math kernels (devices without flash)
#: use the plain-tensor block kernels on the CPU too (what other devices run; for tests)
FORCE_MATH = False


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


class _P2P:
    """Posted point-to-point operations of one ring step (counted when posted)."""

    def __init__(self, group) -> None:
        self.group = group
        self.works: list = []

    def send(self, t: Tensor, dst: int, tag: int) -> None:
        self.works.append(dist.isend(t, _peer(self.group, dst), group=self.group, tag=tag))
        _count(_nbytes(t), 0)

    def recv(self, t: Tensor, src: int, tag: int) -> Tensor:
        self.works.append(dist.irecv(t, _peer(self.group, src), group=self.group, tag=tag))
        _count(0, _nbytes(t))
        return t

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


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


_TAG_HOME = 1 << 20
_TAG_LAST = 1 << 21


# ----------------------------------------------------------------------------------------
# Kernel (linear) attention: O(state) exchanges
# ----------------------------------------------------------------------------------------

_NEG = -1e30  # finite "minus infinity" for log-scale maxima (exp(_NEG - x) == 0, no NaN)
_FAVOR: dict[tuple, Any] = {}
_SEG = 1 << 22  # feature elements per segment of the causal pass


def _feature_map(mechanism: str, params: dict[str, Any], D: int):
    from longattn import registry
    from longattn.ops import kernel as K

    spec = registry.get(mechanism)
    spec.check_params(params)
    full = {**spec.defaults(), **params}
    chunk = full["chunk_size"]
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk!r}")
    if mechanism == "linear":
        return K.resolve_feature_map(full["feature_map"], D), chunk
    if full["redraw_interval"] is not None:
        raise ValueError(f"redraw_interval={full['redraw_interval']!r} needs the module form; "
                         "the functional form draws its features from seed")
    if full["projection"] is not None:
        return K.FavorFeatureMap(D, projection=full["projection"]), chunk
    key = (D, full["num_features"], full["seed"], bool(full["orthogonal"]))
    fm = _FAVOR.get(key)
    if fm is None:  # the same draw as the single-process call: the features depend on the seed only
        fm = _FAVOR[key] = K.FavorFeatureMap(D, full["num_features"], orthogonal=bool(full["orthogonal"]),
                                             seed=full["seed"])
    return fm, chunk


def _kernel_features(fmap, q, k, v, kpm, scale):
    """(fq, fk, sk | None, va = [v, 1] with padded keys zeroed), in the working dtype."""
    D = q.shape[-1]
    work = _acc(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    s = scale if scale is not None else fmap.default_scale(D)
    r = math.sqrt(s) if s is not None and s != 1.0 else None
    fq, _ = fmap.scaled(q, r, is_query=True)
    fk, sk = fmap.scaled(k, r, is_query=False)
    va = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    if kpm is not None:
        real = kpm[:, None, :, None]
        fk = fk.masked_fill(~real, 0.0)
        va = va.masked_fill(~real, 0.0)
        if sk is not None:
            sk = sk.masked_fill(~kpm[:, None, :], _NEG)
    return fq, fk, sk, va


def _ratio(o: Tensor) -> Tensor:
    num, den = o[..., :-1], o[..., -1:]
    zero = den == 0
    return (num / den.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)


def _state(fk: Tensor, sk: Tensor | None, va: Tensor, m: Tensor | None) -> Tensor:
    """sum_j phi(k_j) [v_j, 1]^T, referenced to exp(m) when the map has log-scales."""
    if sk is None:
        return torch.matmul(fk.transpose(-1, -2), va)
    return torch.matmul(fk.transpose(-1, -2), va * torch.exp(sk - m[..., None])[..., None])


def _causal_local(fq, fk, sk, va, C, S0, m0):
    """Causal kernel attention of a shard given the state S0 (referenced to m0) of every
    earlier position: chunks of C rows, a masked C x C product inside a chunk and the
    running state across chunks. Returns (numerator|normaliser [B,H,n,E], S, m)."""
    B, H, n, Fd = fq.shape
    E = va.shape[-1]
    C = max(1, min(C, n))
    nc = -(-n // C)
    pad = nc * C - n
    if pad:
        fq = torch.nn.functional.pad(fq, (0, 0, 0, pad))
        fk = torch.nn.functional.pad(fk, (0, 0, 0, pad))
        va = torch.nn.functional.pad(va, (0, 0, 0, pad))
        if sk is not None:
            sk = torch.nn.functional.pad(sk, (0, pad), value=_NEG)
    fq_c, fk_c, va_c = fq.view(B, H, nc, C, Fd), fk.view(B, H, nc, C, Fd), va.view(B, H, nc, C, E)
    tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    p = torch.matmul(fq_c, fk_c.transpose(-1, -2))  # [B, H, nc, C, C]
    if sk is None:
        u = torch.matmul(fk_c.transpose(-1, -2), va_c)  # [B, H, nc, F, E]
        before = torch.cumsum(torch.cat([S0[:, :, None], u[:, :, :-1]], 2), 2)
        out = torch.matmul(p.masked_fill(~tril, 0.0), va_c) + torch.matmul(fq_c, before)
        return out.reshape(B, H, nc * C, E)[:, :, :n], before[:, :, -1] + u[:, :, -1], None
    anchor = sk.detach()  # reference points cancel in the ratio: no gradient through them
    Mi = torch.maximum(torch.cummax(anchor, -1).values, m0[..., None]).view(B, H, nc, C)
    sk_c = sk.view(B, H, nc, C)
    w = torch.exp((sk_c[:, :, :, None, :] - Mi[..., None]).masked_fill(~tril, float("-inf")))
    out = torch.matmul(p * w, va_c)
    m_after = torch.maximum(torch.cummax(anchor.view(B, H, nc, C).amax(-1), -1).values, m0[..., None])
    m_before = torch.cat([m0[..., None], m_after[..., :-1]], -1)
    u = torch.matmul(fk_c.transpose(-1, -2), va_c * torch.exp(sk_c - m_after[..., None])[..., None])
    decay = torch.exp(m_before - m_after)
    states, S = [], S0
    for u_c, a_c in zip(u.unbind(2), decay.unbind(2)):
        states.append(S)
        S = S * a_c[..., None, None] + u_c
    before = torch.stack(states, 2)
    out = out + torch.matmul(fq_c, before) * torch.exp(m_before[..., None] - Mi)[..., None]
    return out.reshape(B, H, nc * C, E)[:, :, :n], S, m_after[..., -1]


def _kernel_sharded(q, k, v, fmap, chunk, causal, kpm, scale, r, P, group):
    fq, fk, sk, va = _kernel_features(fmap, q, k, v, kpm, scale)
    B, H, n, Fd = fq.shape
    E = va.shape[-1]
    m_loc = None if sk is None else sk.detach().amax(-1)  # [B, H]
    if not causal:
        m = None
        if m_loc is not None:
            m = m_loc.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            _count(_nbytes(m), _nbytes(m))
        S = _AllReduceSum.apply(_state(fk, sk, va, m), group)
        return _ratio(torch.matmul(fq, S)).to(q.dtype)
    T = _state(fk, sk, va, m_loc)  # this rank's total, referenced to its own max
    # [r, B, H, F, E]: the ranks before this one. Rank 0 sums an empty slice: its state
    # still hangs off the gather, so every rank runs the gather's backward collective
    Ts = _AllGather.apply(T, group)[:r]
    if m_loc is None:
        S0, m0 = Ts.sum(0), None
    else:
        ms = torch.empty((P, *m_loc.shape), dtype=m_loc.dtype, device=m_loc.device)
        dist.all_gather(list(ms.unbind(0)), m_loc.contiguous(), group=group)
        _count((P - 1) * _nbytes(m_loc), (P - 1) * _nbytes(m_loc))
        m0 = ms[:r].amax(0) if r else m_loc.new_full(m_loc.shape, _NEG)
        S0 = (Ts * torch.exp(ms[:r] - m0)[..., None, None]).sum(0)
    rows = max(chunk, (_SEG // max(1, B * H * Fd)) // chunk * chunk)
    outs = []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        o, S0, m0 = _causal_local(fq[:, :, a:b], fk[:, :, a:b], None if sk is None else sk[:, :, a:b],
                                  va[:, :, a:b], chunk, S0, m0)
        outs.append(_ratio(o))
    return torch.cat(outs, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------
# Recurrent family (gated_delta, kda, ssd, gla, retention): the state passes along the ranks
# ----------------------------------------------------------------------------------------


def _recurrent_gates(mechanism: str, params: dict[str, Any], q: Tensor,
                     kpm: Tensor | None) -> tuple[Any, Tensor, Tensor | None, int, bool]:
    """(kind, g, beta, chunk_size, use_qk_l2norm) of a recurrent mechanism's functional form
    on this rank's shard: g, beta are the shard's rows [B, H, n(, D)] (defaults: no decay,
    beta = 1; retention's g from ``gamma``), zeroed at padded keys as the module form does."""
    from longattn import registry
    from longattn.ops.recurrent.api import KINDS, _retention_g

    spec = registry.get(mechanism)
    spec.check_params(params)
    full = {**spec.defaults(), **params}
    kind = KINDS[mechanism]
    B, H, n, D = q.shape
    if "gamma" in full:
        g = _retention_g(full["gamma"], B, H, n, q)
    else:
        g = full.get("g")
        g = q.new_zeros((B, H, n, D) if kind.per_channel else (B, H, n)) if g is None else g
    beta = (q.new_ones(B, H, n) if full.get("beta") is None else full["beta"]) if kind.delta else None
    if kpm is not None:
        real = kpm[:, None, :].to(g.dtype)
        g = g * (real[..., None] if kind.per_channel else real)
        beta = None if beta is None else beta * real
    norm = full.get("use_qk_l2norm")
    return kind, g, beta, full["chunk_size"], kind.delta if norm is None else bool(norm)


def _recurrent_sharded(q: Tensor, k: Tensor, v: Tensor, mechanism: str, params: dict[str, Any],
                       kpm: Tensor | None, scale: float | None, r: int, P: int, group: Any) -> Tensor:
    """Rank r's shard of a recurrent mechanism (causal). The state map of a shard is
    affine in the state entering it, S_out = M_r S_in + T_r (M_r [Dk, Dk]: the decays
    and the delta rule's I - beta k kᵀ act on the left): one chunked pass over
    [v, 0] from [0, I] gives [T_r, M_r] together (the state's columns evolve
    independently); the (T, M) of every rank are all-gathered (O(P Dk (Dk + Dv)) bytes,
    independent of n), rank r composes those of ranks < r into its entering state and
    runs its shard from it. Gradients flow back through the gather and both passes.
    Cost: two chunked passes over the shard (O(n C D + n D^2) each, the first with
    Dv + Dk value columns) and O(r Dk^2 Dv) to compose."""
    from longattn.ops.recurrent.api import _run

    kind, g, beta, chunk, norm = _recurrent_gates(mechanism, params, q, kpm)
    if kpm is not None:
        real = kpm[:, None, :, None]
        k, v = k * real.to(k.dtype), v * real.to(v.dtype)
    B, H, n, Dk = q.shape
    Dv = v.shape[-1]

    def run(vv: Tensor, s0: Tensor | None) -> tuple[Tensor, Tensor]:
        return _run(kind, q, k, vv, g, beta, scale=scale, initial_state=s0, output_final_state=True,
                    use_qk_l2norm=norm, segment_ids=None, chunk_size=chunk)

    work = _acc(q.dtype)
    eye = torch.eye(Dk, dtype=work, device=q.device).expand(B, H, Dk, Dk)
    _, TM = run(torch.cat([v, v.new_zeros(B, H, n, Dk)], -1),
                torch.cat([eye.new_zeros(B, H, Dk, Dv), eye], -1))
    # [r, B, H, Dk, Dv + Dk]; every rank's state hangs off the gather (rank 0's as zeros),
    # so every rank runs the gather's backward collective
    before = _AllGather.apply(TM, group)[:r]
    S = before.sum(0)[..., :Dv] * 0.0
    for j in range(r):
        S = torch.matmul(before[j, ..., Dv:], S) + before[j, ..., :Dv]
    out, _ = run(v, S)
    return out


# ----------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------


def _check_mechanism(mechanism: Any) -> None:
    """ValueError naming ``mechanism`` unless :func:`attention` supports it."""
    if not isinstance(mechanism, str) or mechanism not in supported():
        raise ValueError(
            f"longattn.distributed.attention does not support mechanism {mechanism!r}; "
            f"supported: {', '.join(supported())}"
        )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str,
    *,
    causal: bool = False,
    group=None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    **params: Any,
) -> Tensor:
    """Rank r's shard of ``longattn.attention(Q, K, V, mechanism, ...)`` over the whole sequence.

    Args:
        q, k: [B, H, n, D], v: [B, H, n, Dv]: rank r of ``group`` holds positions
            [r*n, (r+1)*n) (equal shards on every rank; the sequence is N = n * P).
        mechanism: one of :func:`supported` (exact patterns, ``full``, ``linear``,
            ``performer``, the recurrent family: causal only, its per-token ``g`` and
            ``beta`` given as this rank's shard [B, H, n(, D)]).
        causal: query i sees key j only if j <= i (over the whole sequence).
        group: a torch.distributed process group (default: the world).
        key_padding_mask: this rank's shard [B, n] of the mask (True = a real token).
        scale: score scale (default 1/sqrt(D), as the single-process call).
        **params: the mechanism's parameters, as for ``longattn.attention``.

    Returns:
        [B, H, n, Dv]: this rank's shard of the output. Differentiable in q, k, v:
        the gradients of every shard equal those of the single-process call.

    Every rank of ``group`` must call this with the same mechanism, parameters,
    causal, scale, dtypes and shapes: the ranks compare a fingerprint of the call
    before any other exchange, and where they differ every rank raises the same
    ValueError naming the fields and the ranks.
    """
    if not dist.is_available() or not dist.is_initialized():
        _check_mechanism(mechanism)
        raise RuntimeError("longattn.distributed.attention needs an initialised torch.distributed process group")
    fp = _fingerprint(mechanism, causal, scale, params, q, k, v, key_padding_mask)
    r, P, n = _check_shards(q, k, v, key_padding_mask, group, fp)
    # the ranks agree from here on: a check that fails, fails on every rank
    _check_mechanism(mechanism)
    check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    from longattn import registry

    spec = registry.get(mechanism)
    if causal and not spec.causal:
        raise ValueError(f"mechanism {mechanism!r} cannot be causal (causal=True was given)")
    if mechanism in RECURRENT_MECHANISMS:
        if not causal:
            raise ValueError(f"mechanism {mechanism!r} is causal only (a recurrence over the past): "
                             f"call it with causal=True, got causal={causal!r}")
        return _recurrent_sharded(q, k, v, mechanism, params, key_padding_mask, scale, r, P, group)
    if mechanism in KERNEL_MECHANISMS:
        if scale is not None:
            default_scale(scale, q.shape[-1])
        fmap, chunk = _feature_map(mechanism, params, q.shape[-1])
        return _kernel_sharded(q, k, v, fmap, chunk, causal, key_padding_mask, scale, r, P, group)
    s = default_scale(scale, q.shape[-1])
    if mechanism == "full":
        spec.check_params(params)
        if params.get("bias") is not None or params.get("dropout", 0.0):
            raise ValueError("distributed 'full' attention supports neither bias nor dropout "
                             f"(got bias={'set' if params.get('bias') is not None else None}, "
                             f"dropout={params.get('dropout', 0.0)!r})")
        D, Dv = q.shape[-1], v.shape[-1]
        if D != Dv:  # the flash kernel wants one head size: zero columns change nothing
            w = max(D, Dv)
            q, k, v = (torch.nn.functional.pad(x, (0, w - x.shape[-1])) for x in (q, k, v))
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = _RingAttention.apply(q, k, v, key_padding_mask, bool(causal), s, r, P, group)
        return out[..., :Dv] if D != Dv else out
    pattern = _resolve_pattern(mechanism, params)
    return _pattern_sharded(q, k, v, pattern, bool(causal), key_padding_mask, s, r, P, n, group)


# ----------------------------------------------------------------------------------------
# Training: every rank holds a slice of every sequence
# ----------------------------------------------------------------------------------------


def check_model(model) -> None:
    """ValueError unless ``model`` (a :class:`longattn.model.Transformer`) can run sequence
    parallel: per-position heads (``lm``, ``tokens``), absolute positions added to the
    embeddings (``sinusoidal``, ``learned``, ``none``), no CLS/global prefix, every
    attention group a parameter-free mechanism of :func:`supported`."""
    from longattn.layers.attention import HeadGroup

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "embed"):
        raise ValueError("sequence parallelism needs a longattn.model.Transformer")
    if cfg.head == "classify":
        raise ValueError("sequence parallelism needs a per-position head ('lm' or 'tokens'): pooling a "
                         "sequence split over ranks is not implemented (head='classify')")
    if cfg.pos not in ("sinusoidal", "learned", "none"):
        raise ValueError(f"sequence parallelism supports pos='sinusoidal', 'learned' or 'none', got {cfg.pos!r}")
    if getattr(model, "n_prefix", 0):
        raise ValueError("sequence parallelism does not support CLS or global-token prefixes")
    for m in model.modules():
        if isinstance(m, HeadGroup):
            if m.spec.name not in supported() or m.impl is not None:
                raise ValueError(f"mechanism {m.spec.name!r} cannot run sequence parallel; supported "
                                 f"(parameter-free forms): {', '.join(supported())}")
            if getattr(m, "attn_dropout", 0.0):
                raise ValueError("sequence parallelism does not support attention dropout")


class sequence_parallel:  # noqa: N801 - used as a context manager
    """Within ``with sequence_parallel(model, group):`` the model's attention layers call
    :func:`attention` on the rank's shard and its positions start at rank * n.

    The layers reach their mechanisms through ``longattn.registry.run``, which is
    replaced for the duration of the block (and restored after, also on error); the
    model's ``embed`` is shadowed by one that adds the rank's offset. Everything else in
    the model is per position, so only attention communicates."""

    def __init__(self, model, group=None) -> None:
        check_model(model)
        self.model, self.group = model, group

    def __enter__(self):
        from longattn import registry

        self._run = registry.run
        group = self.group
        rank = dist.get_rank(group)

        self.calls = 0

        def run(spec, call, q, k, v, *, causal, key_padding_mask, segment_ids, params=None):
            self.calls += 1
            if segment_ids is not None:
                raise ValueError("sequence parallelism does not support packed documents (segment_ids)")
            H, Hkv = q.shape[1], k.shape[1]
            if Hkv != H:  # grouped KV heads: repeat them (the exchanges move H heads then)
                k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            p = dict(params or {})
            if spec.name == "full" and not p.get("dropout"):
                p.pop("dropout", None)
            return attention(q, k, v, spec.name, causal=causal, group=group, key_padding_mask=key_padding_mask, **p)

        registry.run = run
        model = self.model
        cls_embed = type(model).embed

        def embed(x, offset=0, positions=None):
            if positions is not None:
                raise ValueError("sequence parallelism does not support explicit positions")
            return cls_embed(model, x, offset + rank * x.shape[1])

        model.embed = embed
        return self

    def __exit__(self, *exc):
        from longattn import registry

        registry.run = self._run
        del self.model.embed
        return False


def sequence_parallel_loss(model, x: Tensor, mask: Tensor | None, y: Tensor, loss_fn, *, group=None,
                           ignore_index: int = -100):
    """``loss_fn(logits, y)`` on this rank's slice of every sequence of the batch.

    x [B, N] (or [B, N, in_dim]), mask [B, N] | None, y [B, N] per-position labels. The
    batch is padded to a multiple of the world size (padded positions are masked keys
    with ignored labels), rank r takes positions [r*n, (r+1)*n) of every row, and the
    model runs under :class:`sequence_parallel`. The sum over ranks of the returned loss
    (a sum over labelled items, as the trainer's) equals the single-process loss, and
    summing the parameter gradients over ranks gives the single-process gradients."""
    if not (dist.is_available() and dist.is_initialized()):  # one process: nothing to split
        check_model(model)
        return loss_fn(model(x, key_padding_mask=mask), y)
    r, P = _rank_size(group)
    B, N = x.shape[:2]
    n = -(-N // P)
    pad = n * P - N
    if pad:
        x = torch.nn.functional.pad(x, (0, pad) if x.dim() == 2 else (0, 0, 0, pad))
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        mask = torch.nn.functional.pad(mask, (0, pad), value=False)
        y = torch.nn.functional.pad(y, (0, pad), value=ignore_index)
    sl = slice(r * n, (r + 1) * n)
    with sequence_parallel(model, group) as sp:
        logits = model(x[:, sl], key_padding_mask=None if mask is None else mask[:, sl])
    if sp.calls == 0:
        raise RuntimeError("the model's attention layers did not go through longattn.registry.run: "
                           "sequence parallelism cannot reach them")
    return loss_fn(logits, y[:, sl])
