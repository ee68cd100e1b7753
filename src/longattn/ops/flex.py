"""Exact patterns through PyTorch FlexAttention, with block masks built from our own
components: the names of :mod:`longattn.ops.pattern`'s Flex modules, in one place.

- :mod:`longattn.ops.pattern.flex_records`: the visible blocks of a pattern by index
  math on its engine components (never N x N predicate evaluations).
- :mod:`longattn.ops.pattern.flex_mask`: :func:`block_mask_for`,
  :func:`split_block_mask_for` and :func:`expand_block_mask`; the mask_mod is the
  pattern's own point predicate (:meth:`longattn.patterns.Pattern.mask_mod`: a new
  pattern runs on Flex without an edit here) with causal, padding and documents.
- :mod:`longattn.ops.pattern.flex_attention`: :func:`flex_pattern_attention` (the
  compiled call and its cache, the BlockMask cache, the heavy rows and columns
  attended outside Flex and merged by log-sum-exp).

Conventions (docs/design.md sections 3, 4, 7): positions are 0-based; with Nq < Nk the
queries are the last Nq positions (bottom-right, FlashAttention >= 2.1); padded keys
(``key_padding_mask`` False) get no weight; ``segment_ids`` packs documents: each
document is attended as if run alone, positions restarting at its first token.
"""

from __future__ import annotations

from longattn.ops.pattern.flex_attention import (  # noqa: F401 (private names: tests and benchmarks)
    _chunk_attention,
    _compiled,
    _flex_call,
    _heavy_rows_attention,
    _light,
    _split_default,
    flex_available,
    flex_pattern_attention,
)
from longattn.ops.pattern.flex_mask import (
    HEAVY_FACTOR,
    HEAVY_MIN_BLOCKS,
    SplitBlockMask,
    block_mask_for,
    expand_block_mask,
    split_block_mask_for,
)

__all__ = ["HEAVY_FACTOR", "HEAVY_MIN_BLOCKS", "SplitBlockMask", "block_mask_for", "expand_block_mask",
           "flex_available", "flex_pattern_attention", "split_block_mask_for"]
