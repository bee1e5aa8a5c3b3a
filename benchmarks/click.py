"""Click to mask: how long the napari widget's click takes to come back as an instance, through
its Session on a LocalCluster, against the same segmentation run in-process (what a user would
run without the cluster: ``segment_instances`` / ``click_instance`` called directly).

SAM2 is hiera-t with random weights at its own 1024 px input (the tiny config), on the CPU unless
a GPU is there. Random weights rarely pass CryoSAM's filters, so a click would stop at its three
prompted slices; to time the work a trained model does, the filters are opened (any candidate
passes) and each view propagates half a diameter each way, as far as a trained model goes
through a particle. Per particle: a first click, then a refining one (a negative click beside
it), which the worker's kept slice embeddings serve. Writes benchmarks/results/click.json.

    python benchmarks/click.py [--shape 64,128,128] [--clicks 4] [--image-size 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cryodask.models.sam2_slices import LOGIT_CLAMP
from cryodask.picking.params import CryosamParams
from cryodask.prompting.params import SelfPromptParams

RESULTS = Path(__file__).parent / "results"


class Propagating(CryosamParams):
    """CryoSAM's parameters with the filters opened, so random SAM2 propagates as a trained one would."""

    def self_prompt(self, voxel_size: float) -> SelfPromptParams:
        return SelfPromptParams(iou_threshold=0.0, score_threshold=-1.0, logit_threshold=-LOGIT_CLAMP,
                                max_area=10**9, max_extent=math.ceil(self.diameter / voxel_size / 2),
                                diameter_voxels=self.diameter / voxel_size)


def weights_folder(folder: Path, image_size: int) -> Path:
    """Random hiera-t SAM2 and a small random DINOv2, saved as the checkpoints CryoSAM loads."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from cryodask.models.sam2 import build_predictor

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": build_predictor("sam2.1_hiera_t", image_size=image_size).state_dict()},
               folder / "sam2.1_hiera_tiny.pt")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(folder / "dinov2-large")
    return folder


def seconds(job, what: str = "") -> float:
    job.future.result()
    if what:
        print(f"{what}: {job.seconds:.2f} s", flush=True)
    return job.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,128,128")
    parser.add_argument("--clicks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=None, help="local workers (default: the widget's, one "
                                                                  "with every core)")
    args = parser.parse_args()
    import torch

    from cryodask.napari.session import Session
    from cryodask.picking.params import pick_params
    from cryodask.prompting.classical import click_instance
    from cryodask.prompting.selfprompt import segment_instances
    from cryodask.synth.tomogram import synth_tomogram

    shape = tuple(int(v) for v in args.shape.split(","))
    synth = synth_tomogram(shape, voxel_size=10.0, seed=4)
    clicks = synth.particles[np.argsort(synth.kinds, kind="stable")][: args.clicks]
    diameters = [synth.diameters_A[k] for k in np.sort(synth.kinds, kind="stable")[: args.clicks]]
    folder = Path(tempfile.mkdtemp())
    path = folder / "tomo.mrc"
    import mrcfile

    with mrcfile.new(path) as mrc:
        mrc.set_data(synth.volume)
        mrc.voxel_size = 10.0
    weights = weights_folder(folder / "weights", args.image_size)
    params = pick_params("cryosam", weights=weights, config="sam2.1_hiera_t", image_size=args.image_size,
                         feature_image_size=56, diameter=250)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"shape": shape, "image_size": args.image_size, "device": device, "workers": args.workers,
              "cpu": platform.processor() or platform.machine(), "clicks": len(clicks)}

    session = Session(params=Propagating(**dataclasses.asdict(params)), out=folder / "out", diameter=250,
                      device=device)
    session.connect("local", workers=args.workers)
    session.open(path)
    sam, refine, slices = [], [], []
    for c in clicks:
        sam.append(seconds(session.segment([c]), "SAM2 click through the widget's session"))
        cap = math.ceil(250 / 10.0 / 2)  # the slices a click encodes: half a diameter each way, 3 views
        slices.append(int(sum(min(n - 1, round(v) + cap) - max(0, round(v) - cap) + 1 for v, n in zip(c, shape))))
        refine.append(seconds(session.segment([c], [c + np.array([0.0, 0.0, 6.0])]), "  refining click"))
    session.params = None  # the weight-free path on the same session
    classical = []
    for c, d in zip(clicks, diameters):
        session.diameter = d
        classical.append(seconds(session.segment([c])))
    session.close()

    read, sp = (lambda r: synth.volume[r]), Propagating(**dataclasses.asdict(params)).self_prompt(10.0)
    from cryodask.io.normalize import robust_range

    value_range = robust_range(read, shape)
    direct = []
    for c in clicks:
        clock = time.perf_counter()
        segment_instances(read, shape, [c], sp, config=params.config, checkpoint=params.sam_checkpoint,
                          image_size=args.image_size, device=device, value_range=value_range)
        direct.append(time.perf_counter() - clock)
        print(f"SAM2 click in-process: {direct[-1]:.2f} s", flush=True)
    direct_classical = []
    for c, d in zip(clicks, diameters):
        clock = time.perf_counter()
        click_instance(read, shape, (10.0,) * 3, c, d)
        direct_classical.append(time.perf_counter() - clock)
    result.update({
        "sam2_widget_s": sam, "sam2_refine_widget_s": refine, "sam2_in_process_s": direct,
        "slices_per_click": slices,
        "sam2_refine_median_widget_s": float(np.median(refine)),
        "classical_widget_s": classical, "classical_in_process_s": direct_classical,
        "sam2_warm_median_widget_s": float(np.median(sam[1:])),
        "sam2_warm_median_in_process_s": float(np.median(direct[1:])),
        "classical_median_widget_s": float(np.median(classical[1:])),
        "classical_median_in_process_s": float(np.median(direct_classical[1:]))})
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "click.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
