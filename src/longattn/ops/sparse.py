"""Fixed sparse patterns as registered mechanisms (exact, sub-quadratic).

Each mechanism builds a :mod:`longattn.patterns` pattern from its parameters and
runs the exact engine :func:`longattn.ops.blocksparse.pattern_attention`. Patterns
are cached per parameter set so their tile plans are reused across calls.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from longattn import patterns as P
from longattn.ops.blocksparse import pattern_attention
from longattn.registry import REQUIRED, Param, register

_CACHE: dict[tuple, P.Pattern] = {}


def _freeze(x: Any) -> Any:
    """``x`` as a hashable value: lists, tuples, ranges and tensors become tuples."""
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if hasattr(x, "tolist"):
        return _freeze(x.tolist())
    if isinstance(x, range):
        return tuple(x)
    return x


def _typed_key(x: Any) -> Any:
    """A cache key of ``x`` that is equal only for values of the same types: Python has
    ``2.0 == 2`` and ``True == 1`` (same hash), so a plain key would hand a refused
    ``before=2.0`` the pattern built for ``before=2`` once that was cached."""
    x = _freeze(x)
    if isinstance(x, tuple):
        return ("tuple", tuple(_typed_key(v) for v in x))
    return (type(x).__qualname__, x)


def cached_pattern(name: str, **params: Any) -> P.Pattern:
    """``patterns.make(name, **params)``, one object per distinct parameter set (equal
    values of different types, 2 and 2.0 or 1 and True, are different sets)."""
    key = (name, tuple(sorted((k, _typed_key(v)) for k, v in params.items())))
    pat = _CACHE.get(key)
    if pat is None:
        if len(_CACHE) > 512:
            _CACHE.clear()
        pat = _CACHE[key] = P.make(name, **params)
    return pat


def with_globals(name: str, global_idx: Any = (), **params: Any) -> P.Pattern:
    """The cached pattern ``name``, united with global tokens at ``global_idx`` if any."""
    base = cached_pattern(name, **params)
    idx = _freeze(global_idx)
    if not idx:
        return base
    key = ("+global", id(base), _typed_key(idx))
    pat = _CACHE.get(key)
    if pat is None:
        pat = _CACHE[key] = P.Union([base, P.GlobalTokens(list(idx))])
    return pat


GLOBAL_IDX = Param("global_idx", (), "extra global positions (e.g. CLS tokens): see all, seen by all")
BACKEND = Param("backend", "auto", "'engine' | 'flex' (FlexAttention block masks) | 'auto': flex on CUDA")

#: the parameters of each pattern mechanism that name positions (checked to be >= 0)
_POSITION_PARAMS = {"global": "indices", "longformer": "global_indices"}

_REAL_MODELS = dict(gqa=True, bottom_right=True, packed=True, sinks=True, softcap=True)
"""Every exact pattern serves grouped KV heads, decode steps, packed documents, learned
sinks and score caps."""


def _check_positions(name: str, global_idx: Any, params: dict[str, Any]) -> None:
    """Global positions must be >= 0: a ValueError naming the parameter. A position >= N
    is not an error: that token is not there yet (a decode step before it, a shorter
    input, a packed document shorter than the index) and is ignored for this call, as
    the full-sequence computation ignores it for every earlier query."""
    for pname, value in ((_POSITION_PARAMS.get(name), params.get(_POSITION_PARAMS.get(name, ""))),
                         ("global_idx", global_idx)):
        idx = _freeze(value) if pname else ()
        if isinstance(idx, int):
            idx = (idx,)
        bad = [i for i in (idx or ()) if isinstance(i, int) and i < 0]
        if bad:
            raise ValueError(f"{pname} must be non-negative positions, got {bad[:8]}")


def _quantum(name: str) -> Callable[[dict[str, Any], bool], int]:
    def quantum(params: dict[str, Any], causal: bool) -> int:
        kw = {k: v for k, v in params.items() if k not in ("global_idx", "backend")}
        return with_globals(name, params.get("global_idx", ()), **kw).length_quantum(causal)

    return quantum


def _pattern_mechanism(name: str, params: tuple[Param, ...], paper: str, summary: str,
                       **caps: Any) -> Callable[..., Tensor]:
    def fn(q, k, v, *, causal=False, key_padding_mask=None, scale=None, global_idx=(), backend="auto",
           sinks=None, softcap=None, **kw):
        _check_positions(name, global_idx, kw)
        return pattern_attention(
            q, k, v, with_globals(name, global_idx, **kw),
            causal=causal, key_padding_mask=key_padding_mask, scale=scale, backend=backend,
            sinks=sinks, softcap=softcap,
        )

    fn.__name__ = f"{name}_attention"
    fn.__doc__ = f"{summary}\n\nExact; q, k [B, H, N, D], v [B, H, N, Dv] -> [B, H, N, Dv]. {paper}"
    register(
        name, params=(*params, GLOBAL_IDX, BACKEND), family="pattern", exact=True, causal=True,
        cross=False, subquadratic=True, paper=paper, summary=summary, **_REAL_MODELS,
        pattern=name, global_param="global_idx", length_quantum=_quantum(name),
        tile_engine=True, sequence_parallel="halo", **caps,
    )(fn)
    return fn


local_attention = _pattern_mechanism(
    "local",
    (Param("before", 64, "keys before the query (i - before <= j)"),
     Param("after", 64, "keys after the query (j <= i + after)")),
    "Liu et al. 2018; Child et al. 2019 (truncated/sliding window)",
    "sliding window: i - before <= j <= i + after",
    window_params=("before", "after"),
)
dilated_attention = _pattern_mechanism(
    "dilated",
    (Param("radius", 8, "keys on each side"), Param("dilation", 2, "gap between keys")),
    "Beltagy et al. 2020, Longformer (dilated sliding window)",
    "(j - i) % dilation == 0 and |j - i| <= radius * dilation",
)
strided_attention = _pattern_mechanism(
    "strided",
    (Param("stride", 64, "period of visible keys"),),
    "Child et al. 2019 (strided heads)",
    "every stride-th position, unbounded: (j - i) % stride == 0",
)
block_attention = _pattern_mechanism(
    "block_diagonal",
    (Param("block", 64, "block length"),),
    "Qiu et al. 2019, Blockwise self-attention",
    "within the same block: j // block == i // block",
)
global_attention = _pattern_mechanism(
    "global",
    (Param("indices", (0,), "global positions (see all, seen by all)"),),
    "Beltagy et al. 2020; Zaheer et al. 2020 (global tokens)",
    "global rows and columns: i in indices or j in indices",
)
random_attention = _pattern_mechanism(
    "random",
    (Param("blocks_per_row", 3, "random key blocks per query block"),
     Param("block", 64, "block length"), Param("seed", 0, "draw seed (per head)")),
    "Zaheer et al. 2020, BigBird (random blocks)",
    "r seeded random key blocks per query block, per head",
)
longformer_attention = _pattern_mechanism(
    "longformer",
    (Param("window", 256, "one-sided window"), Param("global_indices", (0,), "global positions"),
     Param("dilation", 1, "window dilation")),
    "Beltagy et al. 2020, Longformer",
    "sliding (optionally dilated) window + global tokens",
)
bigbird_attention = _pattern_mechanism(
    "bigbird",
    (Param("block", 64, "block length"), Param("random_blocks", 3, "random blocks per row"),
     Param("global_blocks", 1, "leading global blocks"), Param("seed", 0, "random draw seed")),
    "Zaheer et al. 2020, BigBird",
    "3-block window + random blocks + global blocks",
)
st_strided_attention = _pattern_mechanism(
    "sparse_transformer_strided",
    (Param("l", 64, "stride"), Param("mode", "heads", "'heads' (A/B head halves) or 'union'")),
    "Child et al. 2019, Sparse Transformer (strided)",
    "heads A: 0 <= i - j < l; heads B: (i - j) % l == 0; causal",
)
st_fixed_attention = _pattern_mechanism(
    "sparse_transformer_fixed",
    (Param("l", 64, "block length"), Param("c", 8, "summary positions per block"),
     Param("mode", "heads", "'heads' (A/B head halves) or 'union'")),
    "Child et al. 2019, Sparse Transformer (fixed)",
    "heads A: same block; heads B: j % l >= l - c (summaries); causal",
)


@register(
    "pattern",
    params=(Param("pattern", REQUIRED, "a longattn.patterns.Pattern (unions, per-head lists...)"), BACKEND),
    family="pattern", exact=True, causal=True, cross=False, subquadratic=True, **_REAL_MODELS,
    length_quantum=lambda params, causal: params["pattern"].length_quantum(causal),
    pattern_param="pattern", tile_engine=True, sequence_parallel="halo",
    paper="any composition of docs/design.md section 4",
    summary="exact attention over any Pattern object",
)
def any_pattern_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, pattern, backend="auto",
                          sinks=None, softcap=None):
    """Exact attention over a user-built pattern, e.g. ``Local(64, 64) | Strided(128)``."""
    return pattern_attention(q, k, v, pattern, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                             backend=backend, sinks=sinks, softcap=softcap)
