"""Local attention vs dense SDPA, FlexAttention and local-attention.

Each case runs in its own process (peak RSS per process). B=1, H=8, D=64, fp32,
window of 513 keys (before = after = 256). Usage:

    python benchmarks/local_vs_peers.py [--n 16384] [--cases local_fwd,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

PRELUDE = """
import json, time, torch
torch.manual_seed(0)
B, H, N, D = 1, 8, {n}, 64
def peak_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
def timeit(f, rep):
    f()
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]
q, k, v = (torch.randn(B, H, N, D, requires_grad={grad}) for _ in range(3))
"""

CASES = {
    "sdpa_fwd": ("False", """
import torch.nn.functional as F
with torch.no_grad():
    r = timeit(lambda: F.scaled_dot_product_attention(q, k, v), 2)
"""),
    "sdpa_train": ("True", """
import torch.nn.functional as F
def f():
    F.scaled_dot_product_attention(q, k, v).sum().backward()
r = timeit(f, 1)
"""),
    "flex_fwd": ("False", """
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
def band(b, h, i, j):
    return (j >= i - 256) & (j <= i + 256)
bm = create_block_mask(band, None, None, N, N, device='cpu')
fa = torch.compile(flex_attention)
with torch.no_grad():
    r = timeit(lambda: fa(q, k, v, block_mask=bm), 3)
"""),
    "localattn_fwd": ("False", """
from local_attention import LocalAttention
la = LocalAttention(window_size=256, causal=False, look_backward=1, look_forward=1, exact_windowsize=True, autopad=True)
with torch.no_grad():
    r = timeit(lambda: la(q, k, v), 3)
"""),
    "localattn_train": ("True", """
from local_attention import LocalAttention
la = LocalAttention(window_size=256, causal=False, look_backward=1, look_forward=1, exact_windowsize=True, autopad=True)
r = timeit(lambda: la(q, k, v).sum().backward(), 3)
"""),
    "local_fwd": ("False", """
import longattn
with torch.no_grad():
    r = timeit(lambda: longattn.attention(q, k, v, 'local', before=256, after=256), 5)
"""),
    "local_train": ("True", """
import longattn
r = timeit(lambda: longattn.attention(q, k, v, 'local', before=256, after=256).sum().backward(), 3)
"""),
}

PATTERNS = {
    "dilated": {"radius": 128, "dilation": 2},
    "strided": {"stride": 128},
    "bigbird": {"block": 64, "random_blocks": 3, "global_blocks": 2},
    "longformer": {"window": 256, "global_indices": tuple(range(16))},
    "sparse_transformer_strided": {"l": 128},
    "sparse_transformer_fixed": {"l": 128, "c": 16},
}
for _name, _p in PATTERNS.items():
    _causal = _name.startswith("sparse_transformer")
    CASES[f"{_name}_fwd"] = ("False", f"""
import longattn
from longattn.ops.sparse import cached_pattern
params = {_p!r}
with torch.no_grad():
    r = timeit(lambda: longattn.attention(q, k, v, {_name!r}, causal={_causal}, **params), 3)
vis = cached_pattern({_name!r}, **params).visible_count(N, H, causal={_causal})
extra = {{'useful_gflops': 4 * vis * D / 1e9}}
""")


def run_case(name: str, n: int) -> dict:
    grad, body = CASES[name]
    code = PRELUDE.format(n=n, grad=grad) + "extra = {}\n" + textwrap.dedent(body) + (
        "\nprint('__R__' + json.dumps({'median_s': r[0], 'min_s': r[1], 'max_s': r[2], 'peak_mb': peak_mb(), **extra}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    for line in res.stdout.splitlines():
        if line.startswith("__R__"):
            return json.loads(line[5:])
    return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc={res.returncode}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    out = {}
    for name in args.cases.split(","):
        out[name] = r = run_case(name, args.n)
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
