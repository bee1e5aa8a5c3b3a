"""Stage records → one row per (step, stage), the printed table and the JSON summary."""

from __future__ import annotations

import os
import platform
from collections import defaultdict

from .stages import STAGES


def machine() -> dict:
    """The client machine, so a number is never read without knowing where it was taken."""
    import psutil

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"host": platform.node(), "cores": os.cpu_count(), "cpu": cpu,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def _order(key) -> tuple:
    step, name = key
    return (step, STAGES.index(name) if name in STAGES else len(STAGES), name)


def stage_rows(records: list[dict]) -> list[dict]:
    """Totals per (step, stage): blocks, wall and CPU seconds, the largest peak RSS, bytes and
    throughput (bytes per wall second of that stage, summed over workers)."""
    groups = defaultdict(list)
    for r in records:
        groups[r["step"], r["stage"]].append(r)
    rows = []
    for key in sorted(groups, key=_order):
        rs = groups[key]
        walls = sorted(r["wall"] for r in rs)
        wall, cpu = sum(walls), sum(r["cpu"] for r in rs)
        read, written = sum(r["bytes_read"] for r in rs), sum(r["bytes_written"] for r in rs)
        rows.append({"step": key[0], "stage": key[1], "blocks": len(rs), "wall_s": wall, "cpu_s": cpu,
                     "cpu_per_wall": cpu / wall if wall > 0 else 0.0, "block_wall_median_s": walls[len(walls) // 2],
                     "block_wall_max_s": walls[-1], "peak_rss_mb": max(r["peak_rss"] for r in rs) / 1e6,
                     "bytes_read": read, "bytes_written": written,
                     "read_mb_per_s": read / 1e6 / wall if wall > 0 else 0.0,
                     "write_mb_per_s": written / 1e6 / wall if wall > 0 else 0.0,
                     "workers": len({r["worker"] for r in rs})})
    return rows


def summarize(records: list[dict], *, command: str, wall_s: float, workers: int | None = None) -> dict:
    """The JSON summary of a run: the machine, per-stage rows, per-worker peaks, every record."""
    peaks = defaultdict(int)
    for r in records:
        peaks[r["worker"]] = max(peaks[r["worker"]], r["peak_rss"])
    return {"command": command, "wall_s": wall_s, "workers": workers, "machine": machine(),
            "stages": stage_rows(records), "worker_peak_rss_mb": {w: p / 1e6 for w, p in sorted(peaks.items())},
            "records": sorted(records, key=lambda r: r["start"])}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n else "-"


def table(summary: dict) -> str:
    """The one table printed at the end of every run."""
    rows = summary["stages"]
    head = f"run report: {summary['command']}, {summary['wall_s']:.1f} s wall"
    if summary.get("workers"):
        head += f", {summary['workers']} workers"
    if not rows:
        return head + "; no block stage was recorded"
    lines = [head, f"{'step':<16} {'stage':<13} {'blocks':>6} {'wall s':>8} {'cpu s':>8} {'cpu/wall':>8} "
                   f"{'max block s':>11} {'peak RSS MB':>11} {'read MB':>9} {'written MB':>10} {'MB/s':>7}"]
    for r in rows:
        rate = max(r["read_mb_per_s"], r["write_mb_per_s"])
        lines.append(f"{r['step'][:16]:<16} {r['stage'][:13]:<13} {r['blocks']:>6} {r['wall_s']:>8.2f} "
                     f"{r['cpu_s']:>8.2f} {r['cpu_per_wall']:>8.2f} {r['block_wall_max_s']:>11.3f} "
                     f"{r['peak_rss_mb']:>11.0f} {_mb(r['bytes_read']):>9} {_mb(r['bytes_written']):>10} {rate:>7.0f}")
    return "\n".join(lines)
