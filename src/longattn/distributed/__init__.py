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

Modules (each a part of the above; the public names are re-exported here):

- :mod:`.mechanisms`: which mechanisms run, by how they travel; :func:`supported`.
- :mod:`.comms`: byte counters, group helpers, the differentiable collectives.
- :mod:`.fingerprint`: the cross-rank check of a call's arguments.
- :mod:`.halo`: exact patterns (fetch the visible key rows, run the exact engine).
- :mod:`.ring`: ``full`` by ring attention (``ring.FORCE_MATH``: the plain-tensor
  block kernels on the CPU too, for tests).
- :mod:`.kernel_state`: ``linear`` / ``performer`` by state exchange over
  :mod:`longattn.ops.kernel`'s own feature maps and chunked causal pass.
- :mod:`.recurrent_state`: the recurrent family by composing per-rank state maps.
- :mod:`.api`: :func:`attention`.
- :mod:`.training`: :class:`sequence_parallel`, :func:`sequence_parallel_loss`,
  :func:`check_model` (routing by :func:`longattn.api.routed` and
  :func:`longattn.model.sequence_shard`, no monkeypatch).
"""

from longattn.distributed.api import attention
from longattn.distributed.comms import comm_stats, reset_comm_stats, shard, unshard
from longattn.distributed.mechanisms import supported
from longattn.distributed.training import check_model, sequence_parallel, sequence_parallel_loss

__all__ = ["attention", "supported", "comm_stats", "reset_comm_stats", "shard", "unshard",
           "sequence_parallel", "sequence_parallel_loss", "check_model", "PATTERN_MECHANISMS",
           "KERNEL_MECHANISMS", "RING_MECHANISMS", "RECURRENT_MECHANISMS"]


def __getattr__(name: str) -> tuple[str, ...]:
    """PEP 562: ``PATTERN_MECHANISMS``, ``RING_MECHANISMS``, ``KERNEL_MECHANISMS`` and
    ``RECURRENT_MECHANISMS``, read from the registry's ``sequence_parallel`` field on access."""
    from longattn.distributed import mechanisms

    return getattr(mechanisms, name)
