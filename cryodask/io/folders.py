"""Output folders: created and proved writable before any cluster starts; files written whole or not at all."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import where


def check_output_dir(out) -> Path:
    """Create ``out`` and prove it is writable, before any cluster starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cryodask-write-test-{os.getpid()}-{threading.get_ident()}"  # one per thread
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise where(out, f"output folder is not writable ({exc.strerror or exc})") from None
    return out


@contextmanager
def atomic_write(path):
    """Yield ``<path>.partial`` to write; renamed onto ``path`` when the block ends, removed when
    it raises (a full disk included), so a reader or a rerun never sees half a file and a failed
    write leaves nothing behind.

    >>> with atomic_write("picks.csv") as partial:  # doctest: +SKIP
    ...     table.to_csv(partial, index=False)
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        with suppress(OSError):  # never hide the write's own error behind the clean-up's
            partial.unlink(missing_ok=True)
        raise
