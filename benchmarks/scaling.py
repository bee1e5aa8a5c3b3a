"""Scaling study: one embarrassingly parallel step over a collection, on 1, 2, 4, ... workers.

The step is the classical sheet filter (``cryodask.membranes.classical.membrane_score``, the
Hessian of a Gaussian and its eigenvalues: real CPU work, ~2 s per 32×128×128 tomogram on one
core) over ``--tomograms`` synthetic MRC tomograms on local disk, one task per tomogram: read
the MRC, score it, write the score as ``.npy``. Each worker count gets its own LocalCluster
(processes, 1 thread per worker, BLAS/OpenMP at 1 thread as distributed's nanny sets them),
warmed up (imports, one small score per worker) before timing. Per count: the seconds from
submitting the collection to having every result (median of ``--repeat`` runs, min and max),
throughput in tomograms/s and MB/s, and parallel efficiency T1 / (N · TN), the target being
≥ 0.8. With ``--step label``, the step is 26-connected labelling of masks instead
(``cryodask.postprocess.components.label_block``: cc3d on CPU, CuPy on GPU).

GPU rows (``--gpu-workers 1,2``; the label step on a dask-cuda LocalCUDACluster, one worker
per GPU) run only where a GPU and dask-cuda are usable; elsewhere they are reported as
skipped, never estimated. The machine (cores, CPU model, RAM) and the load average before and
after each run are stored with the numbers, and so is each run's CPU/wall of its stages (the
workers' CPU seconds per stage-second, from the run report): a run whose workers got much less
than 1.0 shared its cores with other work, and its efficiency says nothing about the step.

    python benchmarks/scaling.py --workers 1,2 --repeat 3                 # a 2-core machine
    python benchmarks/scaling.py --workers 1,2,4,8,16 --repeat 3 --tomograms 64
    python benchmarks/scaling.py --workers 1,2,4,8,16 --gpu-workers 1,2,4 --tomograms 64

Writes ``<results>/scaling.json`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


# ------------------------------------------------------------------ the step (runs on the workers)

def step_task(src: str, dst: str, step: str, device: str = "cpu") -> int:
    """One tomogram: read, compute, write; each part recorded as a stage. Returns bytes read."""
    import mrcfile

    from cryodask.report import stage

    name = Path(src).stem
    with stage("read", block=name, step=step) as s, mrcfile.open(src, permissive=True) as mrc:
        data = np.array(mrc.data)
        s.bytes_read = data.nbytes
    with stage("infer", block=name, step=step):
        if step == "sheet":
            from cryodask.membranes.classical import ClassicalParams, membrane_score

            result = membrane_score(data, 10.0, ClassicalParams())
        else:
            from cryodask.postprocess.components import label_block

            result, _ = label_block(data, 26, device)
    with stage("write", block=name, step=step, bytes_written=result.nbytes):
        np.save(dst, result)
    return data.nbytes


def make_collection(folder: Path, n: int, shape, step: str) -> list[Path]:
    """``n`` float32 noise tomograms (the sheet filter's cost does not depend on content), or
    int8 masks of random blobs for the label step."""
    import mrcfile
    from scipy import ndimage

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        data = rng.standard_normal(shape, dtype=np.float32)
        if step == "label":
            data = (ndimage.gaussian_filter(data, 2) > 0.05).astype(np.int8)
        path = folder / f"tomo_{i:03d}.mrc"
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = 10.0
        paths.append(path)
    return paths


# ------------------------------------------------------------------ timing one worker count

def _cluster(kind: str, workers: int):
    if kind == "gpu":
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(n_workers=workers, threads_per_worker=1, silence_logs=logging.ERROR,
                                dashboard_address=":0")
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, silence_logs=logging.ERROR,
                        dashboard_address=":0")


def time_workers(kind: str, workers: int, paths: list[Path], out: Path, step: str, repeat: int) -> dict:
    """Seconds per run (collection submitted → all results back) on a fresh cluster of ``workers``."""
    from distributed import Client

    from cryodask.report import run_report

    device = "cuda" if kind == "gpu" else "cpu"
    runs, stages = [], None
    with _cluster(kind, workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        warm = [client.submit(step_task, str(paths[0]), str(out / f"warm-{i}.npy"), step, device, pure=False,
                              workers=[w]) for i, w in enumerate(client.scheduler_info()["workers"])]
        client.gather(warm)
        for i in range(repeat):
            load = os.getloadavg()[0]
            with run_report(None, client, command=f"scaling {kind} x{workers}", echo=None) as report:
                start = time.perf_counter()
                futures = client.map(step_task, [str(p) for p in paths],
                                     [str(out / f"{p.stem}.npy") for p in paths], step=step, device=device, pure=False)
                nbytes = sum(client.gather(futures))
                seconds = time.perf_counter() - start
            rows = report.summary["stages"]
            busy = sum(r["cpu_s"] for r in rows) / max(sum(r["wall_s"] for r in rows), 1e-9)
            runs.append({"seconds": seconds, "load_before": load, "load_after": os.getloadavg()[0],
                         "cpu_per_wall": busy})
            stages = report.summary["stages"] if i == 0 else stages
            print(f"  {kind} x{workers} run {i + 1}: {seconds:.2f} s (load {load:.1f}, CPU/wall {busy:.2f})",
                  file=sys.stderr)
    seconds = sorted(r["seconds"] for r in runs)
    return {"kind": kind, "workers": workers, "runs": runs, "nbytes": nbytes,
            "seconds": {"median": seconds[len(seconds) // 2], "min": seconds[0], "max": seconds[-1]},
            "stages": stages}


def add_rates(rows: list[dict], n_items: int) -> None:
    """Throughput and parallel efficiency T1 / (N · TN), each as median (min, max); T1 is the
    median of the smallest worker count of the same kind (scaled by its count when not 1)."""
    for kind in {r["kind"] for r in rows}:
        rs = [r for r in rows if r["kind"] == kind]
        base = min(rs, key=lambda r: r["workers"])
        t1 = base["seconds"]["median"] * base["workers"]
        for r in rs:
            s = r["seconds"]
            r["unit"] = "tomograms/s"
            r["throughput"] = {"median": n_items / s["median"], "min": n_items / s["max"], "max": n_items / s["min"]}
            r["mb_per_s"] = r["nbytes"] / 1e6 / s["median"]
            r["efficiency"] = {"median": t1 / (r["workers"] * s["median"]), "min": t1 / (r["workers"] * s["max"]),
                               "max": t1 / (r["workers"] * s["min"])}


def gpu_skip_reason() -> str | None:
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return "dask-cuda is not installed"
    from cryodask.postprocess.gpu import gpu_available

    return None if gpu_available() else "no usable GPU (CuPy)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="CPU worker counts, e.g. 1,2,4,8,16")
    parser.add_argument("--gpu-workers", default="", help="GPU worker counts (one GPU each), e.g. 1,2")
    parser.add_argument("--tomograms", type=int, default=8, help="size of the collection")
    parser.add_argument("--shape", default="32,128,128", help="z,y,x of each tomogram")
    parser.add_argument("--step", choices=("sheet", "label"), default="sheet")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    from cryodask.report.summary import machine
    from plots import scaling_png

    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    gpu_counts = [int(w) for w in args.gpu_workers.split(",") if w.strip()]
    shape = tuple(int(s) for s in args.shape.split(","))
    if max(counts, default=0) > (os.cpu_count() or 1):
        print(f"note: {max(counts)} workers on {os.cpu_count()} cores: efficiency past {os.cpu_count()} workers "
              "measures oversubscription, not scaling", file=sys.stderr)
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        paths = make_collection(tmp, args.tomograms, shape, args.step)
        for n in counts:
            rows.append(time_workers("cpu", n, paths, tmp, args.step, args.repeat))
        if gpu_counts:
            reason = gpu_skip_reason()
            if reason:
                skipped["gpu"] = f"GPU rows {gpu_counts} not run: {reason}"
                print(skipped["gpu"], file=sys.stderr)
            else:
                masks = paths
                if args.step != "label":  # the sheet filter has no GPU path: label masks instead
                    (tmp / "masks").mkdir()
                    masks = make_collection(tmp / "masks", args.tomograms, shape, "label")
                for n in gpu_counts:
                    rows.append(time_workers("gpu", n, masks, tmp, "label", args.repeat))
    add_rates(rows, args.tomograms)
    result = {"step": args.step, "tomograms": args.tomograms, "shape": shape, "repeat": args.repeat,
              "machine": machine(), "rows": rows, "skipped": skipped, "target_efficiency": 0.8}
    print(f"{args.tomograms} tomograms {shape}, step {args.step}; {result['machine']['cores']} cores "
          f"({result['machine']['cpu']}), {result['machine']['memory_gb']} GB; median of {args.repeat}")
    print(f"{'kind':<5} {'workers':>7} {'s (min-max)':>22} {'tomo/s':>7} {'MB/s':>7} {'efficiency':>22} {'load':>6} "
          f"{'CPU/wall':>8}")
    for r in rows:
        s, e = r["seconds"], r["efficiency"]
        load = max(run["load_before"] for run in r["runs"])
        busy = min(run["cpu_per_wall"] for run in r["runs"])
        print(f"{r['kind']:<5} {r['workers']:>7} {s['median']:>8.2f} ({s['min']:.2f}-{s['max']:.2f}) "
              f"{r['throughput']['median']:>7.2f} {r['mb_per_s']:>7.1f} {e['median']:>8.2f} "
              f"({e['min']:.2f}-{e['max']:.2f}) {load:>6.1f} {busy:>8.2f}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "scaling.json").write_text(json.dumps(result, indent=2))
    scaling_png(rows, results / "scaling.png", title=f"{args.step} over {args.tomograms} tomograms {shape}")
    return result


if __name__ == "__main__":
    main()
