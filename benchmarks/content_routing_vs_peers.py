"""Content routing: lsh / clustered / sinkhorn against dense SDPA and reformer-pytorch.

Each case runs in its own process (peak RSS is per process): one warm-up, then
``--reps`` timed forward+backward passes; the median and the peak RSS growth are
printed as one JSON line per case, then a table with the ratios to dense SDPA.

    flock /tmp/longattn-bench.lock .venv/bin/python benchmarks/content_routing_vs_peers.py
    (B=1, H=8, D=64, fp32, N=16384, 2 threads by default)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, statistics, sys, time, torch
torch.set_num_threads({threads})
torch.manual_seed(0)
B, H, N, D = 1, {heads}, {n}, 64
q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
name = {name!r}
if name == "dense_sdpa":
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal={causal})
elif name == "reformer_pytorch":
    from reformer_pytorch import LSHAttention
    m = LSHAttention(bucket_size={bucket}, n_hashes=2, causal={causal})
    f = lambda: m(q.reshape(B * H, N, D), v.reshape(B * H, N, D))[0]
else:
    import longattn
    kw = {kw}
    f = lambda: longattn.attention(q, k, v, name, causal={causal}, **kw)
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
def step():
    for x in (q, k, v):
        x.grad = None
    t0 = time.perf_counter(); out = f(); t1 = time.perf_counter()
    out.sum().backward(); t2 = time.perf_counter()
    return t1 - t0, t2 - t0
step()  # warm-up
import gc; gc.collect()
open('/proc/self/clear_refs', 'w').write('5'); base = rss('VmRSS')
times = [step() for _ in range({reps})]
print(json.dumps(dict(case={label!r}, fwd_s=statistics.median(t[0] for t in times),
                      fwd_bwd_s=statistics.median(t[1] for t in times),
                      peak_mb=rss('VmHWM') - base)))
"""


def run_case(label: str, name: str, kw: dict, args, causal: bool) -> dict:
    code = CASE.format(threads=args.threads, heads=args.heads, n=args.n, name=name, kw=repr(kw),
                       causal=causal, bucket=args.bucket, reps=args.reps, label=label)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return dict(case=label, error=res.stderr.strip().splitlines()[-1])
    row = json.loads(res.stdout.strip().splitlines()[-1])
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
    rows = [run_case(lbl, name, kw, args, args.causal) for lbl, name, kw in cases
            if args.only is None or lbl in args.only]
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
