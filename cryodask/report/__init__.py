"""Run reports: per-block, per-stage wall/CPU/RSS/bytes, a printed table, JSON, PNG and Dask's HTML.

A command wraps its work in :func:`run_report` (``--report DIR``); a block task wraps its parts
in :func:`stage` (read, preprocess, infer, post-process, write), or is timed whole with
``recorded(fn, "infer")`` and ``RecordedRead(read)``. How to add it to a step:
docs/architecture.md, "Adding a step" and "Run reports".
"""

from .session import run_report
from .stages import RecordedRead, recorded, stage

__all__ = ["run_report", "stage", "recorded", "RecordedRead"]
