"""Training: every rank holds a slice of every sequence.

:class:`sequence_parallel` runs a :class:`longattn.model.Transformer` on the rank's
slice (its attention routed to :func:`longattn.distributed.attention`, its positions
offset by the rank), and :func:`sequence_parallel_loss` gives the rank's share of a
loss whose sum over ranks, and the sum of whose gradients, equal the single process.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from longattn.distributed.api import attention
from longattn.distributed.comms import _rank_size
from longattn.distributed.mechanisms import supported


def check_model(model: nn.Module) -> None:
    """ValueError unless ``model`` (a :class:`longattn.model.Transformer`) can run sequence
    parallel: per-position heads (``lm``, ``tokens``), absolute positions added to the
    embeddings (``sinusoidal``, ``learned``, ``none``), no CLS/global prefix, every
    attention group a parameter-free mechanism of :func:`supported`."""
    from longattn.layers.attention import HeadGroup
    from longattn.model import Transformer

    cfg = getattr(model, "cfg", None)
    if cfg is None or not isinstance(model, Transformer):
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
            if not m.spec.sequence_parallel or m.impl is not None:
                raise ValueError(f"mechanism {m.spec.name!r} cannot run sequence parallel; supported "
                                 f"(parameter-free forms): {', '.join(supported())}")
            if getattr(m, "attn_dropout", 0.0):
                raise ValueError("sequence parallelism does not support attention dropout")


class sequence_parallel:  # noqa: N801 - used as a context manager
    """Within ``with sequence_parallel(model, group):`` the model's attention layers call
    :func:`longattn.distributed.attention` on the rank's shard and its positions start
    at rank * n (n: the length of the input the model is given).

    Nothing is replaced or assigned: the model's :class:`~longattn.layers.attention.HeadGroup`
    layers pass themselves as ``owner`` to :func:`longattn.api.run`, and the block
    routes those owners' calls to the sharded call (:func:`longattn.api.routed`);
    the rank's shard index reaches the model's embedding as its position offset
    (:func:`longattn.model.sequence_shard`). Both are :mod:`contextvars` scoped to this
    thread (or asyncio task) and this model: another model in the process, or this one
    in another thread, runs as usual. Everything else in the model is per position, so
    only attention communicates. ``calls``: the routed attention calls in the block."""

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        check_model(model)
        self.model, self.group = model, group
        self.calls = 0
        self._stack: ExitStack | None = None

    def _run(self, spec: Any, call: Any, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
             key_padding_mask: Tensor | None, segment_ids: Tensor | None,
             params: dict[str, Any] | None = None) -> Tensor:
        """The routed form of :func:`longattn.api.run` for this model's layers:
        grouped KV heads repeated (the exchanges then move H heads), the mechanism's
        call replaced by :func:`longattn.distributed.attention` on the rank's shard."""
        self.calls += 1
        if segment_ids is not None:
            raise ValueError("sequence parallelism does not support packed documents (segment_ids)")
        H, Hkv = q.shape[1], k.shape[1]
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        # random parameters left off (dropout 0...) are not passed: the sharded call draws nothing
        p = {n: x for n, x in (params or {}).items() if n not in spec.random_params or spec.random({n: x})}
        return attention(q, k, v, spec.name, causal=causal, group=self.group, key_padding_mask=key_padding_mask,
                         **p)

    def __enter__(self) -> "sequence_parallel":
        from longattn import api
        from longattn.layers.attention import HeadGroup
        from longattn.model import sequence_shard

        if self._stack is not None:
            raise RuntimeError("this sequence_parallel block is already entered")
        rank = dist.get_rank(self.group)
        layers = [m for m in self.model.modules() if isinstance(m, HeadGroup)]
        with ExitStack() as stack:
            stack.enter_context(api.routed(layers, self._run))
            stack.enter_context(sequence_shard(self.model, rank))
            self._stack = stack.pop_all()
        self.calls = 0
        return self

    def __exit__(self, *exc: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return False


def sequence_parallel_loss(model: nn.Module, x: Tensor, mask: Tensor | None, y: Tensor,
                           loss_fn: Callable[[Tensor, Tensor], Any], *, group: Any = None,
                           ignore_index: int = -100) -> Any:
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
        raise RuntimeError("the model's attention layers did not go through longattn.api.run "
                           "(owner=their HeadGroup): sequence parallelism cannot reach them")
    return loss_fn(logits, y[:, sl])
