"""Useful FLOPs: what each mechanism needs to compute, whatever its kernel does.

Convention (stated once, used everywhere):

- A multiply-add is 2 FLOPs. Softmax, exp, masks and other elementwise work are
  not counted (they are O(pairs), not O(pairs * D)).
- Softmax attention over a set of visible (i, j) pairs costs ``4 * pairs * D``
  forward: ``2 * D`` for the score q_i . k_j and ``2 * Dv`` for p_ij v_j (D = Dv).
  For a fixed pattern the pairs are counted exactly with
  :meth:`longattn.patterns.Pattern.visible_count` (chunked, no N x N tensor), so
  "useful" means the pattern's pairs only: masked-out work a kernel does anyway
  (e.g. inside a partial block) is not useful.
- Training (forward + backward) counts ``TRAIN_FACTOR = 3`` times the forward: the
  backward of each matmul is two matmuls of the same size (dQ, dK from dS; dP, dV
  from dO). The FlashAttention papers count 3.5x (2.5x backward) because they
  include the recomputation of the scores; recomputation is not useful work, so it
  is not counted here.
- Approximate mechanisms count the matmuls of their algorithm at the benchmark's
  settings (feature maps, projections, hashing, routing, the attention they keep).
"""

from __future__ import annotations

import math
from typing import Any, Callable

TRAIN_FACTOR = 3.0


def attention_flops(pairs: float, dim: int, dim_v: int | None = None) -> float:
    """Forward FLOPs of softmax attention over ``pairs`` visible (i, j) pairs."""
    return 2.0 * pairs * dim + 2.0 * pairs * (dim if dim_v is None else dim_v)


def pattern_pairs(pattern: Any, n: int, heads: int, causal: bool) -> int:
    """Visible pairs of ``pattern`` summed over ``heads``, exactly.

    Fast paths (O(N) or O(g N)): per-head splits are counted per group; patterns
    that depend on ``j - i`` only (local, dilated, strided, their unions and
    intersections) by summing over offsets, ``(N - |o|)`` pairs per visible offset
    ``o``; their union with global tokens by inclusion-exclusion. Anything else is
    counted row chunk by row chunk (at most ~4M predicate evaluations at a time).
    """
    fast = _fast_pairs(pattern, n, heads, causal)
    if fast is not None:
        return fast
    return chunked_pairs(pattern, n, heads, causal)


def _translation_invariant(p: Any) -> bool:
    from longattn import patterns as P

    if isinstance(p, (P.Local, P.Dilated, P.Strided, P.Full, P.Causal)):
        return True
    if isinstance(p, (P.Union, P.Intersection)):
        return all(_translation_invariant(c) for c in p.children())
    return False


def _fast_pairs(p: Any, n: int, heads: int, causal: bool) -> int | None:
    import torch

    from longattn import patterns as P

    split = p.heads_split(heads)
    if split is not None:
        total = 0
        for _, per, sub in split:
            c = pattern_pairs(sub, n, per, causal)
            total += c
        return total
    if type(p) in (P.SparseTransformerStrided, P.SparseTransformerFixed):  # causal by definition
        return pattern_pairs(p.children()[0], n, heads, True)
    if isinstance(p, P.GlobalTokens):
        g = p.indices[p.indices < n]
        ng = int(g.numel())
        if not causal:
            return heads * (n * n - (n - ng) ** 2)
        both = int((g[None, :] <= g[:, None]).sum())  # i, j both global, j <= i
        return heads * (int((g + 1).sum()) + int((n - g).sum()) - both)
    if _translation_invariant(p):
        o = torch.arange(-(n - 1), n)
        i = torch.full_like(o, n)
        vis = p.visible(i, i + o, torch.zeros_like(o))
        if causal:
            vis = vis & (o <= 0)
        return heads * int(((n - o.abs()) * vis.expand_as(o)).sum())
    if isinstance(p, P.Union) and not causal:
        parts = p.children()
        glob = [c for c in parts if isinstance(c, P.GlobalTokens)]
        rest = [c for c in parts if not isinstance(c, P.GlobalTokens)]
        if glob and rest and all(_translation_invariant(c) for c in rest):
            t = rest[0] if len(rest) == 1 else P.Union(rest)
            g = torch.unique(torch.cat([c.indices for c in glob]))
            g = g[g < n]
            if g.numel() == 0:
                return pattern_pairs(t, n, heads, causal)
            ng = int(g.numel())
            allj = torch.arange(n)
            t_all = pattern_pairs(t, n, 1, False)
            t_rows = int(t.visible(g[:, None], allj[None, :], torch.zeros(())).sum())  # i in G
            t_cols = int(t.visible(allj[:, None], g[None, :], torch.zeros(())).sum())  # j in G
            t_both = int(t.visible(g[:, None], g[None, :], torch.zeros(())).sum())
            t_outside = t_all - t_rows - t_cols + t_both  # T pairs with i, j not global
            hidden = (n - ng) ** 2 - t_outside  # invisible pairs (i, j both non-global, not T)
            return heads * (n * n - hidden)
    return None


def chunked_pairs(pattern: Any, n: int, heads: int, causal: bool) -> int:
    """Visible pairs by evaluating the predicate row chunk by row chunk."""
    per_head = not getattr(pattern, "head_dependent", False) and not _any_head_dependent(pattern)
    h = 1 if per_head else heads
    chunk = max(1, min(1024, (1 << 22) // max(1, n * h)))
    count = pattern.visible_count(n, h, causal, chunk=chunk)
    return count * (heads if per_head else 1)


def block_pairs(pattern: Any, n: int, heads: int, block: int) -> int:
    """Visible pairs of a pattern that is constant on ``block`` x ``block`` tiles
    (BigBird, random blocks, block-diagonal), non-causal: the predicate is
    evaluated once per tile and weighted by the tile's size (the last tile may be
    short)."""
    import torch

    pattern.prepare(n, heads)
    T = -(-n // block)
    start = torch.arange(T) * block
    size = torch.clamp(n - start, max=block)
    i, j = start[None, :, None], start[None, None, :]
    h = torch.arange(heads)[:, None, None]
    vis = pattern.visible(i, j, h).expand(heads, T, T)
    return int((vis.long() * size[None, :, None] * size[None, None, :]).sum())


def _any_head_dependent(pattern: Any) -> bool:
    if getattr(pattern, "head_dependent", False):
        return True
    if pattern.heads_split(1) is not None:
        return True
    return any(_any_head_dependent(c) for c in pattern.children())


def dense_pairs(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def pairs_by_predicate(pred: Callable, n: int, causal: bool, chunk: int = 256) -> int:
    """Count pairs with ``pred(i [c,1], j [1,n]) -> bool`` in row chunks."""
    import torch

    total = 0
    j = torch.arange(n)[None, :]
    for s in range(0, n, chunk):
        i = torch.arange(s, min(n, s + chunk))[:, None]
        m = pred(i, j)
        if causal:
            m = m & (j <= i)
        total += int(m.expand(i.shape[0], n).sum())
    return total


# ----------------------------------------------------------------------- per-mechanism
# Each model: (params, n, heads, dim, causal) -> forward FLOPs for ONE batch element.


def _full(p, n, h, d, causal):
    return h * attention_flops(dense_pairs(n, causal), d)


def _local2d(p, n, h, d, causal):
    H, W, rh, rw = p["height"], p["width"], p.get("radius_h", 1), p.get("radius_w", 1)

    def pred(i, j):
        return ((i // W - j // W).abs() <= rh) & ((i % W - j % W).abs() <= rw)

    return h * attention_flops(pairs_by_predicate(pred, H * W, causal), d)


def _graph(p, n, h, d, causal):
    ei = p["edge_index"]
    e = int((ei[0] <= ei[1]).sum()) if causal else int(ei.shape[1])
    return h * attention_flops(e, d)


def _additive(p, n, h, d, causal):
    A = d
    proj = 2 * 2 * n * A * d  # Wq q and Wk k
    pairs = dense_pairs(n, causal)
    # per pair: add (A), tanh (not counted), w . e (2A), then p v (2 Dv)
    return h * (proj + pairs * (A + 2 * A + 2 * d))


def _kernel(F: int, feature_flops_per_token: float) -> Callable:
    def model(p, n, h, d, causal):
        chunk = p.get("chunk_size", 64)
        feats = 2 * n * feature_flops_per_token
        if not causal:
            core = 2 * n * F * d + 2 * n * F * d + 2 * n * F  # S = phi(K)^T V; phi(Q) S; phi(Q) z
        else:  # chunked prefix sums: inter-chunk as above + intra-chunk quadratic form
            core = 4 * n * F * d + 2 * n * F + 2 * n * chunk * (F + d)
        return h * (feats + core)

    return model


def _linear(p, n, h, d, causal):
    return _kernel(d, 0)(p, n, h, d, causal)


def _performer(p, n, h, d, causal):
    F = p.get("num_features", 256)
    return _kernel(F, 2 * d * F)(p, n, h, d, causal)


def _linformer(p, n, h, d, causal):
    k = min(p.get("proj_dim", 256), n)
    return h * (2 * 2 * k * n * d + attention_flops(n * k, d))


def _compressed(p, n, h, d, causal):
    c = p.get("stride") or math.ceil(n / p.get("slots", 256))
    slots = math.ceil(n / c)
    conv = 0 if p.get("stride") is None else 2 * 2 * slots * c * d * d  # learned conv (k and v)
    pairs = n * slots if not causal else n * (slots + 1) // 2 + n * c // 2
    return h * (conv + attention_flops(pairs, d) + 2 * n * d)


def _nystrom(p, n, h, d, causal):
    m = min(p.get("landmarks", 64), n)
    iters = p.get("pinv_iters", 6)
    k1 = 2 * n * m * d  # softmax(Q Kl^T)
    k2 = 2 * m * m * d  # softmax(Ql Kl^T)
    k3 = 2 * m * n * d + 2 * m * n * d  # softmax(Ql K^T) then @ V
    pinv = iters * 4 * 2 * m**3
    combine = 2 * m * m * d + 2 * n * m * d
    return h * (k1 + k2 + k3 + pinv + combine)


def _lsh(p, n, h, d, causal):
    bs, r = p.get("bucket_size", 64), p.get("n_hashes", 2)
    nb = p.get("n_buckets") or max(1, math.ceil(n / bs))
    hashing = 2 * n * d * max(1, nb // 2)
    keys = min(n, 2 * bs if not causal else bs)
    return h * r * (hashing + attention_flops(n * keys, d))


def _clustered(p, n, h, d, causal):
    C, cs = p.get("n_clusters", 8), p.get("chunk_size", 64)
    routing = 2 * 2 * n * d * C
    keys = cs * (2 if p.get("look_back", True) and not causal else 1)
    if causal:
        keys = cs
    return h * (routing + attention_flops(n * keys, d))


def _sinkhorn(p, n, h, d, causal):
    b = p.get("block_size", 64)
    nb = math.ceil(n / b)
    sort = 2 * 2 * nb * d * p.get("sort_dim", 32) + 2 * nb * nb * p.get("sort_dim", 32)
    mix = 2 * nb * nb * b * d * 2  # soft permutation applied to key and value blocks
    keys = 2 * b if not causal else b
    return h * (sort + mix + attention_flops(n * keys, d))


def _synthesizer(p, n, h, d, causal):
    pairs = dense_pairs(n, causal)
    kind = p.get("kind", "random")
    extra = 0
    if kind == "dense":
        hid = p.get("hidden") or d
        extra = 2 * n * (d * hid + hid * p.get("max_len", n))
    if p.get("mix") is not None:
        extra += 2 * pairs * d
    return h * (extra + 2 * pairs * d)


def _block_pairs_selected(n: int, block: int, blocks: int, causal: bool) -> int:
    """Pairs of "own key block (causally clipped) + ``blocks`` other whole key blocks"
    per query (fewer where fewer earlier blocks exist): the selection families' count."""
    nb = math.ceil(n / block)
    pairs = 0
    for qb in range(nb):
        rows = min(block, n - qb * block)
        own = rows * (rows + 1) // 2 if causal else rows * rows
        others = min(blocks, qb if causal else nb - 1)
        pairs += own + rows * others * block
    return pairs


def _topk_blocks(p, n, h, d, causal):
    b, k = p.get("block", 64), p.get("topk", 8)
    nb = math.ceil(n / b)
    gate = 2 * n * nb * d // (2 if causal else 1)  # q . block summary, every (earlier) block
    extra = n * (p.get("sink_tokens", 0) + p.get("window", 0))  # an upper count: overlaps not removed
    pairs = min(_block_pairs_selected(n, b, k, causal) + extra, dense_pairs(n, causal))
    return h * (gate + attention_flops(pairs, d))


def _nsa(p, n, h, d, causal):
    b, k, w = p.get("block", 32), p.get("topk", 16), p.get("window", 128)
    stride = p.get("stride") or b
    nc = max(0, (n - b) // stride + 1)
    cmp_pairs = n * nc // (2 if causal else 1)
    pool = 2 * 2 * n * d  # weighted pooling of k and v
    # own + first + top-k blocks; the window branch's keys (causal: w, else 2w - 1)
    sel = min(_block_pairs_selected(n, b, k + 1, causal), dense_pairs(n, causal))
    win = n * min(n, w if causal else 2 * w - 1)
    gates = 2 * n * d * 3
    return h * (pool + gates + attention_flops(cmp_pairs + sel + win, d))


def _dsa(p, n, h, d, causal):
    k, hi, di = p.get("topk", 64), p.get("index_heads", 4), p.get("index_dim", 32)
    proj = 2 * n * h * d * (hi * di + hi) + 2 * n * d * di  # index queries, weights, the shared index key
    index = 2 * dense_pairs(n, causal) * hi * di  # every visible (t, s): Hi dot products of Di
    m = min(k, n)
    pairs = m * (m + 1) // 2 + (n - m) * m if causal else n * m  # causal row i sees min(k, i + 1)
    return proj + index + h * attention_flops(pairs, d)  # proj and index are shared by the heads


def _recurrent(delta: bool) -> Callable:
    """The chunked form's matmuls per token (chunk C, state D x Dv): within the chunk the
    masked q k^T and its product with v (4 C D), the WY solve's k k^T and its triangular
    solve (delta members, ~3 C D); across chunks the state read q S and write k^T v
    (4 D^2), plus the delta correction k S (2 D^2); per-channel decays rescale q and k
    (2 D, not counted)."""

    def model(p, n, h, d, causal):
        C = min(p.get("chunk_size", 64), n)
        per_token = 4 * C * d + 4 * d * d + ((3 * C * d + 2 * d * d) if delta else 0)
        return h * n * per_token

    return model


MODELS: dict[str, Callable[..., float]] = {
    "full": _full,
    "local2d": _local2d,
    "graph": _graph,
    "additive": _additive,
    "linear": _linear,
    "performer": _performer,
    "linformer": _linformer,
    "compressed": _compressed,
    "nystrom": _nystrom,
    "lsh": _lsh,
    "clustered": _clustered,
    "sinkhorn": _sinkhorn,
    "synthesizer": _synthesizer,
    "topk_blocks": _topk_blocks,
    "nsa": _nsa,
    "dsa": _dsa,
    "gated_delta": _recurrent(True),
    "kda": _recurrent(True),
    "ssd": _recurrent(False),
    "gla": _recurrent(False),
    "retention": _recurrent(False),
}


def forward_flops(name: str, params: dict[str, Any], *, n: int, batch: int, heads: int, dim: int,
                  causal: bool = False) -> float | None:
    """Useful forward FLOPs of mechanism ``name`` at ``params`` (None if no model).

    Fixed patterns are counted exactly from their predicate (per tile for the
    block-constant ones named in ``bench.cases.SETTINGS``); the others use
    :data:`MODELS`.
    """
    from longattn.bench.cases import SETTINGS, pattern_of

    pat = pattern_of(name, params)
    if pat is not None:
        bp = SETTINGS[name].block_param if name in SETTINGS else None
        block = params.get(bp) if bp else None
        key = (repr(pat), n, heads, causal, block)
        if key not in _PAIRS:
            if block and not causal:
                _PAIRS[key] = block_pairs(pat, n, heads, block)
            else:
                _PAIRS[key] = pattern_pairs(pat, n, heads, causal)
        return float(batch * attention_flops(_PAIRS[key], dim))
    model = MODELS.get(name)
    if model is None:
        return None
    return float(batch * model(params, n, heads, dim, causal))


_PAIRS: dict[tuple, int] = {}


def case_flops(mode: str, fwd: float | None) -> float | None:
    """Useful FLOPs of a case in ``mode`` ('fwd' or 'train') from its forward FLOPs."""
    if fwd is None:
        return None
    return fwd * (TRAIN_FACTOR if mode == "train" else 1.0)

