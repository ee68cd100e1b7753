"""The approximation-error meter: each approximation against exact attention.

For every approximate mechanism (``spec.exact`` False) the relative error of the
output, ``||out - exact||_F / ||exact||_F``, as its budget grows (features,
projected length, landmarks, slots, hashing rounds, chunk or block size), on two
kinds of input:

- ``gaussian``: q, k, v i.i.d. N(0, 1) (attention is diffuse: the hard case for
  sparse approximations, the easy one for low-rank ones);
- ``local``: smooth sequences (Gaussian noise averaged over a moving window of 32,
  rescaled) with q = 2 z + 0.3 noise, k = 2 z: a query is most similar to the keys
  near it, as in text or images (attention is peaked and local).

"exact" is softmax attention over every key (``dense_attention`` in float64),
except for LSH, whose model is shared-QK attention without self-attention: its
reference is dense attention with k = q / |q| and the diagonal masked. Exact
mechanisms (fixed patterns, full) are checked against the dense masked reference
with their own mask and report ~0 (float64 rounding).

Everything runs in float64 on the functional forms (learned mechanisms use their
fixed random tensors from ``seed``), at a fixed seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

SCHEMA = "longattn.error"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """The parameter that buys accuracy, its values, and fixed companions."""

    param: str
    values: tuple[Any, ...]
    fixed: dict[str, Any] | None = None
    note: str = ""
    capped: bool = True  # values above N are meaningless (lengths, counts of positions)


BUDGETS: dict[str, Budget] = {
    "performer": Budget("num_features", (16, 64, 256, 1024), None, "random features", capped=False),
    "linformer": Budget("proj_dim", (16, 64, 256, 1024), {"max_len": "N"}, "projected length k"),
    "nystrom": Budget("landmarks", (4, 16, 64, 256), None, "landmarks m"),
    "compressed": Budget("slots", (16, 64, 256, 1024), None, "compressed slots (stride N/slots)"),
    "lsh": Budget("n_hashes", (1, 2, 4, 8), {"bucket_size": 32}, "hashing rounds (chunks of 32)", capped=False),
    "clustered": Budget("chunk_size", (16, 64, 256, 1024), {"n_clusters": 8}, "chunk length (8 clusters)"),
    "sinkhorn": Budget("block_size", (16, 64, 256, 1024), None, "block length"),
    "linear": Budget("chunk_size", (64,), {"feature_map": "elu"}, "elu+1 features: no budget"),
    # every block selected (topk >= N / 32 - 1) is exact attention: the curve ends at rounding
    "topk_blocks": Budget("topk", (1, 2, 4, 8, 16, 32), {"block": 32, "gate": "mean"},
                          "key blocks of 32 selected per query (MoBA gate)"),
}
"""Budget axis of each approximate mechanism (capped ones drop values above N)."""

_RECURRENT = ("a recurrent state model (decays, delta rule), causal only: not an approximation of softmax "
              "attention, it has no budget that reaches it")
NOT_AN_APPROXIMATION = {
    "synthesizer": "synthesised scores with no Q-K product: not an approximation of softmax attention",
    # learned mixtures whose untrained output is not softmax attention over all keys
    "nsa": "a learned sigmoid-gated sum of three branches (compressed, selected, window): not an "
           "approximation of one softmax over all keys",
    "dsa": "its selection comes from a learned indexer (random at initialisation): measured on a trained "
           "model (longattn eval), not here",
    **{r: _RECURRENT for r in ("gated_delta", "kda", "ssd", "gla", "retention")},
}


# ----------------------------------------------------------------------- inputs


def _smooth(x: Tensor, width: int) -> Tensor:
    """Moving average of width ``width`` along dim -2 (no N x N), rescaled to unit variance."""
    c = torch.cumsum(x, dim=-2)
    c = torch.cat([torch.zeros_like(c[..., :1, :]), c], dim=-2)
    n = x.shape[-2]
    hi = torch.clamp(torch.arange(n) + width // 2 + 1, max=n)
    lo = torch.clamp(torch.arange(n) - width // 2, min=0)
    y = (c[..., hi, :] - c[..., lo, :]) / (hi - lo).to(x.dtype)[:, None]
    return y / y.std()


def make_inputs(kind: str, batch: int, heads: int, n: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, N, D] in float64 for input ``kind`` ('gaussian' or 'local')."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n, dim)
    r = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "gaussian":
        return r(), r(), r()
    if kind == "local":
        z = _smooth(r(), 32)
        q = 2.0 * z + 0.3 * r()
        k = 2.0 * z
        v = _smooth(r(), 32)
        return q, k, v
    raise ValueError(f"input kind must be 'gaussian' or 'local', got {kind!r}")


INPUT_KINDS = ("gaussian", "local")


# ----------------------------------------------------------------------- references


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref||_F / ||ref||_F (in float64)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def approx_reference(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Exact softmax attention under the approximation's own model (see module doc)."""
    from longattn.ops.reference import dense_attention
    from longattn.registry import get

    if get(name).family == "lsh":
        ku = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = q.shape[-2]
        return dense_attention(q, ku, v, mask=~torch.eye(n, dtype=torch.bool), causal=causal)
    return dense_attention(q, k, v, causal=causal)


def _distinct_edges(n: int) -> dict[str, Any]:
    """graph: distinct random edges (5% + self loops; the bench graph repeats border edges)."""
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(n, n, generator=g) < 0.05) | torch.eye(n, dtype=torch.bool)
    i, j = m.nonzero(as_tuple=True)
    return {"edge_index": torch.stack([j, i])}


def _edge_mask(params: dict[str, Any], n: int) -> Tensor:
    ei = params["edge_index"]  # row 0 key j, row 1 query i
    m = torch.zeros(n, n, dtype=torch.bool)
    m[ei[1], ei[0]] = True
    return m


def _grid_mask(params: dict[str, Any], n: int) -> Tensor:
    W, rh, rw = params["width"], params["radius_h"], params["radius_w"]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((i // W - j // W).abs() <= rh) & ((i % W - j % W).abs() <= rw)


@dataclass(frozen=True)
class ExactCheck:
    """How the meter checks an exact mechanism at small N, beside its bench settings:
    ``params(n)`` laid over them (so that the pattern is not all-visible), and
    ``mask(params, n)`` its dense [N, N] visibility where no Pattern gives it."""

    params: Callable[[int], dict[str, Any]] = lambda n: {}
    mask: Callable[[dict[str, Any], int], Tensor] | None = None


def _fixed(**params: Any) -> Callable[[int], dict[str, Any]]:
    return lambda n: dict(params)


EXACT_CHECKS: dict[str, ExactCheck] = {
    "full": ExactCheck(mask=lambda params, n: torch.ones(n, n, dtype=torch.bool)),
    "graph": ExactCheck(_distinct_edges, _edge_mask),
    "local2d": ExactCheck(lambda n: {"height": n // 16, "width": 16, "radius_h": 2, "radius_w": 3}, _grid_mask),
    "local": ExactCheck(_fixed(before=16, after=8)),
    "dilated": ExactCheck(_fixed(radius=8, dilation=3)),
    "strided": ExactCheck(_fixed(stride=16)),
    "block_diagonal": ExactCheck(_fixed(block=32)),
    "random": ExactCheck(_fixed(blocks_per_row=2, block=16, seed=0)),
    "longformer": ExactCheck(_fixed(window=16, global_indices=(0, 5))),
    "bigbird": ExactCheck(_fixed(block=16, random_blocks=2, global_blocks=1, seed=0)),
    "sparse_transformer_strided": ExactCheck(_fixed(l=16)),
    "sparse_transformer_fixed": ExactCheck(_fixed(l=16, c=4)),
}
"""Small-N settings and dense masks of the exact mechanisms (others: bench settings, pattern mask)."""


def exact_mask(name: str, params: dict[str, Any], n: int, heads: int) -> Tensor | None:
    """The dense visibility mask [H, N, N] of an exact mechanism, or None if unknown."""
    from longattn.bench.cases import pattern_of

    check = EXACT_CHECKS.get(name)
    if check is not None and check.mask is not None:
        return check.mask(params, n)[None]
    pat = pattern_of(name, params)
    if pat is not None:
        return pat.mask(n, heads)
    return None


def _exact_params(name: str, n: int, heads: int, dim: int) -> dict[str, Any]:
    """The bench settings of ``name`` at length ``n``, with its small-N ones laid over."""
    from longattn.bench import cases as C

    return {**C.settings(name, n, heads, dim), **EXACT_CHECKS.get(name, ExactCheck()).params(n)}


# ----------------------------------------------------------------------- the meter


@dataclass
class ErrorConfig:
    """What the meter runs: inputs [batch, heads, n, dim] (float64) drawn from ``seed``."""

    n: int = 1024  # length of the approximation curves
    batch: int = 1
    heads: int = 4
    dim: int = 32  # head dimension D
    seed: int = 0  # inputs and the mechanisms' random draws
    causal: bool = False
    inputs: tuple[str, ...] = INPUT_KINDS
    mechanisms: list[str] | None = None  # None: every registered mechanism
    exact_n: int = 256  # length of the exactness checks (dense masks are N x N)
    threads: int = 0


def _budget_params(name: str, b: Budget, value: Any, n: int) -> dict[str, Any]:
    fixed = {k: (n if v == "N" else v) for k, v in (b.fixed or {}).items()}
    return {**fixed, b.param: value}


def _exact_case(cfg: ErrorConfig, name: str, kind: str, exact: list[dict[str, Any]],
                skipped: list[dict[str, str]]) -> None:
    """An exact mechanism at n = min(cfg.n, cfg.exact_n) against the dense masked reference."""
    from longattn.api import attention
    from longattn.ops.reference import dense_attention

    n = min(cfg.n, cfg.exact_n)
    try:
        params = _exact_params(name, n, cfg.heads, cfg.dim)
        mask = exact_mask(name, params, n, cfg.heads)
    except Exception as e:  # noqa: BLE001
        mask, params = None, {}
        why = f"no exact reference: {e}"
    else:
        why = "no dense mask for this exact mechanism (learned scores or no pattern)"
    if mask is None:
        _skip(skipped, name, kind, why)
        return
    q, k, v = make_inputs(kind, cfg.batch, cfg.heads, n, cfg.dim, cfg.seed)
    try:
        out = attention(q, k, v, name, causal=cfg.causal, **params)
        ref = dense_attention(q, k, v, mask=mask, causal=cfg.causal)
        exact.append({"mechanism": name, "input": kind, "n": n, "rel_error": relative_error(out, ref)})
    except Exception as e:  # noqa: BLE001
        _skip(skipped, name, kind, f"{type(e).__name__}: {e}"[:300])


def _approx_case(cfg: ErrorConfig, name: str, kind: str, approx: list[dict[str, Any]],
                 log: Callable[[str], None] | None) -> None:
    """An approximation's error curve along its budget axis (:data:`BUDGETS`)."""
    from longattn.api import attention
    from longattn.registry import get

    b = BUDGETS[name]
    seeded = {"seed": cfg.seed} if "seed" in get(name).param_names else {}
    q, k, v = make_inputs(kind, cfg.batch, cfg.heads, cfg.n, cfg.dim, cfg.seed)
    ref = approx_reference(name, q, k, v, cfg.causal)
    row = {"mechanism": name, "input": kind, "n": cfg.n, "budget_param": b.param}
    for val in [x for x in b.values if not b.capped or x <= cfg.n]:
        params = _budget_params(name, b, val, cfg.n)
        try:
            out = attention(q, k, v, name, causal=cfg.causal, **seeded, **params)
            approx.append({**row, "budget": val, "rel_error": relative_error(out, ref), "fixed": b.fixed or {}})
        except Exception as e:  # noqa: BLE001
            approx.append({**row, "budget": val, "rel_error": None, "error": f"{type(e).__name__}: {e}"[:300]})
            if log:
                log(f"error meter: {name} {b.param}={val}: {type(e).__name__}: {e}")


def _why_not(cfg: ErrorConfig, name: str) -> str | None:
    """Why the meter skips ``name`` (None: it measures it)."""
    from longattn.registry import get

    spec = get(name)
    if cfg.causal and not spec.causal:
        return "cannot be causal"
    if spec.exact and spec.learned:
        return "learned scores: exact for its own weights, no fixed reference"
    if spec.exact:
        return None
    if name in NOT_AN_APPROXIMATION:
        return NOT_AN_APPROXIMATION[name]
    return None if name in BUDGETS else "no budget axis in bench.error.BUDGETS"


def measure(cfg: ErrorConfig, *, progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the meter; return the result document (schema ``longattn.error``)."""
    from dataclasses import asdict

    from longattn.registry import get, names

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    mechs = names() if cfg.mechanisms is None else list(cfg.mechanisms)
    approx: list[dict[str, Any]] = []
    exact: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    jobs: list[tuple[str, str]] = [(m, kind) for m in mechs for kind in cfg.inputs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="error", unit="case", dynamic_ncols=True)
    for name, kind in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{name} {kind}")
        why = _why_not(cfg, name)
        if why is not None:
            _skip(skipped, name, kind, why)
        elif get(name).exact:
            _exact_case(cfg, name, kind, exact, skipped)
        else:
            _approx_case(cfg, name, kind, approx, log)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(cfg),
        "budgets": {k: {"param": b.param, "values": list(b.values), "fixed": b.fixed or {}, "note": b.note}
                    for k, b in BUDGETS.items()},
        "approximate": approx,
        "exact": exact,
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - t0,
    }


def _skip(skipped: list[dict[str, str]], name: str, kind: str, reason: str) -> None:
    if not any(s["mechanism"] == name for s in skipped):
        skipped.append({"mechanism": name, "reason": reason})


def error_curve(doc: dict[str, Any], mechanism: str, kind: str) -> list[tuple[Any, float]]:
    """[(budget, relative error)] of one mechanism on one input kind, from a document."""
    return [(r["budget"], r["rel_error"]) for r in doc["approximate"]
            if r["mechanism"] == mechanism and r["input"] == kind and r["rel_error"] is not None]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
