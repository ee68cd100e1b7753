"""torch.compile vs eager: training-step time of a small longattn LM on the CPU.

    python benchmarks/compile_speed.py                       # local + performer, N=4096
    python benchmarks/compile_speed.py --mech local --n 2048 --steps 3

For each mechanism: a causal LM (``ModelConfig(dim=256, depth=4, heads=8)``,
vocab 256, B=1, N tokens) and one training step = forward, cross-entropy, backward,
AdamW step. Eager and ``torch.compile(model, fullgraph=True)`` (inductor; the
attention runs as the ``longattn::*`` custom ops of :mod:`longattn.ops.custom`)
start from the same weights; the compiled model's first ``--warmup`` steps include
the compilation (its time is reported separately). Reported: median step time over
``--steps`` steps after warm-up (eager and compiled steps interleaved), the speed-up eager / compiled, and the largest
difference of the first step's loss (same weights, same batch).

Measured (2-core shared CPU, torch 2.13, N=4096, median of 3 after 2; loads vary):

    mechanism   eager s  compiled s  speed-up  compile s
    local         2.875       2.298     1.25x       30.2   (engine custom op)
    performer     2.631       2.471     1.07x      185.3   (traced natively, the default)
    performer     3.081       3.420     0.90x       13.7   (--native: through the recomputing op)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from longattn.model import ModelConfig, Transformer

MECHS = {
    "local": dict(mechanism="local", mechanism_params={"before": 256, "after": 0}),
    "performer": dict(mechanism="performer", mechanism_params={"num_features": 64}),
    "bigbird": dict(mechanism="bigbird", mechanism_params={"block": 64, "random_blocks": 2, "global_blocks": 1}),
    "full": dict(mechanism="full", mechanism_params={}),
}


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def timed(step, n: int) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(n):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    return times, losses


def run(mech: str, n: int, steps: int, warmup: int, dim: int, depth: int, heads: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, max_len=n, dim=dim, depth=depth, heads=heads, **MECHS[mech])
    eager = Transformer(cfg)
    comp_model = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, n), generator=g)
    y = torch.randint(0, 256, (1, n), generator=g)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-4)
    opt_c = torch.optim.AdamW(comp_model.parameters(), lr=1e-4)
    compiled = torch.compile(comp_model, fullgraph=True)
    row = {"mechanism": mech}
    # the compiled model's first steps (compilation of the forward and of the backward)
    t0 = time.perf_counter()
    wc, lc = timed(step_fn(compiled, opt_c, x, y), warmup)
    row["compile_s"] = time.perf_counter() - t0
    we, le = timed(step_fn(eager, opt_e, x, y), warmup)
    row["loss_diff"] = max(abs(a - b) for a, b in zip(le, lc))
    se, sc = step_fn(eager, opt_e, x, y), step_fn(compiled, opt_c, x, y)
    te, tc = [], []
    for _ in range(steps):  # interleaved: a change of the machine's load hits both alike
        te += timed(se, 1)[0]
        tc += timed(sc, 1)[0]
    row["eager_s"], row["compiled_s"] = statistics.median(te), statistics.median(tc)
    row["speedup"] = row["eager_s"] / row["compiled_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mech", nargs="+", default=["local", "performer"], choices=sorted(MECHS))
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the compiled model compiles here)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--native", nargs="*", default=None, metavar="MECH",
                    help="set longattn.ops.custom.NATIVE (mechanisms Dynamo may trace natively instead "
                         "of calling the custom op); '--native' alone forces the op; default: the library's")
    a = ap.parse_args()
    if a.native is not None:
        from longattn.ops import custom

        custom.NATIVE.clear()
        custom.NATIVE.update(a.native)
    if a.threads:
        torch.set_num_threads(a.threads)
    from longattn.ops import custom

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; LM dim={a.dim} depth={a.depth} "
          f"heads={a.heads}, B=1, N={a.n}; step = fwd + CE + bwd + AdamW; median of {a.steps} after {a.warmup}; "
          f"traced natively: {sorted(custom.NATIVE) or 'none'}")
    print(f"{'mechanism':<10} {'eager s':>9} {'compiled s':>11} {'speed-up':>9} {'compile s':>10} {'loss diff':>10}")
    for mech in a.mech:
        r = run(mech, a.n, a.steps, a.warmup, a.dim, a.depth, a.heads)
        print(f"{r['mechanism']:<10} {r['eager_s']:>9.3f} {r['compiled_s']:>11.3f} {r['speedup']:>8.2f}x "
              f"{r['compile_s']:>10.1f} {r['loss_diff']:>10.2e}", flush=True)


if __name__ == "__main__":
    main()
