"""The mechanisms :func:`longattn.distributed.attention` runs, by how they travel."""

from __future__ import annotations

from typing import Any

PATTERN_MECHANISMS = (
    "local", "dilated", "strided", "global", "random", "bigbird", "longformer",
    "block_diagonal", "sparse_transformer_strided", "sparse_transformer_fixed", "pattern",
)
KERNEL_MECHANISMS = ("linear", "performer")
RING_MECHANISMS = ("full",)
RECURRENT_MECHANISMS = ("gated_delta", "kda", "ssd", "gla", "retention")
_SHARDED_PARAMS = ("g", "beta")  # per-token gates of the recurrent family: each rank gives its shard


def supported() -> tuple[str, ...]:
    """The mechanism names :func:`longattn.distributed.attention` accepts."""
    return PATTERN_MECHANISMS + RING_MECHANISMS + KERNEL_MECHANISMS + RECURRENT_MECHANISMS


def _check_mechanism(mechanism: Any) -> None:
    """ValueError naming ``mechanism`` unless :func:`longattn.distributed.attention` supports it."""
    if not isinstance(mechanism, str) or mechanism not in supported():
        raise ValueError(
            f"longattn.distributed.attention does not support mechanism {mechanism!r}; "
            f"supported: {', '.join(supported())}"
        )

