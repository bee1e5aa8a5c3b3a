"""A real SLURM: ``deploy/slurm/local/start.sh`` starts munged, slurmctld and slurmd on this machine
(one partition, ``cpu``), and ``cryodask run --cluster slurm`` processes a small collection through
batch jobs that dask-jobqueue submits with ``sbatch``, as on a cluster. One worker job is cancelled
with ``scancel`` mid-run: the run finishes, a new job takes the cancelled one's place, and every
output equals that of an undisturbed run. Skipped, with the script's reason, where SLURM cannot
start (not root, no apt-get, no packages).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import ROOT
from test_reliability import assert_identical, lines

from cryodask.engine.cluster import load_config

START = ROOT / "deploy" / "slurm" / "local" / "start.sh"
PROFILE = f"{ROOT}/deploy/slurm/cluster.yaml:ci"  # 2 jobs of 1 core, 2 GB: fits a 2-core CI machine
JOB_NAME = load_config(PROFILE)["slurm"]["job_name"]
PIPELINE = """\
convert: {chunks: [16, 32, 32], levels: 1}
membranes: {method: classical}
postprocess: {min_slices: 5}
pick: {method: log, diameter: 120}
"""


@pytest.fixture(scope="module")
def slurm():
    """SLURM accepting jobs here: started by the script where it is not running (a second call
    finds it running); the test is skipped with the script's one-line reason where it cannot."""
    try:
        result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"SLURM did not start within 300 s ({START})")
    if result.returncode != 0:
        pytest.skip(f"SLURM cannot start here: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return result.stdout.strip()


def squeue(*options) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", JOB_NAME, *options], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def job_state(job: str) -> str:
    """A job's state as slurmctld keeps it (for MinJobAge = 60 s after it ended)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "?")


def start_run(args, cwd: Path, **env) -> subprocess.Popen:
    """``cryodask ARGS`` in a new process group (the scheduler lives in it; the workers are batch
    jobs); SLURM writes the jobs' ``slurm-<id>.out`` to ``cwd``, the submitting folder."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CRYODASK_BLOCK_")}
    environ["DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT"] = "1s"  # a lost job is forgotten (and replaced) soon
    with open(cwd / "cryodask.log", "w") as log:  # a file, not a pipe: a long run cannot fill it and stall
        return subprocess.Popen([sys.executable, "-m", "cryodask", *map(str, args)], cwd=cwd, env={**environ, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float = 180) -> str:
    """Wait for the run (a hung scheduler cannot hang pytest): exit 0, no traceback; its output.
    Started in a new session, the run's group is killed on time-out."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = (cwd / "cryodask.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in out, f"exit {proc.returncode}:\n{out[-3000:]}"
    return out


def cancel(jobs) -> None:
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def test_the_local_slurm_runs_batch_jobs(slurm, tmp_path):
    assert "running" in slurm
    again = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr  # idempotent
    result = subprocess.run(["sbatch", "--wait", "-p", "cpu", "-c", "1", "--mem=100M", "-o", str(tmp_path / "job.out"),
                             "--wrap", 'echo "job $SLURM_JOB_ID on $SLURMD_NODENAME"'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job = result.stdout.split()[-1]
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert (tmp_path / "job.out").read_text().strip() == f"job {job} on {host}"


def test_a_collection_through_batch_jobs_survives_a_cancelled_job(slurm, tmp_path):
    from cryodask.synth import synth_tomogram

    (tmp_path / "tomograms").mkdir()
    for seed in range(3):
        tomogram = synth_tomogram((32, 64, 64), seed=seed, snr=2.0)
        with mrcfile.new(tmp_path / "tomograms" / f"t{seed}.mrc") as mrc:
            mrc.set_data(tomogram.volume.astype(np.float32))
            mrc.voxel_size = tomogram.voxel_size
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    args = lambda out: ["run", tmp_path / "pipeline.yaml", tmp_path / "tomograms", "--out", out,  # noqa: E731
                        "--cluster", "slurm", "--cluster-config", PROFILE, "--workers", "2"]
    before = set(squeue("-t", "all", "-o", "%i"))
    seen: set[str] = set()
    try:
        # undisturbed: every worker is a batch job (SLURM writes each job's log where it was submitted)
        (tmp_path / "a").mkdir()
        finish(start_run(args(tmp_path / "out"), tmp_path / "a"), tmp_path / "a")
        (tmp_path / "out").rename(tmp_path / "ref")  # both runs write to one path: tomograms.star names it
        assert len(list((tmp_path / "ref").glob("t?_classical_predicted_post_processed_mask.mrc"))) == 3
        jobs_a = {p.stem.split("-")[1] for p in (tmp_path / "a").glob("slurm-*.out")}
        assert len(jobs_a) == 2 and not jobs_a & before, jobs_a

        # a worker job cancelled once six block tasks have started; the run goes on
        (tmp_path / "b").mkdir()
        log = tmp_path / "blocks.log"
        proc = start_run(args(tmp_path / "out"), tmp_path / "b", CRYODASK_BLOCK_DELAY="0.5",
                         CRYODASK_BLOCK_LOG=str(log))
        cancelled, first, deadline = None, set(), time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            running = [j for j in squeue("-t", "running", "-o", "%i") if j not in before | jobs_a]
            seen |= set(running)
            if cancelled is None and len(running) == 2 and len(lines(log)) >= 6:
                cancelled, first, blocks_at_cancel = running[0], set(running), len(lines(log))
                cancel([cancelled])
            time.sleep(0.5)
        finish(proc, tmp_path / "b", timeout=max(1.0, deadline - time.monotonic()))
    finally:
        cancel(sorted(seen))
    assert cancelled is not None, "the run ended before a job could be cancelled"
    assert job_state(cancelled) == "CANCELLED"
    started = {p.stem.split("-")[1] for p in (tmp_path / "b").glob("slurm-*.out")}  # SLURM writes it at the start
    assert len(started - first) == 1, f"not one job in the cancelled one's place: {sorted(started)}, first {first}"
    assert started - first <= seen, "the new job never ran"
    assert blocks_at_cancel < len(lines(log)), "the cancel must land mid-run"
    assert_identical(tmp_path / "out", tmp_path / "ref")
    for mrc in (tmp_path / "out").glob("*.mrc"):  # as users open them: mrcfile, starfile
        assert mrcfile.validate(str(mrc), print_file=io.StringIO())
    for star in (tmp_path / "out").glob("*_picks.star"):
        ours, theirs = (starfile.read(path, always_dict=True) for path in (star, tmp_path / "ref" / star.name))
        assert len(ours["particles"]) > 0 and ours.keys() == theirs.keys()
        assert all(ours[block].equals(theirs[block]) for block in ours)
