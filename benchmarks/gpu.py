"""The one GPU check: every GPU path of cryodask on one machine, in one run, into one JSON.

  sam2        ``benchmarks/membranes.py``: ETSAM's two stages (hiera-b+, 1024², seeded random
              weights saved as ETSAM checkpoints), cryodask's batched path against ETSAM's
              frame-by-frame loop: slices/s, peak host and GPU memory, largest logit difference
  dinov2      ``extract_features`` with a ViT-L/14-with-registers network (CryoSAM's
              ``dinov2_vitl14_reg`` shape, random weights) on the GPU: slices/s, peak GPU memory
  components  CuPy against CPU connected components of the same blocks: identical partitions,
              speed-up
  dask-cuda   ``cryodask membranes --method etsam --cluster cuda`` on two tomograms (a
              ``LocalCUDACluster``, one worker per GPU with the resource GPU=1)

Sized to finish in under 8 minutes on one H100. ``--dry-run`` runs the same steps at tiny sizes
on the CPU (hiera-t at 128², a 2-layer DINOv2, ``--cluster local``; CuPy is reported as
skipped where it is missing): the tests run it, so the script is known to work before a GPU
is lent. ``benchmarks/gpu.sh`` installs carried wheels first (../.library/device/README.md).

    python benchmarks/gpu.py --out gpu.json          # on the GPU machine
    python benchmarks/gpu.py --dry-run --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FULL = {"sam2": ["--config", "sam2.1_hiera_b+", "--image-size", "1024", "--shape", "32,512,512", "--batch", "16",
                 "--device", "cuda"],
        "dinov2": {"shape": (64, 512, 512), "hidden": 1024, "layers": 24, "heads": 16, "image_size": 518,
                   "batch": None, "device": "cuda"},  # None: from the free GPU memory (models/batching.py)
        "components": {"shape": (128, 1024, 1024), "block": (64, 256, 256)},
        "cluster": {"shape": (32, 512, 512), "config": "sam2.1_hiera_b+", "image_size": 1024, "cluster": "cuda",
                    "device": "cuda"}}
DRY = {"sam2": ["--config", "sam2.1_hiera_t", "--image-size", "128", "--shape", "16,64,64", "--batch", "2",
                "--device", "cpu"],
       "dinov2": {"shape": (16, 64, 64), "hidden": 64, "layers": 2, "heads": 2, "image_size": 56, "batch": 4,
                  "device": "cpu"},
       "components": {"shape": (32, 128, 128), "block": (16, 64, 64)},
       "cluster": {"shape": (16, 64, 64), "config": "sam2.1_hiera_t", "image_size": 128, "cluster": "local",
                   "device": "cpu"}}


def sam2(folder: Path, args: list[str]) -> dict:
    out = folder / "membranes.json"
    subprocess.run([sys.executable, str(HERE / "membranes.py"), *args, "--out", str(out)], check=True,
                   capture_output=True, text=True)
    result = json.loads(out.read_text())
    ref, ours = result["rows"]
    return {"config": result["config"], "image_size": result["image_size"], "shape": result["shape"],
            "batch": result["batch"], "device": result["device"],
            "etsam_loop": {k: ref.get(k) for k in ("seconds", "slices_per_s", "peak_rss_mb", "peak_gpu_mb")},
            "cryodask": {k: ours.get(k) for k in ("seconds", "slices_per_s", "peak_rss_mb", "peak_gpu_mb")},
            "speedup": result["speedup"], "max_abs_logit_diff": ours["max_abs_logit_diff"],
            "mask_agreement": ours["mask_agreement"]}


def dinov2(folder: Path, s: dict) -> dict:
    import torch
    from distributed import Client, LocalCluster
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from cryodask.io.mrc import write_mrc
    from cryodask.prompting.features import FeatureParams, extract_features, plan_tasks

    torch.manual_seed(0)
    model = folder / "dinov2"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=4 * s["hidden"], patch_size=14, image_size=s["image_size"],
        num_register_tokens=4)).save_pretrained(model)
    volume = np.random.default_rng(0).normal(size=s["shape"]).astype(np.float32)
    write_mrc(folder / "tomo.mrc", volume, 10.0)
    params = FeatureParams(checkpoint=str(model), image_size=s["image_size"], batch=s["batch"])
    slices = sum(len(t.slices) for t in plan_tasks(s["shape"], params))
    cuda = s["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        start = time.perf_counter()
        extract_features(folder / "tomo.mrc", folder / "features.zarr", params, client=client, device=s["device"])
        seconds = time.perf_counter() - start
    from cryodask.models import batching

    chosen = {k[0]: v for k, v in batching._CHOSEN.items()}  # in-process worker: the batch it chose
    return {"model": f"ViT hidden {s['hidden']}, {s['layers']} layers, registers", "shape": s["shape"],
            "batch_chosen": chosen.get("dinov2"),
            "image_size": s["image_size"], "batch": s["batch"], "device": s["device"], "slices": slices,
            "seconds": seconds, "slices_per_s": slices / seconds,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "note": "bf16 autocast on CUDA (models/dinov2.patch_maps); the time includes the mean/std pass"}


def components(s: dict) -> dict:
    from scipy import ndimage

    from cryodask.postprocess.components import label_block

    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.normal(size=s["shape"]).astype(np.float32), 2) > 0.05
    blocks = [mask[z:z + s["block"][0], y:y + s["block"][1], x:x + s["block"][2]]
              for z in range(0, s["shape"][0], s["block"][0]) for y in range(0, s["shape"][1], s["block"][1])
              for x in range(0, s["shape"][2], s["block"][2])]
    start = time.perf_counter()
    cpu = [label_block(b, 26, "cpu") for b in blocks]
    out = {"shape": s["shape"], "block": s["block"], "blocks": len(blocks), "cpu_seconds": time.perf_counter() - start}
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  (no CuPy, or no GPU: said, not failed)
        return {**out, "gpu": f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    label_block(blocks[0], 26, "cuda")  # kernels compiled outside the timing
    start = time.perf_counter()
    gpu = [label_block(b, 26, "cuda") for b in blocks]
    out["gpu_seconds"] = time.perf_counter() - start
    out["speedup"] = out["cpu_seconds"] / out["gpu_seconds"]
    out["identical_partitions"] = all(same_partition(a[0], b[0]) for a, b in zip(cpu, gpu))
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the foreground alike (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def cluster_run(folder: Path, s: dict) -> dict:
    sys.path.insert(0, str(HERE))
    from membranes import make_inputs

    make_inputs(folder, s["shape"], s["config"], s["image_size"])
    tomos = folder / "tomos"
    tomos.mkdir()
    for i in range(2):
        shutil.copy(folder / "tomo.mrc", tomos / f"t{i}.mrc")
    cmd = [sys.executable, "-m", "cryodask", "membranes", str(tomos), "--out", str(folder / "out"), "--method",
           "etsam", "--stage1-checkpoint", str(folder / "etsam_stage1_v1.pt"), "--stage2-checkpoint",
           str(folder / "etsam_stage2_v1.pt"), "--model-config", s["config"], "--image-size", str(s["image_size"]),
           "--cluster", s["cluster"], "--device", s["device"]]
    if s["cluster"] == "local":
        cmd += ["--workers", "1"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    masks = sorted(p.name for p in (folder / "out").glob("*_predicted_mask.mrc"))
    return {"cluster": s["cluster"], "device": s["device"], "tomograms": 2, "shape": s["shape"],
            "seconds": time.perf_counter() - start, "exit_code": done.returncode, "masks": masks,
            "stderr_tail": done.stderr[-500:] if done.returncode else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    parser.add_argument("--only", default="sam2,dinov2,components,cluster")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    result = {"dry_run": args.dry_run, "machine": f"{platform.node()} {os.cpu_count()} cores", "steps": {}}
    try:
        import torch

        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        result["torch"] = torch.__version__
    except ImportError:
        result["gpu"] = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        for name in args.only.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            clock = time.perf_counter()
            try:
                step = {"sam2": lambda: sam2(folder, sizes["sam2"]), "dinov2": lambda: dinov2(folder, sizes["dinov2"]),
                        "components": lambda: components(sizes["components"]),
                        "cluster": lambda: cluster_run(folder, sizes["cluster"])}[name]()
            except subprocess.CalledProcessError as exc:
                step = {"error": f"{exc.cmd[1]} exited {exc.returncode}: {exc.stderr[-800:]}"}
            except Exception as exc:  # noqa: BLE001  (one step failing still reports the others)
                step = {"error": f"{type(exc).__name__}: {exc}"}
            step["step_seconds"] = time.perf_counter() - clock
            result["steps"][name] = step
            print(f"{name}: {json.dumps(step)[:400]}", file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 1 if any("error" in s for s in result["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
