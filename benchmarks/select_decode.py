"""Decode-step cost of ``topk_blocks`` against the context length: with its block
summaries kept beside the KV cache (:class:`longattn.ops.topk_blocks.KeySummaries`,
what :class:`longattn.integrations.transformers.KeyStateCache` and
:class:`longattn.decoding.PatternCache` keep), without them, and full attention (SDPA).

    python benchmarks/select_decode.py                      # SmolLM2's shape, 4K .. 64K, CPU fp32
    python benchmarks/select_decode.py --lengths 8192 --threads 1

One layer, SmolLM2-135M's attention shape (B=1, 9 query heads over 3 kv heads, D=64),
``topk_blocks:block=64,topk=8,sink_tokens=4``. Step t is one query at position t over
the keys 0..t; the timed steps are consecutive (t = N - repeats .. N - 1), so the kept
summaries take one new key per step, as in generation. Per step:

- kept: O(N / block * D) for the gate over the summaries, O((topk + 1) * block * D) for
  the keys it gathers; the summaries of the new key's block only are recomputed;
- recomputed: every key's block summary again, O(N * D), then the same;
- SDPA: one query against all N keys, O(N * D).

Reported: the median step in microseconds (after warm-up), and the MiB of the kept
summaries beside the cache's. Measured on the repository's 2-core CPU VM (AVX2, fp32,
2 threads; timings move by 10-30 % between runs), one run:

        N   SDPA us   recomputed us   kept us   summaries MiB   KV cache MiB
     4096       352            1283      1085            0.05           6.00
     8192       774            1637      1160            0.09          12.00
    16384      3534            3211      1332            0.19          24.00
    32768      7604            5165      1813            0.38          48.00
    65536     17189           26345      1747            0.75          96.00

(``--repeats 100``.) The kept step stays within 1.1-1.8 ms from 4K to 64K keys (the
gather and the softmax over about 580 keys per head, and some 100 small tensor
operations); SDPA's grows with N and passes it between 8K and 16K keys. The summaries
are 1/128 of the KV cache (block 64, means; buffers grow by doubling).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import longattn
from longattn.ops.topk_blocks import KeySummaries

PARAMS = dict(block=64, topk=8, sink_tokens=4)


def median_step_us(step: Callable[[int], object], first: int, repeats: int) -> float:
    """Median wall time of ``step(t)`` for t = first .. first + repeats - 1, in
    microseconds, after 3 warm-up steps before ``first``."""
    for t in range(first - 3, first):
        step(t)
    times = []
    for t in range(first, first + repeats):
        t0 = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def one_length(n: int, repeats: int, gen: torch.Generator) -> dict[str, float]:
    """The three step times at context length ``n`` (and the bytes kept)."""
    q = torch.randn(1, 9, n, 64, generator=gen)
    k = torch.randn(1, 3, n, 64, generator=gen)
    v = torch.randn(1, 3, n, 64, generator=gen)
    kept = KeySummaries(PARAMS["block"], "mean")
    first = n - repeats

    def step(t: int, **kw: object) -> torch.Tensor:
        return longattn.attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], "topk_blocks",
                                  causal=True, **PARAMS, **kw)

    def sdpa(t: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], enable_gqa=True)

    with torch.inference_mode():
        kept.update(k[:, :, : first - 3])
        row = {
            "sdpa_us": median_step_us(sdpa, first, repeats),
            "recomputed_us": median_step_us(step, first, repeats),
            "kept_us": median_step_us(lambda t: step(t, key_state=kept), first, repeats),
        }
    row["summaries_mib"] = sum(t.nbytes for t in kept.update(k)) / 2**20
    row["kv_cache_mib"] = (k.nbytes + v.nbytes) / 2**20
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if any(n <= args.repeats + 3 for n in args.lengths):
        raise ValueError(f"--lengths must all exceed --repeats + 3 = {args.repeats + 3}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{'N':>9} {'SDPA us':>9} {'recomputed us':>15} {'kept us':>9} {'summaries MiB':>15} {'KV cache MiB':>14}")
    for n in args.lengths:
        r = one_length(n, args.repeats, gen)
        print(f"{n:>9} {r['sdpa_us']:>9.0f} {r['recomputed_us']:>15.0f} {r['kept_us']:>9.0f} "
              f"{r['summaries_mib']:>15.2f} {r['kv_cache_mib']:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
