"""Kernel / low-rank mechanisms against dense SDPA and performer-pytorch.

Each case runs in a fresh process (:mod:`longattn.bench.subprocess_case`; peak memory is
per process): warm-up, the harness's peak-memory call, then the median of ``--repeat`` runs. B=1, H=8, D=64, fp32, 2 threads. Run under the bench lock:

    flock /tmp/longattn-bench.lock .venv/bin/python benchmarks/kernel_lowrank_vs_peers.py

The final harness (``longattn bench``) re-measures; this is a small, honest script.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _attention(name: str, causal: bool) -> Attn:
    """f(q, k, v) -> out of case ``name`` (causal where the case supports it)."""
    if name == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "performer-pytorch":
        from performer_pytorch import FastAttention

        return FastAttention(dim_heads=64, nb_features=256, causal=causal)
    import longattn

    kw = {"performer": dict(causal=causal, num_features=256), "linear": dict(causal=causal),
          "linformer": dict(proj_dim=256, max_len=65536), "nystrom": dict(landmarks=64),
          "compressed": dict(causal=causal, slots=256)}[name]
    return lambda q, k, v: longattn.attention(q, k, v, name, **kw)


CASES = ("sdpa", "performer-pytorch", "performer", "linear", "linformer", "nystrom", "compressed")


def case(name: str, N: int, causal: bool, bwd: bool) -> Callable[[], None]:
    """One forward (no_grad) or forward + backward of ``name`` on [1, 8, N, 64]."""
    f = _attention(name, causal)
    q, k, v = (torch.randn(1, 8, N, 64, requires_grad=bwd) for _ in range(3))

    def once() -> None:
        if bwd:
            f(q, k, v).sum().backward()
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.no_grad():
                f(q, k, v)

    return once


def run_one(name: str, N: int, causal: bool, bwd: bool, repeat: int, warm: int, threads: int) -> dict:
    res = run_case(case_ref(__file__, "case"), dict(name=name, N=N, causal=causal, bwd=bwd), threads=threads,
                   warmup=warm, repeats=repeat, timeout_s=1800)
    info = dict(name=name, N=N, causal=causal, bwd=bwd)
    if res["status"] != "ok":
        return dict(info, error=(res.get("traceback") or res.get("reason", res["status"]))[-500:])
    return dict(median_s=res["time_s"]["median"], peak_mb=res["peak_mb"], **info)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-slow-peer", action="store_true", help="skip performer-pytorch causal fwd+bwd (~1 min)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--sizes", type=int, nargs=2, default=[16384, 65536], metavar=("N1", "N2"),
                    help="the two sequence lengths (default 16384 65536)")
    a = ap.parse_args()
    n1, n2 = a.sizes
    plan = [
        ("sdpa", n1, False, False, 1, 1),
        ("performer-pytorch", n1, False, False, a.repeat, 1),
        ("performer", n1, False, False, a.repeat, 1),
        ("performer", n2, False, False, a.repeat, 1),
        ("linear", n1, False, False, a.repeat, 1),
        ("linear", n2, False, False, a.repeat, 1),
        ("linformer", n1, False, False, a.repeat, 1),
        ("linformer", n2, False, False, a.repeat, 1),
        ("nystrom", n1, False, False, a.repeat, 1),
        ("nystrom", n2, False, False, a.repeat, 1),
        ("compressed", n1, False, False, a.repeat, 1),
        ("compressed", n2, False, False, a.repeat, 1),
        ("performer", n1, True, True, 2, 1),
        ("linear", n1, True, True, 2, 1),
    ]
    if not a.skip_slow_peer:
        plan.append(("performer-pytorch", n1, True, True, 1, 0))
    results = []
    for name, N, causal, bwd, rep, warm in plan:
        if a.only and name not in a.only:
            continue
        r = run_one(name, N, causal, bwd, rep, warm, a.threads)
        results.append(r)
        print(json.dumps(r), flush=True)
    t = {(r["name"], r["N"], r["causal"]): r.get("median_s") for r in results}
    print("\nratios:")
    sd = t.get(("sdpa", n1, False))
    for name in ("performer", "linear", "linformer", "nystrom", "compressed"):
        a16, a64 = t.get((name, n1, False)), t.get((name, n2, False))
        if a16 and a64:
            print(f"  {name}: t({n2})/t({n1}) = {a64 / a16:.2f}" + (f", sdpa/{name} @{n1} = {sd / a16:.1f}x" if sd else ""))
    pp, ours = t.get(("performer-pytorch", n1, False)), t.get(("performer", n1, False))
    if pp and ours:
        print(f"  performer fwd @{n1}: performer-pytorch/ours = {pp / ours:.1f}x")
    pc, oc = t.get(("performer-pytorch", n1, True)), t.get(("performer", n1, True))
    if pc and oc:
        print(f"  causal fwd+bwd @{n1}: performer-pytorch/ours = {pc / oc:.1f}x")


if __name__ == "__main__":
    main()
