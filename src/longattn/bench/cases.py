"""What the benchmark runs: each mechanism's settings, its inputs, and the peers.

Everything here is data or a small builder, so adding a mechanism to the registry
adds it to the benchmark (with its registry defaults) without touching this file;
an entry in :data:`SETTINGS` only picks the benchmark's settings for it.

Default shape: B=1, H=8, D=64, fp32 (see :data:`DEFAULT_SHAPE`).

How the settings are equalised ("about 512 keys per query" where a mechanism has
a budget):

- ``local``: before = after = 256, i.e. 513 keys per query. The local-attention
  peer (``LocalAttention(window_size=256, look_backward=1, look_forward=1,
  exact_windowsize=True)``) computes 3 windows of 256 keys per query and masks
  them down to exactly i - 256 <= j <= i + 256: the same set, so its useful FLOPs
  are ours. FlexAttention gets the same predicate as a ``mask_mod``.
- ``longformer``: window 256 each side + global token 0; ``dilated``: radius 128,
  dilation 2 (the same span, half the keys); ``bigbird``: blocks of 64, 3-block
  window + 3 random + 2 global blocks (= 512 keys for most queries).
- ``performer``: 256 random features (performer-pytorch ``FastAttention`` with
  ``nb_features=256`` is the peer); ``linformer``: k = 256, max_len = N (the
  linformer package's ``LinformerSelfAttention(k=256)`` is the peer, with its
  q/k/v/out projections replaced by identities so that only attention is timed);
  ``compressed``: 256 slots; ``nystrom``: 64 landmarks (the paper's setting).
- ``lsh``: chunks of 64, 2 hashing rounds (reformer-pytorch ``LSHAttention
  (bucket_size=64, n_hashes=2)`` is the peer: it also attends to its chunk and the
  previous one); ``clustered``: chunks of 256 + look-back, 16 clusters;
  ``sinkhorn``: blocks of 256 (own block + sorted block = 512 keys).
- ``local2d``: a 128-wide grid, radius 7 each way (225 keys); ``graph``: each node
  receives 32 edges (16 nearest predecessors/successors + 16 random).

The peers of the newer rows (each :class:`Peer`'s ``note`` says what still differs):

- ``local2d``: FlexAttention with the Neighborhood2D predicate as its ``mask_mod``
  (the same visible set); NATTEN ``na2d(kernel_size=15)`` (the same window except at
  the image border, where NATTEN shifts it inwards).
- ``nystrom``: nystrom-attention's ``NystromAttention(num_landmarks=64,
  residual=False)`` with its projections set to identity: the same landmarks and
  formula; its pinv is 6 iterations of the paper's iteration (ours: exact).
- ``clustered``: routing-transformer's ``KmeansAttention(window_size=512)`` with
  ceil(N / 512) clusters: 512 keys per query as ours (chunk of 256 + the one before).
- ``sinkhorn``: sinkhorn-transformer's ``SinkhornAttention(bucket_size=256,
  n_top_buckets=1)``: own + one sorted block, 8 Sinkhorn iterations, temperature 0.75.

The select-then-attend and recurrent families (docs/design.md sections 9, 10):

- ``topk_blocks``: blocks of 64, the own block + the 7 best earlier blocks by the MoBA
  gate (512 keys per query); ``nsa``: blocks of 64 (compression stride 64), the own,
  first and 6 selected blocks + a window of 64 + the N/64 compressed tokens; ``dsa``:
  512 tokens per query picked by a lightning indexer of 4 heads x 32 (its scores are
  O(N^2) cheap products, in chunks; in training it also computes its KL loss).
- ``gated_delta``, ``kda``, ``ssd``, ``gla``, ``retention``: chunks of 64, gates learned
  from k (registry defaults). They are causal only: a non-causal run lists them as
  skipped (``--causal`` runs them).
- peers: native-sparse-attention-pytorch's ``SparseAttention`` for ``nsa`` (its
  projections set to identity, its compression MLP replaced by our weighted pooling)
  and transformers' ``torch_chunk_gated_delta_rule`` (the Qwen3-Next fallback, with
  autograd) for ``gated_delta``, fed the very gates our module computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

DEFAULT_SHAPE = {"batch": 1, "heads": 8, "dim": 64, "dtype": "float32"}

# A setting value may be a callable of the case (n, heads, dim) -> value.
Dyn = Callable[[int, int, int], Any]


@dataclass(frozen=True)
class Setting:
    """Benchmark parameters of one mechanism (values may be callables of (n, heads, dim))."""

    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    #: for patterns constant on block x block tiles: the parameter holding the block
    block_param: str | None = None
    #: the working-memory model of :func:`estimate_bytes`: "" (by ``subquadratic``),
    #: "flash" (SDPA's flash kernel: O(N D)), "wide_scores" (Nq x Nk x D scores,
    #: 64 queries at a time forward: additive attention)
    memory: str = ""
    #: its cost grows as N^2 although it never builds Nq x Nk (strided: N/stride keys)
    quadratic: bool = False


def _edge_index(n: int, heads: int, dim: int) -> Tensor:
    """A graph where every node receives 32 edges: 16 neighbours + 16 random (seeded)."""
    g = torch.Generator().manual_seed(0)
    i = torch.arange(n)
    near = torch.cat([torch.arange(-8, 0), torch.arange(1, 9)])
    src_near = (i[:, None] + near[None, :]).clamp(0, n - 1)
    src_rand = torch.randint(0, n, (n, 16), generator=g)
    src = torch.cat([src_near, src_rand], 1).flatten()
    dst = i[:, None].expand(n, 32).flatten()
    return torch.stack([src, dst])


def _grid(n: int) -> tuple[int, int]:
    w = min(128, n)
    return n // w, w


def _composed_pattern(n: int, heads: int, dim: int) -> Any:
    from longattn import patterns as P

    return P.Union([P.Local(128, 128), P.Strided(256)])


SETTINGS: dict[str, Setting] = {
    "full": Setting({}, "PyTorch SDPA (the dense peer)", memory="flash"),
    "local": Setting({"before": 256, "after": 256}, "513 keys per query"),
    "dilated": Setting({"radius": 128, "dilation": 2}, "span 256 each side, every 2nd key"),
    "strided": Setting({"stride": 256}, "N/256 keys per query (O(N^2/256))", quadratic=True),
    "block_diagonal": Setting({"block": 512}, "512-key blocks", "block"),
    "global": Setting({"indices": tuple(range(16))}, "16 global tokens"),
    "random": Setting({"blocks_per_row": 8, "block": 64, "seed": 0}, "8 random blocks of 64", "block"),
    "longformer": Setting({"window": 256, "global_indices": (0,)}, "window 256 each side + token 0"),
    "bigbird": Setting({"block": 64, "random_blocks": 3, "global_blocks": 2, "seed": 0},
                       "3-block window + 3 random + 2 global blocks of 64", "block"),
    "sparse_transformer_strided": Setting({"l": 256}, "l = 256"),
    "sparse_transformer_fixed": Setting({"l": 256, "c": 32}, "l = 256, c = 32"),
    "pattern": Setting({"pattern": _composed_pattern}, "Local(128,128) | Strided(256)"),
    "graph": Setting({"edge_index": _edge_index}, "32 in-edges per node"),
    "local2d": Setting({"height": lambda n, h, d: _grid(n)[0], "width": lambda n, h, d: _grid(n)[1],
                        "radius_h": 7, "radius_w": 7}, "128-wide grid, 15 x 15 window"),
    "additive": Setting({"block": 64}, "O(N^2 A) scores, 64 queries at a time", memory="wide_scores"),
    "linear": Setting({"feature_map": "elu", "chunk_size": 64}, "elu + 1 features"),
    "performer": Setting({"num_features": 256, "seed": 0}, "256 orthogonal random features"),
    "linformer": Setting({"proj_dim": 256, "max_len": lambda n, h, d: n, "seed": 0}, "k = 256"),
    "compressed": Setting({"slots": 256}, "256 slots (stride N/256)"),
    "nystrom": Setting({"landmarks": 64}, "64 landmarks"),
    "lsh": Setting({"bucket_size": 64, "n_hashes": 2, "seed": 0}, "chunks of 64, 2 rounds"),
    "clustered": Setting({"n_clusters": 16, "chunk_size": 256, "seed": 0}, "16 clusters, chunks of 256"),
    "sinkhorn": Setting({"block_size": 256, "seed": 0}, "blocks of 256"),
    "synthesizer": Setting({"kind": "random", "max_len": lambda n, h, d: n, "seed": 0},
                           "random N x N scores per head"),
    "topk_blocks": Setting({"block": 64, "topk": 7, "gate": "mean"},
                           "own block + 7 MoBA-gated blocks of 64 = 512 keys per query"),
    "nsa": Setting({"block": 64, "topk": 6, "window": 64},
                   "N/64 compressed tokens + own, first and 6 selected blocks of 64 + window 64"),
    "dsa": Setting({"topk": 512, "index_heads": 4, "index_dim": 32},
                   "512 tokens per query chosen by a 4 x 32 lightning indexer (O(N^2) cheap scores)"),
    **{r: Setting({"chunk_size": 64}, "chunks of 64, gates learned from k")
       for r in ("gated_delta", "kda", "ssd", "gla")},
    "retention": Setting({"chunk_size": 64}, "chunks of 64, RetNet's fixed decays"),
}


def causal_only(name: str) -> bool:
    """Whether registered mechanism ``name`` runs only causally (a recurrence: the
    registry marks it ````causal_only````)."""
    from longattn.registry import get

    return get(name).causal_only


def settings(name: str, n: int, heads: int, dim: int) -> dict[str, Any]:
    """The benchmark parameters of ``name`` at this size (callables resolved).

    Mechanisms without an entry use their registry defaults. Raises ValueError when
    a required parameter of a functional (non-module) mechanism has no setting.
    """
    from longattn.registry import get

    spec = get(name)
    raw = SETTINGS.get(name, Setting()).params
    out = {k: (v(n, heads, dim) if callable(v) else v) for k, v in raw.items()}
    # learned mechanisms are built as modules, which make their own tensors
    missing = [p.name for p in spec.params if p.required and p.name not in out and spec.module is None]
    if missing:
        raise ValueError(f"mechanism {name!r} needs {missing}: add it to bench.cases.SETTINGS")
    return out


def describe_settings(name: str) -> str:
    """The settings of ``name`` as a short string for tables."""
    s = SETTINGS.get(name)
    if s is None:
        return "registry defaults"
    parts = []
    for k, v in s.params.items():
        parts.append(f"{k}={'f(N)' if callable(v) else v!r}")
    return ", ".join(parts) + (f" ({s.note})" if s.note else "")


def pattern_of(name: str, params: dict[str, Any]) -> Any | None:
    """The :class:`longattn.patterns.Pattern` a fixed-pattern mechanism computes, or None."""
    from longattn import patterns as P
    from longattn.registry import get

    spec = get(name)
    if "pattern" in params and isinstance(params["pattern"], P.Pattern):
        return params["pattern"]
    pname = spec.pattern
    if pname is None:
        return None
    from longattn.ops.sparse import with_globals

    kw = {k: v for k, v in params.items() if k not in ("global_idx", "backend")}
    return with_globals(pname, params.get("global_idx", ()), **kw)


# --------------------------------------------------------------------------- building


def make_inputs(batch: int, heads: int, n: int, dim: int, dtype: torch.dtype, train: bool,
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian q, k, v [B, H, N, D] (requiring grad when ``train``)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(3))
    if train:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def build_ours(name: str, n: int, heads: int, dim: int, causal: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(q, k, v) -> out`` running registered mechanism ``name`` at its bench settings."""
    from longattn.api import build

    params = settings(name, n, heads, dim)
    module = build(name, heads=heads, head_dim=dim, **params)
    module.train()

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return module(q, k, v, causal=causal)

    run.module = module  # type: ignore[attr-defined]
    return run


# --------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Peer:
    """A public implementation run beside ours at equal settings.

    ``equals``: the mechanism (and thus the settings and useful FLOPs) it is
    compared with; ``modes``: which of fwd/train it supports here; ``build(n, heads,
    dim, causal) -> f(q, k, v)``; ``available()`` says whether it can run.
    """

    name: str
    equals: str
    package: str
    build: Callable[[int, int, int, bool], Callable[[Tensor, Tensor, Tensor], Tensor]]
    available: Callable[[], bool]
    modes: tuple[str, ...] = ("fwd", "train")
    causal: bool = True
    note: str = ""
    #: how to install it, for the report's "not installed" line ("" = the bench extra)
    install: str = ""
    #: it has no non-causal form (a non-causal run lists it as left out)
    causal_only: bool = False
    #: ``estimate(case) -> bytes`` of its working memory, where the mechanism's
    #: :func:`estimate_bytes` model would undercount it (None: that model)
    estimate: Callable[[dict[str, Any]], float] | None = None


def _has(module: str) -> Callable[[], bool]:
    def check() -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None

    return check


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    import shutil

    return shutil.which("cc") is not None or shutil.which("gcc") is not None


# mask_mods written from the predicates of docs/design.md section 4 (for FlexAttention):
# one builder per mechanism, (bench settings, n, heads) -> mask_mod(b, h, i, j)
MaskModBuilder = Callable[[dict[str, Any], int, int], Callable]


def _flex_local(s: dict[str, Any], n: int, heads: int) -> Callable:
    a, b = s["before"], s["after"]
    return lambda bb, h, i, j: (j >= i - a) & (j <= i + b)


def _flex_dilated(s: dict[str, Any], n: int, heads: int) -> Callable:
    r, d = s["radius"], s["dilation"]
    return lambda bb, h, i, j: ((j - i) % d == 0) & ((j - i).abs() <= r * d)


def _flex_strided(s: dict[str, Any], n: int, heads: int) -> Callable:
    st = s["stride"]
    return lambda bb, h, i, j: (j - i) % st == 0


def _flex_longformer(s: dict[str, Any], n: int, heads: int) -> Callable:
    w = s["window"]
    g = max(s["global_indices"])
    assert tuple(s["global_indices"]) == tuple(range(g + 1))
    return lambda bb, h, i, j: ((j - i).abs() <= w) | (i <= g) | (j <= g)


def _flex_bigbird(s: dict[str, Any], n: int, heads: int) -> Callable:
    """BigBird's mask_mod: a dense [H, T, T] block table of its random blocks (tiny:
    block level), the very draw our mechanism runs, plus window and global blocks."""
    from longattn import patterns as P

    blk, gb = s["block"], s["global_blocks"]
    pat = pattern_of("bigbird", settings("bigbird", n, heads, 64))
    rnd = [c for c in pat.children() if isinstance(c, P.RandomBlocks)]
    tab = rnd[0].table(n, heads) if rnd else torch.zeros(heads, -(-n // blk), 0, dtype=torch.long)
    T = -(-n // blk)
    hit = torch.zeros(heads, T, T, dtype=torch.bool)
    hit.scatter_(2, tab.long(), torch.ones_like(tab, dtype=torch.bool))
    g = gb * blk

    def mm(bb, h, i, j):
        qb, kb = i // blk, j // blk
        return ((qb - kb).abs() <= 1) | (i < g) | (j < g) | hit[h, qb, kb]

    return mm


def _flex_mask_mod(name: str, n: int, heads: int) -> Callable:
    """The FlexAttention ``mask_mod`` of mechanism ``name`` at its bench settings
    (:data:`FLEX_MASKS`); KeyError for a mechanism without one."""
    build, _ = FLEX_MASKS[name]
    return build(SETTINGS[name].params, n, heads)


def _local2d_mask_mod(n: int, heads: int) -> Callable:
    """The predicate of :class:`longattn.patterns.Neighborhood2D` at the local2d
    settings: on the row-major ``height x width`` grid, key j is visible to query i
    iff |row_i - row_j| <= radius_h and |col_i - col_j| <= radius_w (the window is
    cut off at the image border, not shifted inwards)."""
    s = settings("local2d", n, heads, 64)
    W, rh, rw = s["width"], s["radius_h"], s["radius_w"]
    if s["height"] * W != n:
        raise ValueError(f"local2d needs N = height * width: a {W}-wide grid does not divide N={n}")
    return lambda bb, h, i, j: ((i // W - j // W).abs() <= rh) & ((i % W - j % W).abs() <= rw)


#: mechanism -> (mask_mod builder, the mask differs per head): the FlexAttention peers
FLEX_MASKS: dict[str, tuple[MaskModBuilder, bool]] = {
    "local": (_flex_local, False), "dilated": (_flex_dilated, False), "strided": (_flex_strided, False),
    "longformer": (_flex_longformer, False), "bigbird": (_flex_bigbird, True),
    "local2d": (lambda s, n, heads: _local2d_mask_mod(n, heads), False),
}
# the FlexAttention peers: the 1-D patterns (pattern_of gives their masks) and local2d
FLEX_PATTERNS = ("local", "dilated", "strided", "longformer", "bigbird")
FLEX_PEERS = tuple(FLEX_MASKS)


def _build_flex(name: str) -> Callable[[int, int, int, bool], Callable]:
    def build(n: int, heads: int, dim: int, causal: bool) -> Callable:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mm = _flex_mask_mod(name, n, heads)
        if causal:
            base = mm
            mm = lambda bb, h, i, j: base(bb, h, i, j) & (j <= i)  # noqa: E731
        head_dep = FLEX_MASKS[name][1]
        # eager create_block_mask evaluates the predicate on all N x N positions
        # (~2.6 GB at N=16384); compiled, it works block by block
        make = torch.compile(create_block_mask) if n > 4096 else create_block_mask
        bm = make(mm, B=None, H=heads if head_dep else None, Q_LEN=n, KV_LEN=n,
                  device="cpu", BLOCK_SIZE=128)
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return compiled(q, k, v, block_mask=bm)

        return run

    return build


def _build_local_attention(n: int, heads: int, dim: int, causal: bool) -> Callable:
    from local_attention import LocalAttention

    s = SETTINGS["local"].params
    w = s["before"]
    assert s["after"] == w, "local-attention needs before == after"
    if n % w:  # its autopad path lets the last rows see padding: not the same pattern
        raise ValueError(f"local-attention peer needs N a multiple of the window {w}, got N={n}")
    mod = LocalAttention(window_size=w, causal=causal, look_backward=1, look_forward=0 if causal else 1,
                         exact_windowsize=True, autopad=True, use_rotary_pos_emb=False, dropout=0.0)

    def run(q, k, v):
        return mod(q, k, v)

    return run


def _build_performer(n: int, heads: int, dim: int, causal: bool) -> Callable:
    from performer_pytorch import FastAttention

    mod = FastAttention(dim_heads=dim, nb_features=SETTINGS["performer"].params["num_features"], causal=causal)

    def run(q, k, v):
        return mod(q, k, v)

    return run


def _build_reformer(n: int, heads: int, dim: int, causal: bool) -> Callable:
    from reformer_pytorch import LSHAttention

    s = SETTINGS["lsh"].params
    mod = LSHAttention(bucket_size=s["bucket_size"], n_hashes=s["n_hashes"], causal=causal)

    def run(q, k, v):
        B, H, N, D = q.shape
        out = mod(q.reshape(B * H, N, D), v.reshape(B * H, N, D))[0]
        return out.reshape(B, H, N, -1)

    return run


def _build_linformer_pkg(n: int, heads: int, dim: int, causal: bool) -> Callable:
    from linformer import LinformerSelfAttention

    mod = LinformerSelfAttention(dim=heads * dim, seq_len=n, heads=heads, dim_head=dim,
                                 k=SETTINGS["linformer"].params["proj_dim"], one_kv_head=False,
                                 share_kv=False)
    # it is a whole layer: drop its q/k/v/out projections so that it times the
    # attention only (then q = k = v = the input, which does not change the cost)
    mod.to_q = mod.to_k = mod.to_v = mod.to_out = nn.Identity()

    def run(q, k, v):
        B, H, N, D = q.shape
        return mod(q.transpose(1, 2).reshape(B, N, H * D))

    return run


def _fused_qkv_runner(mod: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(q, k, v)`` for a peer module whose q/k/v projections are identities, so it
    takes [B, N, 3 H D] (q, k, v side by side) and returns [B, N, H D]; ``f.module``."""

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, N, D = q.shape
        x = torch.cat([t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k, v)], dim=-1)
        return mod(x).reshape(B, N, H, D).transpose(1, 2)

    run.module = mod  # type: ignore[attr-defined]
    return run


def _with_defaults(name: str, n: int, heads: int, dim: int) -> dict[str, Any]:
    """The bench settings of ``name`` over its registry defaults (what ours runs with)."""
    from longattn.registry import get

    out = {p.name: p.default for p in get(name).params if not p.required}
    out.update(settings(name, n, heads, dim))
    return out


#: nystrom-attention's pinv iterations: the paper's 6 (the package default). It has no
#: exact pseudo-inverse, which our benchmark setting uses (pinv_iters=None)
NYSTROM_PEER_PINV_ITERS = 6


def _build_nystrom_pkg(n: int, heads: int, dim: int, causal: bool,
                       pinv_iters: int = NYSTROM_PEER_PINV_ITERS) -> Callable:
    """nystrom-attention's ``NystromAttention`` layer reduced to its attention.

    Its q/k/v projection (one Linear to 3 H D) and its output projection become
    identities and q, k, v go in concatenated along the features, so it attends over
    exactly our q, k, v (the concatenation and the layout changes are O(N H D)).
    The residual depthwise convolution of v is off (ours has none).
    """
    if causal:
        raise ValueError("nystrom-attention has no causal mode (neither has our nystrom)")
    from nystrom_attention import NystromAttention

    m = _with_defaults("nystrom", n, heads, dim)["landmarks"]
    mod = NystromAttention(dim=heads * dim, dim_head=dim, heads=heads, num_landmarks=m,
                           pinv_iterations=pinv_iters, residual=False, dropout=0.0)
    mod.to_qkv = nn.Identity()
    mod.to_out = nn.Identity()

    return _fused_qkv_runner(mod)


def _build_routing(n: int, heads: int, dim: int, causal: bool) -> Callable:
    """routing-transformer's ``KmeansAttention`` (the attention of its layer, no projections).

    Each of its clusters takes the ``window`` queries and the ``window`` keys nearest
    its centroid and attends among them; window = our keys per query (a chunk of 256
    and, with look-back, the chunk before: 512), and ceil(N / window) clusters so
    that the windows cover N (each token about once).
    """
    from routing_transformer.routing_transformer import KmeansAttention

    s = _with_defaults("clustered", n, heads, dim)
    w = s["chunk_size"] * (2 if s["look_back"] else 1)
    n_clusters = max(1, math.ceil(n / w))
    mod = KmeansAttention(num_clusters=n_clusters, window_size=w, num_heads=heads, head_dim=dim,
                          causal=causal, dropout=0.0, shared_qk=False)
    mod.train()  # as build_ours: k-means centroids move in training (ours by EMA too)

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return mod(q, k, v)[0]  # (out, commitment loss)

    run.module = mod  # type: ignore[attr-defined]
    return run


def _build_sinkhorn_pkg(n: int, heads: int, dim: int, causal: bool) -> Callable:
    """sinkhorn-transformer's ``SinkhornAttention`` (``SinkhornCausalAttention`` when
    causal): buckets of our block size, each attending to itself and one sorted
    bucket (2 x 256 keys, as ours); non-causal: Gumbel-Sinkhorn sorting with our 8
    iterations and temperature 0.75 (not its default top-1 sort)."""
    s = _with_defaults("sinkhorn", n, heads, dim)
    b = s["block_size"]
    if n % b:
        raise ValueError(f"sinkhorn-transformer needs N a multiple of its bucket size {b}, got N={n}")
    from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention, SinkhornCausalAttention

    if causal:
        mod: nn.Module = SinkhornCausalAttention(b, heads * dim, dim, heads, n, dropout=0.0,
                                                 n_top_buckets=1, temperature=s["temperature"])
    else:
        mod = SinkhornAttention(b, heads * dim, dim, heads, n, temperature=s["temperature"],
                                non_permutative=False, sinkhorn_iter=s["iters"], n_sortcut=0, dropout=0.0,
                                n_top_buckets=1)

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return mod(q, k, v)

    run.module = mod  # type: ignore[attr-defined]
    return run


def _build_natten(n: int, heads: int, dim: int, causal: bool) -> Callable:
    """NATTEN's ``na2d`` on the local2d grid, kernel (2 radius + 1)^2.

    Without CUDA, NATTEN (built without libnatten) has only its FlexAttention backend,
    and it refuses to compile Flex without a CUDA device of compute capability >= 70:
    on the CPU it runs Flex's unfused path (which materialises the N x N scores).
    """
    if causal:
        raise ValueError("NATTEN's causal masks are per axis (row <= and column <=), not raster order")
    import natten

    s = settings("local2d", n, heads, dim)
    Hh, W = s["height"], s["width"]
    if Hh * W != n:
        raise ValueError(f"local2d needs N = height * width: a {W}-wide grid does not divide N={n}")
    ks = (2 * s["radius_h"] + 1, 2 * s["radius_w"] + 1)

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, N, D = q.shape
        grid = [t.transpose(1, 2).reshape(B, Hh, W, H, D) for t in (q, k, v)]
        out = natten.na2d(*grid, kernel_size=ks)  # NATTEN picks its backend (CPU: flex-fna)
        return out.reshape(B, N, H, D).transpose(1, 2)

    return run


class _PoolCompress(nn.Module):
    """Our ``nsa`` compression for native-sparse-attention-pytorch's ``compress_mlp``:
    [B, H, W, block, D] (its windows, intra-block positions added) -> [B, H, W, D], a
    weighted mean over the block with softmax(logits) (logits 0: the block mean, as ours
    at initialisation). O(W block D)."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(block))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bhwnd,n->bhwd", x, self.logits.softmax(0).to(x.dtype))


class _FirstFeatures(nn.Module):
    """``inner`` applied to the first ``width`` features (the queries of [q | k | v])."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner, self.width = inner, width

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x[..., : self.width])


def _build_nsa_pkg(n: int, heads: int, dim: int, causal: bool) -> Callable:
    """native-sparse-attention-pytorch's ``SparseAttention`` reduced to its attention.

    q, k, v go in concatenated along the features, its RMSNorm, q/k/v projection and
    head-combining projection become identities, its branch gates read the queries (as
    ours), and its compression MLP is our weighted pooling (:class:`_PoolCompress`), so
    the three branches attend over our q, k, v with our block, stride, top-k and window.
    Still its own: one learned memory key/value among the compressed tokens, rotary
    positions on the selected and window branches, a window of ``window + 1`` keys.
    """
    from native_sparse_attention_pytorch import SparseAttention

    s = _with_defaults("nsa", n, heads, dim)
    blk = s["block"]
    mod = SparseAttention(dim=heads * dim, dim_head=dim, heads=heads, sliding_window_size=s["window"],
                          compress_block_size=blk, compress_block_sliding_stride=s["stride"] or blk,
                          selection_block_size=blk, num_selected_blocks=s["topk"], causal=causal, norm=False,
                          query_heads_share_selected_kv=s["shared"], compress_mlp=_PoolCompress(blk))
    mod.to_qkv = nn.Identity()
    mod.combine_heads = nn.Identity()
    mod.to_strategy_combine[0] = _FirstFeatures(mod.to_strategy_combine[0], heads * dim)

    return _fused_qkv_runner(mod)


def _nsa_pkg_bytes(case: dict[str, Any]) -> float:
    """native-sparse-attention-pytorch's CPU path gathers every query's selected key and
    value blocks: 2 x [B, H, N, topk + 1, block, D] plus the [B, H, N, (topk + 1) block]
    scores (x 2.5 in training, for the saved tensors and gradients)."""
    B, H, N, D = case["batch"], case["heads"], case["n"], case["dim"]
    s = _with_defaults("nsa", N, H, D)
    keys = (s["topk"] + 1) * s["block"]
    per = B * H * N * keys * (2 * D + 3) * 4
    return per * (2.5 if case["mode"] == "train" else 1.0) + 6 * B * H * N * D * 4


def _build_transformers_gdn(n: int, heads: int, dim: int, causal: bool) -> Callable:
    """transformers' ``torch_chunk_gated_delta_rule`` (Qwen3-Next's fallback without
    flash-linear-attention), with autograd for the backward, on [B, N, H, D].

    It gets the gates our ``gated_delta`` module computes from k (a
    :class:`longattn.ops.recurrent.modules.RecurrentGates` built the same way), L2-norm
    of q and k on, chunks of 64: the same computation as ours (checked equal).
    """
    if not causal:
        raise ValueError("torch_chunk_gated_delta_rule is causal only (a recurrence)")
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from longattn.ops.recurrent.modules import RecurrentGates

    chunk = _with_defaults("gated_delta", n, heads, dim)["chunk_size"]
    gates = RecurrentGates(heads, dim, "gated_delta")

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        g, beta, _ = gates(k)
        o, _ = torch_chunk_gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            g.transpose(1, 2), beta.transpose(1, 2), chunk_size=chunk,
                                            use_qk_l2norm_in_kernel=True)
        return o.transpose(1, 2)

    run.module = gates  # type: ignore[attr-defined]
    return run


_FLEX_EXTRA = {
    "local2d": ". Blocks of 128 are whole grid rows: each query block computes 15 partial key blocks "
               "(1920 keys) for 225 visible; checked equal to ours",
}

PEERS: dict[str, Peer] = {
    **{
        f"flex:{p}": Peer(f"flex:{p}", p, "torch.nn.attention.flex_attention", _build_flex(p),
                          _flex_available, modes=("fwd",),
                          note="torch.compile'd FlexAttention with a BlockMask (128) from the predicate; "
                               "inference only on CPU" + _FLEX_EXTRA.get(p, ""))
        for p in FLEX_PEERS
    },
    "local-attention": Peer("local-attention", "local", "local_attention", _build_local_attention,
                            _has("local_attention"),
                            note="LocalAttention(window 256, look back/forward 1, exact_windowsize)"),
    "performer-pytorch": Peer("performer-pytorch", "performer", "performer_pytorch", _build_performer,
                              _has("performer_pytorch"), note="FastAttention(nb_features=256)"),
    "reformer-pytorch": Peer("reformer-pytorch", "lsh", "reformer_pytorch", _build_reformer,
                             _has("reformer_pytorch"),
                             note="LSHAttention(bucket_size=64, n_hashes=2), shared QK"),
    "linformer-pkg": Peer("linformer-pkg", "linformer", "linformer", _build_linformer_pkg,
                          _has("linformer"), causal=False,
                          note="LinformerSelfAttention(k=256) with its q/k/v/out projections set to identity"),
    "nystrom-attention": Peer(
        "nystrom-attention", "nystrom", "nystrom_attention", _build_nystrom_pkg, _has("nystrom_attention"),
        causal=False,
        note="NystromAttention(num_landmarks=64, pinv_iterations=6, residual=False), q/k/v/out projections "
             "set to identity. Differs from ours in the pinv only: 6 iterations of the paper's iteration "
             "(no exact option; ours: exact pinv), started from A^T / (max column sum * max row sum) taken "
             "over all batches and heads together (ours: per head). Checked equal to ours with "
             "pinv_iters=6 head by head"),
    "routing-transformer": Peer(
        "routing-transformer", "clustered", "routing_transformer", _build_routing, _has("routing_transformer"),
        note="KmeansAttention(window_size=512, num_clusters=ceil(N/512)): 512 keys per query as ours, but not "
             "the same computation (so not checked equal): each cluster takes the top-512 queries and keys "
             "nearest its centroid (a token may be in several windows or none; ours: every token in one "
             "cluster, equal chunks of 256 of the (cluster, position) order + the chunk before); queries and "
             "keys routed separately (ours: by q/|q| + k/|k|); centroids from 10 k-means iterations on the "
             "first input (ours: 16 random unit vectors, moved by EMA in training); causal adds a learned "
             "memory key/value per cluster"),
    "sinkhorn-transformer": Peer(
        "sinkhorn-transformer", "sinkhorn", "sinkhorn_transformer", _build_sinkhorn_pkg,
        _has("sinkhorn_transformer"),
        note="SinkhornAttention(bucket_size=256, n_top_buckets=1, non_permutative=False, sinkhorn_iter=8, "
             "temperature=0.75): own + 1 sorted bucket = 512 keys as ours. Not the same computation (checked "
             "equal only with a fixed hard permutation and v = k): block scores are raw dot products of "
             "block means with Gumbel noise always on (ours: a random bilinear SortNet, no noise), and "
             "0.11.4 mixes the sorted *keys* in as the sorted bucket's values; causal is its "
             "SinkhornCausalAttention (top-1 past bucket, half the heads shifted, learned null bucket)"),
    "natten": Peer(
        "natten", "local2d", "natten", _build_natten, _has("natten"), modes=("fwd",), causal=False,
        note="NATTEN na2d(kernel_size=15) on the 128-wide grid. Equal to ours in the interior (checked), "
             "not at the border: NATTEN shifts the window inwards there (always 15 x 15 keys; ours cuts "
             "it off). Causal is per axis in NATTEN, so non-causal only. On CPU it has only its Flex "
             "backend, uncompiled (it compiles Flex on CUDA devices only): forward only, N x N scores",
        install="not in the bench extra (pip would build it in an isolated environment with a CUDA torch): "
                "`pip install --no-build-isolation natten` builds it against this torch"),
    "native-sparse-attention": Peer(
        "native-sparse-attention", "nsa", "native_sparse_attention_pytorch", _build_nsa_pkg,
        _has("native_sparse_attention_pytorch"), estimate=_nsa_pkg_bytes,
        note="SparseAttention(compress block = stride = selection block = 64, 6 selected blocks, window 64) "
             "with its norm and q/k/v/out projections set to identity and our weighted pooling as its "
             "compression MLP. Not the same computation (so not checked equal): one learned memory "
             "key/value among the compressed tokens, rotary positions on the selected and window "
             "branches, a window of 65 keys, the own block but not the first one added to the selection; "
             "on CPU (no Triton, no CUDA FlexAttention) it gathers every query's selected blocks "
             "(O(N topk block D) memory)"),
    "transformers-gdn": Peer(
        "transformers-gdn", "gated_delta", "transformers", _build_transformers_gdn, _has("transformers"),
        causal_only=True,
        note="transformers' torch_chunk_gated_delta_rule (Qwen3-Next's torch fallback), autograd backward, "
             "[B, N, H, D] layout, chunks of 64, q/k L2-normalised, fed the gates our module computes: "
             "the same computation (checked equal)",
        install="`pip install 'longattn[hf]'` (transformers >= 5.0)"),
}


def build_case(case: dict[str, Any]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(q, k, v)`` for a case dict (``mechanism`` or ``peer`` set)."""
    n, h, d, causal = case["n"], case["heads"], case["dim"], case.get("causal", False)
    if case.get("peer"):
        return PEERS[case["peer"]].build(n, h, d, causal)
    return build_ours(case["mechanism"], n, h, d, causal)


# --------------------------------------------------------------------------- memory model


def estimate_bytes(case: dict[str, Any], flops_fwd: float | None = None) -> float:
    """A rough upper estimate of a case's peak working memory (bytes), to skip cases
    that cannot fit before running them.

    Inputs (and their gradients in train) plus: for mechanisms that materialise
    Nq x Nk scores (``subquadratic=False`` apart from ``full``, which runs the flash
    kernel without a mask) ~3 score matrices forward, ~6 in training (times the
    additive width A for additive attention); for the others ~16 values per key
    visited per query (taken from the useful FLOPs when known, else 1024 keys).
    """
    from longattn.registry import get

    peer = PEERS.get(case.get("peer") or "")
    if peer is not None and peer.estimate is not None:
        return peer.estimate(case)
    B, H, N, D = case["batch"], case["heads"], case["n"], case["dim"]
    el = torch.tensor([], dtype=getattr(torch, case.get("dtype", "float32"))).element_size()
    el = max(el, 4)
    train = case["mode"] == "train"
    inputs = 3 * B * H * N * D * el * (2 if train else 1) + B * H * N * D * el * 2
    name = case["mechanism"]
    spec = get(name)
    keys = 1024.0
    if flops_fwd:
        keys = max(1.0, flops_fwd / (4 * B * H * N * D))
    model = SETTINGS.get(name, Setting()).memory
    if not spec.subquadratic and model != "flash" and not case.get("peer"):
        width = D if model == "wide_scores" else 1
        mats = 6 if train else 3
        if model == "wide_scores" and not train:
            return inputs + 4 * B * H * 64 * N * width * 4
        return inputs + mats * B * H * N * N * width * 4 + H * N * N * 4 * (3 if train else 1)
    if model == "flash":  # SDPA's flash kernel: O(N D) working memory
        return inputs + 16 * B * H * N * D * 4 + 64 * 2**20
    per = (8 if train else 4) * B * H * N * min(keys, N) * 4
    return inputs + per + 64 * 2**20


def is_quadratic(case: dict[str, Any]) -> bool:
    """Whether the case's cost grows as N^2 (for extrapolating time/memory)."""
    from longattn.registry import get

    name = case["mechanism"]
    return not get(name).subquadratic or SETTINGS.get(name, Setting()).quadratic


def param_count(fn: Callable) -> int:
    mod = getattr(fn, "module", None)
    return sum(p.numel() for p in mod.parameters()) if isinstance(mod, nn.Module) else 0


def mechanism_names(requested: list[str] | None = None) -> list[str]:
    """Registered mechanisms to benchmark (all by default), validated."""
    from longattn.registry import names

    known = names()
    if not requested:
        return known
    bad = [m for m in requested if m not in known]
    if bad:
        raise ValueError(f"unknown mechanism(s) {bad}; registered: {known}")
    return list(requested)


def peer_names(requested: list[str] | None = None, mechanisms: list[str] | None = None) -> list[str]:
    """Available peers whose equal mechanism is benchmarked (or the ones asked for)."""
    if requested is not None:
        bad = [p for p in requested if p not in PEERS]
        if bad:
            raise ValueError(f"unknown peer(s) {bad}; known: {sorted(PEERS)}")
        return [p for p in requested if PEERS[p].available()]
    return [p for p, peer in PEERS.items()
            if (mechanisms is None or peer.equals in mechanisms) and peer.available()]


def short_run_peers(mechanisms: list[str] | None = None) -> list[str]:
    """The peers of a short run (``make demo``, ``bench --quick``): every peer whose
    equal mechanism is benchmarked, installed or not (the missing ones are listed in
    the report, not dropped), with FlexAttention for ``local`` only (compiling every
    Flex peer costs minutes)."""
    return [p for p, peer in PEERS.items()
            if (mechanisms is None or peer.equals in mechanisms) and (not p.startswith("flex:") or p == "flex:local")]


def missing_peers(requested: list[str] | None = None, mechanisms: list[str] | None = None) -> list[str]:
    """The peers :func:`peer_names` would run but cannot: their package is not installed."""
    names = requested if requested is not None else [
        p for p, peer in PEERS.items() if mechanisms is None or peer.equals in mechanisms]
    return [p for p in names if p in PEERS and not PEERS[p].available()]


def log2(x: float) -> float:
    return math.log2(x) if x > 0 else float("-inf")
