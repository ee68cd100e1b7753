"""Speed and peak memory of ``graph`` (and ``additive``) attention against their peers.

graph: B=1, H=8, D=64, fp32, N nodes with ``--deg`` random in-edges each (uniform
random sources). Cases, each in its own process (:mod:`longattn.bench.subprocess_case`;
peak memory is per process), warm-up, the harness's peak-memory call, then the median of
``--repeat`` runs, forward (no_grad) and train (forward + backward):

- ``graph``: longattn's CSR implementation;
- ``scatter``: the peer a user would write, torch_geometric-style scatter softmax the
  obvious way (gather q[dst], k[src], scatter_reduce amax, exp, scatter_add sum, gather,
  weighted index_add of v[src]), autograd backward;
- ``sdpa``: dense ``scaled_dot_product_attention`` over all N^2 pairs (no mask: the
  cost a dense model pays);
- ``before``: the implementation at a given git revision (``--before REV``, default the
  commit before the CSR rewrite), loaded from ``git show``, when asked for.

additive: train peak memory (and time) at ``--additive-n`` with A = D = 64.

    python benchmarks/graph_additive_speed.py --n 16384 --deg 32 --before b4cb5d9~1
    python benchmarks/graph_additive_speed.py --additive-n 4096 --skip-graph
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable

import torch

from longattn.bench.subprocess_case import case_ref, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, D = 8, 64


def scatter_peer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
    """The obvious torch_geometric-style scatter softmax over edges ``ei`` [2, E] (src, dst)."""
    s_, d_ = ei[0], ei[1]
    B, H, N, D = q.shape
    score = (q[:, :, d_] * k[:, :, s_]).sum(-1) * D ** -0.5  # [B, H, E]
    idx = d_.expand(B, H, -1)
    mx = torch.full((B, H, N), float("-inf")).scatter_reduce(2, idx, score.detach(), "amax")
    w = torch.exp(score - mx.gather(2, idx))
    den = torch.zeros(B, H, N).scatter_add(2, idx, w)
    w = w / den.gather(2, idx)
    return torch.zeros(B, H, N, v.shape[-1]).index_add(2, d_, w[..., None] * v[:, :, s_])


def _attention(kind: str, ei: torch.Tensor, before_dir: str) -> Callable[..., torch.Tensor]:
    """f(q, k, v) of case ``kind`` over the edges ``ei``."""
    import longattn

    if kind == "graph":
        return lambda q, k, v: longattn.attention(q, k, v, "graph", edge_index=ei)
    if kind == "before":
        sys.path.insert(0, before_dir)
        import graph_before

        return lambda q, k, v: graph_before.graph_attention(q, k, v, edge_index=ei)
    if kind == "scatter":
        return lambda q, k, v: scatter_peer(q, k, v, ei)
    if kind == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if kind == "additive":
        return longattn.build("additive", heads=H, head_dim=D)
    raise ValueError(f"kind must be graph, before, scatter, sdpa or additive, got {kind!r}")


def case(kind: str, mode: str, n: int, deg: int, before_dir: str) -> Callable[[], None]:
    """One forward (``mode="fwd"``, no_grad) or forward + backward (``"train"``) of ``kind``
    on [1, 8, n, 64] with ``deg`` random in-edges per node (a rare duplicate counts twice)."""
    q, k, v = (torch.randn(1, H, n, D, requires_grad=mode == "train") for _ in range(3))
    src = torch.randint(0, n, (n * deg,))
    dst = torch.arange(n).repeat_interleave(deg)
    fn = _attention(kind, torch.stack([src, dst]), before_dir)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            fn(q, k, v).sum().backward()

    return step


def run_one(kind: str, mode: str, n: int, deg: int, repeat: int, threads: int, before_dir: str) -> dict:
    # additive: quadratic, minutes at N = 4096: no warm-up, its one (peak) call is the figure;
    # the others warm up once (builds the CSR cache for graph, as a model reusing its edges would)
    quad = kind == "additive"
    res = run_case(case_ref(__file__, "case"), dict(kind=kind, mode=mode, n=n, deg=deg, before_dir=before_dir),
                   threads=threads, warmup=0 if quad else 1, repeats=0 if quad else repeat)
    if res["status"] != "ok":
        return dict(kind=kind, mode=mode, n=n, error=[res.get("reason", res["status"])])
    return dict(kind=kind, mode=mode, n=n, s=res["time_s"]["median"], peak_mb=res["peak_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--deg", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="graph,scatter,sdpa", help="comma list of graph,scatter,sdpa,before")
    ap.add_argument("--modes", default="fwd,train")
    ap.add_argument("--before", default=None, help="git revision of the 'before' graph (adds kind 'before')")
    ap.add_argument("--additive-n", type=int, default=0, help="also measure additive train at this N")
    ap.add_argument("--skip-graph", action="store_true")
    args = ap.parse_args()

    before_dir = "/tmp/longattn_graph_before"
    kinds = [x for x in args.kinds.split(",") if x]
    if args.before:
        os.makedirs(before_dir, exist_ok=True)
        src = subprocess.run(["git", "-C", ROOT, "show", f"{args.before}:src/longattn/ops/graph.py"],
                             capture_output=True, text=True, check=True).stdout
        # the old module registered itself as "graph": keep its function, skip the registration
        src = src.replace("@register(", "@(lambda *a, **kw: (lambda f: f))(", 1)
        with open(os.path.join(before_dir, "graph_before.py"), "w") as f:
            f.write(src)
        if "before" not in kinds:
            kinds.append("before")
    rows = []
    if not args.skip_graph:
        for mode in args.modes.split(","):
            for kind in kinds:
                r = run_one(kind, mode, args.n, args.deg, args.repeat if kind != "sdpa" else 1,
                             args.threads, before_dir)
                rows.append(r)
                print(json.dumps(r), flush=True)
        print(f"\ngraph N={args.n} B=1 H=8 D=64 fp32, {args.deg} in-edges per node, "
              f"{args.threads} threads (median seconds, peak RSS growth MiB)")
        print(f"{'mode':6} {'kind':8} {'seconds':>9} {'peak MiB':>9} {'graph is x faster':>18}")
        for mode in args.modes.split(","):
            mine = next((r for r in rows if r["mode"] == mode and r["kind"] == "graph" and "s" in r), None)
            for r in rows:
                if r["mode"] != mode:
                    continue
                if "s" not in r:
                    print(f"{mode:6} {r['kind']:8} failed: {r['error']}")
                    continue
                ratio = f"{r['s'] / mine['s']:.1f}" if mine else "-"
                print(f"{mode:6} {r['kind']:8} {r['s']:9.3f} {r['peak_mb']:9.0f} {ratio:>18}")
    if args.additive_n:
        r = run_one("additive", "train", args.additive_n, args.deg, 1, args.threads, before_dir)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
