"""Kernel / low-rank mechanisms against dense SDPA and performer-pytorch.

Each case runs in a fresh process (peak RSS is per process): warm-up, then the median
of ``--repeat`` runs. B=1, H=8, D=64, fp32, 2 threads. Run under the bench lock:

    flock /tmp/longattn-bench.lock .venv/bin/python benchmarks/kernel_lowrank_vs_peers.py

The final harness (``longattn bench``) re-measures; this is a small, honest script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    # name: (setup code defining f(q, k, v) -> out, supports causal)
    "sdpa": "import torch.nn.functional as F\nf = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL)",
    "performer-pytorch": (
        "from performer_pytorch import FastAttention\n"
        "fa = FastAttention(dim_heads=64, nb_features=256, causal=CAUSAL)\n"
        "f = lambda q, k, v: fa(q, k, v)"
    ),
    "performer": "import longattn\nf = lambda q, k, v: longattn.attention(q, k, v, 'performer', causal=CAUSAL, num_features=256)",
    "linear": "import longattn\nf = lambda q, k, v: longattn.attention(q, k, v, 'linear', causal=CAUSAL)",
    "linformer": "import longattn\nf = lambda q, k, v: longattn.attention(q, k, v, 'linformer', proj_dim=256, max_len=65536)",
    "nystrom": "import longattn\nf = lambda q, k, v: longattn.attention(q, k, v, 'nystrom', landmarks=64)",
    "compressed": "import longattn\nf = lambda q, k, v: longattn.attention(q, k, v, 'compressed', causal=CAUSAL, slots=256)",
}

CHILD = r"""
import json, statistics, time, torch
torch.manual_seed(0)
torch.set_num_threads({threads})
CAUSAL = {causal}
N, BWD, R = {N}, {bwd}, {repeat}
{setup}
def rss(tag):
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(tag):
                return int(line.split()[1]) / 1024
q, k, v = (torch.randn(1, 8, N, 64, requires_grad=BWD) for _ in range(3))
base = rss('VmRSS:')
def once():
    if BWD:
        out = f(q, k, v); out.sum().backward()
        for t in (q, k, v): t.grad = None
    else:
        with torch.no_grad():
            f(q, k, v)
times = []
for i in range(R + ({warm})):
    t0 = time.perf_counter(); once(); dt = time.perf_counter() - t0
    if i >= {warm}: times.append(dt)
print('__RES__' + json.dumps(dict(median_s=statistics.median(times), peak_mb=rss('VmHWM:') - base)))
"""


def run_case(name: str, N: int, causal: bool, bwd: bool, repeat: int, warm: int, threads: int) -> dict:
    code = CHILD.format(threads=threads, causal=causal, N=N, bwd=bwd, repeat=repeat, warm=warm,
                        setup=CASES[name])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    for line in res.stdout.splitlines():
        if line.startswith("__RES__"):
            r = json.loads(line[7:])
            r.update(name=name, N=N, causal=causal, bwd=bwd)
            return r
    return dict(name=name, N=N, causal=causal, bwd=bwd, error=res.stderr[-500:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-slow-peer", action="store_true", help="skip performer-pytorch causal fwd+bwd (~1 min)")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    plan = [
        ("sdpa", 16384, False, False, 1, 1),
        ("performer-pytorch", 16384, False, False, a.repeat, 1),
        ("performer", 16384, False, False, a.repeat, 1),
        ("performer", 65536, False, False, a.repeat, 1),
        ("linear", 16384, False, False, a.repeat, 1),
        ("linear", 65536, False, False, a.repeat, 1),
        ("linformer", 16384, False, False, a.repeat, 1),
        ("linformer", 65536, False, False, a.repeat, 1),
        ("nystrom", 16384, False, False, a.repeat, 1),
        ("nystrom", 65536, False, False, a.repeat, 1),
        ("compressed", 16384, False, False, a.repeat, 1),
        ("compressed", 65536, False, False, a.repeat, 1),
        ("performer", 16384, True, True, 2, 1),
        ("linear", 16384, True, True, 2, 1),
    ]
    if not a.skip_slow_peer:
        plan.append(("performer-pytorch", 16384, True, True, 1, 0))
    results = []
    for name, N, causal, bwd, rep, warm in plan:
        if a.only and name not in a.only:
            continue
        r = run_case(name, N, causal, bwd, rep, warm, a.threads)
        results.append(r)
        print(json.dumps(r), flush=True)
    t = {(r["name"], r["N"], r["causal"]): r.get("median_s") for r in results}
    print("\nratios:")
    sd = t.get(("sdpa", 16384, False))
    for name in ("performer", "linear", "linformer", "nystrom", "compressed"):
        a16, a64 = t.get((name, 16384, False)), t.get((name, 65536, False))
        if a16 and a64:
            print(f"  {name}: t(65536)/t(16384) = {a64 / a16:.2f}" + (f", sdpa/{name} @16384 = {sd / a16:.1f}x" if sd else ""))
    pp, ours = t.get(("performer-pytorch", 16384, False)), t.get(("performer", 16384, False))
    if pp and ours:
        print(f"  performer fwd @16384: performer-pytorch/ours = {pp / ours:.1f}x")
    pc, oc = t.get(("performer-pytorch", 16384, True)), t.get(("performer", 16384, True))
    if pc and oc:
        print(f"  causal fwd+bwd @16384: performer-pytorch/ours = {pc / oc:.1f}x")


if __name__ == "__main__":
    main()
