"""The evaluation report: markdown tables, plots and the JSON document.

Document (``longattn.eval``, version 1), JSON keys: ``schema``, ``version``, ``model``,
``config`` (:class:`~longattn.evaluation.runner.EvalConfig`, mechanisms as run),
``threads``, ``elapsed_s``, ``machine``; ``perplexity``: one record per (mechanism,
length) with ``nll``, ``tokens`` (scored), ``ppl``, ``windows``, ``prefill_s`` and
``peak_mb`` (first window), ``decode_tok_s``, ``cache_mib``; ``passkey``: one record
per (mechanism, length, depth) with ``key``, ``generated``, ``hit``; ``errors``:
(mechanism, error) for mechanisms that failed.

Files written under the output directory: ``eval.md``, ``eval.json``,
``eval_perplexity.png``, ``eval_passkey.png``, ``eval_cost.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longattn.bench.harness import write_json
from longattn.bench.report import _fmt, _fmt_time, write_page

BASELINE = "sdpa"


def _by(records: list[dict[str, Any]], *keys: str) -> dict[tuple, dict[str, Any]]:
    return {tuple(r[k] for k in keys): r for r in records}


def _mechanisms(doc: dict[str, Any]) -> list[str]:
    return list(doc["config"]["mechanisms"])


def perplexity_table(doc: dict[str, Any]) -> str:
    """Rows: mechanisms; columns: lengths; cells: perplexity (ratio to sdpa's)."""
    lengths = doc["config"]["lengths"]
    recs = _by(doc["perplexity"], "mechanism", "length")
    rows = ["| mechanism | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |",
            "|---|" + "---|" * len(lengths)]
    for m in _mechanisms(doc):
        cells = []
        for n in lengths:
            r, base = recs.get((m, n)), recs.get((BASELINE, n))
            if r is None:
                cells.append("-")
                continue
            ratio = f" ({r['ppl'] / base['ppl']:.3f}x)" if base and m != BASELINE else ""
            cells.append(f"{r['ppl']:.3f}{ratio}")
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def passkey_table(doc: dict[str, Any]) -> str:
    """Rows: mechanisms; columns: lengths; cells: keys retrieved / depths tried."""
    recs = doc["passkey"]
    lengths = sorted({r["length"] for r in recs})
    if not lengths:
        return "(no passkey cases run)\n"
    rows = ["| mechanism | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
            "|---|" + "---|" * len(lengths)]
    for m in _mechanisms(doc):
        cells = []
        for n in lengths:
            got = [r["hit"] for r in recs if r["mechanism"] == m and r["length"] == n]
            cells.append(f"{sum(got)}/{len(got)}" if got else "-")
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def cost_table(doc: dict[str, Any]) -> str:
    """Rows: (mechanism, length); prefill time (speed-up: sdpa's time / this time) and peak
    memory, decode speed, cache."""
    rows = ["| mechanism | length | prefill | speed-up vs sdpa | prefill peak MiB | decode tok/s | cache MiB |",
            "|---|---|---|---|---|---|---|"]
    base = _by([r for r in doc["perplexity"] if r["mechanism"] == BASELINE], "length")
    for r in sorted(doc["perplexity"], key=lambda r: (_mechanisms(doc).index(r["mechanism"]), r["length"])):
        b = base.get((r["length"],))
        speed = _fmt(b["prefill_s"] / r["prefill_s"], ".2f") + "x" if b and r["mechanism"] != BASELINE else ""
        rows.append(f"| `{r['mechanism']}` | {r['length']} | {_fmt_time(r['prefill_s'])} | {speed} | "
                    f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r['decode_tok_s'], '.1f')} | "
                    f"{_fmt(r['cache_mib'], '.1f')} |")
    return "\n".join(rows) + "\n"


def _plot_perplexity(doc: dict[str, Any], ax: Any) -> None:
    for m in _mechanisms(doc):
        rs = sorted((r for r in doc["perplexity"] if r["mechanism"] == m), key=lambda r: r["length"])
        if rs:
            ax.plot([r["length"] for r in rs], [r["ppl"] for r in rs], "o-", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens; second half scored)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)


def _plot_passkey(doc: dict[str, Any], ax: Any) -> None:
    for m in _mechanisms(doc):
        lengths = sorted({r["length"] for r in doc["passkey"] if r["mechanism"] == m})
        acc = [sum(r["hit"] for r in doc["passkey"] if r["mechanism"] == m and r["length"] == n)
               / max(1, sum(1 for r in doc["passkey"] if r["mechanism"] == m and r["length"] == n))
               for n in lengths]
        if lengths:
            ax.plot(lengths, acc, "o-", label=m)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey retrieved (fraction of depths)")
    ax.legend(fontsize=7)


def _plot_cost(doc: dict[str, Any], axes: Any) -> None:
    for key, ax, label in (("prefill_s", axes[0], "prefill time (s)"), ("peak_mb", axes[1], "prefill peak (MiB)"),
                           ("decode_tok_s", axes[2], "decode tokens/s")):
        for m in _mechanisms(doc):
            rs = sorted((r for r in doc["perplexity"] if r["mechanism"] == m and r.get(key)),
                        key=lambda r: r["length"])
            if rs:
                ax.plot([r["length"] for r in rs], [r[key] for r in rs], "o-", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)


def plot_all(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The three figures (module docstring); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ncols, draw in (("perplexity", 1, _plot_perplexity), ("passkey", 1, _plot_passkey),
                              ("cost", 3, _plot_cost)):
        fig, ax = plt.subplots(1, ncols, figsize=(5 * ncols, 3.6))
        draw(doc, ax)
        fig.suptitle(f"{doc['model']}: {name}", fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / f"eval_{name}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def markdown(doc: dict[str, Any], plots: list[Path]) -> list[str]:
    """The sections of ``eval.md``."""
    cfg = doc["config"]
    cpu = doc.get("machine", {}).get("cpu", "?")
    intro = (f"Model `{doc['model']}`, {doc.get('threads', '?')} thread(s) of {cpu}, {cfg['device']}, "
             f"{doc.get('elapsed_s', 0):.0f} s. Perplexity: {cfg['windows']} window(s) per length, the "
             f"second half of each scored. Passkey: depths {list(cfg['depths'])}, greedy "
             f"{cfg['passkey_tokens']} tokens. Decode: {cfg['decode_tokens']} greedy tokens after the "
             "first window's prefill. Prefill peak: memory growth of the first window's forward (its "
             "scored logits included, the same for every mechanism).\n")
    sections = [intro, "## Perplexity\n", perplexity_table(doc), "## Passkey retrieval\n", passkey_table(doc),
                "## Cost\n", cost_table(doc)]
    if doc["errors"]:
        sections += ["## Not run\n", "| mechanism | error |\n|---|---|\n" + "".join(
            f"| `{e['mechanism']}` | {e['error'].replace('|', '/')} |\n" for e in doc["errors"])]
    sections += [f"![{p.stem}]({p.name})\n" for p in plots]
    return sections


def write_report(doc: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``eval.json``, the plots and ``eval.md`` under ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"json": write_json(doc, out_dir / "eval.json")}
    figures = plot_all(doc, out_dir) if plots else []
    paths.update({p.stem: p for p in figures})
    paths["markdown"] = write_page(out_dir / "eval.md", "longattn eval", markdown(doc, figures))
    return paths
