"""``cryodask evaluate``: score predictions against ground truth (see ``cryodask.evaluate``)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, THREADS, WORKERS, cluster_session

evaluate_app = typer.Typer(help="Score predictions against ground truth.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def _report(metrics: dict) -> None:
    for name, value in metrics.items():
        if name != "files":
            typer.echo(f"  {name:<18} {value:.4f}" if isinstance(value, float) else f"  {name:<18} {value}")
    for path in metrics["files"]:
        typer.echo(f"wrote {path}")


@evaluate_app.command("membranes")
def membranes(
    pred: Path = typer.Argument(..., help="Predicted mask: MRC/TIFF, or OME-Zarr image (x.zarr/labels/<name>)."),
    truth: Path = typer.Argument(..., help="Ground-truth mask, same shape."),
    logits: Path = typer.Option(None, "--logits", help="Logits/scores volume, for the PR curve and AP."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the CSV and PNG files."),
    bins: int = typer.Option(1000, "--bins", help="Thresholds of the PR curve."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG,
):
    """Voxel-wise Dice, IoU, precision, recall (and AP with --logits), block by block on a cluster."""
    from ..engine.cluster import check_spec
    from ..errors import where
    from ..evaluate import evaluate_membranes, load_volume

    check_spec(cluster)
    shapes = {path: tuple(load_volume(path).shape) for path in (pred, truth, logits) if path is not None}
    for path, shape in shapes.items():  # every input checked before a cluster starts
        if shape != shapes[pred]:
            raise where(path, f"shape {shape} differs from {pred} {shapes[pred]}")
    with cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config):
        _report(evaluate_membranes(pred, truth, logits=logits, out=out, bins=bins))


@evaluate_app.command("picks")
def picks(
    pred: Path = typer.Argument(..., help="Picked coordinates: STAR (pixels, or RELION 5 centred Å) or CSV (pixels)."),
    truth: Path = typer.Argument(..., help="True coordinates: STAR (pixels, or RELION 5 centred Å) or CSV (pixels)."),
    radius: float = typer.Option(..., "--radius", help="Match radius, in --unit."),
    unit: str = typer.Option("px", "--unit", help="px | angstrom"),
    voxel_size: float = typer.Option(None, "--voxel-size", help="Pixel size in Å (default: from the files)."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the CSV and PNG files."),
    tomograms: Path = typer.Option(None, "--tomograms", help="tomograms.star of RELION 5 files "
                                                             "(default: found beside them or above)."),
    tomo: str = typer.Option(None, "--tomo", help="Tomogram scored where a file holds several (rlnTomoName)."),
    class_number: int = typer.Option(None, "--class", help="Score one particle kind: the truth rows with this "
                                                           "rlnClassNumber (and the prediction's, if it has classes)."),
):
    """Precision, recall, F1 of picks matched one-to-one (Hungarian) within --radius."""
    from ..evaluate import evaluate_picks

    metrics = evaluate_picks(pred, truth, radius, unit=unit, voxel_size=voxel_size, out=out, tomograms=tomograms,
                             tomo_name=tomo, class_number=class_number)
    if class_number is not None and not metrics["pred_has_classes"]:
        typer.echo(f"note: {pred} has no rlnClassNumber: all its picks are scored against class {class_number}, so "
                   f"picks of other kinds count as false positives (recall is the class's own)")
    _report(metrics)
