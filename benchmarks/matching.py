"""Hierarchical Feature Matching (CryoSAM) against naive matching, on a zarr feature pyramid.

The input is a synthetic DINOv2-like feature pyramid of a tomogram: ratios 16, 8 and 4 of a
``--shape`` volume (default 200×512×512 voxels), ``--dim`` features per point (default
3×384 = 1152, the tri-view layout of ViT-S/14), float16 zarr, written chunk by chunk so that
making it never needs a whole level in RAM. The field is what the matcher sees in real
features: a smooth background (64 random Fourier modes, ~24-voxel correlation length, norm
~1), white noise (norm ~0.3, fixed per voxel so the levels agree where they coincide), and
Gaussian blobs (sigma 8 voxels) of one unit vector per particle kind: ``--particles`` of the
prompted kind and ``--decoys`` of three other kinds (cosine 0.3 with it), at least 28 voxels
apart. The query is ``references.query_vector`` at one particle (a single prompt, as in CryoSAM).

Methods, each in its own process, each reading the same zarr pyramid:
  hierarchical   ``match(features, query, MatchParams())`` (16 → 8 → 4, threshold 0.5, NMS 5, top 512)
  hier-nearest   the same with ``children="nearest"`` (candidates all around each survivor)
  naive          ``match(..., MatchParams(matching="naive"))``: every ratio-4 point, same NMS/top-K
  naive-in-RAM   CryoSAM's layout: the whole ratio-4 level loaded, ``similarity`` + ``nms_top_k``
                 (the memory reference; skip with ``--no-in-ram``)
in this process (the default; ``--workers N`` adds both on a LocalCluster of N workers).
Seconds are the matching alone (opening the arrays and the query excluded), median of
``--repeat`` runs; peak RSS is sampled every 20 ms over the process tree. Against naive:
"rec/naive" is the share of naive's detections with score >= 0.5 that a method also returns
within ``--radius`` voxels, "same vox" at the very same voxel. Against the planted particles
of the prompted kind (Hungarian matching within ``--radius`` voxels,
``cryodask.metrics.picking``): recall of all detections, precision of those >= 0.5, and
recall of the best N (N = the number of particles). Targets: >= 20x faster than
naive, recall within 1 % (docs/architecture.md, "Targets").

The default layout is float16, uncompressed, chunks of 4×4×4 grid points × D (147 kB): DINOv2
features hardly compress (zstd saves ~8 %) and decompressing costs more than reading, and a
chunk of 16³ voxels lets the hierarchy skip most of the volume (``--chunks 16,32,32
--compress`` shows the other extreme; ``--shards`` stores small chunks in fewer files).

    python benchmarks/matching.py --shape 200,512,512 --repeat 3

Scratch files (the pyramid, ~2.2 GB at the default shape) go to a temporary folder under
``$CRYODASK_BENCH_DIR`` if set, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np
from measure import run_child as run_measured

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RATIOS = (16, 8, 4)
SIGMA, AMPLITUDE, NOISE, DECOY_COSINE, MIN_SEPARATION = 8.0, 4.0, 0.3, 0.3, 28.0


# ------------------------------------------------------------------ the synthetic pyramid

class Field:
    """The feature at any voxel, analytically: smooth background + noise + particle blobs."""

    def __init__(self, shape, dim, n_particles, n_decoys, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.dim = tuple(shape), dim
        modes = 64
        self.k = rng.normal(0, 1 / 24, (modes, 3)).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, modes).astype(np.float32)
        self.mix = rng.normal(0, math.sqrt(2 / (modes * dim)), (modes, dim)).astype(np.float32)
        self.noise = rng.normal(0, NOISE / math.sqrt(dim), (4096, dim)).astype(np.float32)
        target = rng.normal(size=dim)
        target /= np.linalg.norm(target)
        kinds = [target]
        for _ in range(3):
            other = rng.normal(size=dim)
            other -= other @ target * target
            other /= np.linalg.norm(other)
            kinds.append(DECOY_COSINE * target + math.sqrt(1 - DECOY_COSINE**2) * other)
        self.kinds = np.asarray(kinds, np.float32)
        centres, kind = [], []
        lo, hi = np.full(3, 12.0), np.asarray(shape, float) - 12
        while len(centres) < n_particles + n_decoys:
            c = rng.uniform(lo, hi)
            if not centres or np.min(np.linalg.norm(np.asarray(centres) - c, axis=1)) >= MIN_SEPARATION:
                centres.append(c)
                kind.append(0 if len(centres) <= n_particles else 1 + len(centres) % 3)
        self.centres, self.kind = np.asarray(centres), np.asarray(kind)

    @property
    def truth(self) -> np.ndarray:
        return self.centres[self.kind == 0]

    def region(self, ratio, region) -> np.ndarray:
        """Features of grid points ``region`` (slices) of level ``ratio``: (z, y, x, D) float32."""
        axes = [np.arange(s.start, s.stop) * ratio for s in region]
        zyx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        out = np.cos(zyx.astype(np.float32) @ self.k.T + self.phase) @ self.mix
        z, y, x = (zyx[:, i].astype(np.int64) for i in range(3))
        out += self.noise[((z * 73856093) ^ (y * 19349663) ^ (x * 83492791)) % len(self.noise)]
        lo = np.array([a[0] for a in axes]) - 4 * SIGMA
        hi = np.array([a[-1] for a in axes]) + 4 * SIGMA
        near = np.all((self.centres >= lo) & (self.centres <= hi), axis=1)
        if near.any():
            d2 = ((zyx[:, None, :] - self.centres[near][None]) ** 2).sum(-1)
            blobs = (AMPLITUDE * np.exp(-d2 / (2 * SIGMA**2))).astype(np.float32)  # (points, particles)
            out += blobs @ self.kinds[self.kind[near]]
        return out.reshape(*[len(a) for a in axes], self.dim)


def write_pyramid(root: Path, field: Field, chunks, shards=None, compress=False, threads=2) -> dict:
    """One float16 zarr array per ratio (``r16.zarr`` ...), written a few chunks (or a shard) at a time."""
    import zarr

    start, nbytes = time.perf_counter(), 0
    for r in RATIOS:
        grid = tuple(math.ceil(n / r) for n in field.shape)
        step = shards or tuple(c * max(1, w // c) for c, w in zip(chunks, (16, 32, 32)))
        array = zarr.create_array(str(root / f"r{r}.zarr"), shape=(*grid, field.dim), dtype="float16",
                                  chunks=(*chunks, field.dim), shards=(*shards, field.dim) if shards else None,
                                  compressors="auto" if compress else None, overwrite=True)

        def write(corner):
            region = tuple(slice(c, min(c + s, n)) for c, s, n in zip(corner, step, grid))
            array[region] = field.region(r, region).astype(np.float16)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(write, product(*[range(0, n, s) for n, s in zip(grid, step)])))
        nbytes += math.prod(grid) * field.dim * 2
    return {"seconds": time.perf_counter() - start, "gigabytes": nbytes / 1e9}


# ------------------------------------------------------------------ methods (run in child processes)

def _open(root: Path) -> dict:
    import zarr

    return {r: zarr.open_array(str(root / f"r{r}.zarr"), mode="r") for r in RATIOS}


def run_child(method: str, root: Path, out: Path, block, workers: int) -> dict:
    from cryodask.prompting.matching import MatchParams, match, nms_top_k, similarity

    features = _open(root)
    query = np.load(root / "query.npy")
    if method == "naive-in-RAM":
        start = time.perf_counter()
        level = features[4][...]  # the whole finest level, as CryoSAM holds it
        coords, scores = nms_top_k(similarity(level, query), 5, 512)
        seconds = time.perf_counter() - start
        np.savetxt(out, np.column_stack([coords * 4, scores]), delimiter=",", header="z,y,x,score", comments="")
        return {"seconds": seconds, "detections": len(scores)}
    params = MatchParams(children="nearest") if method == "hier-nearest" else MatchParams(matching=method)
    if workers:
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            start = time.perf_counter()
            df = match(features, query, params, client=client, block=block)
            seconds = time.perf_counter() - start
    else:
        start = time.perf_counter()
        df = match(features, query, params, block=block)
        seconds = time.perf_counter() - start
    df.to_csv(out, index=False)
    return {"seconds": seconds, "detections": len(df), "levels": df.attrs["matching"]["levels"]}


def measure(method: str, root: Path, out: Path, args, workers: int = 0) -> dict:
    """Run one method in a child process; sample the RSS of its process tree until it exits."""
    cmd = [sys.executable, __file__, "--child", method, "--scratch", str(root), "--output", str(out),
           "--block", args.block, "--workers", str(workers)]
    return run_measured(cmd, method)


# ------------------------------------------------------------------ comparing

def _read_picks(path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, :3], table[:, 3]


def quality(picks, scores, truth, radius) -> dict:
    from cryodask.metrics.picking import match_picks

    confident = scores >= 0.5
    return {"recall_vs_truth": match_picks(picks, truth, radius).recall,
            "precision_vs_truth": match_picks(picks[confident], truth, radius).precision,
            "recall_at_n_truth": match_picks(picks[:len(truth)], truth, radius).recall,
            "detections_ge_0.5": int(confident.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="200,512,512")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--particles", type=int, default=300, help="particles of the prompted kind")
    parser.add_argument("--decoys", type=int, default=150, help="particles of three other kinds")
    parser.add_argument("--chunks", default="4,4,4", help="zarr chunk (grid points z,y,x; D whole)")
    parser.add_argument("--shards", default="", help="zarr shard shape (grid points); chunks become inner chunks")
    parser.add_argument("--compress", action="store_true", help="zstd (zarr's default codec) instead of raw chunks")
    parser.add_argument("--block", default="16,64,64", help="grid points per block task")
    parser.add_argument("--radius", type=float, default=8.0, help="voxels, for the truth matching")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also run both on a LocalCluster of N workers")
    parser.add_argument("--no-in-ram", action="store_true", help="skip the whole-level in-RAM reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    block = tuple(int(b) for b in args.block.split(","))
    if args.child:
        print(json.dumps(run_child(args.child, Path(args.scratch), Path(args.output), block, args.workers)))
        return

    from references import query_vector

    shape = tuple(int(s) for s in args.shape.split(","))
    chunks = tuple(int(c) for c in args.chunks.split(","))
    shards = tuple(int(c) for c in args.shards.split(",")) if args.shards else None
    rows, picks = {}, {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        root = Path(tmp)
        field = Field(shape, args.dim, args.particles, args.decoys, seed=args.seed)
        generated = write_pyramid(root, field, chunks, shards, compress=args.compress)
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e9
        query = query_vector(_open(root), 4, field.truth[:1])
        np.save(root / "query.npy", query)
        print(f"generated {shape} x {args.dim} pyramid ({generated['gigabytes']:.2f} GB float16, {disk:.2f} GB on "
              f"disk) in {generated['seconds']:.1f} s: {len(field.truth)} particles + {args.decoys} decoys",
              file=sys.stderr)
        plan = [("hierarchical", "hierarchical", 0), ("hier-nearest", "hier-nearest", 0), ("naive", "naive", 0)]
        if not args.no_in_ram:
            plan.append(("naive-in-RAM", "naive-in-RAM", 0))
        if args.workers:
            plan += [(f"hierarchical x{args.workers}", "hierarchical", args.workers),
                     (f"naive x{args.workers}", "naive", args.workers)]
        runs = {name: [] for name, _, _ in plan}
        for i in range(args.repeat):  # interleaved, so drifts in machine load hit every method alike
            for name, method, workers in plan:
                out = root / f"{name.replace(' ', '_')}.csv"
                runs[name].append(measure(method, root, out, args, workers))
                if i == 0:
                    picks[name] = _read_picks(out)
                print(f"  {name} run {i + 1}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)
    for name, rs in runs.items():
        seconds = sorted(r["seconds"] for r in rs)
        rows[name] = {"seconds_median": seconds[len(seconds) // 2], "seconds_min": seconds[0],
                      "seconds_max": seconds[-1],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "detections": rs[0]["detections"],
                      **quality(*picks[name], field.truth, args.radius)}
        if "levels" in rs[0]:
            rows[name]["levels"] = rs[0]["levels"]
    from cryodask.metrics.picking import match_picks

    naive_picks, naive_scores = picks["naive"]
    confident = naive_picks[naive_scores >= 0.5]
    for name, row in rows.items():
        row["speedup_vs_naive"] = rows["naive"]["seconds_median"] / row["seconds_median"]
        row["recall_vs_naive"] = match_picks(picks[name][0], confident, args.radius).recall
        row["recall_vs_naive_same_voxel"] = match_picks(picks[name][0], confident, 0).recall
    finest = rows["hierarchical"]["levels"][-1]
    summary = {"input": {"shape": shape, "dim": args.dim, "ratios": RATIOS, "particles": args.particles,
                         "decoys": args.decoys, "chunks": chunks, "shards": shards, "compressed": args.compress,
                         "block": block, "cpus": os.cpu_count(), "repeat": args.repeat, "disk_gb": disk, **generated,
                         "radius": args.radius, "naive_detections_ge_0.5": len(confident),
                         "ratio4_points_scored_by_hierarchical": finest["candidates"] / finest["grid_points"]},
               "methods": rows,
               "estimates": {"note": "derived, not measured: naive matching at full voxel resolution (ratio 1, the "
                                     "paper's 'voxel-wise' baseline) scores 64x the points of ratio 4",
                             "naive_voxelwise_seconds": 64 * rows["naive"]["seconds_median"],
                             "hierarchical_speedup_vs_voxelwise": 64 * rows["naive"]["seconds_median"]
                             / rows["hierarchical"]["seconds_median"]}}
    print(f"input {shape} voxels, D={args.dim}, float16 zarr chunks {chunks}{f' shards {shards}' if shards else ''}"
          f"{' zstd' if args.compress else ' uncompressed'} ({disk:.2f} GB); {len(field.truth)} particles + "
          f"{args.decoys} decoys; {os.cpu_count()} cores; median of {args.repeat}")
    for name in ("hierarchical", "hier-nearest"):
        print(f"{name} scored " + ", ".join(
            f"r{lv['ratio']} {lv['candidates'] / lv['grid_points']:.1%} of {lv['grid_points']} points "
            f"({lv['blocks_read']}/{lv['blocks']} blocks)" for lv in rows[name]["levels"]))
    print(f"{'method':<14} {'s (min-max)':>19} {'vs naive':>8} {'peak MB':>8} {'detect':>6} {'>=0.5':>5} "
          f"{'rec/naive':>9} {'same vox':>8} {'rec/truth':>9} {'prec/truth':>10} {'rec@N':>6}")
    for name, r in rows.items():
        print(f"{name:<14} {r['seconds_median']:>6.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f})"
              f" {r['speedup_vs_naive']:>7.1f}x {r['peak_rss_mb']:>8.0f} {r['detections']:>6} "
              f"{r['detections_ge_0.5']:>5} {r['recall_vs_naive']:>9.3f} {r['recall_vs_naive_same_voxel']:>8.3f} "
              f"{r['recall_vs_truth']:>9.3f} {r['precision_vs_truth']:>10.3f} {r['recall_at_n_truth']:>6.3f}")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "matching.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
