"""MRC → OME-Zarr: cryodask against the bandwidth limit and against ome-zarr-py, side by side.

Methods, each in its own process, on the same MRC file (float32 noise: tomograms barely compress):
  raw-copy    read the file's bytes sequentially and write them to a new file (the disk limit)
  ome-zarr    load the whole array, then ome-zarr-py ``write_image`` with a 3-level pyramid
              (``local_mean``, dict scale factors so z is downsampled too) — what a user writes by hand
  cryodask    ``cryodask.convert`` on a LocalCluster (cluster start-up timed separately)
Every method ends with ``os.sync()`` inside its timing, so bytes are on disk, not in the cache.
Peak memory is the largest total RSS of the method's process tree (workers included),
sampled every 20 ms.

    python benchmarks/convert.py --shape 256,1024,1024 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import run_child

HERE = Path(__file__).resolve().parent


def make_input(path: Path, shape) -> None:
    import mrcfile

    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as mrc:
        for z in range(shape[0]):
            mrc.data[z] = rng.standard_normal(shape[1:], dtype=np.float32)
        mrc.voxel_size = 10.0


def run_raw_copy(src: Path, out: Path, **_) -> dict:
    start = time.perf_counter()
    with open(src, "rb") as fin, open(out / "copy.raw", "wb") as fout:
        buffer = bytearray(64 * 2**20)
        while n := fin.readinto(buffer):
            fout.write(memoryview(buffer)[:n])
    os.sync()
    return {"seconds": time.perf_counter() - start}


def run_ome_zarr(src: Path, out: Path, chunks, **_) -> dict:
    import mrcfile
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    start = time.perf_counter()
    with mrcfile.open(src, permissive=True) as mrc:
        data = np.array(mrc.data)
    group = zarr.open_group(str(out / "ome.zarr"), mode="w", zarr_format=2)
    write_image(data, group, scale_factors=[{"z": 2, "y": 2, "x": 2}, {"z": 4, "y": 4, "x": 4}],
                method=Methods.LOCAL_MEAN, fmt=FormatV04(), axes="zyx", storage_options={"chunks": chunks})
    os.sync()
    return {"seconds": time.perf_counter() - start}


def run_cryodask(src: Path, out: Path, chunks, workers: int, **_) -> dict:
    from distributed import Client, LocalCluster

    sys.path.insert(0, str(HERE.parent))
    from cryodask.convert import ConvertParams, convert

    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        started = time.perf_counter()
        report = convert([src], out, ConvertParams(chunks=chunks, levels=3), client=client)
        os.sync()
        done = time.perf_counter()
    assert report.results[0].status == "converted", report.results[0].message
    return {"seconds": done - started, "cluster_start_seconds": started - start}


METHODS = {"raw-copy": run_raw_copy, "ome-zarr": run_ome_zarr, "cryodask": run_cryodask}


def measure(method: str, src: Path, out: Path, args) -> dict:
    """Run one method in a child process; sample its process tree's RSS until it exits."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", method, "--input", str(src), "--scratch", str(out),
           "--chunks", args.chunks, "--workers", str(args.workers)]
    return run_child(cmd, method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256,1024,1024")
    parser.add_argument("--chunks", default="64,256,256")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunks = tuple(int(c) for c in args.chunks.split(","))
    if args.child:
        print(json.dumps(METHODS[args.child](Path(args.input), Path(args.scratch), chunks=chunks,
                                             workers=args.workers)))
        return

    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        src = Path(tmp) / "tomogram.mrc"
        make_input(src, shape)
        mb = src.stat().st_size / 1e6
        rows = {}
        for method in METHODS:
            runs = []
            for i in range(args.repeat):
                scratch = Path(tmp) / f"{method}-{i}"
                runs.append(measure(method, src, scratch, args))
                shutil.rmtree(scratch)
            seconds = sorted(r["seconds"] for r in runs)
            rows[method] = {"seconds_median": seconds[len(seconds) // 2], "seconds_min": seconds[0],
                            "seconds_max": seconds[-1],
                            "mb_per_s": mb / seconds[len(seconds) // 2],
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                            **({"cluster_start_seconds": runs[0]["cluster_start_seconds"]}
                               if method == "cryodask" else {})}
    limit, ome, ours = rows["raw-copy"], rows["ome-zarr"], rows["cryodask"]
    summary = {
        "input": {"shape": shape, "mb": mb, "chunks": chunks, "workers": args.workers, "cpus": os.cpu_count()},
        "methods": rows,
        "cryodask_vs_bandwidth_limit": ours["mb_per_s"] / limit["mb_per_s"],
        "cryodask_speedup_vs_ome_zarr": ome["seconds_median"] / ours["seconds_median"],
        "cryodask_peak_memory_vs_ome_zarr": ours["peak_rss_mb"] / ome["peak_rss_mb"],
    }
    print(f"input {shape} float32, {mb:.0f} MB; {args.workers} workers on {os.cpu_count()} cores; median of "
          f"{args.repeat}")
    print(f"{'method':<10} {'s (min-max)':>20} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, r in rows.items():
        print(f"{name:<10} {r['seconds_median']:>8.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f}) "
              f"{r['mb_per_s']:>8.0f} {r['peak_rss_mb']:>12.0f}")
    print(f"cryodask / bandwidth limit: {summary['cryodask_vs_bandwidth_limit']:.2f}   "
          f"speed-up vs ome-zarr: {summary['cryodask_speedup_vs_ome_zarr']:.2f}x   "
          f"peak memory vs ome-zarr: {summary['cryodask_peak_memory_vs_ome_zarr']:.2f}")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "convert.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
