"""Greedy non-maximum suppression of scored points: overlapping sliding windows see the same
particle, and only the best-scoring window of each particle should become a pick."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def nms_points(points, scores, radius: float, *, highest_first: bool = True) -> np.ndarray:
    """Indices of the points kept: best score first, each suppressing every other point
    closer than ``radius`` (strictly); kept points are thus at least ``radius`` apart.

    ``highest_first=False`` ranks the lowest scores first (for thinning rejected windows,
    whose most confident member is the least particle-like).

    Examples
    --------
    >>> nms_points([[0, 0], [0, 3], [0, 10]], [0.9, 0.95, 0.5], radius=5).tolist()
    [1, 2]
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(points) == 0:
        return np.empty(0, dtype=np.intp)
    order = np.argsort(-scores if highest_first else scores, kind="stable")
    if radius <= 0:
        return order
    neighbours = cKDTree(points).query_ball_point(points, np.nextafter(radius, 0))
    suppressed = np.zeros(len(points), bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[neighbours[i]] = True
    return np.asarray(kept, dtype=np.intp)
