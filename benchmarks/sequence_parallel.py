"""Sequence parallelism on CPU processes: time, per-rank peak memory, bytes per rank.

    python benchmarks/sequence_parallel.py --procs 1 2 4 --n 65536 131072 262144 \\
        --out results/sequence_parallel

For each mechanism, N and P, P gloo processes (P = 1: one plain process calling
``longattn.attention``) each hold N/P positions of q, k, v [B, H, N/P, D] (fp32) and
run one forward + backward of ``longattn.distributed.attention`` (after one warm-up
call at the same size, which also caches the fetch plans). Reported per case:

- time: the slowest rank's wall time of forward + backward (median of ``--repeat``);
- peak: each rank's peak resident memory above its resting RSS after start-up
  (VmHWM after a reset through /proc/self/clear_refs, minus VmRSS), max over ranks;
- received: bytes one rank received from the others in one forward + backward
  (``longattn.distributed.comm_stats``), max over ranks.

Writes ``<out>.json`` and ``<out>.png`` (time, peak, bytes against N, one line per
mechanism and P). Each case runs in fresh processes; a case whose single-process
estimate exceeds ``--budget`` seconds is skipped (the ring at 1M positions on a CPU is
hours of work).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from longattn.bench.subprocess_case import reset_peak, resident_mb

MECHS = {
    "local": dict(mechanism="local", causal=False, params=dict(before=256, after=256)),
    "bigbird": dict(mechanism="bigbird", causal=False, params=dict(block=64, random_blocks=3, global_blocks=1)),
    "linear-causal": dict(mechanism="linear", causal=True, params={}),
    "full-causal": dict(mechanism="full", causal=True, params={}),
}
# rough single-thread cost per (query, key) pair seen, fwd + bwd, to skip hopeless cases
_PAIR_COST_S = 2.5e-8 * 8 / 8


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    rss, hwm = resident_mb()
    return int(rss * 2**20), int(hwm * 2**20)


def _check(rank, world, case, N, B, H, D, ref_path):
    """Max |difference| of out, dq, dk, dv from the single-process run's (saved at P = 1)."""
    import longattn
    import longattn.distributed as ld

    spec = MECHS[case]
    g = torch.Generator().manual_seed(12345)
    q, k, v, gout = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    mine = [t[:, :, sl].clone().requires_grad_(True) for t in (q, k, v)]
    del q, k, v
    fn = ld.attention if world > 1 else longattn.attention
    out = fn(*mine, spec["mechanism"], causal=spec["causal"], **spec["params"])
    out.backward(gout[:, :, sl])
    got = [out.detach()] + [t.grad for t in mine]
    if world == 1:
        torch.save(got, ref_path)
        return 0.0
    ref = torch.load(ref_path)
    return max(float((a - b[:, :, sl]).abs().max()) for a, b in zip(got, ref))


def _worker(rank, world, path, case, N, B, H, D, repeat, threads, result_dir, ref_path=None):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    import longattn
    import longattn.distributed as ld

    spec = MECHS[case]
    dist = world > 1
    if dist:
        torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=3600))
    n = N // world
    g = torch.Generator().manual_seed(rank)

    def run():
        q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(True) for _ in range(3))
        gout = torch.randn(B, H, n, D, generator=g)
        if dist:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        if dist:
            out = ld.attention(q, k, v, spec["mechanism"], causal=spec["causal"], **spec["params"])
        else:
            out = longattn.attention(q, k, v, spec["mechanism"], causal=spec["causal"], **spec["params"])
        out.backward(gout)
        t = time.perf_counter() - t0
        del q, k, v, gout, out
        if dist:
            tt = torch.tensor([t], dtype=torch.float64)
            torch.distributed.all_reduce(tt, op=torch.distributed.ReduceOp.MAX)
            t = float(tt)
        return t

    # warm-up at a small size (kernels, caches), then measure the peak of the first real call
    n_full = n
    n = min(n, 4096)
    run()
    n = n_full
    ld.reset_comm_stats()
    rest, _ = _rss()
    reset_peak()
    times = [run()]
    _, hwm = _rss()
    received = ld.comm_stats()["received"]
    for _ in range(repeat - 1):
        times.append(run())
    res = dict(rank=rank, time=statistics.median(times), times=times, peak=hwm - rest, received=received)
    if ref_path is not None and (world == 1 or os.path.exists(ref_path)):
        res["maxdiff"] = _check(rank, world, case, N, B, H, D, ref_path)
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    if dist:
        torch.distributed.destroy_process_group()


def run_case(case, N, P, B, H, D, repeat, threads, timeout, ref_path=None):
    tmp = tempfile.mkdtemp(prefix="longattn-sp-")
    path = os.path.join(tmp, "rendezvous")
    ctx = mp.start_processes(_worker, args=(P, path, case, N, B, H, D, repeat, threads, tmp, ref_path),
                             nprocs=P, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            return None
    ranks = []
    for r in range(P):
        with open(os.path.join(tmp, f"{r}.json")) as f:
            ranks.append(json.load(f))
    return dict(case=case, N=N, P=P, time=max(x["time"] for x in ranks),
                peak=max(x["peak"] for x in ranks), peaks=[x["peak"] for x in ranks],
                received=max(x["received"] for x in ranks), receiveds=[x["received"] for x in ranks],
                maxdiff=max((x["maxdiff"] for x in ranks if "maxdiff" in x), default=None))


def _estimate(case, N, B, H) -> float:
    """Seconds of one forward + backward in one process (order of magnitude)."""
    if case == "full-causal":
        pairs = N * N / 2
    elif case == "local":
        pairs = N * 513
    elif case == "bigbird":
        pairs = N * 64 * 7 + 2 * 64 * N
    else:
        pairs = N * 64 * 2
    return pairs * B * H * _PAIR_COST_S


def plot(rows, out_png, title=""):
    """Time, peak and bytes against N (one line per mechanism and P), or against P when
    every row has the same N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {1: "-", 2: "--", 4: ":"}
    cases = sorted({r["case"] for r in rows})
    colors = {c: f"C{i}" for i, c in enumerate(cases)}
    by_p = len({r["N"] for r in rows}) == 1
    for c in cases:
        groups = [sorted(((r["P"], r) for r in rows if r["case"] == c), key=lambda t: t[0])] if by_p else [
            sorted(((r["N"], r) for r in rows if r["case"] == c and r["P"] == P), key=lambda t: t[0])
            for P in sorted({r["P"] for r in rows})]
        for pts in groups:
            if not pts:
                continue
            P = pts[0][1]["P"]
            xs = [p[0] for p in pts]
            kw = dict(color=colors[c], linestyle="-" if by_p else styles.get(P, "-."), marker="o",
                      label=c if by_p else f"{c} P={P}")
            axes[0].plot(xs, [p[1]["time"] for p in pts], **kw)
            axes[1].plot(xs, [p[1]["peak"] / 2**20 for p in pts], **kw)
            bx = [(x, p[1]) for x, p in zip(xs, pts) if p[1]["P"] > 1]
            if bx:
                axes[2].plot([b[0] for b in bx], [max(b[1]["received"], 1) / 2**20 for b in bx], **kw)
    for ax, t in zip(axes, ("fwd+bwd time, slowest rank (s)", "peak RSS per rank above rest (MiB)",
                            "bytes received per rank, fwd+bwd (MiB)")):
        if by_p:
            ax.set_xlabel(f"processes P (N = {rows[0]['N']})")
            ax.set_xticks(sorted({r['P'] for r in rows}))
        else:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (whole sequence)")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"longattn.distributed on CPU gloo processes ({title}; P=1: longattn.attention)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(MECHS), choices=list(MECHS))
    ap.add_argument("--n", nargs="+", type=int, default=[65536, 131072, 262144, 524288, 1048576])
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--budget", type=float, default=900.0,
                    help="skip a case whose estimated single-rank time exceeds this (s)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="docs/img/sequence_parallel")
    ap.add_argument("--check", action="store_true",
                    help="after timing, compare out and gradients with the P=1 run's (run P=1 first; fp32)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from <out>.json")
    a = ap.parse_args(argv)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    rows = []
    if os.path.exists(a.out + ".json"):
        with open(a.out + ".json") as f:
            rows = json.load(f)["rows"]
    if not a.plot_only:
        for case in a.cases:
            for N in a.n:
                for P in a.procs:
                    est = _estimate(case, N, a.batch, a.heads)
                    if case == "full-causal":
                        est = est * (2 * P - 1) / (P * P) if P > 1 else est  # the last rank's share
                    else:
                        est /= P
                    if est > a.budget:
                        print(f"skip {case} N={N} P={P}: ~{est:.0f} s estimated", flush=True)
                        continue
                    ref = f"{tempfile.gettempdir()}/longattn-sp-ref-{case}-{N}.pt" if a.check else None
                    r = run_case(case, N, P, a.batch, a.heads, a.head_dim, a.repeat, a.threads, a.timeout, ref)
                    if r is None:
                        print(f"timeout {case} N={N} P={P}", flush=True)
                        continue
                    rows = [x for x in rows if (x["case"], x["N"], x["P"]) != (case, N, P)] + [r]
                    print(f"{case:14s} N={N:8d} P={P}: {r['time']:8.2f} s  peak {r['peak'] / 2**20:8.1f} MiB"
                          f"  received {r['received'] / 2**20:9.3f} MiB"
                          + (f"  max|diff| vs P=1 {r['maxdiff']:.2e}" if r.get("maxdiff") is not None else ""),
                          flush=True)
                    with open(a.out + ".json", "w") as f:
                        json.dump(dict(machine=os.uname().nodename, cpus=os.cpu_count(), torch=torch.__version__,
                                       threads=a.threads, B=a.batch, H=a.heads, D=a.head_dim, rows=rows), f, indent=1)
    if rows:
        plot(rows, a.out + ".png", f"B={a.batch}, H={a.heads}, D={a.head_dim}, fp32, {a.threads} thread(s) each")
        print(f"wrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    sys.exit(main())
