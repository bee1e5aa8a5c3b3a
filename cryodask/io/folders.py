"""Output folders: created and proved writable before any cluster starts."""

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
