"""Per-block, per-stage measurements taken inside the tasks themselves, in any process.

``with stage("read", block=name) as s: ...; s.bytes_read = n`` records wall and CPU time, the
process's peak RSS so far and the bytes moved; nested stages are exclusive, so every second is
counted once. Inactive (no recorder in the process) a stage costs one attribute test, active a
few µs, so it can wrap every block of a large run. What each number means: docs/architecture.md,
"Run reports".
"""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time

FIELDS = ("run", "step", "stage", "block", "start", "wall", "cpu", "peak_rss", "bytes_read", "bytes_written",
          "worker")
STAGES = ("read", "preprocess", "infer", "post-process", "write")  # the canonical order of the table


class _Recorder:
    """The process's active run: records kept in memory (and appended to a file, if given)."""

    def __init__(self, run: str, step: str, jsonl: str | None):
        self.run, self.step = run, step
        self.records: list[tuple] = []
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.file = open(jsonl, "a", buffering=1) if jsonl else None  # line-buffered: one write per stage
        self.lock = threading.Lock()

    def add(self, record: tuple) -> None:
        self.records.append(record)
        if self.file is not None:
            with self.lock:
                self.file.write(json.dumps(dict(zip(FIELDS, record))) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_active: _Recorder | None = None
_local = threading.local()  # the stack of open stages of each thread


def activate(run: str, step: str = "", jsonl: str | None = None) -> None:
    """Start recording in this process (replacing any other run)."""
    global _active
    if _active is not None:
        _active.close()
    _active = _Recorder(run, step, jsonl)


def collect(run: str | None = None, stop: bool = True) -> list[dict]:
    """This process's records of ``run`` (of any run when None) as dicts; ``stop`` ends recording."""
    global _active
    recorder = _active
    if recorder is None or (run is not None and recorder.run != run):
        return []
    records = [dict(zip(FIELDS, r)) for r in recorder.records]
    if stop:
        recorder.close()
        _active = None
    return records


def active() -> bool:
    return _active is not None


class stage:  # noqa: N801  (used as a context manager, like ``open``)
    """Measure one stage of one block: ``with stage("read", block=name) as s: ...; s.bytes_read = n``."""

    __slots__ = ("name", "block", "step", "bytes_read", "bytes_written", "_start", "_cpu", "_wall0", "_inner",
                 "_on")

    def __init__(self, name: str, *, block: str | None = None, step: str | None = None, bytes_read: int = 0,
                 bytes_written: int = 0):
        self.name, self.block, self.step = name, block, step
        self.bytes_read, self.bytes_written = bytes_read, bytes_written

    def __enter__(self) -> stage:
        self._on = _active is not None
        if not self._on:
            return self
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        if stack:
            parent = stack[-1]
            self.block = parent.block if self.block is None else self.block
            self.step = parent.step if self.step is None else self.step
        stack.append(self)
        self._inner = [0.0, 0.0]  # wall and CPU of the stages nested in this one
        self._start = time.time()
        self._cpu = time.process_time()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if not self._on:
            return
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu
        _local.stack.pop()
        if _local.stack:
            outer = _local.stack[-1]._inner
            outer[0] += wall
            outer[1] += cpu
        recorder = _active
        if recorder is None:  # the run ended while this stage ran
            return
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        recorder.add((recorder.run, self.step or recorder.step, self.name, self.block or "", self._start,
                      wall - self._inner[0], max(cpu - self._inner[1], 0.0), peak, int(self.bytes_read),
                      int(self.bytes_written), recorder.worker))


class RecordedRead:
    """A picklable ``read(region)`` that records each call as a "read" stage (bytes = the array's).

    Lets a block task's read be measured without touching the task:
    ``pick_block(RecordedRead(read), ...)``.
    """

    def __init__(self, read, name: str = "read"):
        self.read, self.name = read, name

    def __call__(self, region):
        with stage(self.name) as s:
            data = self.read(region)
            s.bytes_read = getattr(data, "nbytes", 0)
        return data

    def __getattr__(self, attr):  # the wrapped reader's attributes (source, path, ...) stay visible
        if attr == "read":
            raise AttributeError(attr)
        return getattr(self.read, attr)


class recorded:  # noqa: N801  (a function wrapper, named like one)
    """``recorded(fn, "infer")`` is ``fn`` run as one stage per call: times a whole block task
    that cannot be edited. ``block`` names it (else the Dask key of the task, when there is one)."""

    def __init__(self, fn, name: str, *, step: str | None = None):
        self.fn, self.name, self.step = fn, name, step
        self.__name__ = getattr(fn, "__name__", "task")  # dask keys and task names use it

    def __call__(self, *args, **kwargs):
        with stage(self.name, step=self.step, block=_task_key()):
            return self.fn(*args, **kwargs)


def _task_key() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().get_current_task())
    except (ValueError, ImportError):
        return None
