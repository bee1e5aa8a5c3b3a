"""PNG figures of a run report (matplotlib, Agg canvas, no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..viz import _save


def stage_colours(n: int) -> list:
    """``n`` distinct colours, one per stage: tab20's dark shades then its light ones (no two
    neighbours alike), evenly spaced hues of ``turbo`` past 20."""
    from matplotlib import colormaps

    if n > 20:
        return [colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, n)]
    tab = colormaps["tab20"].colors
    return [tab[i] for i in (*range(0, 20, 2), *range(1, 20, 2))][:n]


def report_png(summary: dict, out_png) -> Path:
    """Save :func:`report_figure` of a run's summary as a PNG."""
    return _save(report_figure(summary), out_png)


def report_figure(summary: dict) -> Figure:
    """Wall and CPU seconds, MB/s per stage and each worker's peak RSS above, the block timeline
    per worker below. Stages are rows of horizontal bars named on the y axis (long names never
    overlap), each in its own colour in every panel; the timeline's legend sits beside it."""
    from matplotlib.patches import Patch

    rows, records = summary["stages"], summary["records"]
    names = [f"{r['step']} / {r['stage']}" for r in rows]
    colours = dict(zip(names, stage_colours(len(names))))
    workers = sorted({r["worker"] for r in records})
    peaks = summary["worker_peak_rss_mb"]
    top, bottom = 0.28 * max(len(rows), 4) + 1.2, 0.3 * max(len(workers), len(rows) / 2, 4) + 1.2
    fig = Figure(figsize=(14, top + bottom + 0.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=(3, 2, 1.4), height_ratios=(top, bottom))
    ax_time = fig.add_subplot(grid[0, 0])
    ax_rate = fig.add_subplot(grid[0, 1], sharey=ax_time)
    ax_rss = fig.add_subplot(grid[0, 2])
    ax_line = fig.add_subplot(grid[1, :])
    y = np.arange(len(rows))
    bar_colours = [colours[n] for n in names]
    ax_time.barh(y - 0.2, [r["wall_s"] for r in rows], 0.4, color=bar_colours, label="wall")
    ax_time.barh(y + 0.2, [r["cpu_s"] for r in rows], 0.4, color=bar_colours, alpha=0.45, hatch="//", label="CPU")
    ax_time.set(yticks=y, yticklabels=names, xlabel="seconds (summed over blocks)", title="Time per stage")
    ax_rate.barh(y - 0.2, [r["read_mb_per_s"] for r in rows], 0.4, color=bar_colours, label="read")
    ax_rate.barh(y + 0.2, [r["write_mb_per_s"] for r in rows], 0.4, color=bar_colours, alpha=0.45, hatch="//",
                 label="written")
    ax_rate.set(xlabel="MB per stage-second", title="Throughput per stage")
    ax_rate.tick_params(labelleft=False)
    ax_time.invert_yaxis()  # the first stage on top, as in the printed table (shared with ax_rate)
    for ax in (ax_time, ax_rate):
        ax.grid(axis="x", alpha=0.3)
        # solid = wall / read, hatched = CPU / written, in grey: colour means the stage
        ax.legend(handles=[Patch(facecolor="0.4", label=ax.containers[0].get_label()),
                           Patch(facecolor="0.4", alpha=0.45, hatch="//", label=ax.containers[1].get_label())],
                  loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / top), ncols=2, fontsize="small",
                  frameon=False)
    t0 = min((r["start"] for r in records), default=0.0)
    for r in records:
        ax_line.barh(workers.index(r["worker"]), r["wall"], left=r["start"] - t0, height=0.8,
                     color=colours.get(f"{r['step']} / {r['stage']}", "grey"))
    ax_line.set(yticks=range(len(workers)), yticklabels=[w.rsplit(":", 1)[-1] for w in workers],
                xlabel="seconds since the first stage", ylabel="worker (pid)", title="Blocks over time")
    if colours:
        ax_line.legend(handles=[Patch(facecolor=c, label=n) for n, c in colours.items()], loc="upper left",
                       bbox_to_anchor=(1.005, 1.0), fontsize="small", title="stage", frameon=False,
                       ncols=1 + len(colours) // 16)
    ax_rss.barh(range(len(peaks)), list(peaks.values()), color="0.5")
    ax_rss.set(yticks=range(len(peaks)), yticklabels=[w.rsplit(":", 1)[-1] for w in peaks], xlabel="MB",
               ylabel="process (pid)", title="Peak RSS per process")
    fig.suptitle(f"{summary['command']}: {summary['wall_s']:.1f} s")
    return fig
