"""Communication: byte counters, group helpers and differentiable collectives.

Every exchange adds its bytes to a per-process counter (:func:`comm_stats`,
:func:`reset_comm_stats`): the bytes this rank sends to and receives from *other*
ranks; for ``all_reduce`` the 2 (P-1)/P x size of a ring all-reduce, for
``all_gather`` (P-1) x size. Each collective here is a ``torch.autograd.Function``
whose backward sends the gradients back the reverse way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

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


def _summed(x: Tensor, group) -> Tensor:
    """The sum over the ranks of ``group`` of ``x`` (a fresh tensor, by ``all_reduce``),
    counted in :func:`comm_stats` as a ring all-reduce moves it: 2 (P - 1) / P bytes of x."""
    y = x.contiguous().clone()
    dist.all_reduce(y, group=group)
    _, P = _rank_size(group)
    b = 2 * (P - 1) * _nbytes(y) // max(P, 1)
    _count(b, b)
    return y


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x. Backward: the gradient of x is the sum over ranks of dy."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _summed(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _summed(dy, ctx.group), None


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
        return _summed(dy, ctx.group)[ctx.rank], None


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

