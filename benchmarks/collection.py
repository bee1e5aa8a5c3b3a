"""Collection overhead: N tiny tomograms through ``cryodask run`` (convert → classical membranes →
postprocess → LoG pick) on a LocalCluster, against the same steps on one tomogram in one process.

Per N: wall and CPU seconds per tomogram (the command and its workers), the client's peak RSS
(the LocalCluster's scheduler lives in the same process), the time until the first tomogram has
finished every step and how many tomograms had been started by then. The baseline is the same
pipeline on one tomogram with an in-process cluster of one thread (what a user calling the steps
one after another in a notebook pays). Then a SIGKILL of ``cryodask run`` at a random point and a
rerun: finished steps skipped (counted) and outputs identical to the undisturbed run.

    python benchmarks/collection.py --n 10,100,1000 --workers 2

Writes ``<results>/collection.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PIPELINE = """\
convert: {chunks: [32, 64, 64], levels: 2}
membranes: {method: classical}
postprocess: {min_slices: 5}
pick: {method: log, diameter: 100}
"""
CLI = "import sys; from cryodask.cli import main; sys.exit(main(sys.argv[1:]))"


def collection(folder: Path, n: int, shape) -> Path:
    """``n`` copies (different names, the same bytes) of one synthetic tomogram."""
    from cryodask.synth.tomogram import synth_tomogram, write_tomogram

    folder.mkdir(parents=True, exist_ok=True)
    first = write_tomogram(folder / "t00000.mrc", synth_tomogram(shape, voxel_size=10.0, seed=1, snr=0.5))["tomogram"]
    shutil.rmtree(folder / "truth", ignore_errors=True)
    for i in range(1, n):
        shutil.copyfile(first, folder / f"t{i:05d}.mrc")
    return folder


def baseline(folder: Path, work: Path) -> dict:
    """The same steps on one tomogram, in this process, with an in-process one-thread cluster."""
    from distributed import Client, LocalCluster

    from cryodask.engine.collection import Item
    from cryodask.pipeline import load_pipeline, run_tomogram

    path = work / "pipeline.yaml"
    path.write_text(PIPELINE)
    pipeline = load_pipeline(path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        warm = work / "warm"
        run_tomogram(Item(folder / "t00000.mrc", "t00000"), pipeline, warm, client)  # imports, caches
        clock, cpu = time.perf_counter(), time.process_time()
        run_tomogram(Item(folder / "t00000.mrc", "t00000"), pipeline, work / "baseline", client)
        return {"wall_s": time.perf_counter() - clock, "cpu_s": time.process_time() - cpu}


def run(folder: Path, out: Path, workers: int, *, kill_after: float | None = None, env=None) -> dict:
    """``cryodask run`` in a subprocess: wall, CPU of it and its workers, its peak RSS, the time
    to the first finished tomogram and how many had been started by then."""
    import psutil

    pipeline = out.parent / f"{out.name}.yaml"
    pipeline.write_text(PIPELINE)
    command = [sys.executable, "-c", CLI, "run", str(pipeline), str(folder), "--out", str(out),
               "--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    clock = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, **(env or {})), start_new_session=True)
    watched = psutil.Process(process.pid)
    peak, first, started_then, lines = [0], [None], [None], []

    def sample():
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], watched.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def read():
        for line in process.stdout:
            lines.append(line)
            if first[0] is None and line.startswith("  pick:"):
                first[0] = time.perf_counter() - clock
                started_then[0] = sum(1 for _ in out.glob("*.zarr"))

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    if kill_after is not None:
        time.sleep(kill_after)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for t in threads:
        t.join(timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = "".join(lines)
    skipped = next((line for line in lines if line.startswith("steps:")), "").strip()
    return {"wall_s": time.perf_counter() - clock,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "client_peak_rss_mb": peak[0] / 2**20, "first_finished_s": first[0], "started_at_first": started_then[0],
            "returncode": process.returncode, "steps": skipped,
            "summary": text.strip().splitlines()[-1:] if text else []}


def same_outputs(a: Path, b: Path) -> bool:
    import mrcfile
    import numpy as np

    names = sorted(p.name for p in a.glob("*.mrc"))
    if names != sorted(p.name for p in b.glob("*.mrc")):
        return False
    for name in names:
        with mrcfile.open(a / name) as x, mrcfile.open(b / name) as y:
            if not np.array_equal(x.data, y.data):
                return False
    stars = sorted(p.name for p in a.glob("*_picks.star"))
    return stars == sorted(p.name for p in b.glob("*_picks.star")) and all(
        (a / s).read_text() == (b / s).read_text() for s in stars)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10,100", help="Collection sizes, comma-separated.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape", default="32,64,64")
    parser.add_argument("--kill-n", type=int, default=20, help="Tomograms of the kill-and-rerun check (0: skip).")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    sizes = [int(v) for v in args.n.split(",")]
    results = {"shape": shape, "workers": args.workers, "cpus": os.cpu_count(), "pipeline": PIPELINE, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cryodask-collection-") as tmp:
        tmp = Path(tmp)
        tomos = collection(tmp / "tomos", max(sizes + [args.kill_n]), shape)
        results["baseline_one_tomogram"] = one = baseline(tomos, tmp)
        print(f"baseline (one tomogram, one process): {one['wall_s']:.2f} s wall, {one['cpu_s']:.2f} s CPU", flush=True)
        for n in sizes:
            folder = tmp / f"n{n}"
            folder.mkdir()
            for p in sorted(tomos.glob("*.mrc"))[:n]:
                os.link(p, folder / p.name)
            row = {"n": n, **run(folder, tmp / f"out{n}", args.workers)}
            row["wall_per_tomogram_s"] = row["wall_s"] / n
            row["cpu_per_tomogram_s"] = row["cpu_s"] / n
            row["first_finished_fraction_started"] = (row["started_at_first"] or 0) / n
            results["runs"].append(row)
            print(f"N={n}: {row['wall_s']:.1f} s wall ({row['wall_per_tomogram_s']:.3f} s/tomogram, "
                  f"{row['cpu_per_tomogram_s']:.3f} CPU-s/tomogram), client+scheduler peak "
                  f"{row['client_peak_rss_mb']:.0f} MB, first finished at {row['first_finished_s']} s with "
                  f"{row['started_at_first']} of {n} started; {row['summary']}", flush=True)
            shutil.rmtree(tmp / f"out{n}", ignore_errors=True)
        if args.kill_n:
            folder = tmp / "kill"
            folder.mkdir()
            for p in sorted(tomos.glob("*.mrc"))[:args.kill_n]:
                os.link(p, folder / p.name)
            reference = run(folder, tmp / "kill-reference", args.workers)
            at = random.Random(args.seed).uniform(0.3, 0.7) * reference["wall_s"]
            killed = run(folder, tmp / "kill-out", args.workers, kill_after=at)
            rerun = run(folder, tmp / "kill-out", args.workers)
            results["kill"] = {"n": args.kill_n, "killed_after_s": at, "killed_returncode": killed["returncode"],
                               "rerun": rerun["steps"], "rerun_returncode": rerun["returncode"],
                               "identical": same_outputs(tmp / "kill-reference", tmp / "kill-out")}
            print(f"kill at {at:.1f} s of {reference['wall_s']:.1f} s, rerun: {rerun['steps']}; "
                  f"outputs identical: {results['kill']['identical']}", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "collection.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.results / 'collection.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
