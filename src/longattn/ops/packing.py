"""Packed documents: several documents in one row, each attending as if run alone.

``segment_ids`` [B, N] marks the documents of each row as runs of equal ids (the
FlashAttention "varlen" / FlexAttention document-mask use). The result equals
running every document on its own: positions restart at its first token, so a
global token at index 0 is each document's first token and BigBird's blocks start
at each document.

How: documents are grouped by length class; the documents of one class are
gathered into a batch [docs, H, L, D] (their ends padded up to the class length L)
and the mechanism runs once per class, then the outputs are scattered back. Work
and memory stay proportional to what each document sees (no N x N mask, no Python
loop over documents: one call per length class). Length classes grow by 1/8 of a
power of two (at most 12.5% padding, ~8 classes per doubling of the length), or, for
patterns whose layout depends on the length (non-causal random blocks), the exact
multiple of their block. Padded keys are masked with a key-padding mask when the
attention is not causal; causal attention never sees them (they come after every
real query of their document).

    segment_ids [1, 10]: 0 0 0 1 1 1 1 1 2 2   -> documents of lengths 3, 5, 2
    class 3 (pad 0): [doc0]; class 5: [doc1]; class 2: [doc2]
"""

from __future__ import annotations

import contextvars
from typing import Callable

import torch
from torch import Tensor

from longattn.ops._checks import check_qkv

Call = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
"""``call(q, k, v, key_padding_mask) -> out``: one mechanism on [B, H, N, D] tensors."""

_INSIDE = contextvars.ContextVar("longattn_packed", default=False)


def inside_packed_call() -> bool:
    """True while a mechanism runs on the documents of a packed batch (its length is
    then a document's, not the row's: checks against the row length do not apply)."""
    return _INSIDE.get()


_DOCS: contextvars.ContextVar = contextvars.ContextVar("longattn_packed_docs", default=None)


def packed_documents() -> tuple[Tensor, Tensor, tuple[int, int]] | None:
    """Inside a packed call, the documents being run: (row [M], positions [M, L], (B, N)),
    the row of the packed batch each document comes from, each slot's position in that
    row (padding slots clamped into the row) and the packed batch's shape. Per-position
    arguments (a score bias) are sliced with it. None outside a packed call."""
    return _DOCS.get()


def with_document_arguments(fn: Callable[[], Tensor]) -> Tensor:
    """``fn()`` for a call whose per-position arguments were built at the document's
    own length (the layer's ALiBi bias of each document, O(L^2) rather than the row's
    O(N^2)): within it :func:`packed_documents` is None, so nothing slices them again
    as whole-row arguments. Outside a packed call it is just ``fn()``."""
    token = _DOCS.set(None)
    try:
        return fn()
    finally:
        _DOCS.reset(token)


def check_segment_ids(segment_ids: object, B: int, N: int) -> Tensor:
    """``segment_ids`` as a LongTensor [B, N]; TypeError/ValueError naming it otherwise."""
    if not isinstance(segment_ids, Tensor):
        raise TypeError(f"segment_ids must be an integer tensor [B, N], got {type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool or segment_ids.is_complex():
        raise TypeError(f"segment_ids must be an integer tensor, got dtype {segment_ids.dtype}")
    if tuple(segment_ids.shape) != (B, N):
        raise ValueError(f"segment_ids must have shape [B, N] = [{B}, {N}], got {tuple(segment_ids.shape)}")
    return segment_ids.long()


def documents(segment_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The documents (runs of equal ids) of every row: (row, start, length), each [M]."""
    B, N = segment_ids.shape
    new = torch.ones(B, N, dtype=torch.bool, device=segment_ids.device)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    row, start = new.nonzero(as_tuple=True)
    flat = row * N + start
    ends = torch.cat([flat[1:], flat.new_tensor([B * N])])
    ends = torch.minimum(ends, (row + 1) * N)  # a run never crosses its row
    return row.cpu(), start.cpu(), (ends - flat).cpu()


def length_class(L: Tensor, quantum: int) -> Tensor:
    """The padded length of documents of length L: the next multiple of ``quantum``
    when the layout depends on the length, else the next multiple of 2^(bits(L) - 4)
    (at most 12.5% longer)."""
    if quantum > 1:
        return (L + quantum - 1) // quantum * quantum
    step = (1 << (torch.log2(L.double()).floor().long() - 3).clamp(min=0))
    return (L + step - 1) // step * step


def packed_attention(
    call: Call,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_ids: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    quantum: int = 1,
) -> Tensor:
    """``call`` run on every document of ``segment_ids`` alone; [B, H, N, Dv].

    q: [B, H, N, D]; k, v: [B, Hkv, N, .] (self-attention: Nq == Nk); segment_ids:
    [B, N] integer runs; key_padding_mask: [B, N] (True = real) within documents.
    The inputs pass :func:`longattn.ops._checks.check_qkv` first (the checks and
    messages of an unpacked call: a mechanism only sees the documents, so a row-level
    mistake would otherwise reach it reshaped). Differentiable in q, k, v (gathers and
    scatters of rows)."""
    check_qkv(q, k, v, key_padding_mask=key_padding_mask, gqa=True)
    B, H, N, _ = q.shape
    if k.shape[2] != N:
        raise ValueError(
            f"segment_ids needs self-attention lengths (Nq == Nk), got Nq={N}, Nk={k.shape[2]}"
        )
    seg = check_segment_ids(segment_ids, B, N)
    row, start, length = documents(seg)
    padded_len = length_class(length, quantum)
    if key_padding_mask is None and bool((length == length[0]).all()) and N % int(length[0]) == 0:
        return _equal_documents(call, q, k, v, int(length[0]))
    out = q.new_zeros(B * N, H, v.shape[-1])
    # rows [B * N, heads, D]; padding slots read row 0 and are masked or dropped
    flat = [x.transpose(1, 2).reshape(B * N, x.shape[1], x.shape[3]) for x in (q, k, v)]
    kpm = None if key_padding_mask is None else key_padding_mask.reshape(-1)
    for Lp in torch.unique(padded_len).tolist():
        sel = (padded_len == Lp).nonzero(as_tuple=True)[0]
        t = torch.arange(Lp)
        pos = row[sel, None] * N + start[sel, None] + t  # [docs, Lp]
        real = t[None, :] < length[sel, None]
        idx = torch.where(real, pos, torch.zeros_like(pos)).reshape(-1).to(q.device)
        qd, kd, vd = (x.index_select(0, idx).view(len(sel), Lp, x.shape[1], x.shape[2]).transpose(1, 2)
                      for x in flat)
        mask = None
        if kpm is not None:
            mask = kpm.index_select(0, idx).view(len(sel), Lp) & real.to(q.device)
        elif not causal and not bool(real.all()):
            mask = real.to(q.device)
        od = _inside(call, qd, kd, vd, mask, (row[sel], (start[sel, None] + t).clamp(max=N - 1), (B, N)))
        od = od.transpose(1, 2).reshape(-1, H, od.shape[-1])
        keep = real.reshape(-1).to(q.device)
        out = out.index_copy(0, idx[keep], od[keep])
    return out.view(B, N, H, -1).transpose(1, 2)


def _inside(call: Call, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
            docs: tuple[Tensor, Tensor, tuple[int, int]] | None = None) -> Tensor:
    token, docs_token = _INSIDE.set(True), _DOCS.set(docs)
    try:
        return call(q, k, v, mask)
    finally:
        _INSIDE.reset(token)
        _DOCS.reset(docs_token)


def _equal_documents(call: Call, q: Tensor, k: Tensor, v: Tensor, L: int) -> Tensor:
    """Every document has length L and the rows are tiled by them: the documents are
    a reshape of the rows (one copy in, one out), no gather."""
    B, H, N, _ = q.shape
    m = N // L

    def split(x: Tensor) -> Tensor:  # [B, h, N, d] -> [B * m, h, L, d]
        return x.view(B, x.shape[1], m, L, x.shape[3]).transpose(1, 2).reshape(B * m, x.shape[1], L, x.shape[3])

    docs = (torch.arange(B).repeat_interleave(m), (torch.arange(m)[:, None] * L + torch.arange(L)).repeat(B, 1), (B, N))
    out = _inside(call, split(q), split(k), split(v), None, docs)
    return out.view(B, m, H, L, -1).transpose(1, 2).reshape(B, H, N, -1)


def document_positions(segment_ids: Tensor) -> Tensor:
    """Each token's position within its document (runs of equal ids): [B, N] LongTensor,
    0 at every document's first token (what position encodings of a packed row use)."""
    B, N = segment_ids.shape
    idx = torch.arange(N, device=segment_ids.device).expand(B, N)
    new = torch.ones(B, N, dtype=torch.bool, device=segment_ids.device)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - start
