"""Training labels generated from particle coordinates: a disk of the particle diameter at
each centre (the masks of the CryoPPP/CryoSegNet ground truth are drawn the same way)."""

from __future__ import annotations

import numpy as np

from ...io.micrographs import bin_image


def disk_mask(shape, centres, diameter: float) -> np.ndarray:
    """uint8 (rows, cols) mask: 1 within ``diameter / 2`` of any (row, col) centre.

    Examples
    --------
    >>> int(disk_mask((9, 9), [[4, 4]], 5).sum())  # the 21 pixels within 2.5 of the centre
    21
    """
    mask = np.zeros(tuple(int(s) for s in shape), np.uint8)
    radius = float(diameter) / 2
    reach = int(np.ceil(radius))
    for cy, cx in np.asarray(centres, dtype=np.float64).reshape(-1, 2):
        y0, y1 = max(int(np.floor(cy)) - reach, 0), min(int(np.ceil(cy)) + reach + 1, mask.shape[0])
        x0, x1 = max(int(np.floor(cx)) - reach, 0), min(int(np.ceil(cx)) + reach + 1, mask.shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        y, x = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= ((y - cy) ** 2 + (x - cx) ** 2 <= radius * radius).astype(np.uint8)
    return mask


def bin_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A binary mask binned like its micrograph: a binned pixel is 1 when most of it was."""
    return (bin_image(np.asarray(mask) != 0, factor) >= 0.5).astype(np.uint8)


def unbin_mask(mask: np.ndarray, factor: int, shape) -> np.ndarray:
    """A binned mask back at full resolution ``shape``: each pixel repeated ``factor``×``factor``,
    the remainder rows/columns that binning cropped filled from the nearest edge."""
    full = np.repeat(np.repeat(np.asarray(mask), factor, axis=0), factor, axis=1)
    pad = [(0, max(0, s - n)) for s, n in zip(shape, full.shape)]
    if any(p for _, p in pad):
        full = np.pad(full, pad, mode="edge")
    return full[: shape[0], : shape[1]]


def to_full_resolution(coords: np.ndarray, factor: int) -> np.ndarray:
    """(row, col) in binned pixels → full-resolution pixels: binned pixel i covers full pixels
    i·f … i·f + f − 1, whose centre is i·f + (f − 1)/2."""
    return np.asarray(coords, dtype=np.float64) * factor + (factor - 1) / 2
