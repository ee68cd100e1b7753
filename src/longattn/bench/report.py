"""The report: markdown tables and log-log plots from the result documents.

Benchmark document (``longattn.bench``, version 1), JSON keys:

- ``schema``, ``version``, ``created``, ``elapsed_s``;
- ``machine``: cpu, cores, threads, torch, python, platform, mem_available_mb,
  ``matmul_gflops`` (fp32 n x n matmul measured in the same run);
- ``config``: the :class:`~longattn.bench.harness.BenchConfig` used;
- ``flops_convention``: how useful FLOPs are counted (:mod:`longattn.bench.flops`);
- ``settings``: mechanism or peer -> its benchmark settings;
- ``results``: one record per (mechanism or peer, N, mode) with ``mechanism``,
  ``equals`` (the mechanism whose settings apply), ``kind`` ("dense" | "ours" |
  "peer"), ``peer``, ``n``, ``mode`` ("fwd" | "train"), ``batch``, ``heads``,
  ``dim``, ``dtype``, ``causal``, ``status`` ("ok" | "skipped" | "timeout" |
  "killed" | "oom" | "error"), ``reason``, ``flops`` (useful), ``est_mb``; and when
  ok: ``time_s`` {median, min, max, q1, q3, repeats}, ``peak_mb`` (working memory
  above the inputs), ``rss_peak_mb``, ``params``, ``gflops`` (useful GFLOP/s),
  ``frac_of_matmul``, ``speedup_vs_full`` (dense time / this time, same N and mode).

Error document (``longattn.error``, version 1): ``config``, ``budgets``,
``approximate`` (mechanism, input, n, budget_param, budget, rel_error), ``exact``
(mechanism, input, n, rel_error), ``skipped`` (mechanism, reason).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BENCH_KEYS = ("schema", "version", "machine", "config", "settings", "results", "flops_convention")
RESULT_KEYS = ("mechanism", "equals", "kind", "n", "mode", "status", "flops")
ERROR_KEYS = ("schema", "version", "config", "approximate", "exact", "skipped")


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def bench_table(doc: dict[str, Any], mode: str) -> str:
    """Markdown table of one mode: rows = mechanisms/peers, one block of columns per N."""
    res = [r for r in doc["results"] if r["mode"] == mode]
    ns = sorted({r["n"] for r in res})
    labels = list(dict.fromkeys(r["mechanism"] for r in res))
    head = ["mechanism", "kind"] + [f"N={n}" for n in ns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        row = [f"`{lab}`", next(r["kind"] for r in res if r["mechanism"] == lab)]
        for n in ns:
            r = next((r for r in res if r["mechanism"] == lab and r["n"] == n), None)
            row.append(_cell(r))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def headline_table(doc: dict[str, Any]) -> str:
    """Speed-up and memory against dense SDPA at the largest N where it ran, per mode."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in doc["results"]):
        dense = [r for r in doc["results"] if r["mode"] == mode and r["mechanism"] == "full"
                 and r.get("status") == "ok"]
        if not dense:
            continue
        d = max(dense, key=lambda r: r["n"])
        rows = [r for r in doc["results"] if r["mode"] == mode and r["n"] == d["n"] and r.get("status") == "ok"]
        rows.sort(key=lambda r: -r.get("speedup_vs_full", 0.0))
        out += [f"**{mode}, N={d['n']}** (dense SDPA: {_fmt_time(d['time_s']['median'])}, "
                f"{_fmt(d.get('peak_mb'), '.0f')} MiB)", "",
                "| mechanism | kind | time | speed-up vs full | peak MiB | useful GFLOP/s |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| `{r['mechanism']}` | {r['kind']} | {_fmt_time(r['time_s']['median'])} | "
                       f"{_fmt(r.get('speedup_vs_full'), '.2f')} | {_fmt(r.get('peak_mb'), '.0f')} | "
                       f"{_fmt(r.get('gflops'), '.1f')} |")
        out.append("")
    return "\n".join(out) if out else "(dense SDPA did not run: no ratios)"


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r.get("status") != "ok":
        return r.get("status", "?")
    t = r["time_s"]
    parts = [f"{_fmt_time(t['median'])} [{_fmt_time(t['min'])}-{_fmt_time(t['max'])}]"]
    parts.append(f"{_fmt(r.get('peak_mb'), '.0f')} MiB")
    if r.get("gflops") is not None:
        frac = r.get("frac_of_matmul")
        parts.append(f"{r['gflops']:.1f} GF/s" + (f" ({100 * frac:.0f}%)" if frac else ""))
    if r.get("speedup_vs_full") is not None and r["mechanism"] != "full":
        parts.append(f"x{r['speedup_vs_full']:.2g} vs full")
    return "<br>".join(parts)


def skipped_table(doc: dict[str, Any]) -> str:
    rows = [r for r in doc["results"] if r.get("status") != "ok"]
    missing = doc.get("peers_missing", [])
    left_out = doc.get("peers_left_out", [])
    if not rows and not missing and not left_out:
        return "Every case ran."
    lines = ["| mechanism | N | mode | status | reason |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['mechanism']}` | {r['n']} | {r['mode']} | {r['status']} | "
                     f"{_one_cell(r.get('reason', ''))} |")
    for p in missing:
        lines.append(f"| `{p}` (peer) | all | all | not installed | {_one_cell(_install_hint(p))} |")
    for e in left_out:
        lines.append(f"| `{e['peer']}` (peer) | all | {e['modes']} | not run | {_one_cell(e['reason'])} |")
    return "\n".join(lines)


def _one_cell(text: str) -> str:
    """``text`` as one markdown table cell (an error message may hold newlines or pipes)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _install_hint(peer: str) -> str:
    """How to install a missing peer: its own hint (:attr:`Peer.install`) or the bench extra."""
    try:
        from longattn.bench.cases import PEERS
    except ImportError:
        PEERS = {}
    hint = getattr(PEERS.get(peer), "install", "")
    return hint or "`pip install -e '.[bench]'` (make demo does)"


def settings_table(doc: dict[str, Any]) -> str:
    lines = ["| mechanism / peer | benchmark settings |", "|---|---|"]
    for k, v in doc["settings"].items():
        lines.append(f"| `{k}` | {v} |")
    return "\n".join(lines)


def error_table(doc: dict[str, Any]) -> str:
    """Markdown: relative error per approximate mechanism, budget and input."""
    kinds = list(doc["config"]["inputs"])
    lines = ["| mechanism | budget | " + " | ".join(f"rel. error ({k})" for k in kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    seen: dict[tuple[str, Any], dict[str, float | None]] = {}
    params: dict[str, str] = {}
    for r in doc["approximate"]:
        seen.setdefault((r["mechanism"], r["budget"]), {})[r["input"]] = r["rel_error"]
        params[r["mechanism"]] = r["budget_param"]
    for (m, b), errs in seen.items():
        cells = [_fmt(errs.get(k), ".3g") for k in kinds]
        lines.append(f"| `{m}` | {params[m]}={b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exact_table(doc: dict[str, Any]) -> str:
    kinds = list(doc["config"]["inputs"])
    lines = ["| exact mechanism | N | " + " | ".join(f"rel. error ({k})" for k in kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    by: dict[str, dict[str, Any]] = {}
    for r in doc["exact"]:
        by.setdefault(r["mechanism"], {"n": r["n"]})[r["input"]] = r["rel_error"]
    for m, e in by.items():
        lines.append(f"| `{m}` | {e['n']} | " + " | ".join(_fmt(e.get(k), ".1e") for k in kinds) + " |")
    for s in doc["skipped"]:
        lines.append(f"| `{s['mechanism']}` | - | not measured: {s['reason']} |" + " |" * (len(kinds) - 1))
    return "\n".join(lines)


# ----------------------------------------------------------------------- plots

_STYLE = {"dense": dict(color="black", linewidth=2.5, linestyle="-", marker="s"),
          "peer": dict(linestyle="--", marker="x", linewidth=1.5),
          "ours": dict(linestyle="-", marker="o", linewidth=1.2, markersize=3)}


def plot_bench(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """time vs N and memory vs N (log-log), one line per mechanism and mode; dense
    SDPA thick black, peers dashed with crosses, plus O(N) and O(N^2) guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    modes = list(dict.fromkeys(r["mode"] for r in doc["results"]))
    for metric, ylabel, fname in (("time", "median time (s)", "bench_time.png"),
                                  ("memory", "peak working memory (MiB)", "bench_memory.png")):
        fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(7.5 * max(1, len(modes)), 6), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            res = [r for r in doc["results"] if r["mode"] == mode and r.get("status") == "ok"]
            labels = list(dict.fromkeys(r["mechanism"] for r in res))
            cmap = plt.get_cmap("tab20")
            for idx, lab in enumerate(labels):
                rs = sorted((r for r in res if r["mechanism"] == lab), key=lambda r: r["n"])
                xs = [r["n"] for r in rs]
                ys = [r["time_s"]["median"] if metric == "time" else max(r.get("peak_mb") or 0.0, 0.01)
                      for r in rs]
                kind = rs[0]["kind"]
                style = dict(_STYLE[kind])
                if kind != "dense":
                    style.setdefault("color", cmap(idx % 20))
                if kind == "ours":
                    style["marker"] = "o^vsD<>ph*"[idx % 10]
                ax.plot(xs, ys, label=lab + (" (peer)" if kind == "peer" else ""), **style)
            _guides(ax, res, metric)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{metric} vs N, {mode} (B={doc['config']['batch']}, H={doc['config']['heads']}, "
                         f"D={doc['config']['dim']}, {doc['config']['dtype']})")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels_ = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def _guides(ax: Any, res: list[dict[str, Any]], metric: str) -> None:
    """Dotted O(N) and O(N^2) slopes anchored at the dense point of the smallest N."""
    dense = sorted((r for r in res if r["kind"] == "dense"), key=lambda r: r["n"])
    if not dense:
        return
    n0 = dense[0]["n"]
    y0 = dense[0]["time_s"]["median"] if metric == "time" else max(dense[0].get("peak_mb") or 0.01, 0.01)
    ns = sorted({r["n"] for r in res})
    if len(ns) < 2:
        return
    ax.plot(ns, [y0 * (n / n0) ** 2 for n in ns], ":", color="grey", linewidth=1, label="O(N^2) slope")
    ax.plot(ns, [y0 * (n / n0) for n in ns], "-.", color="grey", linewidth=1, label="O(N) slope")


def plot_error(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Relative error vs budget (log x, log y), one line per mechanism, one panel per input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = list(doc["config"]["inputs"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in doc["approximate"] if r["input"] == kind and r["rel_error"] is not None]
        for m in dict.fromkeys(r["mechanism"] for r in rs):
            pts = sorted((r["budget"], r["rel_error"]) for r in rs if r["mechanism"] == m)
            param = next(r["budget_param"] for r in rs if r["mechanism"] == m)
            ax.plot([p[0] for p in pts], [max(p[1], 1e-16) for p in pts], marker="o", label=f"{m} ({param})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("budget (features / k / landmarks / slots / rounds / chunk)")
        ax.set_ylabel("||out - exact|| / ||exact||")
        ax.set_title(f"approximation error, {kind} inputs (N={doc['config']['n']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "error.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


# ----------------------------------------------------------------------- pages


def _allocator_note(doc: dict[str, Any]) -> str:
    if doc["config"].get("allocator", "strict") == "reuse":
        return ("Timed calls reuse freed buffers up to 32 MiB (glibc's default behaviour; "
                "`--allocator strict` maps every buffer afresh, as runs before December 2026 did).")
    return "Timed calls map every buffer above 64 KiB afresh (`--allocator strict`)."


def bench_markdown(doc: dict[str, Any], plots: list[Path] | None = None, rel_to: Path | None = None) -> str:
    m = doc["machine"]
    out = ["## Speed and memory", "",
           f"Machine: {m['cpu']}, {m['threads']} thread(s) of {m['cores']} cores, torch {m['torch']}; "
           f"fp32 matmul measured at **{_fmt(m.get('matmul_gflops'), '.1f')} GFLOP/s** in this run. "
           f"Shape B={doc['config']['batch']}, H={doc['config']['heads']}, D={doc['config']['dim']}, "
           f"{doc['config']['dtype']}, causal={doc['config']['causal']}.", "",
           "Each cell: median time [min-max] over the repeats, peak working memory above the inputs "
           "(own process, one call under a strict allocator), useful GFLOP/s (and % of the matmul rate), speed-up over dense SDPA "
           f"(`full`) at the same N. FLOPs: {doc['flops_convention']}. {_allocator_note(doc)}", ""]
    for p in plots or []:
        out.append(f"![{p.stem}]({p.relative_to(rel_to) if rel_to else p})")
    out += ["", "### Against dense SDPA", "", headline_table(doc), ""]
    for mode in dict.fromkeys(r["mode"] for r in doc["results"]):
        out += [f"### {'forward (inference)' if mode == 'fwd' else 'training (forward + backward)'}", "",
                bench_table(doc, mode), ""]
    out += ["### Settings (equalised with the peers)", "", settings_table(doc), "",
            "### Not run", "", skipped_table(doc), ""]
    return "\n".join(out)


def error_markdown(doc: dict[str, Any], plot: Path | None = None, rel_to: Path | None = None) -> str:
    c = doc["config"]
    out = ["## Approximation error", "",
           f"Relative error ||out - exact|| / ||exact|| against exact softmax attention, "
           f"N={c['n']}, H={c['heads']}, D={c['dim']}, float64, seed {c['seed']}. Inputs: `gaussian` "
           "(i.i.d. N(0,1): diffuse attention) and `local` (smooth sequences, queries close to the keys "
           "near them: peaked, local attention). Note that with diffuse attention the exact output is "
           "an average of many values, so its norm is small and relative errors can exceed 1.", ""]
    if plot:
        out += [f"![error]({plot.relative_to(rel_to) if rel_to else plot})", ""]
    out += [error_table(doc), "", "### Exact mechanisms against the dense masked reference", "",
            exact_table(doc), ""]
    return "\n".join(out)


def write_page(path: str | Path, title: str, sections: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + "\n".join(sections))
    return path
