"""Particle-picking scores: optimal one-to-one matching of picks to truth within a radius.

A pick is a true positive when it is matched to a distinct true particle no farther than
``radius`` (inclusive). The matching maximises the number of matches, then minimises their
total distance (the Hungarian rule of Topaz and cet_pick, without their radius quirks);
greedy nearest-neighbour matching can find fewer.

Conventions for empty sets: precision is 1.0 when nothing is picked and nothing is there
to find, else 0.0 when nothing is picked; recall likewise when there is nothing to find;
F1 is 0.0 when precision + recall is 0. Two empty sets score 1.0 on all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix, hstack
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class Matching:
    """Matched pairs (``pred_index[k]`` ↔ ``truth_index[k]`` at ``distance[k]``) and the
    sizes of both sets, from which every score follows."""

    pred_index: np.ndarray
    truth_index: np.ndarray
    distance: np.ndarray
    n_pred: int
    n_truth: int

    @property
    def tp(self) -> int:
        return len(self.pred_index)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_truth - self.tp

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else float(self.n_truth == 0)

    @property
    def recall(self) -> float:
        return self.tp / self.n_truth if self.n_truth else float(self.n_pred == 0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def scores(self) -> dict:
        """Precision, recall, F1 and the counts, as a flat dict."""
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "tp": self.tp, "fp": self.fp, "fn": self.fn}


def _points(a, name) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        a = a.reshape(0, a.shape[-1] if a.ndim == 2 else 0)
    if a.ndim != 2:
        raise ValueError(f"{name} must be an (N, ndim) array of coordinates, got shape {a.shape}")
    return a


def match_picks(pred, truth, radius: float) -> Matching:
    """Match predicted to true coordinates one to one, within ``radius`` (same units).

    Candidate pairs come from a k-d tree; the bipartite graph of candidates splits into
    connected components, and each component is solved exactly with
    ``linear_sum_assignment`` (or scipy's sparse solver when a component is very large).
    Non-candidates cost more than any set of real pairs, so the solver first maximises the
    number of matches, then minimises their total distance.
    This scales to 10⁵ points when the radius is about a particle's size.

    Examples
    --------
    >>> m = match_picks([[0, 0.85], [0, -0.95]], [[0, 0], [0, 1.8]], radius=1)
    >>> m.tp, sorted(zip(m.pred_index.tolist(), m.truth_index.tolist()))
    (2, [(0, 1), (1, 0)])
    """
    pred, truth = _points(pred, "pred"), _points(truth, "truth")
    if len(pred) and len(truth) and pred.shape[1] != truth.shape[1]:
        raise ValueError(f"pred has {pred.shape[1]} dimensions, truth has {truth.shape[1]}")
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    n, m = len(pred), len(truth)
    empty = Matching(np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0), n, m)
    if n == 0 or m == 0:
        return empty
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), radius, output_type="ndarray")
    if len(pairs) == 0:
        return empty
    i, j, d = pairs["i"].astype(np.intp), pairs["j"].astype(np.intp), pairs["v"]
    # Components of the bipartite graph: preds are nodes 0..n-1, truths n..n+m-1.
    graph = coo_matrix((np.ones(len(i)), (i, j + n)), shape=(n + m, n + m))
    component = connected_components(graph, directed=False)[1][i]
    order = np.argsort(component, kind="stable")
    i, j, d, component = i[order], j[order], d[order], component[order]
    starts = np.flatnonzero(np.diff(component, prepend=-1))
    sizes = np.diff(starts, append=len(i))
    single = starts[sizes == 1]  # an isolated pair is its own answer
    matched = [(i[single], j[single])]
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        part = slice(start, start + size)
        rows, r = np.unique(i[part], return_inverse=True)
        cols, c = np.unique(j[part], return_inverse=True)
        a, b = _assign(r, c, d[part], len(rows), len(cols), radius)
        matched.append((rows[a], cols[b]))
    pi, tj = (np.concatenate(x) for x in zip(*matched))
    order = np.argsort(pi)
    pi, tj = pi[order], tj[order]
    return Matching(pi, tj, np.linalg.norm(pred[pi] - truth[tj], axis=1), n, m)


DENSE_LIMIT = 4_000_000  # cells of a component's cost matrix solved densely (32 MB)


def _assign(r, c, d, n_rows, n_cols, radius):
    """Most pairs, then least total distance, among candidate pairs ``(r, c)`` at distance ``d``.

    Components that fit in memory go to ``linear_sum_assignment`` with non-candidates at a
    prohibitive cost; larger ones (crowded picks, large radius) to the sparse solver, with
    one dummy partner per row so that a full matching always exists.
    """
    big = (radius + 1.0) * (min(n_rows, n_cols) + 1) + 1.0  # more than any set of real pairs costs
    if n_rows * n_cols <= DENSE_LIMIT:
        cost = np.full((n_rows, n_cols), big)
        cost[r, c] = d
        a, b = linear_sum_assignment(cost)
        real = cost[a, b] < big
        return a[real], b[real]
    # Weights must be non-zero: shift real pairs by 1 (every full matching has n_rows pairs).
    real = csr_matrix((d + 1.0, (r, c)), shape=(n_rows, n_cols))
    dummies = csr_matrix((np.full(n_rows, big), (np.arange(n_rows), np.arange(n_rows))), shape=(n_rows, n_rows))
    a, b = min_weight_full_bipartite_matching(hstack([real, dummies], format="csr"))
    keep = b < n_cols
    return a[keep], b[keep]


def picking_scores(pred, truth, radius: float) -> dict:
    """Precision, recall, F1, tp, fp, fn of picks matched to truth within ``radius``.

    Examples
    --------
    >>> picking_scores([[0, 0], [5, 5]], [[0, 1]], radius=2)["f1"]
    0.6666666666666666
    """
    return match_picks(pred, truth, radius).scores()
