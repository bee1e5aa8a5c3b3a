"""Feature stores: bytes per voxel per channel, and matching, before and after patch maps.

"Before" is cryodask at ``--before`` (default 261c20e: float16 grids of every ratio and view,
zarr's default codec), run from a git worktree of that commit; "after" is this checkout
(patch maps sampled on read, ``cryodask.prompting.features``). Both run the same random
DINOv2 (with registers, 518² input: 37×37 patches, ``--hidden`` channels, 2 layers) on the
same tomograms, each in its own process:

  synth       cryodask's own generator, 64×256×256 (the size the issue measured), particles
  noise-big   smoothed noise at ``--big`` (default 300×928×928: a real tomogram's size);
              "after" only unless ``--big-before`` (the grids are ~9 GB at 384 channels)
  cylindra    a real tomogram crop (36×206×94, bright), ``../shared/data/tomograms``
  serialem    a real int8 tomogram crop (78×64×32), ``../shared/data/mrc``

For each: bytes on disk of the store divided by voxels × channels per view; the query is the
feature at the first particle (synth) or the centre voxel; matching with CryoSAM's defaults
(hierarchical, threshold 0.5, NMS 5, top 512) and ``--sim-threshold`` -1 (every detection).
"recall" is the share of "before"'s detections that "after" returns at the same voxel, and
within one grid step (4 voxels). After, on the same store: hierarchical (scored from the
query's projection) against naive matching of the sampled vectors (every ratio-4 point, as
CryoSAM and cryodask before scored), and exhaustive matching (every ratio-4 point scored from
the projection: naive's detections, exactly), seconds, speed-up and recall of naive's
detections scoring >= the threshold.

    python benchmarks/features_store.py            # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data"


def make_model(folder: Path, hidden: int) -> Path:
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=hidden, num_hidden_layers=2,
                                       num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                                       patch_size=14, image_size=518,
                                       num_register_tokens=4)
    Dinov2WithRegistersModel(config).eval().save_pretrained(folder)
    return folder


def inputs(tmp: Path, big) -> dict:
    """name -> (path, query voxel, truth or None)."""
    from cryodask.io.mrc import write_mrc
    from cryodask.synth import synth_tomogram

    cases = {}
    t = synth_tomogram((64, 256, 256), voxel_size=10.0, seed=1)
    write_mrc(tmp / "synth.mrc", t.volume, voxel_size=10.0)
    cases["synth"] = (tmp / "synth.mrc", tuple(int(v) for v in t.particles[0]), t.particles)
    if big is not None:
        cases["noise-big"] = (big_volume(tmp / "noise-big.mrc", big), tuple(n // 2 for n in big), None)
    for name, path in (("cylindra", DATA / "tomograms" / "cylindra_13pf_MT.tif"),
                       ("serialem", DATA / "mrc" / "serialem-int8-3d.mrc")):
        if path.exists():
            from cryodask.io.volumes import open_volume

            shape = open_volume(path).shape
            cases[name] = (path, tuple(n // 2 for n in shape), None)
    return cases


def big_volume(path: Path, shape) -> Path:
    """Smoothed noise of a real tomogram's size, written a slab at a time (the generator would
    need the whole volume, and its arrays, in RAM): the store's size depends on the shape alone."""
    import mrcfile
    from scipy import ndimage

    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(path, shape=tuple(shape), mrc_mode=2, overwrite=True) as mrc:
        for z in range(0, shape[0], 16):
            slab = rng.normal(size=(min(16, shape[0] - z), *shape[1:])).astype(np.float32)
            mrc.data[z:z + len(slab)] = ndimage.gaussian_filter(slab, (0, 2, 2))
        mrc.voxel_size = 10.0
    return path


# ------------------------------------------------------------------ one version, in a child process

def child(path: str, store: str, model: str, voxel: tuple, threshold: float) -> dict:
    """Write the store (timed), then match at the voxel's query with both matchings."""
    import torch  # noqa: F401  (loaded before any timing: the model needs it anyway)

    from cryodask.prompting.features import FeatureParams, extract_features, open_features
    from cryodask.prompting.matching import MatchParams, match

    start = time.perf_counter()
    extract_features(path, store, FeatureParams(checkpoint=model), device="cpu")
    written = time.perf_counter() - start
    features = open_features(store)
    query = np.asarray(features[4][tuple(v // 4 for v in voxel)], np.float32)
    import cryodask

    out = {"module": cryodask.__file__, "write_seconds": written,
           "bytes": sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()),
           "channels": features[4].shape[3] // 3}
    runs = [("hierarchical", MatchParams(sim_threshold=threshold), features),
            ("naive-vectors", MatchParams(sim_threshold=threshold, matching="naive"), dict(features))]
    if hasattr(features, "project"):  # every point scored from the projection (patch-map stores)
        runs.append(("exhaustive", MatchParams(sim_threshold=threshold, matching="naive"), features))
    for name, params, pyramid in runs:
        start = time.perf_counter()
        df = match(pyramid, query, params)
        out[name] = {"seconds": time.perf_counter() - start, "detections": df[["z", "y", "x"]].to_numpy().tolist(),
                     "scores": df["score"].tolist()}
    return out


def run_version(pythonpath: str, path, store, model, voxel, threshold, naive: bool = True) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from features_store import child; "
            f"print(json.dumps(child({str(path)!r}, {str(store)!r}, {str(model)!r}, {tuple(voxel)!r}, {threshold})))")
    env = {**os.environ, "PYTHONPATH": pythonpath}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                            cwd=Path(store).parent)  # not this checkout: PYTHONPATH says which cryodask runs
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def recall(before, after, radius) -> float:
    from cryodask.metrics.picking import match_picks

    if not len(before):
        return 1.0
    return match_picks(np.asarray(after, float).reshape(-1, 3), np.asarray(before, float).reshape(-1, 3),
                       radius).recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="261c20e", help="the commit to compare with")
    parser.add_argument("--hidden", type=int, default=384, help="channels per view of the random DINOv2")
    parser.add_argument("--big", default="300,928,928", help="the large synthetic tomogram; 'none' to skip")
    parser.add_argument("--big-before", action="store_true", help="also write the large one with --before")
    parser.add_argument("--sim-threshold", type=float, default=0.5)
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    big = None if args.big == "none" else tuple(int(v) for v in args.big.split(","))
    rows = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        worktree = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
        try:
            model = make_model(tmp / "dinov2", args.hidden)
            for name, (path, voxel, truth) in inputs(tmp, big).items():
                if args.cases and name not in args.cases.split(","):
                    continue
                after = run_version(str(ROOT), path, tmp / f"{name}_after.zarr", model, voxel, args.sim_threshold)
                row = {"shape": list(_shape(path)), "query_voxel": list(voxel)}
                voxels = int(np.prod(row["shape"]))
                row["after"] = _summary(after, voxels)
                if name != "noise-big" or args.big_before:
                    before = run_version(str(worktree), path, tmp / f"{name}_before.zarr", model, voxel,
                                         args.sim_threshold)
                    row["before"] = _summary(before, voxels)
                    row["bytes_ratio"] = before["bytes"] / after["bytes"]
                    b, a = before["hierarchical"]["detections"], after["hierarchical"]["detections"]
                    row["recall_of_before_same_voxel"] = recall(b, a, 0)
                    row["recall_of_before_within_4"] = recall(b, a, 4)
                a = after
                naive = _confident(a["naive-vectors"], args.sim_threshold)
                row["after_hier_vs_naive"] = {
                    "speedup": a["naive-vectors"]["seconds"] / a["hierarchical"]["seconds"],
                    "recall_of_naive_within_4": recall(naive, a["hierarchical"]["detections"], 4)}
                row["after_exhaustive_vs_naive"] = {
                    "speedup": a["naive-vectors"]["seconds"] / a["exhaustive"]["seconds"],
                    "recall_of_naive_same_voxel": recall(naive, a["exhaustive"]["detections"], 0)}
                if truth is not None:
                    from cryodask.metrics.picking import match_picks

                    picks = np.asarray(a["hierarchical"]["detections"], float).reshape(-1, 3)
                    row["after_recall_vs_truth_r8"] = match_picks(picks, truth, 8).recall
                rows[name] = row
                print(name, json.dumps({k: v for k, v in row.items() if k not in ("before", "after")}),
                      json.dumps({k: {x: y for x, y in v.items() if not isinstance(y, dict)}
                                  for k, v in row.items() if k in ("before", "after")}), file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           check=False, capture_output=True)
    print(f"{'case':<10} {'shape':>14} {'B/vox/ch before':>15} {'after':>8} {'smaller':>7} {'rec same':>8} "
          f"{'rec ±4':>6} {'hier s':>7} {'naive s':>7} {'speed-up':>8} {'exhaust s':>9} {'speed-up':>8} {'rec':>5}")
    for name, r in rows.items():
        b = r.get("before", {})
        before = b.get("bytes_per_voxel_channel", float("nan"))
        print(f"{name:<10} {'x'.join(map(str, r['shape'])):>14} {before:>15.4f} "
              f"{r['after']['bytes_per_voxel_channel']:>8.4f} {r.get('bytes_ratio', float('nan')):>6.1f}x "
              f"{r.get('recall_of_before_same_voxel', float('nan')):>8.3f} "
              f"{r.get('recall_of_before_within_4', float('nan')):>6.3f} {r['after']['hierarchical_seconds']:>7.2f} "
              f"{r['after']['naive_vectors_seconds']:>7.2f} {r['after_hier_vs_naive']['speedup']:>7.1f}x "
              f"{r['after']['exhaustive_seconds']:>9.2f} {r['after_exhaustive_vs_naive']['speedup']:>7.1f}x "
              f"{r['after_exhaustive_vs_naive']['recall_of_naive_same_voxel']:>5.3f}")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "features_store.json").write_text(json.dumps(
        {"before": args.before, "hidden": args.hidden, "cpus": os.cpu_count(), "cases": rows}, indent=2))


def _confident(run: dict, threshold: float) -> list:
    """Naive matching's detections scoring at least the threshold (hierarchical drops the rest)."""
    return [d for d, s in zip(run["detections"], run["scores"]) if s >= threshold]


def _shape(path):
    from cryodask.io.volumes import open_volume

    return open_volume(path).shape


def _summary(run: dict, voxels: int) -> dict:
    return {"module": run["module"], "bytes": run["bytes"], "channels": run["channels"],
            "bytes_per_voxel_channel": run["bytes"] / (voxels * run["channels"]),
            "write_seconds": run["write_seconds"], "hierarchical_seconds": run["hierarchical"]["seconds"],
            "naive_vectors_seconds": run["naive-vectors"]["seconds"],
            "exhaustive_seconds": run.get("exhaustive", {}).get("seconds"),
            "detections": len(run["hierarchical"]["detections"])}


if __name__ == "__main__":
    main()
