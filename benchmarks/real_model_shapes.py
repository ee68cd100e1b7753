"""Decode steps, grouped KV heads and packed documents: the shapes of real models.

Three measurements (B=1, H=8, D=64, fp32), each case in its own process for memory
(:mod:`longattn.bench.subprocess_case`):

1. decode: one query over a KV cache of t keys, ``local`` causal window of 512
   (before=511), t = 4096 and 262144: the step touches only its window, so the time
   should not grow with t.
2. gqa: ``local`` (513 keys) forward+backward at N=65536 with Hkv=1 and Hkv=8 kv
   heads: peak memory (whole-process VmHWM) and time.
3. packed: 64 documents of 256 tokens in one row (segment_ids) against one
   unpacked row of 16384, ``local`` window 128 each side, forward: time.

    python benchmarks/real_model_shapes.py [--reps 5] [--only decode,gqa,packed]
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case


def case(kind: str, t: int = 4096, hkv: int = 8, packed: bool = False) -> Callable[[], None]:
    """The step of measurement ``kind`` (module docstring): ``decode`` over a cache of ``t``
    keys, ``gqa`` train step with ``hkv`` kv heads, ``packed`` forward with or without
    64 documents of 256 tokens."""
    import longattn

    if kind == "decode":
        q = torch.randn(1, 8, 1, 64)
        k, v = torch.randn(1, 8, t, 64), torch.randn(1, 8, t, 64)

        def decode() -> None:
            with torch.no_grad():
                longattn.attention(q, k, v, "local", before=511, after=0, causal=True)

        return decode
    if kind == "gqa":
        N = 65536
        q = torch.randn(1, 8, N, 64, requires_grad=True)
        k = torch.randn(1, hkv, N, 64, requires_grad=True)
        v = torch.randn(1, hkv, N, 64, requires_grad=True)
        return lambda: longattn.attention(q, k, v, "local", before=256, after=256).sum().backward()
    if kind == "packed":
        N = 16384
        q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
        seg = torch.arange(N).div(256, rounding_mode="floor")[None] if packed else None

        def fwd() -> None:
            with torch.no_grad():
                longattn.attention(q, k, v, "local", before=128, after=128, segment_ids=seg)

        return fwd
    raise ValueError(f"kind must be decode, gqa or packed, got {kind!r}")


def run(kind: str, reps: int, **kw) -> dict:
    """{"seconds": median, "peak_mib": whole-process VmHWM} of one case in a fresh process."""
    res = run_case(case_ref(__file__, "case"), dict(kind=kind, **kw), threads=2, warmup=1,
                   repeats=reps * 20 if kind == "decode" else reps)
    if res["status"] != "ok":
        raise RuntimeError(f"{kind} {kw} failed:\n{res.get('traceback') or res.get('reason')}")
    return {"seconds": res["time_s"]["median"], "peak_mib": res["rss_peak_mb"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="decode,gqa,packed")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if "decode" in only:
        a, b = run("decode", args.reps, t=4096), run("decode", args.reps, t=262144)
        print(f"decode step, local window 512: t=4096 {a['seconds'] * 1e3:.2f} ms, "
              f"t=262144 {b['seconds'] * 1e3:.2f} ms, ratio {b['seconds'] / a['seconds']:.2f} (target <= 2)")
    if "gqa" in only:
        one, full = run("gqa", args.reps, hkv=1), run("gqa", args.reps, hkv=8)
        print(f"local fwd+bwd N=65536: Hkv=1 {one['seconds']:.2f} s, peak {one['peak_mib']:.0f} MiB; "
              f"Hkv=8 {full['seconds']:.2f} s, peak {full['peak_mib']:.0f} MiB (target: Hkv=1 below)")
    if "packed" in only:
        pk, un = run("packed", args.reps, packed=True), run("packed", args.reps, packed=False)
        print(f"local 128+128, N=16384: 64 packed documents of 256 {pk['seconds'] * 1e3:.0f} ms, "
              f"one row {un['seconds'] * 1e3:.0f} ms, ratio {pk['seconds'] / un['seconds']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
