"""``cryodask autopick train|repick|classify``: Autopick-BC's good/bad particle classifier."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS, cluster_session

autopick_app = typer.Typer(help="Autopick-BC: train a good/bad particle classifier, re-pick and split picks.",
                           no_args_is_help=True)
app.add_typer(autopick_app, name="autopick")

MICROGRAPHS = typer.Option(..., "--micrographs",
                           help="Micrograph files, folders, globs or a micrographs STAR (repeatable).")
FLIP_Y = typer.Option(False, "--flip-y", help="Coordinates count y from the bottom of the image (autopick-bc .box).")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda.")
FLIP_Y_TRAIN = typer.Option("no", "--flip-y", metavar="no|yes|auto",
                            help="Coordinates count y from the bottom of the image (autopick-bc .box): no | yes | "
                                 "auto (decided from the images, and said).")
PIXEL_SIZE = typer.Option(None, "--pixel-size", help="Å/px of the micrographs (default: from their headers; "
                                                      "JPEG/PNG have none).")
CHECKS = typer.Option(True, "--checks/--no-checks",
                      help="Refuse coordinates that look y-flipped, unbalanced classes and a held-out result "
                           "at the class prior.")


@autopick_app.command("train")
def train_command(
    micrographs: list[str] = MICROGRAPHS,
    good: Path = typer.Option(..., "--good",
                              help="Good particles: a STAR, or per-micrograph .box/.star files (a folder of them)."),
    bad: Path = typer.Option(..., "--bad", help="Bad particles (ice, carbon, empty), in the same forms."),
    box_size: int = typer.Option(..., "--box-size", help="Particle box in pixels of the micrographs."),
    bin_factor: int = typer.Option(4, "--bin", help="Bin the micrographs by this factor before cutting windows."),
    out: Path = typer.Option(..., "--out", help="Model folder (model.pt, config.json, logs, test results)."),
    epochs: int = typer.Option(50, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(5e-5, "--lr", help="Adam learning rate (Autopick-BC: 5e-5)."),
    patience: int = typer.Option(2, "--patience", help="Epochs without a lower validation loss before stopping."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Windows held out for the test scores."),
    validation_fraction: float = typer.Option(0.2, "--validation-fraction", help="Of the rest, for early stopping."),
    shift: float = typer.Option(0.0, "--shift", help="Largest random centre offset in augmentation (pixels)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random rotations and flips while training."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split, the weights and the augmentation."),
    flip_y: str = FLIP_Y_TRAIN, pixel_size: float = PIXEL_SIZE, checks: bool = CHECKS, device: str = DEVICE,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Train the classifier on windows cut around good and bad particles; report test scores."""
    from ..engine.cluster import check_spec
    from ..io.folders import check_output_dir
    from ..engine.lock import output_lock
    from ..errors import InputError
    from ..micrographs.autopick.checks import parse_flip
    from ..micrographs.autopick.train import TrainParams, train, training_inputs

    check_spec(cluster)
    params = TrainParams(box_size=box_size, bin=bin_factor, epochs=epochs, batch_size=batch_size, lr=lr,
                         patience=patience, test=test_fraction, validation=validation_fraction, augment=augment,
                         shift=shift, seed=seed)
    flip_y = parse_flip(flip_y)
    if pixel_size is not None and not pixel_size > 0:
        raise InputError(f"--pixel-size must be positive, got {pixel_size}")
    training_inputs(micrographs, good, bad, flip_y=flip_y == "yes", quiet=True)
    check_output_dir(out)
    from ..report import run_report

    with output_lock(out, "autopick train"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="autopick train", echo=typer.echo):
        result = train(micrographs, good, bad, out, params=params, flip_y=flip_y, client=client, device=device,
                       log=typer.echo, pixel_size=pixel_size, checks=checks)
    c, t = result.counts, result.test
    typer.echo(f"{c['good']} good + {c['bad']} bad windows of {c['window']} px from {c['micrographs']} micrographs; "
               f"train {c['train']}, validation {c['validation']}, test {c['test']}")
    typer.echo(f"test: accuracy {t['accuracy']:.3f}, precision {t['precision']:.3f}, recall {t['recall']:.3f}"
               + (f", AUC {t['auc']:.3f}" if t["auc"] is not None else ""))
    typer.echo(f"wrote {result.model_dir}")


@autopick_app.command("repick")
def repick_command(
    model: Path = typer.Option(..., "--model", help="Model folder written by `cryodask autopick train`."),
    micrographs: list[str] = MICROGRAPHS,
    out: Path = typer.Option(..., "--out",
                             help="Output folder: <name>_true.star, <name>_false.star, <name>_picks.png."),
    stride: float = typer.Option(None, "--stride", help="Sliding-window step in pixels (default box/4)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Lowest score of a true pick."),
    radius: float = typer.Option(None, "--radius", help="NMS distance in pixels (default box/2)."),
    batch: int = typer.Option(16, "--batch", help="Windows per forward pass."),
    show_false: bool = typer.Option(False, "--show-false", help="Also draw the false picks (red) in the PNG."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Redo micrographs already done with this model and these parameters."),
    margin: float = typer.Option(None, "--margin", help="Keep picks this far from the image border, in pixels of "
                                                        "the model's box (default half a box; 0: none)."),
    pixel_size: float = PIXEL_SIZE,
    flip_y: bool = FLIP_Y, device: str = DEVICE,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Score a sliding window over every micrograph; keep the best windows (NMS) as picks."""
    from ..engine.cluster import check_spec
    from ..io.folders import check_output_dir
    from ..engine.lock import output_lock
    from ..micrographs.autopick.inputs import micrograph_set
    from ..micrographs.autopick.repick import RepickParams, repick
    from ..micrographs.autopick.score import check_model

    check_spec(cluster)
    from ..micrographs.autopick.score import sampling_note

    params = RepickParams(stride=stride, threshold=threshold, radius=radius, batch=batch, overlay_false=show_false,
                          margin=margin)
    config = check_model(model)
    sampling_note(config, micrograph_set(micrographs), pixel_size, typer.echo)
    check_output_dir(out)
    from ..report import run_report

    with output_lock(out, "autopick repick"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="autopick repick", echo=typer.echo):
        report = repick(micrographs, model, out, params=params, flip_y=flip_y, overwrite=overwrite, device=device,
                        client=client, pixel_size=pixel_size)
    picked, skipped = report.picked, len(report.results) - len(report.picked)
    typer.echo(f"{len(picked)} micrographs re-picked ({sum(r['true'] for r in picked)} true, "
               f"{sum(r['false'] for r in picked)} false picks), {skipped} skipped (done before) "
               f"in {report.seconds:.1f} s")
    typer.echo(f"wrote {out}")


@autopick_app.command("classify")
def classify_command(
    model: Path = typer.Option(..., "--model", help="Model folder written by `cryodask autopick train`."),
    micrographs: list[str] = MICROGRAPHS,
    particles: Path = typer.Option(..., "--particles",
                                   help="Picks: a particles STAR, or a folder of per-micrograph .box/.star files."),
    out: Path = typer.Option(..., "--out", help="Output folder for the *_true.star / *_false.star files."),
    threshold: float = typer.Option(0.5, "--threshold", help="Lowest score of a true pick."),
    batch: int = typer.Option(16, "--batch", help="Windows per forward pass."),
    pixel_size: float = PIXEL_SIZE,
    flip_y: bool = FLIP_Y, device: str = DEVICE,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Score existing picks and split them into true and false STAR files."""
    from ..engine.cluster import check_spec
    from ..errors import InputError
    from ..io.folders import check_output_dir
    from ..engine.lock import output_lock
    from ..micrographs.autopick.classify import classify
    from ..micrographs.autopick.inputs import micrograph_set, read_centres
    from ..micrographs.autopick.score import check_model

    check_spec(cluster)
    if not 0 <= threshold <= 1:
        raise InputError(f"--threshold must be between 0 and 1, got {threshold}")
    from ..micrographs.autopick.score import sampling_note

    config = check_model(model)
    mics = micrograph_set(micrographs)
    sampling_note(config, mics, pixel_size, typer.echo)
    read_centres(particles, mics, flip_y=flip_y, quiet=True)
    check_output_dir(out)
    from ..report import run_report

    with output_lock(out, "autopick classify"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="autopick classify", echo=typer.echo):
        result = classify(micrographs, model, particles, out, threshold=threshold, flip_y=flip_y, batch=batch,
                          device=device, client=client, pixel_size=pixel_size)
    typer.echo(f"{result.counts['true']} true, {result.counts['false']} false picks in {result.seconds:.1f} s")
    for path in result.files[:6]:
        typer.echo(f"wrote {path}")
    if len(result.files) > 6:
        typer.echo(f"... and {len(result.files) - 6} more files in {out}")
