"""Scores of a binary classifier, as Autopick-BC reports them: accuracy, precision, recall,
AUC and the confusion counts at the decision threshold 0.5."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve (the Mann–Whitney U statistic, ties counted half);
    None when one class is absent."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_scores(labels, scores, threshold: float = 0.5) -> dict:
    """``accuracy, precision, recall, auc, tp, fp, tn, fn, n`` of ``scores >= threshold``
    against boolean ``labels`` (precision is 0 when nothing is called positive).

    Examples
    --------
    >>> classification_scores([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])["accuracy"]
    0.5
    """
    labels = np.asarray(labels, bool)
    called = np.asarray(scores, dtype=np.float64) >= threshold
    tp, fp = int((called & labels).sum()), int((called & ~labels).sum())
    tn, fn = int((~called & ~labels).sum()), int((~called & labels).sum())
    n = len(labels)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "auc": roc_auc(labels, scores),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n, "threshold": threshold}
