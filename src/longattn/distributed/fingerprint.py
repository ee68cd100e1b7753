"""Argument checks across ranks: every rank of a call must agree on it.

A fingerprint of the call (mechanism, causal, scale, dtypes, parameters) and the
shard shapes are compared by one ``all_gather`` of a few int64 before any other
exchange, so that a rank with another dtype or mechanism cannot abort or hang the
others: where they differ, every rank raises the same ValueError naming the fields.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.distributed.comms import _rank_size
from longattn.distributed.mechanisms import _SHARDED_PARAMS, way_of

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
    sharded = _SHARDED_PARAMS if way_of(mechanism) == "recurrent_state" else ()
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
