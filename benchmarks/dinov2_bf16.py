"""What DINOv2 in bf16 changes: the same features store computed in float32 and under bf16
autocast (as ``models/dinov2.patch_maps`` runs on CUDA), on the CPU, and the query's detections.

DINOv2 runs in bf16 on CUDA (CryoSAM's code runs it in float32). No GPU is needed to see what
that does to the picks: CPU autocast to bf16 rounds the same matrix products the same way
(8-bit mantissa inputs, float32 accumulation). A random DINOv2 with registers (518², 37×37
patches, ``--hidden`` channels, 2 layers) on cryodask's synthetic 64×256×256 tomogram; the
query is the feature at the first particle, taken from each store; matching with CryoSAM's
defaults (and ``--sim-threshold``). Reported: the features' relative difference per vector,
the detections of each and the share of float32's that bf16 returns at the same voxel and
within one grid step (4 voxels), and the largest score difference of the shared ones.

    python benchmarks/dinov2_bf16.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def store(tomogram: Path, out: Path, model: Path, bf16: bool) -> Path:
    """``extract_features`` with DINOv2 in float32 or under CPU bf16 autocast (in-process workers,
    so the autocast around ``patch_maps`` reaches them)."""
    import torch
    from distributed import Client, LocalCluster

    import cryodask.models.dinov2 as dinov2
    from cryodask.prompting.features import FeatureParams, extract_features

    plain = dinov2.patch_maps

    def patch_maps(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return plain(*args, **kwargs).float()

    dinov2.patch_maps = patch_maps
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            return extract_features(tomogram, out, FeatureParams(checkpoint=str(model)), client=client, device="cpu")
    finally:
        dinov2.patch_maps = plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--sim-threshold", type=float, default=0.5)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    from features_store import make_model

    from cryodask.io.mrc import write_mrc
    from cryodask.metrics.picking import match_picks
    from cryodask.prompting.features import open_features
    from cryodask.prompting.matching import MatchParams, match
    from cryodask.synth import synth_tomogram

    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "dinov2", args.hidden)
        t = synth_tomogram((64, 256, 256), voxel_size=10.0, seed=1)
        write_mrc(tmp / "t.mrc", t.volume, voxel_size=10.0)
        voxel = tuple(int(v) // 4 for v in t.particles[0])
        stores = {name: open_features(store(tmp / "t.mrc", tmp / f"{name}.zarr", model, name == "bf16"))
                  for name in ("float32", "bf16")}
        a, b = stores["float32"][4][:], stores["bf16"][4][:]
        rel = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(a, axis=-1), 1e-12)
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        picks = {}
        for name, features in stores.items():
            query = features[4][voxel]
            picks[name] = match(features, query, MatchParams(sim_threshold=args.sim_threshold))
    p32, p16 = (picks[n][["z", "y", "x"]].to_numpy(float) for n in ("float32", "bf16"))
    same = match_picks(p16, p32, 0)
    shared = {tuple(r[:3]): r[3] for r in picks["bf16"][["z", "y", "x", "score"]].to_numpy()}
    diffs = [abs(s - shared[tuple(r)]) for r, s in zip(p32, picks["float32"]["score"]) if tuple(r) in shared]
    result = {"hidden": args.hidden, "shape": [64, 256, 256],
              "feature_relative_difference": {"median": float(np.median(rel)), "max": float(rel.max())},
              "feature_cosine_min": float(cos.min()),
              "detections": {"float32": len(p32), "bf16": len(p16)},
              "recall_of_float32_same_voxel": same.recall if len(p32) else 1.0,
              "recall_of_float32_within_4": match_picks(p16, p32, 4).recall if len(p32) else 1.0,
              "max_score_difference_shared": float(max(diffs)) if diffs else None}
    print(json.dumps(result, indent=2))
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "dinov2_bf16.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
