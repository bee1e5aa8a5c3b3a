"""One writer per output folder: two runs into the same ``--out`` would overwrite each other's
chunks and done-marks, so the second one stops with a clear error instead.

The lock is ``<out>/.cryodask/lock``, created atomically (``O_EXCL``), holding the host, pid,
command and start time of its owner. A lock left by a process that is gone (killed, crashed) on
the same host is taken over, so a SIGKILLed run can simply be rerun; a lock from another host
cannot be checked and is reported with the way to clear it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def output_lock(out, command: str):
    """Hold ``<out>/.cryodask/lock`` while ``command`` writes into ``out``.

    >>> with output_lock("zarr/", "convert"):  # doctest: +SKIP
    ...     ...
    """
    folder = Path(out) / ".cryodask"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    path = folder / "lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            same_host = owner.get("host") == me["host"]
            if same_host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                path.unlink(missing_ok=True)  # its owner is gone: a killed run, take over
                continue
            who = (f"cryodask {owner.get('command', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
                   f"started {owner.get('started', '?')})") if owner else "another cryodask run"
            hint = "" if same_host else f"; if it is no longer running, delete {path}"
            raise InputError(f"{out}: {who} is writing to this folder; "
                             f"wait for it to finish or use another --out{hint}")
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield path
    finally:
        if _read(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
