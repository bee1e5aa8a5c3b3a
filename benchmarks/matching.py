"""Hierarchical Feature Matching (CryoSAM) against naive matching, on a features store.

The input is a synthetic DINOv2-like features store of a tomogram in the layout ``cryodask
features`` writes (``cryodask.prompting.features``: per view, the 37×37 patch map of every 4th
slice, float16, with its Gram maps), made from an analytic field: ``--shape`` voxels (default
200×512×512), ``--dim`` features per point (default 3×384 = 1152, the tri-view layout of
ViT-S/14). The field is what the matcher sees in real features: a smooth background (64
random Fourier modes, ~24-voxel correlation length, norm ~1), white noise (norm ~0.3, fixed
per voxel), and Gaussian blobs (sigma 8 voxels) of one unit vector per particle kind:
``--particles`` of the prompted kind and ``--decoys`` of three other kinds (cosine 0.3 with
it), at least 28 voxels apart. A view's token is the field at the token's centre (its third
of the channels); a grid point's feature is the bilinear sample of each view, as for real
features. The query is ``references.query_vector`` at one particle (a single prompt, as in
CryoSAM).

Methods, each in its own process, each reading the same store:
  hierarchical   ``match(store, query, MatchParams())`` (16 → 8 → 4, threshold 0.5, NMS 5,
                 top 512): every point scored from the query's projection on the stored
                 tokens and their Gram maps (``FeatureStore.project``)
  hier-nearest   the same with ``children="nearest"`` (candidates all around each survivor)
  exhaustive     the projection's similarity at every ratio-4 point (``matching="naive"``
                 over the store): exact naive matching at the projection's cost
  naive          ``match(dict(store), ..., MatchParams(matching="naive"))``: every ratio-4
                 point's D-vector sampled from the maps and scored, as CryoSAM does (and as
                 cryodask did before patch maps): the baseline
in this process (the default; ``--workers N`` adds hierarchical and naive on a LocalCluster
of N workers). Seconds are the matching alone (opening the store and the query excluded),
median of ``--repeat`` runs; peak RSS is sampled every 20 ms over the process tree. Against
naive: "rec/naive" is the share of naive's detections with score >= 0.5 that a method also
returns within ``--radius`` voxels, "same vox" at the very same voxel. Against the planted
particles of the prompted kind (Hungarian matching within ``--radius`` voxels,
``cryodask.metrics.picking``): recall of all detections, precision of those >= 0.5, and
recall of the best N (N = the number of particles). Targets: >= 20x faster than naive,
recall >= 0.99 of naive's.

    python benchmarks/matching.py --shape 200,512,512 --repeat 3

Scratch files go to a temporary folder under ``$CRYODASK_BENCH_DIR`` if set, deleted at the end.
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

    def at(self, zyx: np.ndarray) -> np.ndarray:
        """Features at voxel positions ``zyx`` (N, 3), fractional allowed: (N, D) float32."""
        zyx = np.asarray(zyx, np.float32)
        out = np.cos(zyx @ self.k.T + self.phase) @ self.mix
        z, y, x = (np.rint(zyx[:, i]).astype(np.int64) for i in range(3))
        out += self.noise[((z * 73856093) ^ (y * 19349663) ^ (x * 83492791)) % len(self.noise)]
        lo, hi = zyx.min(0) - 4 * SIGMA, zyx.max(0) + 4 * SIGMA
        near = np.all((self.centres >= lo) & (self.centres <= hi), axis=1)
        if near.any():
            d2 = ((zyx[:, None, :] - self.centres[near][None]) ** 2).sum(-1)
            blobs = (AMPLITUDE * np.exp(-d2 / (2 * SIGMA**2))).astype(np.float32)  # (points, particles)
            out += blobs @ self.kinds[self.kind[near]]
        return out


def write_store(root: Path, field: Field, patches: int = 37, threads: int = 2) -> dict:
    """A features store of the field (``cryodask.prompting.features.create_store``/``write_planes``,
    the writers ``cryodask features`` uses), a slab of planes at a time."""
    from cryodask.prompting.features import (VIEWS, Geometry, create_store, inplane, set_complete,
                                             write_planes)

    start, slab = time.perf_counter(), 16
    base, channels = min(RATIOS), field.dim // 3
    geometry = Geometry.plan(field.shape, base, patches)
    store = root / "features.zarr"
    create_store(store, geometry, channels, planes=slab, ratios=RATIOS)

    def positions(axis, kind):  # voxel coordinates of the stored entries along an in-plane axis
        n = field.shape[axis]
        if kind == "grid":
            return np.arange(0, n, base, dtype=np.float32)
        return np.linspace(0, n - 1, patches, dtype=np.float32)

    def write(task):
        v, view, p0 = task
        planes, a_pos, b_pos = geometry.stored(view)[0], *(positions(ax, k) for ax, k in
                                                          zip(inplane(view), geometry.kinds[view]))
        tokens = []
        for p in range(p0, min(p0 + slab, planes)):
            zyx = np.zeros((len(a_pos), len(b_pos), 3), np.float32)
            zyx[..., VIEWS.index(view)] = p * base
            a_axis, b_axis = inplane(view)
            zyx[..., a_axis], zyx[..., b_axis] = a_pos[:, None], b_pos[None, :]
            feats = field.at(zyx.reshape(-1, 3))[:, v * channels:(v + 1) * channels]
            tokens.append(feats.reshape(len(a_pos), len(b_pos), channels))
        return write_planes(store, geometry, view, p0, np.stack(tokens))

    tasks = [(v, view, p0) for v, view in enumerate(VIEWS) for p0 in range(0, geometry.stored(view)[0], slab)]
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(pool.map(write, tasks))
    set_complete(store, True)
    return {"seconds": time.perf_counter() - start, "gigabytes": nbytes / 1e9}


# ------------------------------------------------------------------ methods (run in child processes)

def _open(root: Path):
    from cryodask.prompting.features import open_features

    return open_features(root / "features.zarr")


def run_child(method: str, root: Path, out: Path, block, workers: int) -> dict:
    from cryodask.prompting.matching import MatchParams, match

    import torch  # noqa: F401  (loaded in any real run, with the model; its import is not matching)

    store = _open(root)
    query = np.load(root / "query.npy")
    features = dict(store) if method == "naive" else store  # a plain mapping: the sampled vectors are scored
    params = {"hier-nearest": MatchParams(children="nearest"), "exhaustive": MatchParams(matching="naive"),
              "naive": MatchParams(matching="naive")}.get(method, MatchParams())
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
    parser.add_argument("--block", default="16,64,64", help="grid points per block task")
    parser.add_argument("--radius", type=float, default=8.0, help="voxels, for the truth matching")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also run both on a LocalCluster of N workers")
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
    rows, picks = {}, {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        root = Path(tmp)
        field = Field(shape, args.dim, args.particles, args.decoys, seed=args.seed)
        generated = write_store(root, field)
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e9
        query = query_vector(_open(root), 4, field.truth[:1])
        np.save(root / "query.npy", query)
        print(f"generated {shape} x {args.dim} store ({generated['gigabytes']:.2f} GB written, {disk:.2f} GB on "
              f"disk) in {generated['seconds']:.1f} s: {len(field.truth)} particles + {args.decoys} decoys",
              file=sys.stderr)
        plan = [("hierarchical", "hierarchical", 0), ("hier-nearest", "hier-nearest", 0),
                ("exhaustive", "exhaustive", 0), ("naive", "naive", 0)]
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
                         "decoys": args.decoys, "store": "patch maps 37x37, float16, a plane every 4 voxels",
                         "block": block, "cpus": os.cpu_count(), "repeat": args.repeat, "disk_gb": disk, **generated,
                         "radius": args.radius, "naive_detections_ge_0.5": len(confident),
                         "ratio4_points_scored_by_hierarchical": finest["candidates"] / finest["grid_points"]},
               "methods": rows,
               "estimates": {"note": "derived, not measured: naive matching at full voxel resolution (ratio 1, the "
                                     "paper's 'voxel-wise' baseline) scores 64x the points of ratio 4",
                             "naive_voxelwise_seconds": 64 * rows["naive"]["seconds_median"],
                             "hierarchical_speedup_vs_voxelwise": 64 * rows["naive"]["seconds_median"]
                             / rows["hierarchical"]["seconds_median"]}}
    print(f"input {shape} voxels, D={args.dim}, a features store of 37x37 patch maps ({disk:.2f} GB); "
          f"{len(field.truth)} particles + "
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
