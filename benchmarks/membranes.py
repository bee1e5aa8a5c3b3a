"""ETSAM's two stages: cryodask's streamed, batched path against ETSAM's frame-by-frame loop.

Both run the same SAM2 models (seeded random weights saved as ETSAM checkpoints: random
weights cost exactly what real ones do) on the same tomogram, each in its own process:
  reference   ETSAM's procedure (``benchmarks/references.py``): whole tomogram and its
              N×3×S×S frames in RAM, the image encoder one frame at a time, every output kept
  cryodask    ``two_stage_column``: frames streamed from the OME-Zarr level 0, the encoder on
              ``--batch`` slices per call, logits streamed to zarr, bf16 autocast on CUDA
Reported: seconds, slices/s (both stages: 2 × Z slices per run), peak RSS of the process
(the models included), the ratios, and how far cryodask's logits are from the reference's.
Targets: >= 3x the reference's slices/s on the same GPU; peak host RAM flat in Z (< 4 GB).

    python benchmarks/membranes.py                                    # CPU: hiera-t, 256², 24 slices
    python benchmarks/membranes.py --config sam2.1_hiera_b+ --image-size 1024 --shape 64,928,960 --batch 16
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


def make_inputs(folder: Path, shape, config: str, image_size: int) -> None:
    """A synthetic tomogram (MRC + OME-Zarr) and two seeded random checkpoints in ETSAM's format."""
    import torch

    from cryodask.convert import ConvertParams, convert
    from cryodask.models.sam2 import build_predictor
    from cryodask.synth.tomogram import synth_tomogram
    from cryodask.io.mrc import write_mrc

    tomo = synth_tomogram(shape, voxel_size=10.0, seed=0, snr=0.5)
    write_mrc(folder / "tomo.mrc", tomo.volume, 10.0)
    convert([folder / "tomo.mrc"], folder, ConvertParams(chunks=(16, 256, 256), levels=1))
    for seed, name in ((1, "etsam_stage1_v1.pt"), (2, "etsam_stage2_v1.pt")):
        torch.manual_seed(seed)
        torch.save({"model": build_predictor(config, image_size=image_size).state_dict()}, folder / name)


def run_method(method: str, folder: Path, config: str, image_size: int, batch: int, device: str) -> dict:
    """One method in this process: returns timings and its peak RSS."""
    import torch
    import zarr

    from cryodask.engine.blocks import DoneMarks
    from cryodask.io.normalize import from_extremes
    from cryodask.io.volumes import ZarrReader
    from cryodask.membranes.etsam import EtsamParams, TiledLogits, two_stage_column
    from cryodask.models.sam2 import cached_predictor, pick_device
    from references import reference_two_stage

    device = pick_device(device)
    ckpts = [str(folder / f"etsam_stage{i}_v1.pt") for i in (1, 2)]
    level0 = zarr.open_array(str(folder / "tomo.zarr" / "0"), mode="r")
    shape = level0.shape
    models = [cached_predictor(config, c, device=device, image_size=image_size) for c in ckpts]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if method == "reference":
        from cryodask.io.mrc import read_region

        tomogram = np.asarray(read_region(folder / "tomo.mrc", np.s_[:, :, :]), dtype=np.float32)
        _, logits = reference_two_stage(*models, tomogram, grid_interval=50, device=device)
        np.save(folder / "reference_logits.npy", logits)
    else:
        import dask.array as da

        params = EtsamParams(config, stage1_checkpoint=ckpts[0], stage2_checkpoint=ckpts[1], image_size=image_size)
        data = da.from_zarr(level0)
        lo, hi = (float(v) for v in da.compute(data.min(), data.max(), scheduler="threads"))
        norm = from_extremes(params.normalize, lo, hi)
        marks = DoneMarks(folder / "marks", "bench", str(time.time_ns()))
        two_stage_column(ZarrReader(str(folder / "tomo.zarr" / "0"), "float32"), norm, shape[0], slice(0, shape[1]),
                         slice(0, shape[2]), params, str(folder / "logits"), marks, device=device, batch=batch)
        logits = TiledLogits(str(folder / "logits"), shape, None)[:]
        ref = np.load(folder / "reference_logits.npy")
        diff = float(np.abs(logits - ref).max())
        agree = float(((logits > -0.25) == (ref > -0.25)).mean())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"method": method, "seconds": seconds, "slices_per_s": 2 * shape[0] / seconds,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if method == "cryodask":
        out.update(max_abs_logit_diff=diff, mask_agreement=agree)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="24,192,192", help="z,y,x of the tomogram")
    parser.add_argument("--config", default="sam2.1_hiera_t")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all cores)")
    parser.add_argument("--out", default=str(HERE / "results" / "membranes.json"))
    parser.add_argument("--_method", help=argparse.SUPPRESS)
    parser.add_argument("--_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._method:
        print(json.dumps(run_method(args._method, Path(args._folder), args.config, args.image_size, args.batch,
                                    args.device)))
        return
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        make_inputs(folder, shape, args.config, args.image_size)
        rows = []
        for method in ("reference", "cryodask"):  # the reference first: cryodask compares with its logits
            cmd = [sys.executable, __file__, "--_method", method, "--_folder", str(folder), "--config", args.config,
                   "--image-size", str(args.image_size), "--batch", str(args.batch), "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref, ours = rows
    result = {
        "shape": shape, "config": args.config, "image_size": args.image_size, "batch": args.batch,
        "device": args.device, "machine": f"{platform.node()} {os.cpu_count()} cores", "rows": rows,
        "speedup": ref["seconds"] / ours["seconds"], "rss_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"],
    }
    print(f"{'method':10} {'seconds':>9} {'slices/s':>9} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['method']:10} {row['seconds']:9.1f} {row['slices_per_s']:9.2f} {row['peak_rss_mb']:12.0f}")
    print(f"speed-up {result['speedup']:.2f}x, RSS ratio {result['rss_ratio']:.2f}; "
          f"max |logit diff| {ours['max_abs_logit_diff']:.2e}, mask agreement {ours['mask_agreement']:.6f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
