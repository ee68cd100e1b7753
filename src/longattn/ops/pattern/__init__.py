"""The pattern engine: exact attention over any pattern of :mod:`longattn.patterns`,
without an N x N tensor.

Modules: :mod:`.plan` (components -> tile batches, :func:`plan`, :func:`needed_keys`,
the plan cache), :mod:`.engine` (tile batches -> the merged softmax:
``engine_forward`` / ``engine_backward`` and the autograd wrapper), :mod:`.api`
(:func:`pattern_attention`: checks, backend choice). The softmax numerics (tile
kernels, merges, sinks) are :mod:`longattn.ops._softmax`. The FlexAttention backend:
:mod:`.flex_records` (a pattern's visible blocks), :mod:`.flex_mask` (the BlockMask,
its mask_mod from :meth:`longattn.patterns.Pattern.mask_mod`), :mod:`.flex_attention`
(the compiled call, the heavy-row split); :mod:`longattn.ops.flex` names them all.

How it works
------------
A pattern's components are cut into *tile batches*: T tiles, each a block of bq
queries and a list of K keys (by position). Each slice of a tile batch is one call of
PyTorch's CPU flash-attention kernel (:data:`longattn.ops._softmax.flash_fwd`),
which returns the tiles' outputs and their log-sum-exp (lse). Tiles are of four kinds:

- ``full``: every listed key is visible (no mask: the fast kernel path);
- ``causal``: key y visible from query x iff y <= x inside the tile (the kernel's
  own causal path);
- ``shared``: one bool [bq, K] mask, the same for every tile (band interiors);
- ``mask``: anything else (edges of the sequence, random blocks, global columns,
  key padding), with a mask computed from the pattern's predicate once per plan.

Rows are read without copies wherever the positions allow it. When tile t, row w
of a batch is position ``start + t * step + w * stride`` (a :class:`View`), the
kernel reads the sequence itself through a strided view. That covers a sliding
window (step = bq, stride 1), the same band inside residue classes mod r (dilated:
stride r), whole groups as tiles (strided: step 1, stride r; block-diagonal: step =
block), BigBird's block window and global rows. Other key lists (random blocks,
global columns) are gathered, a bounded slice at a time::

    local(2, 2), bq = 4:      tile 0 (edge)     tile 1 (view)      tile 2 (view)
    queries 4..7 see keys     keys 0..5         keys 2..9          keys 6..13
    2..9: K = bq + 4 = 8      (masked)          shared band mask   same mask

The band tile bq is 32 rows, the CPU kernel's own query block for short sequences,
so a window of w keys costs about w + 32 keys per query.

All tiles of all components of one head form one softmax: outputs are merged with
their lse (out = sum_t exp(lse_t - L) out_t, L = logsumexp_t lse_t), and a key that
two components both list is counted once (the later component masks it out).
The backward pass calls the kernel's backward per tile with the *merged* output
and L, which gives the exact gradient of the single softmax.

Cost: time ~ the visible entries (plus <= one tile of slack per query block);
memory O(N * D) for inputs, outputs and lse, plus a bounded per-slice workspace
(``WORKSPACE`` elements, small enough to be reused by the allocator rather than
mapped afresh).

On devices other than the CPU the same tiles run through :func:`longattn.ops._softmax.tile_forward` and
:func:`~longattn.ops._softmax.tile_backward` (plain matmuls over one bounded slice at a time): still exact and
sub-quadratic, just without the fused kernel.
"""

from longattn.ops.pattern.api import BACKENDS, check_sinks, check_softcap, pattern_attention
from longattn.ops.pattern.engine import engine_backward, engine_forward
from longattn.ops.pattern.plan import TileBatch, View, needed_keys, plan

__all__ = [
    "BACKENDS", "TileBatch", "View", "check_sinks", "check_softcap", "engine_backward", "engine_forward",
    "needed_keys", "pattern_attention", "plan",
]
