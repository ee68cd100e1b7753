"""Sparse kernels over (query, key) edge lists in CSR order, shared by ``graph`` and the
shared-list path of ``given_keys`` (one key list per query for every head: DSA).

Both are PyTorch kernels that read each edge's key row from the key table directly (no
[E, D] gathered copy is ever written), so with one head's table in the cache (N x D,
4 MiB at N = 16384, D = 64) they run close to the cache's bandwidth:

- :func:`sddmm_into`: out[e] = alpha * a_i . b_j for every edge e = (i, j) of the CSR
  pattern (``torch.sparse.sampled_addmm``, in place);
- :func:`bag_sum`: out[r] = sum_{e in row r} w[e] table[idx[e]] (``embedding_bag``, mode
  sum with per-sample weights, written into a given output);
- :func:`key_major`: the same edges in key-major order, for the backward's bag sums into
  key rows.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

_bag_sum_into = torch.ops.aten._embedding_bag_forward_only.out


def csr_matrix(rowptr: Tensor, col: Tensor, values: Tensor, nq: int, nk: int) -> Tensor:
    """The [nq, nk] CSR matrix of the pattern (rowptr [nq + 1], col [E]) holding ``values``
    [E] (shared, not copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(rowptr, col, values, (nq, nk), check_invariants=False)


def sddmm_into(out: Tensor, rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """out[e] = alpha * a_i . b_j for every edge e = (i, j): a [nq, D], b [nk, D], out [E].

    ``sampled_addmm`` writes in place when its output is its input matrix (else it first
    copies the whole pattern, indices included); beta = 0 still reads the old values
    (0 * NaN = NaN), so they are zeroed first. Cost O(E D)."""
    m = csr_matrix(rowptr, col, out.zero_(), a.shape[0], b.shape[0])
    torch.sparse.sampled_addmm(m, a, b.t(), beta=0.0, alpha=alpha, out=m)
    return out


def bag_sum(table: Tensor, idx: Tensor, offsets: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """out[r] = sum_{offsets[r] <= e < offsets[r + 1]} w[e] table[idx[e]]: table [M, D],
    idx, w [E], offsets [R + 1] -> [R, D] (written into ``out`` when given). Cost O(E D)."""
    if out is None:
        out = table.new_empty(offsets.numel() - 1, table.shape[1])
    aux = [torch.empty(0, dtype=torch.long, device=table.device) for _ in range(3)]
    _bag_sum_into(table, idx, offsets, False, 0, False, w, True, -1,
                  out0=out, out1=aux[0], out2=aux[1], out3=aux[2])
    return out


def key_major(col: Tensor, nk: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The edges of a pattern with ``width`` slots per row (col [R * width] keys in [0, nk)),
    in key-major order: (perm [E] edge ids, each edge's row [E], rowptr over keys [nk + 1]).
    For the transposed bag sums of a backward (dK, dV). The stable sort runs on the
    narrowest integer type that holds the keys (int16 sorts 2M keys about 3x faster than
    int64 on the CPU, int32 1.8x)."""
    narrow = torch.int16 if nk <= 2 ** 15 else torch.int32 if nk <= 2 ** 31 else torch.int64
    perm = torch.argsort(col.to(narrow), stable=True)
    rowptr = torch.zeros(nk + 1, dtype=torch.long, device=col.device)
    torch.cumsum(torch.bincount(col, minlength=nk), 0, out=rowptr[1:])
    return perm, perm // width, rowptr

