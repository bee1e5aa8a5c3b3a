"""One progress display per command, counting blocks as well as tomograms.

The block runner reports the blocks it plans and finishes; the collection runner reports the
tomograms. Both go to whichever :class:`Progress` is active (one per command, set by the
collection runner), so a 128×384×384 tomogram shows its blocks move instead of ``0/1``. With
none active (a notebook calling one step) the calls do nothing.
"""

from __future__ import annotations

import sys
import threading
import time

_active: "Progress | None" = None
_lock = threading.Lock()
_resumed = threading.local()  # blocks found done by this thread's tomogram, for its "resumed" line


class Progress:
    """Counts of tomograms and blocks, printed as one line that updates in place (a terminal)
    or at most every ``every`` seconds (a log file)."""

    def __init__(self, label: str, tomograms: int, *, enabled: bool = True, stream=None, every: float = 10.0):
        self.label, self.tomograms = label, tomograms
        self.finished = self.failed = self.skipped = 0
        self.blocks_total = self.blocks_done = 0
        self.enabled, self.stream, self.every = enabled, stream or sys.stderr, every
        self._shown = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self):
        """The outermost display owns the line; one opened inside it (a step that runs its own
        small collection, from any thread) stays silent and leaves the counting to it."""
        global _active
        with _lock:
            self.owner = _active is None
            if self.owner:
                _active = self
            else:
                self.enabled = False
        return self

    def __exit__(self, *exc):
        global _active
        with _lock:
            if self.owner:
                _active = None
        self.show(force=True, end=True)

    def finished_one(self, status: str) -> None:
        """One of this display's tomograms ended (ignored when an outer display owns the line)."""
        if self.owner:
            tomogram_finished(status)

    def line(self) -> str:
        done = self.finished + self.skipped
        text = f"{self.label}: {done}/{self.tomograms} tomograms"
        if self.failed:
            text += f", {self.failed} failed"
        if self.blocks_total:
            text += f"; {self.blocks_done}/{self.blocks_total} blocks"
        return text

    def show(self, force: bool = False, end: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._shown < (0.5 if self._tty else self.every):
            return
        self._shown = now
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if end else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def _update(**counts) -> None:
    with _lock:
        progress = _active
        if progress is None:
            return
        for name, n in counts.items():
            setattr(progress, name, getattr(progress, name) + n)
    progress.show()


def blocks_planned(n: int) -> None:
    """The block runner has ``n`` more blocks to run (done-marked ones included)."""
    _update(blocks_total=n)


def blocks_done(n: int = 1) -> None:
    """``n`` blocks finished (or were found done)."""
    _update(blocks_done=n)


def tomogram_finished(status: str) -> None:
    """One tomogram ended: ``done``, ``skipped`` or ``failed``."""
    _update(**{{"done": "finished", "skipped": "skipped", "failed": "failed"}[status]: 1})


def blocks_resumed(n: int) -> None:
    """``n`` blocks of the current thread's tomogram were found done (a resumed run)."""
    _resumed.count = getattr(_resumed, "count", 0) + n


def take_resumed() -> int:
    """How many blocks this thread found done since the last call (and start again at 0)."""
    n, _resumed.count = getattr(_resumed, "count", 0), 0
    return n
