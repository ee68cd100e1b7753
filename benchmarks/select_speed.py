"""Speed and peak memory of the learned select-then-attend mechanisms ``nsa`` and ``dsa``
against dense ``scaled_dot_product_attention``.

B=1, H=8, D=64, fp32, causal, forward + backward (the learned weights of nsa/dsa get their
gradients too; dsa in eval mode: the main attention only, no indexer loss, and with
``--dsa-loss`` in training mode with its KL indexer loss added). Each case runs in its own
process (peak RSS is per process): a warm-up at N=1024, then ``--repeat`` timed runs at N
(the median is reported) and the peak RSS growth of the timed runs.

    python benchmarks/select_speed.py --n 16384 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, statistics, time, torch
torch.set_num_threads({threads})
torch.manual_seed(0)
N, H, D, kind, repeat = {n}, 8, 64, {kind!r}, {repeat}

def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024

def make(n):
    return [torch.randn(1, H, n, D, requires_grad=True) for _ in range(3)]

if kind == "sdpa":
    fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
else:
    from longattn import registry
    mod = registry.build(kind.split("+")[0], heads=H, head_dim=D, **{params})
    mod.train(kind == "dsa+loss")
    def fn(q, k, v):
        out = mod(q, k, v, causal=True)
        return out + 0 * mod.last_indexer_loss if kind == "dsa+loss" else out

def step(q, k, v):
    out = fn(q, k, v)
    out.sum().backward()

step(*make(1024))
q, k, v = make(N)
import gc; gc.collect()
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
base = status('VmRSS:')
times = []
for _ in range(repeat):
    for x in (q, k, v):
        x.grad = None
    t = time.perf_counter()
    step(q, k, v)
    times.append(time.perf_counter() - t)
print(json.dumps({{"kind": kind, "seconds": statistics.median(times), "peak_mib": status('VmHWM:') - base}}))
"""

PARAMS = {
    "sdpa": {},
    "nsa": {"block": 32, "topk": 16, "window": 128},
    "dsa": {"topk": 256, "index_heads": 4, "index_dim": 32},
    "dsa+loss": {"topk": 256, "index_heads": 4, "index_dim": 32},
}


def run(kind: str, n: int, threads: int, repeat: int) -> dict:
    code = CASE.format(threads=threads, n=n, kind=kind, repeat=repeat, params=PARAMS[kind])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return {"kind": kind, "error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--kinds", default="sdpa,nsa,dsa")
    args = ap.parse_args()
    for kind in args.kinds.split(","):
        r = run(kind, args.n, args.threads, args.repeat)
        if "error" in r:
            print(f"{kind:9s} failed:\n{r['error']}")
        else:
            print(f"{kind:9s} {PARAMS[kind]}  fwd+bwd {r['seconds']:.2f} s  peak {r['peak_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
