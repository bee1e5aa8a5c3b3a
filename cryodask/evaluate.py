"""Score files against ground truth: membrane masks (voxel-wise) and particle picks (matched).

The file-level layer over ``cryodask.metrics``: it opens MRC/TIFF/OME-Zarr volumes lazily and
STAR/CSV picks, checks that prediction and truth can be compared, and writes the metrics as
CSV plus PNG plots into ``out``. Volumes are read as dask arrays, so a tomogram larger than
memory is scored block by block (on a ``distributed`` client if one is active).
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from . import viz
from .errors import InputError, where
from .io.folders import check_output_dir
from .io.picks import read_picks
from .io.volumes import open_volume
from .metrics import match_picks, pr_curve, segmentation_scores

UNITS = ("px", "angstrom")


def load_volume(path, chunks: int = 64) -> da.Array:
    """A volume as a lazy dask array (z, y, x): an MRC/TIFF file in slabs of ``chunks``
    z-slices, an OME-Zarr image (``x.zarr``, ``x.zarr/labels/membranes``) in its own chunks.

    >>> mask = load_volume("tomo.zarr/labels/membranes")  # doctest: +SKIP
    """
    volume = open_volume(path, voxel_size=1.0)  # voxel size plays no part in voxel-wise scores
    return volume.to_dask(None if volume.format == "zarr" else (chunks, -1, -1))


def _same_shape(reference, ref_path, other, other_path) -> None:
    if tuple(other.shape) != tuple(reference.shape):
        raise where(other_path, f"shape {tuple(other.shape)} differs from {ref_path} {tuple(reference.shape)}")


def evaluate_membranes(pred, truth, logits=None, out=None, chunks: int = 64, bins: int = 1000) -> dict:
    """Score a membrane mask against ground truth; with ``logits``, also the PR curve and AP.

    Parameters
    ----------
    pred, truth : MRC/TIFF file or OME-Zarr image (see ``load_volume``); nonzero = membrane
    logits : optional volume of scores (higher = membrane), for the PR curve
    out : folder for ``membranes_metrics.csv`` and, with logits, ``membranes_pr.csv`` and
        ``membranes_pr.png`` (the prediction marked as the operating point); None writes nothing
    chunks : z-slices per block when reading MRC/TIFF
    bins : histogram bins (thresholds) of the PR curve

    Returns
    -------
    dict of dice, iou, precision, recall, tp, fp, fn, [average_precision], and ``files`` written.

    Examples
    --------
    >>> evaluate_membranes("pred.mrc", "tomo.zarr/labels/membranes", out="eval")["dice"]  # doctest: +SKIP
    0.79
    """
    p, t = load_volume(pred, chunks), load_volume(truth, chunks)
    _same_shape(p, pred, t, truth)
    scores = segmentation_scores(p, t)
    metrics = {k: scores[k] for k in ("dice", "iou", "precision", "recall", "tp", "fp", "fn")}
    curve = None
    if logits is not None:
        lg = load_volume(logits, chunks)
        _same_shape(p, pred, lg, logits)
        curve = pr_curve(lg, t, bins=bins)
        metrics["average_precision"] = curve.average_precision
    files = []
    if out is not None:
        out = check_output_dir(out)
        files.append(out / "membranes_metrics.csv")
        pd.DataFrame([{**metrics, "pred": str(pred), "truth": str(truth)}]).to_csv(files[-1], index=False)
        if curve is not None:
            files.append(out / "membranes_pr.csv")
            pd.DataFrame({"threshold": curve.thresholds, "precision": curve.precision[:-1], "recall": curve.recall[:-1],
                          "tp": curve.tp, "fp": curve.fp}).to_csv(files[-1], index=False)
            files.append(viz.pr_plot(curve.recall, curve.precision, out / "membranes_pr.png",
                                     average_precision=curve.average_precision,
                                     operating_point=(metrics["recall"], metrics["precision"]),
                                     title=f"Membranes: {Path(str(pred)).name}"))
    return {**metrics, "files": [str(f) for f in files]}


def _radius_px(radius, unit, voxel_size, pred, truth, pred_path, truth_path) -> float:
    if unit not in UNITS:
        raise InputError(f"--unit must be one of {', '.join(UNITS)}, got {unit}")
    if not (np.isfinite(radius) and radius > 0):
        raise InputError(f"--radius must be positive, got {radius}")
    if unit == "px":
        return float(radius)
    if voxel_size is None:
        if pred.pixel_size and truth.pixel_size and not np.isclose(pred.pixel_size, truth.pixel_size, rtol=1e-3):
            raise where(truth_path, f"pixel size {truth.pixel_size} Å differs from {pred_path} ({pred.pixel_size} Å)")
        voxel_size = pred.pixel_size or truth.pixel_size
        if not voxel_size:
            raise where(pred_path, "no pixel size in the file (nor in the truth file); "
                                   "pass --voxel-size (Å) to give the radius in angstrom")
    if not (np.isfinite(voxel_size) and voxel_size > 0):
        raise InputError(f"--voxel-size must be positive, got {voxel_size}")
    return float(radius) / float(voxel_size)


def _tomo_names(picks) -> list[str]:
    return sorted(set(picks.table["rlnTomoName"].astype(str))) if "rlnTomoName" in picks.table.columns else []


def _same_tomogram(pred, truth, tomograms, tomo_name):
    """Prediction and truth of one tomogram: a file naming several (rlnTomoName) keeps the rows of
    ``tomo_name``, else of the one tomogram the other file names; otherwise a one-line error."""
    p = read_picks(pred, tomograms=tomograms, tomo_name=tomo_name)
    t = read_picks(truth, tomograms=tomograms, tomo_name=tomo_name)
    if tomo_name is None:
        names_p, names_t = _tomo_names(p), _tomo_names(t)
        if len(names_p) == 1 and len(names_t) > 1:
            t = read_picks(truth, tomograms=tomograms, tomo_name=names_p[0])
            names_t = _tomo_names(t)
        elif len(names_t) == 1 and len(names_p) > 1:
            p = read_picks(pred, tomograms=tomograms, tomo_name=names_t[0])
            names_p = _tomo_names(p)
        for path, names in ((pred, names_p), (truth, names_t)):
            if len(names) > 1:
                raise where(path, f"holds picks of {len(names)} tomograms ({', '.join(names[:3])}"
                                  f"{', ...' if len(names) > 3 else ''}); choose one with --tomo")
    return p, t


CLASS_COLUMN = "rlnClassNumber"


def _class_rows(picks, path, class_number: int, required: bool):
    """The picks of one particle kind (``rlnClassNumber``); a file without the column is kept
    whole unless ``required`` (the truth must say which row is which kind)."""
    from dataclasses import replace

    table = picks.table
    if CLASS_COLUMN not in table.columns:
        if required:
            raise where(path, f"has no {CLASS_COLUMN} column: --class needs truth that names each particle's kind")
        return picks, False
    try:
        classes = pd.to_numeric(table[CLASS_COLUMN], errors="raise").to_numpy()
    except (ValueError, TypeError):
        raise where(path, f"{CLASS_COLUMN} holds values that are not numbers") from None
    keep = classes == class_number
    if required and not keep.any():
        present = ", ".join(str(int(c)) if float(c).is_integer() else str(c) for c in sorted(set(classes)))
        raise where(path, f"holds no particle of class {class_number} ({CLASS_COLUMN} values: {present or 'none'})")
    return replace(picks, coords=picks.coords[keep], table=table[keep]), True


def evaluate_picks(pred, truth, radius: float, unit: str = "px", voxel_size: float | None = None,
                   out=None, *, tomograms=None, tomo_name: str | None = None, class_number: int | None = None) -> dict:
    """Score picked coordinates against true ones: Hungarian matching within ``radius``.

    Parameters
    ----------
    pred, truth : STAR or CSV coordinate files (pixels, same dimensionality)
    radius : match radius, in pixels (``unit="px"``) or Å (``unit="angstrom"``)
    unit : "px" or "angstrom"; Å are converted with ``voxel_size`` or the files' pixel size
    voxel_size : pixel size in Å, overriding the files'
    tomograms : the tomograms.star of RELION 5 files (default: found beside them or above)
    tomo_name : the tomogram scored where a file holds several (rlnTomoName or reconstructed stem)
    class_number : score one particle kind: the truth rows whose ``rlnClassNumber`` is this, and
        the prediction's too if it has the column; a prediction without classes is kept whole,
        so its picks of other kinds count as false positives (recall is the meaningful number)
    out : folder for ``picks_metrics.csv``, ``picks_matches.csv``, ``picks_f1_vs_radius.csv``
        and ``picks_f1_vs_radius.png`` (P/R/F1 from 0.25× to 2× the radius); None writes nothing

    Returns
    -------
    dict of precision, recall, f1, tp, fp, fn, radius_px, and ``files`` written; with
    ``class_number`` also ``class`` and ``pred_has_classes``.

    Examples
    --------
    >>> evaluate_picks("picks.star", "truth.star", radius=100, unit="angstrom")["f1"]  # doctest: +SKIP
    0.87
    """
    p, t = _same_tomogram(pred, truth, tomograms, tomo_name)
    if class_number is not None:
        t, _ = _class_rows(t, truth, class_number, required=True)
        p, pred_has_classes = _class_rows(p, pred, class_number, required=False)
    if len(p.coords) and len(t.coords) and p.coords.shape[1] != t.coords.shape[1]:
        raise where(truth, f"has {t.coords.shape[1]}D coordinates but {pred} has {p.coords.shape[1]}D")
    radius_px = _radius_px(radius, unit, voxel_size, p, t, pred, truth)
    matching = match_picks(p.coords, t.coords, radius_px)
    metrics = {**matching.scores(), "radius_px": radius_px}
    metrics = {k: metrics[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "radius_px")}
    if class_number is not None:
        metrics.update({"class": class_number, "pred_has_classes": pred_has_classes})
    files = []
    if out is not None:
        out = check_output_dir(out)
        files.append(out / "picks_metrics.csv")
        pd.DataFrame([{**metrics, "pred": str(pred), "truth": str(truth)}]).to_csv(files[-1], index=False)
        files.append(out / "picks_matches.csv")
        pd.DataFrame({"pred_index": matching.pred_index, "truth_index": matching.truth_index,
                      "distance_px": matching.distance}).to_csv(files[-1], index=False)
        factors = np.linspace(0.25, 2.0, 15)
        sweep = pd.DataFrame([{"radius": f * radius, "radius_px": f * radius_px,
                               **match_picks(p.coords, t.coords, f * radius_px).scores()} for f in factors])
        files.append(out / "picks_f1_vs_radius.csv")
        sweep.to_csv(files[-1], index=False)
        files.append(viz.picks_radius_plot(sweep["radius"], sweep["precision"], sweep["recall"], sweep["f1"],
                                           out / "picks_f1_vs_radius.png", radius=radius,
                                           unit="Å" if unit == "angstrom" else "px",
                                           title=f"Picks: {Path(str(pred)).name}"))
    return {**metrics, "files": [str(f) for f in files]}
