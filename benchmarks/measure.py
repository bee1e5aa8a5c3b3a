"""Shared by the benchmarks: run one method in a child process and sample its memory."""

from __future__ import annotations

import json
import subprocess
import time


def run_child(cmd: list[str], method: str) -> dict:
    """Run ``cmd``; sample the summed RSS of its process tree every 20 ms until it exits.

    The child prints one JSON object as its last line; ``peak_rss_mb`` is added to it."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{method} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 1e6
    return result
