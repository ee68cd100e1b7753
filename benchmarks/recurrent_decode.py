"""Decode-step cost against the context length: the recurrent family's O(state) step vs
full attention's step over a KV cache (issue 33's decode-cost target).

    python benchmarks/recurrent_decode.py                    # B=1, H=8, D=128, 1K/4K/16K, CPU fp32
    python benchmarks/recurrent_decode.py --device cuda --lengths 1024 4096 16384 65536

For each prompt length N: the prompt's final state S [B, H, D, D] comes from the
chunked :func:`longattn.ops.recurrent.gated_delta_rule` (``output_final_state=True``),
then one :func:`~longattn.ops.recurrent.gated_delta_rule_step` is timed (the state is
the same size at every N: O(H D^2) time and memory per token). Beside it, full
attention's decode step: one query over a KV cache of N keys with
``scaled_dot_product_attention`` (what :class:`longattn.decoding.KVCache` runs, its
append left out): O(N H D) per token, the cache O(N H D) memory. Reported: the
median of ``--repeats`` steps after warm-up, in microseconds, and the bytes each holds.

Measured (2-core CPU shared with 7 other jobs, OMP_NUM_THREADS=1, torch fp32, B=1,
H=8, D=128, median of 200 steps; loads vary, the full-attention rows most):

        N   recurrent step us   state MiB   full-attn step us   KV cache MiB
     1024                 185        0.50                 580           8.00
     4096                 183        0.50               16889          32.00
    16384                 182        0.50               63780         128.00
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from longattn.ops.recurrent import gated_delta_rule, gated_delta_rule_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_us(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in microseconds over ``repeats`` calls after 5 warm-ups."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def gates(B: int, H: int, N: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Log decays g [B, H, N] in (-0.1, 0) and beta [B, H, N] in (0, 1), as a trained model's."""
    g = -0.1 * torch.rand(B, H, N, generator=gen, device=device)
    return g, torch.rand(B, H, N, generator=gen, device=device)


def row(N: int, B: int, H: int, D: int, repeats: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(N, recurrent step us, state MiB, full-attention step us, KV cache MiB) at prompt length N."""
    gen = torch.Generator(device).manual_seed(N)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q, k, v = rnd(B, H, N, D), rnd(B, H, N, D), rnd(B, H, N, D)
    g, beta = gates(B, H, N, device, gen)
    with torch.no_grad():
        _, state = gated_delta_rule(q, k, v, g.to(dtype), beta.to(dtype), output_final_state=True,
                                    use_qk_l2norm=True)
        q1, k1, v1 = rnd(B, H, 1, D), rnd(B, H, 1, D), rnd(B, H, 1, D)
        g1, b1 = (x[:, :, :1].to(dtype) for x in gates(B, H, 1, device, gen))
        rec = median_us(lambda: gated_delta_rule_step(q1, k1, v1, g1, b1, state, use_qk_l2norm=True),
                        repeats, device)
        full = median_us(lambda: F.scaled_dot_product_attention(q1, k, v), repeats, device)
    mib = 2.0 ** 20
    return N, rec, state.nbytes / mib, full, (k.nbytes + v.nbytes) / mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    print(f"B={a.batch} H={a.heads} D={a.dim} {a.dtype} on {device} "
          f"({torch.get_num_threads()} threads), median of {a.repeats} steps")
    print(f"{'N':>9} {'recurrent step us':>19} {'state MiB':>11} {'full-attn step us':>19} {'KV cache MiB':>14}")
    for N in a.lengths:
        n, rec, s_mib, full, kv_mib = row(N, a.batch, a.heads, a.dim, a.repeats, device, dtype)
        print(f"{n:>9} {rec:>19.0f} {s_mib:>11.2f} {full:>19.0f} {kv_mib:>14.2f}")


if __name__ == "__main__":
    main()
