"""Crash-and-resume and worker-failure proofs (DESIGN rules 2, 3 and 8).

**Crash and resume.** Each command runs as a real ``cryodask`` process with its own
``LocalCluster`` (2 worker processes), slowed by ``CRYODASK_BLOCK_DELAY``. At a seeded random
number of done-marks, the whole process group (the CLI, the nannies, the workers) gets SIGKILL.
Then the same command runs again, to completion, and its outputs must equal byte for byte those of
an uninterrupted run in another folder. ``CRYODASK_BLOCK_LOG`` makes every block task write one line
(``fault_injection_delay``) when it runs, so we can count what the rerun recomputed: exactly the
blocks that had no done-mark when the first run was killed, and none that had one. Right after the
kill, no output may exist under its final name (MRC, STAR, CSV and copick files are written as
``.partial`` and renamed when complete).

**Worker failure.** A worker process is SIGKILLed while it runs a block task on a
``LocalCluster(processes=True)``. Its nanny starts a new worker, the scheduler runs the task again
(one failure is within ``distributed.scheduler.allowed-failures``), and the output equals an
uninterrupted run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import write_raw_mrc

CLUSTER = ["--cluster", "local", "--workers", "2", "--threads-per-worker", "1"]


def whole_outputs_only(out: Path, reference: Path) -> None:
    """After a kill, an MRC under its final name is a tomogram that finished before it (tomograms
    finish independently): it must be whole, the same as the undisturbed run's, never partial."""
    import mrcfile

    for path in out.glob("*.mrc"):
        with mrcfile.open(path) as got, mrcfile.open(reference / path.name) as want:
            assert np.array_equal(got.data, want.data), f"a partial output under its final name: {path.name}"


# ------------------------------------------------------------------ helpers

def cryodask(*args) -> list[str]:
    """A command line, without the cluster options."""
    return [str(a) for a in args]


def run(args, *, log: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a command to completion in a new ``cryodask`` process with its own LocalCluster;
    with ``log``, every block task it runs writes a line there."""
    env = {k: v for k, v in os.environ.items() if k not in ("CRYODASK_BLOCK_DELAY", "CRYODASK_BLOCK_LOG")}
    if log is not None:
        env["CRYODASK_BLOCK_LOG"] = str(log)
    result = subprocess.run([sys.executable, "-m", "cryodask", *args, *CLUSTER], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result


def reference(args, client) -> None:
    """The uninterrupted run: the same command, in this process, on the session's (warm) cluster."""
    from cryodask.cli import main

    assert main([*args, "--cluster", client.scheduler.address]) == 0


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, which the container may never reap, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


def kill_at(args, *, delay: float, log: Path, count, target: int, timeout: float = 150) -> None:
    """Start ``args`` in a new session (so its LocalCluster's processes share its process group),
    wait until ``count()`` reaches ``target``, SIGKILL the whole group and wait until it is gone."""
    env = {**os.environ, "CRYODASK_BLOCK_DELAY": str(delay), "CRYODASK_BLOCK_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, "-m", "cryodask", *args, *CLUSTER], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while count() < target:
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.time() < deadline, "the kill point was never reached"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
    assert not _group_alive(proc.pid), "a process of the killed run survived"


def marks(out: Path, step: str) -> dict[tuple[str, str], int]:
    """Done-marks of ``step`` under ``<out>/.cryodask``: (stem, block name) -> mtime (ns).
    ``step`` is the folder prefix (``convert``, ``membranes-classical``, ...); the key is not kept."""
    found = {}
    for folder in (out / ".cryodask").glob(f"*/{step}-*"):
        # os.walk, not rglob: the running command removes its temporary stores while this polls
        for root, _, files in os.walk(folder):
            for name in files:
                path = Path(root) / name
                if name.endswith(".partial") or path.suffix in (".npy", ".npz", ".zst", ".pkl"):
                    continue
                try:
                    found[folder.parent.name, "/".join(path.relative_to(folder).parts)] = path.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
    return found


def completed(out: Path, step: str) -> set[str]:
    """Stems whose ``step`` finished (its ``.complete`` mark; its block marks are gone then)."""
    return {p.parent.name for p in (out / ".cryodask").glob(f"*/{step}-*.complete")}


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the work folder ``.cryodask``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cryodask" not in p.relative_to(folder).parts}


MRC_LABELS = slice(224, 1024)  # the header's ten 80-byte text labels


def _comparable(name: str, data: bytes) -> bytes:
    """The bytes that must match: all of them, but the date and time in an MRC header's labels
    (mrcfile writes "Created by mrcfile.py <date> <time>" when a file is made) and in a STAR
    file's first comment (starfile writes "... at <time> on <date>")."""
    if name.endswith(".star"):
        return re.sub(rb"at \d\d:\d\d:\d\d on \d\d/\d\d/\d{4}", b"at hh:mm:ss on DD/MM/YYYY", data, count=1)
    if not name.endswith(".mrc"):
        return data
    labels = re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", b"YYYY-MM-DD hh:mm:ss", data[MRC_LABELS])
    return data[:MRC_LABELS.start] + labels + data[MRC_LABELS.stop:]


def assert_identical(folder: Path, reference: Path) -> int:
    """Same files, same bytes (MRC headers and data, zarr chunks and metadata, STAR/CSV/JSON)."""
    ours, theirs = outputs(folder), outputs(reference)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if _comparable(name, ours[name]) != _comparable(name, theirs[name])] == []
    assert not any(name.endswith(".partial") for name in ours)
    return len(ours)


def kill_point(seed: int, low: int, high: int) -> int:
    return random.Random(seed).randint(low, high)


# ------------------------------------------------------------------ convert

def test_convert_killed_and_rerun_redoes_only_unmarked_blocks(tmp_path, client):
    seed = 101
    data = np.random.default_rng(seed).normal(size=(64, 128, 96)).astype(np.float32)
    (tmp_path / "in").mkdir()
    source = write_raw_mrc(tmp_path / "in" / "t.mrc", data)
    args = lambda out: cryodask("convert", source, "--out", out, "--chunks", "8,32,32", "--levels", "3")  # noqa: E731
    reference(args(tmp_path / "ref"), client)
    out = tmp_path / "run"
    target = kill_point(seed, 2, 6)  # of 10 block tasks: 8 level-0 (+ level 1), 2 level-2 (seed 101: 6)
    kill_at(args(out), delay=0.4, log=tmp_path / "killed.log", count=lambda: len(marks(out, "convert")), target=target)
    before = marks(out, "convert")
    assert target <= len(before) < 10, "the kill must land mid-run"
    assert zarr.open_group(str(out / "t.zarr"), mode="r").attrs["cryodask"]["convert"]["complete"] is False

    result = run(args(out), log=tmp_path / "rerun.log")
    assert "resumed" in result.stdout
    after = marks(out, "convert")
    recomputed = Counter(tuple(line.split()[1:]) for line in lines(tmp_path / "rerun.log"))
    assert set(recomputed) == set(after) - set(before) and max(recomputed.values()) == 1
    assert len(after) == 10 and all(after[m] == t for m, t in before.items()), "a finished block was redone"
    assert_identical(out, tmp_path / "ref")
    assert zarr.open_group(str(out / "t.zarr"), mode="r").attrs["cryodask"]["convert"]["complete"] is True


# ------------------------------------------------------------------ postprocess

def test_postprocess_killed_and_rerun_redoes_only_unmarked_blocks(tmp_path, client):
    from cryodask.postprocess.components import plan
    from cryodask.synth import synth_tomogram

    seed = 211
    (tmp_path / "in").mkdir()
    mask = synth_tomogram((48, 96, 96), seed=3).membranes.astype(np.uint8)
    source = write_raw_mrc(tmp_path / "in" / "m.mrc", mask)
    args = lambda out: cryodask("postprocess", source, "--out", out / "o.mrc", "--min-slices", "10",  # noqa: E731
                                "--labels", "--chunks", "16,32,32")
    (tmp_path / "ref").mkdir()
    reference(args(tmp_path / "ref"), client)
    out = tmp_path / "run"
    out.mkdir()
    names = [b.name for b in plan(mask.shape, (16, 32, 96))[0]]  # MRC to MRC: blocks of whole rows
    every = {("o.mrc", f"{step}/{n}") for step in ("label", "write") for n in names}
    target = kill_point(seed, 3, 15)  # of 18: 9 label tasks, then 9 write tasks (seed 211: 12)
    kill_at(args(out), delay=0.3, log=tmp_path / "killed.log", count=lambda: len(marks(out, "postprocess")),
            target=target)
    before = marks(out, "postprocess")
    assert target <= len(before) < len(every) and set(before) <= every
    assert not (out / "o.mrc").exists() and not (out / "o_labels.mrc").exists(), "a partial output under its final name"

    run(args(out), log=tmp_path / "rerun.log")
    recomputed = Counter(("o.mrc", line.split()[1]) for line in lines(tmp_path / "rerun.log"))
    assert set(recomputed) == every - set(before) and max(recomputed.values()) == 1
    assert_identical(out, tmp_path / "ref")


def test_a_new_mask_under_the_same_name_is_processed_again_not_skipped(tmp_path, client):
    """The done-mark key covers the input file (size, mtime), as convert's does: membranes
    rewrites its mask under the same name when a parameter changes, and the post-processed mask
    used to be skipped as finished, stale."""
    import mrcfile

    from cryodask.postprocess.pipeline import PostprocessParams, postprocess
    from cryodask.synth import synth_tomogram

    first = synth_tomogram((32, 64, 64), seed=3).membranes.astype(np.uint8)
    second = first.copy()
    second[:, :, 32:] = 0
    params = PostprocessParams(min_slices=5)
    for mask in (first, second):
        write_raw_mrc(tmp_path / "m.mrc", mask)
        result = postprocess(tmp_path / "m.mrc", tmp_path / "o.mrc", params, client=client)
        assert result.status == "done"
        with mrcfile.open(tmp_path / "o.mrc") as mrc:
            assert (mrc.data <= mask).all() and mrc.data.any()
    assert postprocess(tmp_path / "m.mrc", tmp_path / "o.mrc", params, client=client).status == "skipped"


# ------------------------------------------------------------------ membranes

def _membrane_recomputed(log: Path, kind: str) -> Counter:
    """(stem, mark name) per block line of ``kind`` (``classical`` or ``etsam``) in a task log."""
    found = Counter()
    for line in lines(log):
        words = line.split()
        if words[0] == kind:
            parts = Path(words[1]).parts
            found[parts[parts.index(".cryodask") + 1], words[-1]] += 1
    return found


def test_classical_membranes_killed_and_rerun_redo_only_unmarked_blocks(tmp_path, client):
    """Slow (~20 s on 2 cores): convert + classical filter + exports + post-processing of two
    tomograms, killed and rerun in processes with their own clusters."""
    from cryodask.engine.blocks import plan_blocks
    from cryodask.synth.tomogram import synth_tomogram

    seed = 300
    (tmp_path / "in").mkdir()
    shapes = {"a": (24, 256, 256), "b": (24, 128, 256)}
    for i, (stem, shape) in enumerate(shapes.items()):
        write_raw_mrc(tmp_path / "in" / f"{stem}.mrc", synth_tomogram(shape, voxel_size=10.0, seed=i, snr=0.3).volume)
    inputs = [tmp_path / "in" / "a.mrc", tmp_path / "in" / "b.mrc"]
    args = lambda out: cryodask("membranes", *inputs, "--out", out,  # noqa: E731
                                "--method", "classical", "--post-process", "--store-logits", "--chunks", "24,64,64")
    reference(args(tmp_path / "ref"), client)
    out = tmp_path / "run"
    blocks = {stem: [b.name for b in plan_blocks(shape, (64, 128, 128))] for stem, shape in shapes.items()}
    every = {(stem, f"{step}/{n}") for stem, names in blocks.items() for step in ("score", "mask") for n in names}

    def done():
        return {m for m in marks(out, "membranes-classical") if m in every} | {
            m for m in every if m[0] in completed(out, "membranes")}

    target = kill_point(seed, 2, 9)  # of 12 block tasks: 6 score, then 6 mask (seed 300: 7)
    kill_at(args(out), delay=0.5, log=tmp_path / "killed.log", count=lambda: len(done()), target=target)
    before, converted = done(), marks(out, "convert")
    assert target <= len(before) < len(every)
    whole_outputs_only(out, tmp_path / "ref")

    run(args(out), log=tmp_path / "rerun.log")
    recomputed = _membrane_recomputed(tmp_path / "rerun.log", "classical")
    assert set(recomputed) == every - before and max(recomputed.values()) == 1
    assert not [line for line in lines(tmp_path / "rerun.log") if line.startswith("convert")
                and tuple(line.split()[1:]) in converted], "a converted block was redone"
    assert_identical(out, tmp_path / "ref")


@pytest.fixture(scope="module")
def etsam_weights(tmp_path_factory):
    """ETSAM's two checkpoint files, made from seeded random hiera-t models ({"model": state_dict})."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from cryodask.models.sam2 import build_predictor

    folder = tmp_path_factory.mktemp("weights")
    for seed, name in ((11, "etsam_stage1_v1.pt"), (12, "etsam_stage2_v1.pt")):
        torch.manual_seed(seed)
        torch.save({"model": build_predictor("sam2.1_hiera_t", image_size=128).state_dict()}, folder / name)
    return folder


def test_etsam_killed_and_rerun_redo_only_unmarked_stages(tmp_path, client, etsam_weights):
    """The slowest case (~40 s on 2 cores): each fresh cluster imports torch and SAM2 and loads
    both models on each worker."""
    from cryodask.membranes.etsam import tile_name, tiles

    seed = 404
    (tmp_path / "in").mkdir()
    z, y, x = np.mgrid[:8, :36, :44]
    rng = np.random.default_rng(seed)
    for stem in ("a", "b"):
        ring = np.abs(np.hypot(y - 18, x - 22) - 10 - 0.5 * z) < 1.5
        write_raw_mrc(tmp_path / "in" / f"{stem}.mrc", (ring * 2.0 + rng.normal(0, 0.7, ring.shape)).astype(np.float32),
                      voxel_size=13.48)
    args = lambda out: cryodask(  # noqa: E731
        "membranes", tmp_path / "in" / "a.mrc", tmp_path / "in" / "b.mrc", "--out", out, "--method", "etsam",
        "--stage1-checkpoint", etsam_weights / "etsam_stage1_v1.pt", "--stage2-checkpoint",
        etsam_weights / "etsam_stage2_v1.pt", "--model-config", "sam2.1_hiera_t", "--image-size", "128",
        "--grid-interval", "10", "--tile", "20,44", "--store-logits", "--post-process",
        "--post-process-min-slices", "3", "--chunks", "4,16,16")
    reference(args(tmp_path / "ref"), client)
    out = tmp_path / "run"
    columns = [tile_name(ys, xs) for ys, xs in tiles(36, 44, (20, 44))]
    every = {(stem, f"stage{s}-{c}") for stem in ("a", "b") for c in columns for s in (1, 2)}

    def done():
        return set(marks(out, "membranes-etsam")) & every | {m for m in every if m[0] in completed(out, "membranes")}

    target = kill_point(seed, 1, 5)  # of 8 stage tasks: 2 tomograms x 2 columns x 2 stages (seed 404: 1)
    kill_at(args(out), delay=0.5, log=tmp_path / "killed.log", count=lambda: len(done()), target=target)
    before = done()
    assert target <= len(before) < len(every)
    whole_outputs_only(out, tmp_path / "ref")

    run(args(out), log=tmp_path / "rerun.log")
    recomputed = _membrane_recomputed(tmp_path / "rerun.log", "etsam")
    assert set(recomputed) == every - before and max(recomputed.values()) == 1
    assert_identical(out, tmp_path / "ref")


# ------------------------------------------------------------------ pick

def test_log_pick_killed_and_rerun_redoes_only_unmarked_blocks(tmp_path, client):
    from cryodask.engine.blocks import plan_blocks
    from cryodask.synth.tomogram import synth_tomogram, write_tomogram

    seed = 505
    (tmp_path / "in").mkdir()
    shape = (64, 128, 128)
    tomogram = synth_tomogram(shape, voxel_size=10.0, seed=5, snr=0.5)
    source = write_tomogram(tmp_path / "in" / "t.mrc", tomogram)["tomogram"]
    args = lambda out: cryodask("pick", source, "--out", out, "--method", "log", "--diameter", "250",  # noqa: E731
                                "--chunks", "32,64,64")
    reference(args(tmp_path / "ref"), client)
    out = tmp_path / "run"
    every = {("t", f"pick/{b.name}") for b in plan_blocks(shape, (32, 64, 64))}
    target = kill_point(seed, 2, 5)  # of 8 block tasks (seed 505: 3)
    kill_at(args(out), delay=0.5, log=tmp_path / "killed.log", count=lambda: len(marks(out, "pick-log")), target=target)
    before = marks(out, "pick-log")
    assert target <= len(before) < len(every) and set(before) <= every
    assert not [p for p in out.rglob("*") if p.is_file() and ".cryodask" not in p.parts], "an output before the end"

    run(args(out), log=tmp_path / "rerun.log")
    recomputed = Counter(("t", line.split()[1]) for line in lines(tmp_path / "rerun.log") if line.startswith("log "))
    assert {m for m in recomputed if m[1].startswith("pick/")} == every - set(before)
    assert max(recomputed.values()) == 1
    assert_identical(out, tmp_path / "ref")
    assert not marks(out, "pick-log"), "the work folder is removed once the picks are written"


# ------------------------------------------------------------------ a worker dies mid-task

@pytest.fixture
def slow_cluster(monkeypatch, tmp_path):
    """Two worker processes (each under a nanny, which restarts it) that sleep 0.5 s per block
    task and log it: the environment is set before they start, so they inherit it."""
    import logging

    from distributed import Client, LocalCluster

    monkeypatch.setenv("CRYODASK_BLOCK_DELAY", "0.5")
    monkeypatch.setenv("CRYODASK_BLOCK_LOG", str(tmp_path / "tasks.log"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GB",
                      silence_logs=logging.CRITICAL, dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client, tmp_path / "tasks.log"


def _kill_a_busy_worker(client, prefix: str, ready=lambda: True, timeout: float = 60) -> str:
    """Once ``ready()``, SIGKILL the process of a worker while it executes a task whose key starts
    with ``prefix``; return that task's key."""
    def executing(dask_worker):
        return [str(ts.key) for ts in dask_worker.state.executing]

    deadline = time.time() + timeout
    while time.time() < deadline:
        running = client.run(executing) if ready() else {}
        busy = {addr: keys for addr, keys in running.items() if any(k.startswith(prefix) for k in keys)}
        if busy:
            addr, keys = next(iter(busy.items()))
            pid = client.run(os.getpid, workers=[addr])[addr]
            os.kill(pid, signal.SIGKILL)
            return next(k for k in keys if k.startswith(prefix))
        time.sleep(0.05)
    raise AssertionError("no worker ever executed a task")


def _in_background(fn):
    """Run ``fn()`` in a thread; return a function that joins it and gives its result (or raises)."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread)
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()

    def join():
        thread.join(timeout=120)
        assert not thread.is_alive(), "the run did not finish"
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def test_worker_killed_mid_convert_task_the_task_is_retried_and_the_output_identical(tmp_path, slow_cluster, client):
    from cryodask.convert import ConvertParams, convert

    slow, log = slow_cluster
    data = np.random.default_rng(6).normal(size=(64, 128, 96)).astype(np.float32)
    source = write_raw_mrc(tmp_path / "t.mrc", data)
    params = ConvertParams(chunks=(8, 32, 32), levels=3)
    convert([source], tmp_path / "ref", params, client=client)  # the session's cluster: no delay

    join = _in_background(lambda: convert([source], tmp_path / "run", params, client=slow))
    killed = _kill_a_busy_worker(slow, "convert-")
    report = join()
    assert [r.status for r in report.results] == ["converted"], report
    *_, level, _, block = killed.split("-")  # convert-<stem>-<level>-<run token>-<block>
    runs = Counter(line.split()[-1] for line in lines(log))
    assert runs[f"{level}/{block}"] == 2, "the killed task was not run again"
    assert set(runs) == {m[1] for m in marks(tmp_path / "run", "convert")}  # every block, each written
    assert_identical(tmp_path / "run", tmp_path / "ref")


def test_worker_killed_mid_label_task_the_task_is_retried_and_the_output_identical(tmp_path, slow_cluster, client):
    """The dead worker also held the finished label results of other blocks: the scheduler
    recomputes them, and their done-marks make that a read of the saved faces, not a relabel."""
    from cryodask.postprocess.components import plan
    from cryodask.postprocess.pipeline import PostprocessParams, postprocess
    from cryodask.synth import synth_tomogram

    slow, log = slow_cluster
    mask = synth_tomogram((48, 96, 96), seed=3).membranes.astype(np.uint8)
    source = write_raw_mrc(tmp_path / "m.mrc", mask)
    params, options = PostprocessParams(min_slices=10, labels=True), dict(chunks=(16, 32, 32))
    for folder in ("ref", "run"):
        (tmp_path / folder).mkdir()
    postprocess(source, tmp_path / "ref" / "o.zarr", params, client=client, **options)

    join = _in_background(lambda: postprocess(source, tmp_path / "run" / "o.zarr", params, client=slow, **options))
    # after a few blocks are labelled, so that the dead worker's memory held some of their results
    killed = _kill_a_busy_worker(slow, "cc-label-", ready=lambda: len(marks(tmp_path / "run", "postprocess")) >= 3)
    block = killed.rsplit("-", 1)[1]
    # killed in its delay or its labelling (almost always), the task labels again; killed in the
    # instant after its mark, the retry reads the saved faces back
    again = ("o.zarr", f"label/{block}") not in marks(tmp_path / "run", "postprocess")
    result = join()
    names = [b.name for b in plan(mask.shape, (16, 32, 32))[0]]
    runs = Counter(line.split()[-1] for line in lines(log))
    assert runs == Counter({f"{step}/{n}": 1 + (again and step == "label" and n == block) for step in ("label", "write")
                            for n in names}), "only the killed task runs twice"
    assert result.blocks_written == len(names)
    assert_identical(tmp_path / "run", tmp_path / "ref")
