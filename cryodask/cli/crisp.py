"""``cryodask crisp train|predict``: CRISP micrograph segmentation, dense-CRF refinement and
particle extraction."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS, cluster_session

crisp_app = typer.Typer(help="CRISP: segment particles in micrographs (network + loss of your choice), "
                             "refine with a dense CRF, extract particle coordinates.", no_args_is_help=True)
app.add_typer(crisp_app, name="crisp")


def _widths(text: str | None):
    from ..errors import InputError

    if text is None:
        return None
    try:
        widths = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise InputError(f"--widths must be positive integers separated by commas, got {text!r}")
    return widths


@crisp_app.command("train")
def train_command(
    micrographs: list[Path] = typer.Option(..., "--micrographs", help="Micrograph files, folders, globs or a STAR "
                                                                      "listing them (repeatable)."),
    out: Path = typer.Option(..., "--out",
                             help="Model folder: model.pt, config.json, training_log.json, loss_curve.png."),
    particles: Path = typer.Option(None, "--particles", help="Coordinates (STAR/.box/.coords/.csv file or folder); "
                                                             "labels are disks of --diameter."),
    diameter: float = typer.Option(None, "--diameter",
                                   help="Particle diameter in full-resolution pixels (with --particles)."),
    masks: Path = typer.Option(None, "--masks",
                               help="Folder of <name>_mask.png/.jpg/.mrc label masks (instead of --particles)."),
    flip_y: str = typer.Option("no", "--flip-y", metavar="no|yes|auto",
                               help="The coordinates' y counts from the bottom (CryoPPP STAR, autopick-bc .box): no | "
                                    "yes | auto (decided from the images, and said)."),
    pixel_size: float = typer.Option(None, "--pixel-size",
                                     help="Å/px of the micrographs (default: from their headers; JPEG/PNG have none)."),
    checks: bool = typer.Option(True, "--checks/--no-checks", help="Refuse coordinates that look y-flipped."),
    model: str = typer.Option("unet", "--model", help="unet | deeplab (DeepLabV3+-style ASPP network)."),
    loss: str = typer.Option("dice", "--loss",
                             help="dice | ce (label smoothing 0.1) | jaccard | tversky (focal) | lovasz."),
    widths: str = typer.Option(None, "--widths", help="Channels per level, e.g. 16,32,64,128 (default per model)."),
    bin: int = typer.Option(1, "--bin", help="Bin micrographs (and labels) by this integer factor first."),
    epochs: int = typer.Option(50, "--epochs"),
    crop: int = typer.Option(256, "--crop", help="Random square crop side, binned pixels."),
    batch_size: int = typer.Option(4, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate of the one-cycle schedule (Adam)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(None, "--threads",
                                help="Torch threads (default: one per core; 1 is faster on a busy machine)."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Train a segmentation network from particle coordinates or masks: the cluster reads, labels
    and bins the micrographs (one task each), the network trains here."""
    from ..engine.cluster import check_spec
    from ..errors import InputError
    from ..io.folders import check_output_dir
    from ..engine.lock import output_lock
    from ..micrographs.crisp.train import TrainParams, check_labels, train

    check_spec(cluster)
    params = TrainParams(model=model, loss=loss, widths=_widths(widths), bin=bin, epochs=epochs, crop=crop,
                         batch_size=batch_size, lr=lr, seed=seed)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    from ..micrographs.autopick.checks import parse_flip

    flip_y = parse_flip(flip_y)
    check_labels(micrographs, particles=particles, masks=masks, diameter=diameter, flip_y=flip_y == "yes", quiet=True)
    out = check_output_dir(out)
    from ..report import run_report

    with (output_lock(out, "crisp train"),
          cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client,
          run_report(report_dir, client, command="crisp train", echo=typer.echo)):
        result = train(micrographs, out, particles=particles, masks=masks, diameter=diameter, flip_y=flip_y,
                       params=params, threads=threads, log=typer.echo, pixel_size=pixel_size, checks=checks,
                       client=client)
    typer.echo(f"trained {model} + {loss} on {result.micrographs} micrograph(s) in {result.seconds:.1f} s; "
               f"final loss {result.losses[-1]:.4f}")
    typer.echo(f"wrote {result.model_dir}")


def _sampling_note(model: Path, micrographs) -> None:
    """Say which micrographs are rescaled to the model's pixel size, or which size is assumed."""
    import json

    from ..micrographs.autopick.inputs import micrograph_set
    from ..micrographs.autopick.score import sampling_note

    try:
        pixel = json.loads((Path(model) / "config.json").read_text()).get("pixel_size")
    except (OSError, ValueError, AttributeError):
        pixel = None
    sampling_note(pixel, micrograph_set(micrographs), echo=typer.echo)


@crisp_app.command("predict")
def predict_command(
    model: Path = typer.Option(..., "--model", help="Model folder written by cryodask crisp train."),
    micrographs: list[Path] = typer.Option(..., "--micrographs", help="Micrograph files, folders, globs or a STAR "
                                                                      "listing them (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    crf: str = typer.Option("auto", "--crf", help="auto | on | off: refine the mask with a dense CRF; auto: with the "
                                                 "settings crisp train chose, only if they raised its training IoU "
                                                 "(any --crf-* setting means on). Without --crf-* settings, the CRF "
                                                 "settings crisp train chose; with some, CRISP's default for the "
                                                 "others."),
    no_crf: bool = typer.Option(False, "--no-crf", hidden=True, help="Same as --crf off."),
    crf_features: str = typer.Option(None, "--crf-features",
                                     help="image | logits: the bilateral kernel's feature (CRISP's default: image)."),
    crf_iterations: int = typer.Option(None, "--crf-iterations", help="Mean-field iterations (CRISP's default: 5)."),
    crf_sxy: float = typer.Option(None, "--crf-sxy",
                                  help="Bilateral spatial std, pixels of the binned grid (CRISP's default: 160)."),
    crf_srgb: float = typer.Option(None, "--crf-srgb", help="Bilateral feature std, feature scaled to 0–255 by its "
                                                            "1–99th percentiles (CRISP's default: 13)."),
    crf_compat: float = typer.Option(None, "--crf-compat", help="Bilateral Potts weight (CRISP's default: 1)."),
    crf_gaussian_sxy: float = typer.Option(None, "--crf-gaussian-sxy",
                                           help="Smoothness kernel spatial std, binned pixels (CRISP's default: 3)."),
    crf_gaussian_compat: float = typer.Option(None, "--crf-gaussian-compat",
                                              help="Smoothness kernel Potts weight (CRISP's default: 1)."),
    extract: str = typer.Option("peaks", "--extract",
                                help="components (centroids, area filter) | peaks (distance-transform maxima)."),
    diameter: float = typer.Option(None, "--diameter",
                                   help="Particle diameter, full-resolution pixels (default: the model's)."),
    probability: bool = typer.Option(False, "--probability", help="Also write <name>_probability.mrc (binned grid)."),
    tile: int = typer.Option(512, "--tile", help="Inference tile side, binned pixels."),
    overlap: int = typer.Option(64, "--overlap", help="Tile overlap, binned pixels."),
    truth_masks: Path = typer.Option(None, "--truth-masks", help="Folder of <name>_mask.* truth masks: pixel scores."),
    truth_particles: Path = typer.Option(None, "--truth-particles",
                                         help="Truth coordinates (file or folder): picking scores."),
    truth_flip_y: bool = typer.Option(False, "--truth-flip-y", help="The truth coordinates' y counts from the bottom."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Segment micrographs: <name>_mask.png, <name>_particles.star, <name>_overlay.png (mask and picks
    over the micrograph); metrics.csv/json with truth."""
    from dataclasses import fields

    from ..engine.cluster import check_spec
    from ..engine.lock import output_lock
    from ..micrographs.crisp.crf import CRFParams
    from ..micrographs.crisp.predict import PredictParams, plan_prediction, run_prediction

    check_spec(cluster)
    given = {"features": crf_features, "iterations": crf_iterations, "sxy": crf_sxy, "srgb": crf_srgb,
             "compat": crf_compat, "gaussian_sxy": crf_gaussian_sxy, "gaussian_compat": crf_gaussian_compat}
    given = {k: v for k, v in given.items() if v is not None}
    crf_params = CRFParams(**{f.name: given[f.name] for f in fields(CRFParams) if f.name in given}) if given else None
    params = PredictParams(crf="off" if no_crf else crf, crf_params=crf_params, extract=extract, diameter=diameter,
                           tile=tile, overlap=overlap, probability=probability)
    plan = plan_prediction(micrographs, model, out, params=params, truth_masks=truth_masks,
                           truth_particles=truth_particles, truth_flip_y=truth_flip_y)
    typer.echo(plan.crf_note)
    _sampling_note(model, micrographs)
    if plan.done:
        typer.echo(f"{len(plan.done)} micrograph(s) already done, {len(plan.jobs)} to do")
    with output_lock(plan.out, "crisp predict"):
        if plan.jobs:
            from ..report import run_report

            with (cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client,
                  run_report(report_dir, client, command="crisp predict", echo=typer.echo)):
                report = run_prediction(plan, client)
        else:
            report = run_prediction(plan, None)
    typer.echo(f"{len(report.results)} micrograph(s) segmented, {sum(r['picks'] for r in report.results)} particles")
    if report.without_truth:
        names = ", ".join(report.without_truth[:3]) + (", ..." if len(report.without_truth) > 3 else "")
        typer.echo(f"metrics over the {len(report.results) - len(report.without_truth)} micrograph(s) with truth; "
                   f"{len(report.without_truth)} had none and are not scored ({names})")
    for variant, entry in report.summary.items():
        pooled = entry.get("pooled", {})
        typer.echo(f"{variant}: " + ", ".join(f"{k} {pooled[k]:.3f}" for k in
                                             ("iou", "f1", "precision", "recall", "pixel_accuracy", "pick_f1")
                                             if k in pooled))
    for path in report.files:
        typer.echo(f"wrote {path}")
    for message in report.failed:
        typer.echo(f"failed: {message}", err=True)
    if report.failed:
        raise typer.Exit(1)
