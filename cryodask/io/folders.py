"""Output folders: created and proved writable before any cluster starts; files written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import where


def check_output_dir(out) -> Path:
    """Create ``out`` and prove it is writable, before any cluster starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cryodask-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise where(out, f"output folder is not writable ({exc.strerror or exc})") from None
    return out


def atomic_write(path, write) -> Path:
    """``write(partial)`` then rename onto ``path``: a reader (or a rerun) never sees half a file;
    a failed write leaves no partial file behind."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path
