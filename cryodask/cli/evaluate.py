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


TRUTH = typer.Option(None, "--truth", help="Truth of every input named after its tomogram: a path with {name}, e.g. "
                                           "truth/{name}_membranes.mrc (the name is the input's up to _<method>_...).")


def _pairs(inputs: list[str], truth: str | None, suffixes) -> list[tuple[str, Path, Path]]:
    """(tomogram name, prediction, truth): ``PRED TRUTH`` as two arguments, or every input with
    ``--truth`` naming its truth by ``{name}``."""
    import re

    from ..engine.collection import find_items, stem
    from ..errors import InputError

    if truth is None:
        if len(inputs) != 2:
            raise InputError("give PRED TRUTH, or predictions with --truth PATTERN ({name} is each tomogram's name)")
        return [(stem(inputs[0]), Path(inputs[0]), Path(inputs[1]))]
    if "{name}" not in truth:
        raise InputError(f"--truth must contain {{name}} (each tomogram's name), got {truth!r}")
    pairs = []
    for item in find_items(inputs, stores=True):
        name = re.sub(suffixes, "", item.name)
        pairs.append((name, item.path, Path(truth.format(name=name))))
    return pairs


def _over(command, pairs, score, out: Path, cluster_options: dict | None) -> None:
    """Score each pair (one line each), then ``<out>/evaluate_<kind>.csv`` of all with their mean."""
    import pandas as pd

    from ..engine.collection import Item, Outcome
    from ..errors import where
    from .collection import over_collection

    if len(pairs) == 1:
        _report(score(*pairs[0][1:], out))
        return
    items = [Item(pred, name) for name, pred, _ in pairs]
    truths = {pred: truth for _, pred, truth in pairs}

    def check(item):
        if not truths[item.path].exists():
            raise where(truths[item.path], f"(the truth of {item.path}) does not exist")

    def work(item, client):
        metrics = score(item.path, truths[item.path], out / item.name)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        return Outcome(item, "done", value=metrics, lines=[f"{item.path}: {shown}"])

    report = over_collection(command, None, work, check=check, items=items, needs_cluster=cluster_options is not None,
                             finish_later=True, lock_folder=None, **(cluster_options or {}))
    rows = [{"tomogram": o.item.name, **{k: v for k, v in o.value.items() if isinstance(v, (int, float))}}
            for o in report.outcomes if o.status == "done"]
    if rows:
        table = pd.DataFrame(rows)
        table = pd.concat([table, pd.DataFrame([{"tomogram": "mean", **table.mean(numeric_only=True).to_dict()}])],
                          ignore_index=True)
        path = out / f"{command.replace(' ', '_')}.csv"
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False, float_format="%.6g")
        typer.echo(f"wrote {path}")
    from .collection import finish

    finish(report)


@evaluate_app.command("membranes")
def membranes(
    inputs: list[str] = typer.Argument(..., help="PRED TRUTH (masks: MRC/TIFF, or OME-Zarr x.zarr/labels/<name>), or "
                                                 "predictions (files, folders, globs) with --truth."),
    truth: str = TRUTH,
    logits: Path = typer.Option(None, "--logits", help="Logits/scores volume, for the PR curve and AP (one pair)."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the CSV and PNG files (one folder per tomogram)."),
    bins: int = typer.Option(1000, "--bins", help="Thresholds of the PR curve."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG,
):
    """Voxel-wise Dice, IoU, precision, recall (and AP with --logits), block by block on a cluster."""
    from ..engine.cluster import check_spec
    from ..errors import InputError, where
    from ..evaluate import evaluate_membranes
    from ..io.volumes import open_volume

    check_spec(cluster)
    pairs = _pairs(inputs, truth, r"_[a-z0-9]+_predicted(_post_processed)?_mask$")
    if logits is not None and len(pairs) > 1:
        raise InputError("--logits scores one pair: give PRED TRUTH")
    if len(pairs) == 1:
        _, pred, true = pairs[0]
        shapes = {path: open_volume(path, 1.0).shape for path in (pred, true, logits) if path is not None}
        for path, shape in shapes.items():  # every input checked before a cluster starts
            if shape != shapes[pred]:
                raise where(path, f"shape {shape} differs from {pred} {shapes[pred]}")
        with cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config):
            _report(evaluate_membranes(pred, true, logits=logits, out=out, bins=bins))
        return
    _over("evaluate membranes", pairs, lambda p, t, folder: evaluate_membranes(p, t, out=folder, bins=bins), out,
          dict(cluster=cluster, workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
               cluster_config=cluster_config))


@evaluate_app.command("picks")
def picks(
    inputs: list[str] = typer.Argument(..., help="PRED TRUTH (STAR: pixels or RELION 5 centred Å; CSV: pixels), or "
                                                 "predictions (files, folders, globs) with --truth."),
    truth: str = TRUTH,
    radius: float = typer.Option(..., "--radius", help="Match radius, in --unit."),
    unit: str = typer.Option("px", "--unit", help="px | angstrom"),
    voxel_size: float = typer.Option(None, "--voxel-size", help="Pixel size in Å (default: from the files)."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the CSV and PNG files (one folder per tomogram)."),
    tomograms: Path = typer.Option(None, "--tomograms", help="tomograms.star of RELION 5 files "
                                                             "(default: found beside them or above)."),
    tomo: str = typer.Option(None, "--tomo", help="Tomogram scored where a file holds several (rlnTomoName)."),
    class_number: int = typer.Option(None, "--class", help="Score one particle kind: the truth rows with this "
                                                           "rlnClassNumber (and the prediction's, if it has classes)."),
):
    """Precision, recall, F1 of picks matched one-to-one (Hungarian) within --radius."""
    from ..evaluate import evaluate_picks

    pairs = _pairs_of_files(inputs, truth)

    def score(pred, true, folder):
        metrics = evaluate_picks(pred, true, radius, unit=unit, voxel_size=voxel_size, out=folder, tomograms=tomograms,
                                 tomo_name=tomo, class_number=class_number)
        if class_number is not None and not metrics["pred_has_classes"]:
            typer.echo(f"note: {pred} has no rlnClassNumber: all its picks are scored against class {class_number}, so "
                       f"picks of other kinds count as false positives (recall is the class's own)")
        return metrics

    _over("evaluate picks", pairs, score, out, None)


def _pairs_of_files(inputs, truth):
    """Pick files are not volumes: folders and globs of STAR/CSV files."""
    import glob
    import re

    from ..engine.collection import stem
    from ..errors import InputError, where

    if truth is None:
        return _pairs(inputs, None, "")
    if "{name}" not in truth:
        raise InputError(f"--truth must contain {{name}} (each tomogram's name), got {truth!r}")
    files = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files += sorted(p for p in path.iterdir()
                            if p.suffix.lower() in (".star", ".csv") and p.name != "tomograms.star")
        elif any(ch in text for ch in "*?["):
            files += sorted(Path(p) for p in glob.glob(text))
        elif path.is_file():
            files.append(path)
        else:
            raise where(path, "no such file")
    pairs, names = [], set()
    for path in dict.fromkeys(files):
        name = re.sub(r"_[a-z0-9]+_picks$", "", stem(path))
        if name in names:  # the .star and .csv of one tomogram: score the first
            continue
        names.add(name)
        pairs.append((name, path, Path(truth.format(name=name))))
    return pairs
