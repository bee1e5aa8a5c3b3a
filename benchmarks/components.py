"""Connected-component post-processing: cryodask against scipy and cc3d on the whole array.

The input is a membrane-like 0/1 mask (open vesicle bands, curved sheets crossing the volume,
flat debris, small blobs and speckle — what a thresholded membrane segmentation looks like),
generated slab by slab straight into an MRC file, so making 0.5 G voxels needs neither 5 GB of
RAM nor minutes. Every method applies ETSAM's filter: 26-connected components whose
bounding-box z extent is at least ``--min-slices`` (10) are kept.

Methods, each in its own process, each reading the MRC and writing the filtered mask (MRC;
cryodask writes OME-Zarr instead with ``--output-format zarr``):
  scipy       ``ndimage.label(mask, ones((3,3,3)))`` + ``find_objects`` on the whole array — ETSAM's
              post-processing (with the filter vectorised: ``keep[labels]``), single-threaded
  cc3d        ``cc3d.connected_components(connectivity=26)`` + ``cc3d.statistics`` on the whole array
  cryodask    ``postprocess(...)`` on a LocalCluster of 1, 2 and all cores (1 thread per worker;
              cluster start-up timed separately); ``cryodask-gpu`` rows too when a GPU is usable
Seconds are end to end (read, label, filter, write); ``label_seconds`` in the JSON is the
in-memory part of the baselines. Peak RSS is sampled every 20 ms per process: "total" sums the
whole process tree (workers included), "per worker" is the largest single worker process
(the process itself for the baselines). "identical" compares the output with scipy's, slab by
slab. Targets: identical; faster than scipy on the same cores; per-worker peak <= 1/4 of scipy's.

    python benchmarks/components.py --shape 512,1024,1024 --repeat 3

Scratch files (the input, one output at a time, the scipy reference) go to a temporary folder
under ``$CRYODASK_BENCH_DIR`` if set: about 3 bytes per voxel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SLAB = 32  # z-slices generated / compared at a time


# ------------------------------------------------------------------ the membrane-like mask

def membrane_objects(shape, seed=0) -> dict:
    """Random geometry of a membrane mask, in voxels: sheets, vesicles, debris, blobs.

    Vesicle shells lose their caps where the surface is nearly parallel to xy (|n_z| > 0.8), as
    the missing wedge does to real segmentations, so they become open bands; debris is flat
    (thin in z) and blobs are small, so ETSAM's z-extent filter removes both.
    """
    rng = np.random.default_rng(seed)
    shape_arr = np.asarray(shape, float)
    volume = shape_arr.prod()
    sheets = []
    for _ in range(3):  # a patch of a huge sphere crossing the volume, normal near the xy plane
        phi, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3)
        normal = np.array([np.sin(tilt), np.cos(tilt) * np.cos(phi), np.cos(tilt) * np.sin(phi)])
        radius = rng.uniform(2, 4) * shape_arr.max()
        crossing = shape_arr / 2 + normal * rng.uniform(-0.3, 0.3) * (np.abs(normal) @ shape_arr)
        sheets.append((crossing - normal * radius, radius, rng.uniform(3, 5)))
    f32 = lambda values: np.asarray(values, np.float32)  # noqa: E731 - keeps the per-voxel maths in float32
    r_max = min(50.0, 0.4 * shape_arr.min())
    r_min = min(15.0, 0.6 * r_max)
    n_vesicles = int(0.12 * volume / (4 / 3 * np.pi * ((r_min + r_max) / 2) ** 3))
    vesicles, centres, radii = [], np.zeros((0, 3)), np.zeros(0)
    for _ in range(n_vesicles):
        for _ in range(20):  # rejection sampling: vesicles do not overlap each other
            axes = rng.uniform(r_min, r_max) * rng.uniform(0.85, 1.15, 3)
            centre = rng.uniform(0, 1, 3) * shape_arr
            if np.all(np.linalg.norm(centres - centre, axis=1) > radii + axes.max() + 4):
                vesicles.append((centre, f32(axes), np.float32(rng.uniform(3, 5))))
                centres, radii = np.vstack([centres, centre]), np.append(radii, axes.max())
                break
    n_debris = int(volume / 60**3)
    debris = [(rng.uniform(0, 1, 3) * shape_arr, f32([rng.uniform(1, 3), *rng.uniform(4, 15, 2)]))
              for _ in range(n_debris)]
    blobs = [(rng.uniform(0, 1, 3) * shape_arr, f32(np.full(3, rng.uniform(0.8, 3)))) for _ in range(n_debris * 4)]
    return {"sheets": sheets, "vesicles": vesicles, "solids": debris + blobs, "seed": seed}


def _box(centre, half, z0, z1, shape):
    """Slices of the object's bounding box inside slab [z0, z1), or None."""
    lo = np.maximum(np.floor(centre - half).astype(int), [z0, 0, 0])
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, [z1, shape[1], shape[2]])
    return None if np.any(hi <= lo) else tuple(slice(a, b) for a, b in zip(lo, hi))


def _grids(box, centre, z0):
    """Open-grid offsets of a box from the centre (float32, broadcastable), z shifted to the slab."""
    return [(np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c))
            .reshape([-1 if i == j else 1 for j in range(3)])
            for i, (s, c) in enumerate(zip(box, centre))], (slice(box[0].start - z0, box[0].stop - z0),) + box[1:]


def render_slab(objects, shape, z0, z1) -> np.ndarray:
    """Voxels z0..z1 of the mask (bool), from analytic distances to each object's surface."""
    slab = np.zeros((z1 - z0, shape[1], shape[2]), bool)
    for centre, radius, thick in objects["sheets"]:  # |r - R| <= t/2, without a square root
        (gz, gy, gx), _ = _grids((slice(z0, z1), slice(0, shape[1]), slice(0, shape[2])), centre, z0)
        r2 = gz * gz + (gy * gy + gx * gx)
        slab |= (r2 >= np.float32((radius - thick / 2) ** 2)) & (r2 <= np.float32((radius + thick / 2) ** 2))
    for centre, axes, thick in objects["vesicles"]:
        box = _box(centre, axes + thick, z0, z1, shape)
        if box is None:
            continue
        (gz, gy, gx), local = _grids(box, centre, z0)
        rho = np.sqrt((gz / axes[0]) ** 2 + (gy / axes[1]) ** 2 + (gx / axes[2]) ** 2)
        shell = np.abs(rho - 1) * np.float32(axes.mean()) <= thick / 2
        shell &= np.abs(gz) < np.float32(0.8) * axes[0] * rho  # the missing wedge erases the caps
        slab[local] |= shell
    for centre, axes in objects["solids"]:
        box = _box(centre, axes, z0, z1, shape)
        if box is not None:
            (gz, gy, gx), local = _grids(box, centre, z0)
            slab[local] |= (gz / axes[0]) ** 2 + (gy / axes[1]) ** 2 + (gx / axes[2]) ** 2 <= 1
    speckle = np.random.default_rng([objects["seed"], z0]).random(slab.shape, dtype=np.float32) < 2e-5
    return slab | speckle


def make_mask(path: Path, shape, seed=0, threads=None) -> dict:
    """Write the mask to an int8 (mode 0) MRC file slab by slab, in parallel threads."""
    import mrcfile

    objects = membrane_objects(shape, seed)
    start = time.perf_counter()
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=0, overwrite=True) as mrc:
        def write(z0):
            slab = render_slab(objects, shape, z0, min(z0 + SLAB, shape[0]))
            mrc.data[z0:z0 + len(slab)] = slab
            return int(slab.sum())
        with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
            foreground = sum(pool.map(write, range(0, shape[0], SLAB)))
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = 0, 1, foreground / np.prod(shape)
        mrc.voxel_size = 10.0
    return {"seconds": time.perf_counter() - start, "foreground_fraction": foreground / float(np.prod(shape)),
            "vesicles": len(objects["vesicles"]), "sheets": len(objects["sheets"]),
            "small_objects": len(objects["solids"])}


# ------------------------------------------------------------------ methods (run in child processes)

def _read_mrc(path) -> np.ndarray:
    import mrcfile

    with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
        return np.array(mrc.data)


def _write_mrc(path, mask: np.ndarray) -> None:
    import mrcfile

    with mrcfile.new_mmap(path, shape=mask.shape, mrc_mode=0, overwrite=True) as mrc:
        for z0 in range(0, mask.shape[0], SLAB):
            mrc.data[z0:z0 + SLAB] = mask[z0:z0 + SLAB]
        mrc.voxel_size = 10.0


def run_scipy(src: Path, out: Path, min_slices: int, **_) -> dict:
    from scipy import ndimage

    def label(mask):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        return labels, n, ndimage.find_objects(labels)

    return _whole_array_baseline(src, out, min_slices, label)


def run_cc3d(src: Path, out: Path, min_slices: int, **_) -> dict:
    import cc3d

    def label(mask):
        labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        return labels, n, cc3d.statistics(labels)["bounding_boxes"][1:n + 1]  # index 0 is the background

    return _whole_array_baseline(src, out, min_slices, label)


def _whole_array_baseline(src: Path, out: Path, min_slices: int, label) -> dict:
    """Read the whole mask, ``label`` it (-> labels, n, bounding boxes), apply ETSAM's z-extent
    filter, write the mask to MRC. Each array is dropped as soon as it is used, as a careful
    user would, so the peak memory is the baseline's own."""
    start = time.perf_counter()
    mask = _read_mrc(src)
    label_start = time.perf_counter()
    labels, n, boxes = label(mask)
    del mask
    keep = np.zeros(n + 1, bool)
    keep[1:] = [box[0].stop - box[0].start >= min_slices for box in boxes]
    filtered = keep[labels]
    del labels
    label_seconds = time.perf_counter() - label_start
    _write_mrc(out / "mask.mrc", filtered)
    return {"seconds": time.perf_counter() - start, "label_seconds": label_seconds, "output": str(out / "mask.mrc"),
            "n_components": int(n), "n_kept": int(keep.sum())}


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _postprocess_function():
    """cryodask's ``postprocess`` (None before it exists, so the baselines still run)."""
    sys.path.insert(0, str(HERE.parent))
    try:
        from cryodask.postprocess.pipeline import postprocess
    except ImportError:
        return None
    return postprocess


def run_cryodask(src: Path, out: Path, min_slices: int, workers: int, chunks, memory_limit: str,
                 device: str = "cpu", output_format: str = "mrc", **_) -> dict:
    from distributed import Client, LocalCluster

    postprocess = _postprocess_function()
    from cryodask.postprocess.pipeline import PostprocessParams

    output = out / f"mask.{output_format}"
    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        started = time.perf_counter()
        result = postprocess(str(src), str(output), PostprocessParams(connectivity=26, min_slices=min_slices),
                             chunks=chunks, client=client, device=device)
        done = time.perf_counter()
        worker_max_rss = max(client.run(_max_rss).values())
    return {"seconds": done - started, "cluster_start_seconds": started - start, "output": str(output),
            "n_components": int(result.n_components), "n_kept": int(result.n_kept),
            "worker_max_rss_mb": worker_max_rss / 1e6, "stages": getattr(result, "seconds", None)}


def run_cryodask_gpu(*args, **kwargs) -> dict:
    return run_cryodask(*args, **{**kwargs, "device": "cuda"})


METHODS = {"scipy": run_scipy, "cc3d": run_cc3d, "cryodask": run_cryodask, "cryodask-gpu": run_cryodask_gpu}


# ------------------------------------------------------------------ measuring and comparing

def measure(method: str, src: Path, out: Path, args, workers: int = 1) -> dict:
    """Run one method in a child process; sample every process's RSS in its tree until it exits."""
    import psutil

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", method, "--input", str(src), "--scratch", str(out),
           "--chunks", args.chunks, "--workers", str(workers), "--min-slices", str(args.min_slices),
           "--memory-limit", args.memory_limit, "--output-format", args.output_format]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root, total, per_process = psutil.Process(proc.pid), 0, {}
    while proc.poll() is None:
        try:
            rss = {p.pid: p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running()}
        except psutil.Error:
            rss = {}
        total = max(total, sum(rss.values()))
        for pid, value in rss.items():
            per_process[pid] = max(per_process.get(pid, 0), value)
        time.sleep(0.02)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{method} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    children = [v for pid, v in per_process.items() if pid != proc.pid]
    result["peak_rss_mb"] = total / 1e6
    # the baselines are one process; cryodask's largest process below the client is a worker
    result["peak_rss_worker_mb"] = (max(children) if method.startswith("cryodask") and children
                                    else per_process.get(proc.pid, 0)) / 1e6
    result["peak_rss_client_mb"] = per_process.get(proc.pid, 0) / 1e6
    return result


def open_mask(path):
    """An array-like view of an output mask: MRC (memory-mapped), zarr array or OME-Zarr level 0."""
    path = str(path)
    if path.endswith(".mrc"):
        import mrcfile

        return mrcfile.mmap(path, mode="r", permissive=True).data
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return node
    attrs = node.attrs.asdict()
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    return node[multiscales[0]["datasets"][0]["path"]]


def identical(path, reference) -> bool:
    """The same foreground as the reference mask, compared slab by slab."""
    a, b = open_mask(path), open_mask(reference)
    if tuple(a.shape) != tuple(b.shape):
        return False
    return all(np.array_equal(np.asarray(a[z:z + SLAB]) != 0, np.asarray(b[z:z + SLAB]) != 0)
               for z in range(0, a.shape[0], SLAB))


def plan(args) -> list[tuple[str, str, int]]:
    """(row name, method, cores) for every row of the table."""
    rows = [("scipy", "scipy", 1), ("cc3d", "cc3d", 1)]
    if _postprocess_function() is None:
        print("cryodask.postprocess.pipeline.postprocess not found: baselines only", file=sys.stderr)
        return rows
    cores = sorted({1, min(2, os.cpu_count()), os.cpu_count()})
    rows += [(f"cryodask x{k}", "cryodask", k) for k in cores]
    sys.path.insert(0, str(HERE.parent))
    from cryodask.postprocess.gpu import gpu_available

    if gpu_available():
        rows += [(f"cryodask-gpu x{k}", "cryodask-gpu", k) for k in sorted({1, os.cpu_count()})]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512,1024,1024")
    parser.add_argument("--chunks", default="64,256,256")
    parser.add_argument("--min-slices", type=int, default=10)
    parser.add_argument("--memory-limit", default="auto", help="per cryodask worker (LocalCluster's memory_limit)")
    parser.add_argument("--output-format", choices=("mrc", "zarr"), default="mrc", help="cryodask's output")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method: median, min and max are reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunks = tuple(int(c) for c in args.chunks.split(","))
    if args.child:
        result = METHODS[args.child](Path(args.input), Path(args.scratch), min_slices=args.min_slices,
                                     workers=args.workers, chunks=chunks, memory_limit=args.memory_limit,
                                     output_format=args.output_format)
        print(json.dumps(result))
        return

    shape = tuple(int(s) for s in args.shape.split(","))
    rows = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        src = Path(tmp) / "mask.mrc"
        generated = make_mask(src, shape, seed=args.seed)
        print(f"generated {shape} mask in {generated['seconds']:.1f} s: {generated['foreground_fraction']:.2%} "
              f"foreground, {generated['vesicles']} vesicles, {generated['sheets']} sheets, "
              f"{generated['small_objects']} small objects", file=sys.stderr)
        reference = Path(tmp) / "reference" / "mask.mrc"
        for name, method, cores in plan(args):
            runs = []
            for i in range(args.repeat):
                scratch = Path(tmp) / f"{method}-{cores}-{i}"
                runs.append(measure(method, src, scratch, args, workers=cores))
                print(f"  {name} run {i + 1}: {runs[-1]['seconds']:.2f} s", file=sys.stderr)
                if name == "scipy" and i == 0:
                    reference.parent.mkdir()
                    shutil.move(runs[0]["output"], reference)
                elif i == 0:
                    runs[0]["identical"] = identical(runs[0]["output"], reference)
                shutil.rmtree(scratch)
            seconds = sorted(r["seconds"] for r in runs)
            rows[name] = {"method": method, "cores": cores, "seconds_median": seconds[len(seconds) // 2],
                          "seconds_min": seconds[0], "seconds_max": seconds[-1],
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                          "peak_rss_worker_mb": max(r["peak_rss_worker_mb"] for r in runs),
                          "identical": runs[0].get("identical", True),
                          **{k: runs[0][k] for k in ("n_components", "n_kept", "label_seconds", "cluster_start_seconds",
                                                      "worker_max_rss_mb", "peak_rss_client_mb",
                                                      "stages") if k in runs[0]}}
    scipy = rows["scipy"]
    for r in rows.values():
        r["speedup_vs_scipy"] = scipy["seconds_median"] / r["seconds_median"]
        r["worker_peak_vs_scipy_peak"] = r["peak_rss_worker_mb"] / scipy["peak_rss_mb"]
        r["identical"] = bool(r["identical"]
                              and (r["n_components"], r["n_kept"]) == (scipy["n_components"], scipy["n_kept"]))
    summary = {"input": {"shape": shape, "voxels": int(np.prod(shape)), "chunks": chunks, "min_slices": args.min_slices,
                         "cpus": os.cpu_count(), "repeat": args.repeat, **generated}, "methods": rows}
    print(f"input {shape} ({np.prod(shape) / 1e9:.2f} G voxels, {generated['foreground_fraction']:.2%} foreground), "
          f"{scipy['n_components']} components, {scipy['n_kept']} kept (z extent >= {args.min_slices}); "
          f"{os.cpu_count()} cores; median of {args.repeat}")
    print(f"{'method':<16} {'cores':>5} {'s (min-max)':>22} {'vs scipy':>9} {'peak MB':>9} {'/worker MB':>11} "
          f"{'/scipy peak':>12} {'identical':>10}")
    for name, r in rows.items():
        print(f"{name:<16} {r['cores']:>5} {r['seconds_median']:>8.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f})"
              f" {r['speedup_vs_scipy']:>8.2f}x {r['peak_rss_mb']:>9.0f} {r['peak_rss_worker_mb']:>11.0f}"
              f" {r['worker_peak_vs_scipy_peak']:>12.2f} {'reference' if name == 'scipy' else str(r['identical']):>10}")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "components.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
