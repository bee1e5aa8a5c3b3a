"""The classical membrane filter per core: cryodask against scikit-image's Hessian, on the same blocks.

Both see the same synthetic tomograms (``synth_tomogram`` and the projection simulator
``synth_projection_tomogram``, 10 Å voxels, SNR 0.3, ±60° wedge), cut into the same blocks
(``--chunks``), each read with the same halo (``classical.halo``: 4 σ), one thread, each method in
its own process (peak RSS sampled every 20 ms, and the process's own ru_maxrss):
  skimage         what a user would write per block: ``hessian_matrix(block, sigma=σ/voxel,
                  mode="reflect", use_gaussian_derivatives=True)`` + ``hessian_matrix_eigvals``,
                  score λ_max - |λ_mid|. Masked as the classical filter thresholds (median + 2.5 /
                  6 robust spreads, seeds also >= 0.8 × the 99.9th percentile, skimage's
                  hysteresis), without its ridge and thickness steps. skimage takes the second
                  derivative as two first derivatives at σ/√2 truncated at 8 of them (2 × 18 voxels
                  here), so with this halo its block edges differ a little from its whole-array score.
  cryodask-score  ``membrane_score`` per block: the same work as the skimage row.
  cryodask        ``classical_segment`` in this process (no cluster): the score pass (Hessian, eigen,
                  ridge, histogram, zarr writes) and the mask pass (hysteresis, thickness, writes).
Mvox/s counts the voxels of the blocks (not their halos) per second of the timed work (the best of
``--repeat``). Dice is against the simulators' membrane truth.

    git worktree add /tmp/oldtree <commit>          # the code to compare with, checked out beside
    python benchmarks/classical.py --before /tmp/oldtree

With ``--before``, every method also runs on that tree's cryodask (``PYTHONPATH``), right after
this checkout's, so both see the same machine load; its rows are labelled "before", this
checkout's "after" (``--label``). Each run replaces its labels' rows in the JSON (``--out``) and
recomputes the ratios. Timings on a shared machine vary: compare rows of one run, read the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
SIMULATORS = ("synth_tomogram", "synth_projection_tomogram")
METHODS = ("skimage", "cryodask-score", "cryodask")


def make_inputs(folder: Path, shape, voxel_size: float, snr: float, seed: int) -> None:
    """Each simulator's volume and membrane truth as .npy files the children map."""
    from cryodask.synth import synth_projection_tomogram, synth_tomogram

    for name, make in (("synth_tomogram", synth_tomogram), ("synth_projection_tomogram", synth_projection_tomogram)):
        kwargs = {"missing_wedge": 60.0} if name == "synth_tomogram" else {"tilt_max": 60.0}
        t = make(shape, voxel_size=voxel_size, seed=seed, snr=snr, **kwargs)
        np.save(folder / f"{name}.npy", np.asarray(t.volume, np.float32))
        np.save(folder / f"{name}_truth.npy", np.asarray(t.membranes, np.uint8))


def code_version(package: Path) -> str:
    """Where the cryodask that ran lives, its commit, and whether its tree had changes."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", ".") else ""
    return f"{package} ({commit or 'no git'}{dirty})"


def blocks_with_halo(shape, chunks, halo):
    """(grown region, the block inside it, the block in the volume) of every block."""
    from cryodask.engine.blocks import plan_blocks

    for block in plan_blocks(shape, chunks):
        grown = tuple(slice(max(0, r.start - h), min(n, r.stop + h)) for r, h, n in zip(block.region, halo, shape))
        inner = tuple(slice(r.start - g.start, r.stop - g.start) for r, g in zip(block.region, grown))
        yield grown, inner, block.region


def thresholded(score: np.ndarray, params) -> np.ndarray:
    """The classical filter's thresholds (from the whole score) and skimage's hysteresis."""
    from skimage.filters import apply_hysteresis_threshold

    q25, median, q75, top = np.percentile(score, [25, 50, 75, 99.9])
    spread = (q75 - q25) / 1.349
    low = max(median + params.low * spread, 0.0)
    high = max(median + params.high * spread, params.high_fraction * top, low)
    return apply_hysteresis_threshold(score, low, high)


def run_method(method: str, folder: Path, simulator: str, voxel_size: float, chunks, repeat: int) -> dict:
    """One method on one simulator's volume, in this process; returns timings, Dice and memory."""
    import zarr

    import cryodask
    from cryodask.membranes import classical as C
    from cryodask.metrics.segmentation import segmentation_scores

    volume = np.load(folder / f"{simulator}.npy")
    truth = np.load(folder / f"{simulator}_truth.npy")
    params = C.ClassicalParams()
    spacing = (voxel_size,) * 3
    halo = C.halo(spacing, params)
    mean, std = float(volume.mean(dtype=np.float64)), float(volume.std(dtype=np.float64))
    out = {"method": method, "simulator": simulator, "cryodask": code_version(Path(cryodask.__file__).parent)}
    seconds = {}
    if method in ("skimage", "cryodask-score"):
        from skimage.feature import hessian_matrix, hessian_matrix_eigvals

        sigma = params.sigma() / voxel_size
        score = np.empty(volume.shape, np.float32)
        best = np.inf
        for _ in range(repeat):
            clock = time.perf_counter()
            for grown, inner, region in blocks_with_halo(volume.shape, chunks, halo):
                if method == "skimage":
                    x = (volume[grown] - np.float32(mean)) / np.float32(std)
                    h = hessian_matrix(x, sigma=sigma, mode="reflect", order="rc", use_gaussian_derivatives=True)
                    ev = hessian_matrix_eigvals(h)  # decreasing
                    score[region] = (ev[0] - np.abs(ev[1]))[inner]
                else:
                    score[region] = C.membrane_score(volume[grown], spacing, params, mean=mean, std=std)[inner]
            best = min(best, time.perf_counter() - clock)
        seconds["score"] = best
        clock = time.perf_counter()
        mask = thresholded(score, params)
        seconds["threshold_whole_volume"] = time.perf_counter() - clock
        work = seconds["score"]
    else:
        best = None
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            for _ in range(repeat):
                stats = C.classical_segment(lambda r: volume[r], volume.shape, spacing, chunks, params,
                                            f"{tmp}/score.zarr", f"{tmp}/mask.zarr", mean=mean, std=std)
                if best is None or sum(stats["seconds"].values()) < sum(best.values()):
                    best = dict(stats["seconds"])
            mask = zarr.open_array(f"{tmp}/mask.zarr", mode="r")[:]
        seconds = {"score": best["score"], "mask": best["mask"]}
        work = seconds["score"] + seconds["mask"]
    voxels = int(np.prod(volume.shape))
    scores = segmentation_scores(mask, truth)
    out.update(seconds=seconds, voxels=voxels, mvox_per_s=voxels / work / 1e6,
               score_mvox_per_s=voxels / seconds["score"] / 1e6,
               dice=scores["dice"], precision=scores["precision"], recall=scores["recall"],
               mask_fraction=float(np.mean(mask)),
               ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,256,256", help="z,y,x of each tomogram")
    parser.add_argument("--chunks", default="64,128,128", help="z,y,x of the blocks")
    parser.add_argument("--voxel-size", type=float, default=10.0)
    parser.add_argument("--snr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the best counts")
    parser.add_argument("--label", default="after", help="the rows' key in the JSON (before / after)")
    parser.add_argument("--before", help="a source tree of the code to compare with, run as label 'before'")
    parser.add_argument("--only", default=",".join(METHODS), help="methods to run, comma-separated")
    parser.add_argument("--out", default=str(HERE / "results" / "classical.json"))
    parser.add_argument("--_method", help=argparse.SUPPRESS)
    parser.add_argument("--_simulator", help=argparse.SUPPRESS)
    parser.add_argument("--_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunks = tuple(int(v) for v in args.chunks.split(","))
    if args._method:
        print(json.dumps(run_method(args._method, Path(args._folder), args._simulator, args.voxel_size, chunks,
                                    args.repeat)))
        return
    sys.path.insert(0, str(HERE))
    from measure import run_child

    shape = tuple(int(v) for v in args.shape.split(","))
    methods = [m for m in args.only.split(",") if m]
    trees = [(args.label, None)] + ([("before", str(Path(args.before).resolve()))] if args.before else [])
    rows = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        make_inputs(folder, shape, args.voxel_size, args.snr, args.seed)
        os.environ.update(ONE_THREAD)  # the children: one thread each
        for simulator in SIMULATORS:
            for method in methods:
                for label, tree in trees:
                    if tree and method == "skimage":
                        continue  # the same code either way
                    load = os.getloadavg()[0]
                    cmd = [sys.executable, __file__, "--_method", method, "--_simulator", simulator, "--_folder", tmp,
                           "--chunks", args.chunks, "--voxel-size", str(args.voxel_size), "--repeat", str(args.repeat)]
                    saved = os.environ.get("PYTHONPATH")
                    if tree:
                        os.environ["PYTHONPATH"] = tree  # the child imports that tree's cryodask
                    try:
                        row = run_child(cmd, method)
                    finally:
                        os.environ.pop("PYTHONPATH", None)
                        if saved is not None:
                            os.environ["PYTHONPATH"] = saved
                    row["load_before"] = load
                    rows[label].append(row)
                    print(f"{label:6} {simulator:26} {method:15} {row['mvox_per_s']:6.2f} Mvox/s "
                          f"(score {row['score_mvox_per_s']:6.2f})  Dice {row['dice']:.3f}  "
                          f"peak RSS {row['peak_rss_mb']:5.0f} MB  load {load:.1f}", flush=True)
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.exists() else {}
    for label, _ in trees:
        result.setdefault("runs", {})[label] = {
            "shape": shape, "chunks": chunks, "voxel_size": args.voxel_size, "snr": args.snr, "seed": args.seed,
            "repeat": args.repeat, "machine": f"{platform.node()} {os.cpu_count()} cores, one thread per method",
            "command": " ".join(sys.argv), "rows": rows[label]}
    result["ratios"] = ratios(result["runs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.2f}")


def ratios(runs: dict) -> dict:
    """Mvox/s of cryodask over skimage (each run), and after over before, per simulator."""
    def rate(label, simulator, method, key="mvox_per_s"):
        for row in runs.get(label, {}).get("rows", []):
            if row["simulator"] == simulator and row["method"] == method:
                return row[key]
        return None

    out = {}
    for simulator in SIMULATORS:
        for label in runs:
            sk = rate(label, simulator, "skimage") or rate("after", simulator, "skimage")  # run once per run
            for method in ("cryodask-score", "cryodask"):
                ours = rate(label, simulator, method)
                if sk and ours:
                    out[f"{label} {simulator} {method} / skimage"] = ours / sk
        for method in ("cryodask-score", "cryodask"):
            before, after = rate("before", simulator, method), rate("after", simulator, method)
            if before and after:
                out[f"{simulator} {method} after / before"] = after / before
        before, after = rate("before", simulator, "cryodask", "score_mvox_per_s"), rate("after", simulator, "cryodask",
                                                                                        "score_mvox_per_s")
        if before and after:
            out[f"{simulator} cryodask score pass after / before"] = after / before
    return out


if __name__ == "__main__":
    main()
