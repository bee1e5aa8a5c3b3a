"""The benchmark suite's figures: ratios against baselines, scaling, memory, stage throughput.

Only the benchmarks draw these, so they live here and not in the package. Matplotlib's Agg
canvas, no pyplot, as ``cryodask.viz``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=fig.dpi, format="png")
    return out_png


def ratio_png(name: str, ratios: dict, out_png) -> Path:
    """One benchmark's ratios against its baselines: medians with min–max error bars."""
    fig = Figure(figsize=(max(5, 1.6 * len(ratios)), 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    names = list(ratios)
    med = np.array([ratios[n]["median"] for n in names])
    lo = med - np.array([ratios[n]["min"] for n in names])
    hi = np.array([ratios[n]["max"] for n in names]) - med
    ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xticks=range(len(names)), xticklabels=[n.replace(" ", "\n", 2) for n in names], ylabel="ratio",
           title=f"{name}: median of runs, bars min–max")
    return _save(fig, out_png)


def scaling_png(rows: list[dict], out_png, *, title: str = "Scaling") -> Path:
    """Throughput and parallel efficiency against the number of workers (median, min–max)."""
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax_tp, ax_eff = fig.subplots(1, 2)
    for kind in sorted({r.get("kind", "cpu") for r in rows}):
        rs = sorted((r for r in rows if r.get("kind", "cpu") == kind), key=lambda r: r["workers"])
        n = [r["workers"] for r in rs]
        for ax, key in ((ax_tp, "throughput"), (ax_eff, "efficiency")):
            med = np.array([r[key]["median"] for r in rs])
            err = [med - [r[key]["min"] for r in rs], np.array([r[key]["max"] for r in rs]) - med]
            ax.errorbar(n, med, yerr=err, marker="o", capsize=4, label=kind)
    if rows:
        top = max(r["workers"] for r in rows)
        first = min(rows, key=lambda r: r["workers"])
        per_worker = first["throughput"]["median"] / first["workers"]
        ax_tp.plot([1, top], [per_worker, per_worker * top], "--", color="grey", label="linear")
    counts = sorted({r["workers"] for r in rows})
    for ax in (ax_tp, ax_eff):
        ax.set_xticks(counts)
    ax_eff.axhline(0.8, color="C3", ls=":", label="target 0.8")
    ax_tp.set(xlabel="workers", ylabel=rows[0].get("unit", "items/s") if rows else "", title="Throughput")
    ax_eff.set(xlabel="workers", ylabel="T1 / (N · TN)", ylim=(0, 1.2), title="Parallel efficiency")
    ax_tp.legend()
    ax_eff.legend()
    fig.suptitle(title)
    return _save(fig, out_png)


def memory_png(peaks: dict, out_png) -> Path:
    """Peak RSS (MB) of every method of every benchmark, grouped by benchmark."""
    labels = [f"{bench}\n{method}" for bench, methods in peaks.items() for method in methods]
    values = [v for methods in peaks.values() for v in methods.values()]
    fig = Figure(figsize=(max(6, 0.7 * len(values)), 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=[f"C{i}" for i, m in enumerate(peaks.values()) for _ in m])
    ax.set(xticks=range(len(values)), ylabel="peak RSS MB (max over runs)", title="Peak memory")
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize="small")
    return _save(fig, out_png)


def throughput_png(rows: list[dict], out_png) -> Path:
    """Per-stage throughput of the scaling step at each worker count: MB per stage-second
    (read, write) and blocks per stage-second (every stage), from the run reports."""
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax_mb, ax_blocks = fig.subplots(1, 2)
    with_stages = [r for r in rows if r.get("stages")]
    names = sorted({s["stage"] for r in with_stages for s in r["stages"]}, key=lambda n: (
        ("read", "preprocess", "infer", "post-process", "write") + (n,)).index(n))
    width = 0.8 / max(len(with_stages), 1)
    for i, r in enumerate(with_stages):
        by = {s["stage"]: s for s in r["stages"]}
        x = np.arange(len(names)) + i * width
        ax_mb.bar(x, [max(by[n]["read_mb_per_s"], by[n]["write_mb_per_s"]) if n in by else 0 for n in names], width,
                  label=f"{r['kind']} x{r['workers']}")
        ax_blocks.bar(x, [by[n]["blocks"] / by[n]["wall_s"] if n in by and by[n]["wall_s"] > 0 else 0 for n in names],
                      width, label=f"{r['kind']} x{r['workers']}")
    for ax, label in ((ax_mb, "MB per stage-second"), (ax_blocks, "blocks per stage-second")):
        ax.set(xticks=np.arange(len(names)) + 0.4 - width / 2, xticklabels=names, ylabel=label)
        ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.suptitle("Throughput per stage (one worker's view: summed stage time)")
    return _save(fig, out_png)
