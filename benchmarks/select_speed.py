"""Speed and peak memory of the learned select-then-attend mechanisms ``nsa`` and ``dsa``
against dense ``scaled_dot_product_attention``.

B=1, H=8, D=64, fp32, causal, forward + backward (the learned weights of nsa/dsa get their
gradients too; dsa in eval mode: the main attention only, no indexer loss, and with
``--dsa-loss`` in training mode with its KL indexer loss added). Each case runs in its own
process (:mod:`longattn.bench.subprocess_case`): a warm-up at N=1024 while building, then the
harness's peak-memory call and ``--repeat`` timed runs at N (the median is reported).

    python benchmarks/select_speed.py --n 16384 --threads 2
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case

H, D = 8, 64
PARAMS = {
    "sdpa": {},
    "nsa": {"block": 32, "topk": 16, "window": 128},
    "dsa": {"topk": 256, "index_heads": 4, "index_dim": 32},
    "dsa+loss": {"topk": 256, "index_heads": 4, "index_dim": 32},
}


def case(kind: str, n: int) -> Callable[[], None]:
    """Causal forward + backward of ``kind`` at length ``n`` (warmed up at N=1024)."""
    if kind == "sdpa":
        def fn(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        from longattn import registry

        mod = registry.build(kind.split("+")[0], heads=H, head_dim=D, **PARAMS[kind])
        mod.train(kind == "dsa+loss")

        def fn(q, k, v):
            out = mod(q, k, v, causal=True)
            return out + 0 * mod.last_indexer_loss if kind == "dsa+loss" else out

    def make(length: int) -> list[torch.Tensor]:
        return [torch.randn(1, H, length, D, requires_grad=True) for _ in range(3)]

    fn(*make(1024)).sum().backward()
    q, k, v = make(n)

    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).sum().backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--kinds", default="sdpa,nsa,dsa")
    args = ap.parse_args()
    for kind in args.kinds.split(","):
        r = run_case(case_ref(__file__, "case"), {"kind": kind, "n": args.n}, threads=args.threads,
                     warmup=0, repeats=args.repeat)
        if r["status"] != "ok":
            print(f"{kind:9s} failed:\n{r.get('traceback') or r.get('reason')}")
        else:
            print(f"{kind:9s} {PARAMS[kind]}  fwd+bwd {r['time_s']['median']:.2f} s  peak {r['peak_mb']:.0f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
