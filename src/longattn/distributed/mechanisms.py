"""The mechanisms :func:`longattn.distributed.attention` runs, by how they travel.

How a mechanism is sharded is its registry field ``sequence_parallel`` (set in its own
``register`` call): ``"halo"`` (exact patterns), ``"ring"`` (full), ``"kernel_state"``
(linear, Performer), ``"recurrent_state"`` (the recurrent family); never its name.
"""

from __future__ import annotations

from typing import Any

from longattn import registry

#: the ways a mechanism is sharded, in the order :func:`supported` lists them
WAYS = ("halo", "ring", "kernel_state", "recurrent_state")
_SHARDED_PARAMS = ("g", "beta")  # per-token gates of the recurrent family: each rank gives its shard


def by_way(way: str) -> tuple[str, ...]:
    """The registered mechanisms sharded ``way`` (one of :data:`WAYS`), by name."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    return tuple(s.name for s in registry.specs() if s.sequence_parallel == way)


def way_of(mechanism: Any) -> str:
    """``mechanism``'s ``sequence_parallel`` field; ``""`` for anything not registered."""
    if not isinstance(mechanism, str) or mechanism not in registry.names():
        return ""
    return registry.get(mechanism).sequence_parallel


def supported() -> tuple[str, ...]:
    """The mechanism names :func:`longattn.distributed.attention` accepts."""
    return tuple(n for way in WAYS for n in by_way(way))


def _check_mechanism(mechanism: Any) -> None:
    """ValueError naming ``mechanism`` unless :func:`longattn.distributed.attention` supports it."""
    if not way_of(mechanism):
        raise ValueError(
            f"longattn.distributed.attention does not support mechanism {mechanism!r}; "
            f"supported: {', '.join(supported())}"
        )


def __getattr__(name: str) -> tuple[str, ...]:
    """PEP 562: ``PATTERN_MECHANISMS``, ``RING_MECHANISMS``, ``KERNEL_MECHANISMS``,
    ``RECURRENT_MECHANISMS`` (read from the registry at access time)."""
    way = _OLD_NAMES.get(name)
    if way is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return by_way(way)


_OLD_NAMES = {"PATTERN_MECHANISMS": "halo", "RING_MECHANISMS": "ring", "KERNEL_MECHANISMS": "kernel_state",
              "RECURRENT_MECHANISMS": "recurrent_state"}
