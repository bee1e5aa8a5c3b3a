"""Two runs into one output folder: the second stops with a clear error; a killed run's lock
does not block the rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_raw_mrc
from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.engine.lock import output_lock


def test_second_writer_is_refused_and_the_lock_is_released(tmp_path):
    with output_lock(tmp_path, "convert") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        child = subprocess.run([sys.executable, "-c", "from cryodask.engine.lock import output_lock\n"
                                f"with output_lock({str(tmp_path)!r}, 'membranes'): pass"],
                               capture_output=True, text=True)
        assert child.returncode != 0 and "is writing to this folder" in child.stderr and "convert" in child.stderr
    assert not path.exists()
    with output_lock(tmp_path, "pick"):  # free again
        pass


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".cryodask" / "lock"
    lock.parent.mkdir()
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "command": "convert"}))
    with output_lock(tmp_path, "convert") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "convert"}))
    with pytest.raises(InputError, match="delete .*lock"):
        with output_lock(tmp_path, "convert"):
            pass


def test_concurrent_commands_on_one_folder(tmp_path, capsys, client):
    """A slow conversion holds the folder; a second command into it exits 2 in one line."""
    import numpy as np

    write_raw_mrc(tmp_path / "t.mrc", np.zeros((16, 32, 32), np.float32))
    env = {**os.environ, "CRYODASK_BLOCK_DELAY": "1.0"}
    slow = subprocess.Popen([sys.executable, "-m", "cryodask", "convert", str(tmp_path / "t.mrc"), "--out",
                             str(tmp_path / "out"), "--chunks", "4,32,32", "--cluster", client.scheduler.address],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "out" / ".cryodask" / "lock").exists():
            assert time.time() < deadline and slow.poll() is None, slow.stderr.read()
            time.sleep(0.1)
        code = main(["membranes", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "out"), "--method", "classical",
                     "--cluster", client.scheduler.address])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "cryodask convert (pid" in err
    finally:
        os.killpg(slow.pid, signal.SIGKILL)
        slow.wait()
    # the killed run's lock does not block the rerun
    assert main(["convert", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "out"), "--chunks", "4,32,32",
                 "--cluster", client.scheduler.address]) == 0
    assert not (tmp_path / "out" / ".cryodask" / "lock").exists()
