"""Exact attention over any pattern of :mod:`longattn.patterns`: the old import path.

The engine now lives in the package :mod:`longattn.ops.pattern` (overview in its
docstring), split by responsibility:

- :mod:`longattn.ops.pattern.plan`: :class:`TileBatch`, :class:`View`, band and gather
  batches, :func:`plan`, :func:`needed_keys`, the plan cache, the head groups;
- :mod:`longattn.ops.pattern.engine`: chunk slicing, ``engine_forward`` /
  ``engine_backward`` and the autograd wrapper ``_BlockSparseAttention``;
  ``UNINIT_FILL`` (tests) lives there;
- :mod:`longattn.ops.pattern.api`: :func:`pattern_attention`, the backend choice and
  the argument checks;
- the softmax numerics shared with the other engines (tile kernels ``tile_forward`` /
  ``tile_backward``, the CPU flash kernel, ``FORCE_MATH``, merges, sinks) are in
  :mod:`longattn.ops._softmax`.

This module re-exports the names that callers import from here. Switches such as
``FORCE_MATH`` and ``UNINIT_FILL`` are not re-exported: set them on the module that
reads them.
"""

from __future__ import annotations

from longattn.ops._softmax import additive_mask as _additive
from longattn.ops.pattern.api import BACKENDS, _positions, _use_flex, check_sinks, check_softcap, pattern_attention
from longattn.ops.pattern.engine import Groups, _BlockSparseAttention, engine_backward, engine_forward
from longattn.ops.pattern.plan import (
    BAND_QUERY_TILE,
    BAND_QUERY_TILE_BWD,
    MIN_BAND_TILE,
    SHORT_CAUSAL,
    WIDE_BAND,
    WIDE_GROUP,
    WIDE_TILE,
    WIDE_TILE_MASKED,
    WORKSPACE,
    TileBatch,
    View,
    _cached_plan,
    _head_groups,
    _kv_groups,
    needed_keys,
    plan,
)

__all__ = [
    "BACKENDS", "BAND_QUERY_TILE", "BAND_QUERY_TILE_BWD", "Groups", "MIN_BAND_TILE", "SHORT_CAUSAL", "TileBatch",
    "View", "WIDE_BAND", "WIDE_GROUP", "WIDE_TILE", "WIDE_TILE_MASKED", "WORKSPACE", "check_sinks",
    "check_softcap", "engine_backward", "engine_forward", "needed_keys", "pattern_attention", "plan",
    "_BlockSparseAttention", "_additive", "_cached_plan", "_head_groups", "_kv_groups", "_positions", "_use_flex",
]
