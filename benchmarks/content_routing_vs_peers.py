"""Content routing: lsh / clustered / sinkhorn against dense SDPA and reformer-pytorch.

Each case runs in its own process (:mod:`longattn.bench.subprocess_case`; peak memory is
per process): one warm-up, the harness's peak-memory call, then ``--reps`` timed
forward+backward passes; the median and the peak RSS growth are printed as one JSON line
per case, then a table with the ratios to dense SDPA.

    flock /tmp/longattn-bench.lock .venv/bin/python benchmarks/content_routing_vs_peers.py
    (B=1, H=8, D=64, fp32, N=16384, 2 threads by default)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case

D = 64


def case(name: str, kw: dict[str, Any], n: int, heads: int, bucket: int, causal: bool,
         ) -> tuple[Callable[[], None], dict[str, Any]]:
    """Forward + backward of ``name`` (a mechanism, ``dense_sdpa`` or ``reformer_pytorch``)
    on [1, heads, n, 64]; the step records its forward time in ``extra["fwd_times"]``."""
    B, H, N = 1, heads, n
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    if name == "dense_sdpa":
        def f():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    elif name == "reformer_pytorch":
        from reformer_pytorch import LSHAttention

        m = LSHAttention(bucket_size=bucket, n_hashes=2, causal=causal)

        def f():
            return m(q.reshape(B * H, N, D), v.reshape(B * H, N, D))[0]
    else:
        import longattn

        def f():
            return longattn.attention(q, k, v, name, causal=causal, **kw)
    extra: dict[str, Any] = {"fwd_times": []}

    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        t0 = time.perf_counter()
        out = f()
        extra["fwd_times"].append(time.perf_counter() - t0)
        out.sum().backward()

    return step, extra


def run_one(label: str, name: str, kw: dict, args: argparse.Namespace) -> dict:
    res = run_case(case_ref(__file__, "case"), dict(name=name, kw=kw, n=args.n, heads=args.heads,
                   bucket=args.bucket, causal=args.causal), threads=args.threads, warmup=1, repeats=args.reps)
    if res["status"] != "ok":
        return dict(case=label, error=res.get("reason", res["status"]))
    row = dict(case=label, fwd_s=statistics.median(res["extra"]["fwd_times"][-args.reps:]),
               fwd_bwd_s=res["time_s"]["median"], peak_mb=res["peak_mb"])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    b = args.bucket
    cases = [
        ("dense_sdpa", "dense_sdpa", {}),
        ("lsh", "lsh", dict(bucket_size=b, n_hashes=2)),
        ("lsh_nodedup", "lsh", dict(bucket_size=b, n_hashes=2, dedup=False)),
        ("reformer_pytorch", "reformer_pytorch", {}),
        ("clustered", "clustered", dict(chunk_size=b, n_clusters=16)),
        ("sinkhorn", "sinkhorn", dict(block_size=b)),
    ]
    rows = [run_one(lbl, name, kw, args) for lbl, name, kw in cases if args.only is None or lbl in args.only]
    dense = next((r for r in rows if r["case"] == "dense_sdpa" and "error" not in r), None)
    print(f"\nB=1 H={args.heads} D=64 N={args.n} fp32 threads={args.threads} causal={args.causal}")
    print(f"{'case':18s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'peak MB':>8s} {'x dense':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:18s} error: {r['error']}")
            continue
        ratio = dense["fwd_bwd_s"] / r["fwd_bwd_s"] if dense else float("nan")
        print(f"{r['case']:18s} {r['fwd_s']:8.3f} {r['fwd_bwd_s']:10.3f} {r['peak_mb']:8.0f} {ratio:8.1f}")


if __name__ == "__main__":
    main()
