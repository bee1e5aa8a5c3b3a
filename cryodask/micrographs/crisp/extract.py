"""Particles from a segmentation mask: one coordinate per particle.

``components``: each connected component whose area is a plausible particle gives its
centroid (CRISP's contour method, without the OpenCV dependency). ``peaks``: maxima of the
distance transform at least ``min_distance`` apart (about a radius), so touching particles
that merged into one component still give one pick each.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

METHODS = ("components", "peaks")


def components(mask: np.ndarray, diameter: float, min_area: float = 0.3, max_area: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (N, 2) (row, col) of components with area between ``min_area`` and ``max_area``
    times the disk area π(d/2)² (``max_area`` None: no upper bound), and their areas.

    Examples
    --------
    >>> m = np.zeros((20, 20), np.uint8); m[4:9, 5:10] = 1
    >>> components(m, diameter=5)[0]
    array([[6., 7.]])
    """
    labels, n = ndi.label(np.asarray(mask) != 0)
    if n == 0:
        return np.empty((0, 2)), np.empty(0)
    index = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones(labels.shape, np.float64), labels, index)
    disk = np.pi * (diameter / 2) ** 2
    keep = areas >= min_area * disk
    if max_area is not None:
        keep &= areas <= max_area * disk
    if not keep.any():
        return np.empty((0, 2)), np.empty(0)
    centres = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, index[keep]), dtype=np.float64)
    return centres.reshape(-1, 2), areas[keep]


def peaks(mask: np.ndarray, diameter: float, min_distance: float | None = None, min_depth: float = 0.5
          ) -> tuple[np.ndarray, np.ndarray]:
    """Distance-transform maxima (N, 2) (row, col) of the mask at least ``min_distance`` (default:
    the radius) apart and at least ``min_depth`` × radius inside the mask; and their depths.

    Examples
    --------
    >>> from cryodask.micrographs.crisp.labels import disk_mask
    >>> len(peaks(disk_mask((40, 60), [[20, 20], [20, 38]], 20), diameter=20)[0])  # two touching disks
    2
    """
    from skimage.feature import peak_local_max

    mask = np.asarray(mask) != 0
    radius = diameter / 2
    if not mask.any():
        return np.empty((0, 2)), np.empty(0)
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    distance = max(1, int(round(radius if min_distance is None else min_distance)))
    found = peak_local_max(depth, min_distance=distance, threshold_abs=max(min_depth * radius, 1.0),
                           exclude_border=False, labels=ndi.label(mask)[0])
    found = _plateau_centres(found, depth)
    return found.astype(np.float64).reshape(-1, 2), depth[tuple(np.round(found).astype(int).T)]


def _plateau_centres(found: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """A flat maximum (an even-sized disk has a 2×2 one) is reported at its centre, not its corner."""
    if len(found) == 0:
        return found.astype(np.float64)
    out = found.astype(np.float64)
    for k, (r, c) in enumerate(found):
        r0, c0 = max(r - 1, 0), max(c - 1, 0)
        window = depth[r0:r + 2, c0:c + 2]
        rows, cols = np.nonzero(window >= depth[r, c] - 1e-6)
        out[k] = (r0 + rows.mean(), c0 + cols.mean())
    return out


def extract(mask: np.ndarray, diameter: float, method: str = "peaks") -> tuple[np.ndarray, np.ndarray]:
    """Particle centres (row, col) and scores from a mask by ``method`` (see ``METHODS``);
    ``diameter`` in the mask's pixels."""
    from ...errors import InputError

    if method not in METHODS:
        raise InputError(f"--extract must be one of {', '.join(METHODS)}, got {method!r}")
    return components(mask, diameter) if method == "components" else peaks(mask, diameter)
