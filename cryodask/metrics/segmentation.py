"""Voxel-wise scores of a binary segmentation, for numpy arrays or dask arrays larger than memory.

Everything reduces to counts (a confusion matrix, or two histograms of logits), so a dask
volume is read block by block and only the counts ever meet in one place.

Conventions for empty sets: a ratio whose denominator is 0 (nothing predicted, nothing to
find) is 1.0 when prediction and truth are both empty — they agree perfectly — and 0.0
otherwise. So two empty masks score Dice = IoU = precision = recall = 1.0, and an empty
prediction against a non-empty truth scores 0.0 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np


def _as_array(a):
    """numpy stays numpy, dask stays dask; other chunked arrays (zarr) become dask arrays."""
    if isinstance(a, (np.ndarray, da.Array)):
        return a
    if hasattr(a, "chunks") and hasattr(a, "shape"):
        return da.from_array(a, chunks=a.chunks)
    return np.asarray(a)


def _check_shapes(pred, truth) -> None:
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}")


def confusion(pred, truth) -> dict[str, int]:
    """Count true/false positives/negatives of a binary prediction (nonzero = positive).

    Dask inputs are reduced blockwise in a single ``dask.compute``, so each block is read once.

    Examples
    --------
    >>> confusion(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    {'tp': 1, 'fp': 1, 'fn': 1, 'tn': 1}
    """
    pred, truth = _as_array(pred), _as_array(truth)
    _check_shapes(pred, truth)
    p, t = pred != 0, truth != 0
    tp, n_pred, n_truth = dask.compute((p & t).sum(), p.sum(), t.sum())
    tp, n_pred, n_truth = int(tp), int(n_pred), int(n_truth)
    return {"tp": tp, "fp": n_pred - tp, "fn": n_truth - tp, "tn": int(np.prod(pred.shape)) - n_pred - n_truth + tp}


def _ratio(num, den, both_empty):
    """``num / den``; where ``den`` is 0: 1.0 if prediction and truth are both empty, else 0.0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.where(np.broadcast_to(both_empty, den.shape), 1.0, 0.0)
    np.divide(num, den, out=out, where=den > 0)
    return out[()] if out.ndim == 0 else out


def scores(tp: int, fp: int, fn: int, tn: int = 0) -> dict[str, float]:
    """Dice, IoU, precision and recall from confusion counts (``tn`` plays no part).

    Two empty masks (tp = fp = fn = 0) score 1.0 on every measure; see the module docstring.

    Examples
    --------
    >>> scores(tp=3, fp=1, fn=2, tn=10)["dice"]
    0.6666666666666666
    """
    empty = tp + fp + fn == 0
    return {"dice": float(_ratio(2 * tp, 2 * tp + fp + fn, empty)),
            "iou": float(_ratio(tp, tp + fp + fn, empty)),
            "precision": float(_ratio(tp, tp + fp, empty)),
            "recall": float(_ratio(tp, tp + fn, empty))}


def segmentation_scores(pred, truth) -> dict:
    """Dice, IoU, precision, recall and the confusion counts of a binary prediction.

    Examples
    --------
    >>> segmentation_scores(np.eye(3), np.eye(3))["dice"]
    1.0
    """
    counts = confusion(pred, truth)
    return {**scores(**counts), **counts}


@dataclass(frozen=True)
class PRCurve:
    """A precision–recall curve in scikit-learn's order: ``thresholds`` increase, and
    ``precision``/``recall`` have one more entry, the (recall 0, precision 1) end point.

    ``tp``/``fp`` count voxels with ``logit >= threshold``. ``average_precision`` is the
    step-wise area under the curve (scikit-learn's AP); NaN when the truth has no positives.
    """

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    average_precision: float


def average_precision(precision, recall) -> float:
    """Step-wise area under a PR curve in scikit-learn's order (recall decreasing).

    Examples
    --------
    >>> average_precision([0.5, 1.0, 1.0], [1.0, 0.5, 0.0])
    0.75
    """
    precision, recall = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def _histograms(x, t, bins, range_):
    """Counts of negatives (row 0) and positives (row 1) in one block: column 0 below the
    range, then one column per bin (logits above the range fall in the last bin)."""
    x, t = np.minimum(np.ravel(x), range_[1]), np.ravel(t) != 0
    below = x < range_[0]
    return np.array([[np.count_nonzero(below & ~t), *np.histogram(x[~t], bins, range_)[0]],
                     [np.count_nonzero(below & t), *np.histogram(x[t], bins, range_)[0]]], dtype=np.int64)


def pr_curve(logits, truth, bins: int = 1000, range: tuple[float, float] | None = None) -> PRCurve:
    """Precision–recall curve of thresholded logits, from two histograms (scales to any volume).

    Thresholds are the left edges of ``bins`` equal bins over ``range`` (default: the
    logits' global min and max, found in one pass). At those thresholds the counts are
    exact; between them the curve treats a bin as a tie, so AP converges to the exact value
    as ``bins`` grows. Logits below ``range`` are never predicted positive, those above always.

    Examples
    --------
    >>> curve = pr_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]), bins=100)
    >>> round(curve.average_precision, 4)
    0.8333
    """
    logits, truth = _as_array(logits), _as_array(truth)
    _check_shapes(logits, truth)
    if range is None:
        lo, hi = dask.compute(logits.min(), logits.max())
        range = (float(lo), float(hi))
    edges = np.histogram_bin_edges(np.empty(0), bins, range=range)
    if isinstance(logits, da.Array) or isinstance(truth, da.Array):
        index = "abcdefghij"[:logits.ndim]
        logits, truth = da.unify_chunks(da.asarray(logits), index, da.asarray(truth), index)[1]
        parts = [da.from_delayed(dask.delayed(_histograms)(x, t, bins, range), (2, bins + 1), np.int64)
                 for x, t in zip(logits.to_delayed().ravel(), truth.to_delayed().ravel())]
        counts = da.stack(parts).sum(axis=0).compute()
    else:
        counts = _histograms(logits, truth, bins, range)
    # Voxels at or above each left edge: cumulative sums from the high end.
    fp, tp = (np.append(np.cumsum(c[:0:-1])[::-1], 0) for c in counts)
    positives = int(counts[1].sum())
    precision = _ratio(tp, tp + fp, True)  # nothing predicted: no false claim (sklearn's end point)
    recall = tp / positives if positives else np.full(tp.shape, np.nan)
    ap = average_precision(precision, recall) if positives else float("nan")
    return PRCurve(edges[:-1], precision, recall, tp[:-1], fp[:-1], ap)
