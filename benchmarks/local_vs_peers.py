"""Local attention vs dense SDPA, FlexAttention and local-attention.

Each case runs in its own process (:mod:`longattn.bench.subprocess_case`; peak RSS, the
whole process's, per process). B=1, H=8, D=64, fp32,
window of 513 keys (before = after = 256). Usage:

    python benchmarks/local_vs_peers.py [--n 16384] [--cases local_fwd,...]
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case

B, H, D = 1, 8, 64
PATTERNS = {
    "dilated": {"radius": 128, "dilation": 2},
    "strided": {"stride": 128},
    "bigbird": {"block": 64, "random_blocks": 3, "global_blocks": 2},
    "longformer": {"window": 256, "global_indices": tuple(range(16))},
    "sparse_transformer_strided": {"l": 128},
    "sparse_transformer_fixed": {"l": 128, "c": 16},
}
#: case name -> timed repeats (the README's figures: median of these after one warm-up)
CASES = {"sdpa_fwd": 2, "sdpa_train": 1, "flex_fwd": 3, "localattn_fwd": 3, "localattn_train": 3,
         "local_fwd": 5, "local_train": 3, **{f"{p}_fwd": 3 for p in PATTERNS}}


def _peer(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The attention call of case ``name`` (its ``_fwd``/``_train`` suffix removed)."""
    N = q.shape[-2]
    if name == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def band(b, h, i, j):
            return (j >= i - 256) & (j <= i + 256)

        bm = create_block_mask(band, None, None, N, N, device="cpu")
        fa = torch.compile(flex_attention)
        return lambda: fa(q, k, v, block_mask=bm)
    if name == "localattn":
        from local_attention import LocalAttention

        la = LocalAttention(window_size=256, causal=False, look_backward=1, look_forward=1,
                            exact_windowsize=True, autopad=True)
        return lambda: la(q, k, v)
    import longattn

    params = PATTERNS.get(name, {"before": 256, "after": 256})
    causal = name.startswith("sparse_transformer")
    return lambda: longattn.attention(q, k, v, name, causal=causal, **params)


def case(name: str, n: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """One call of case ``name`` at length ``n`` (forward under no_grad, or forward +
    backward for ``*_train``); extra: the pattern's useful GFLOP for the pattern cases."""
    train = name.endswith("_train")
    kind = name.rsplit("_", 1)[0]
    q, k, v = (torch.randn(B, H, n, D, requires_grad=train) for _ in range(3))
    f = _peer(kind, q, k, v)
    extra: dict[str, Any] = {}
    if kind in PATTERNS:
        from longattn.ops.sparse import cached_pattern

        vis = cached_pattern(kind, **PATTERNS[kind]).visible_count(n, H, causal=kind.startswith("sparse_transformer"))
        extra["useful_gflops"] = 4 * vis * D / 1e9

    def step() -> None:
        if train:
            f().sum().backward()
        else:
            with torch.no_grad():
                f()

    return step, extra


def run_one(name: str, n: int) -> dict:
    res = run_case(case_ref(__file__, "case"), {"name": name, "n": n}, threads=torch.get_num_threads(),
                   warmup=1, repeats=CASES[name], timeout_s=900)
    if res["status"] != "ok":
        return {"error": res.get("reason", res["status"])}
    t = res["time_s"]
    return {"median_s": t["median"], "min_s": t["min"], "max_s": t["max"], "peak_mb": res["rss_peak_mb"],
            **res["extra"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    out = {}
    for name in args.cases.split(","):
        out[name] = r = run_one(name, args.n)
        print(f"N={args.n:6d} {name:32s} {json.dumps(r)}", flush=True)
    dense_f = out.get("sdpa_fwd", {}).get("median_s")
    if dense_f:
        dense_gfs = 4 * args.n * args.n * 64 * 8 / 1e9 / dense_f
        print(f"dense SDPA useful GFLOP/s: {dense_gfs:.1f}")
        for name, r in out.items():
            if "useful_gflops" in r:
                print(f"  {name:32s} {r['useful_gflops'] / r['median_s']:.1f} GFLOP/s "
                      f"({r['useful_gflops'] / r['median_s'] / dense_gfs:.2f} of dense)")


if __name__ == "__main__":
    main()
