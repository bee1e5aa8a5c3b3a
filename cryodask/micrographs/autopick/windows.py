"""Particle windows cut in memory from a binned micrograph: no PNG copies, no RELION extraction.

The micrograph is binned once (integer mean-pool); a window is ``box / bin`` pixels square
around a centre rounded to the binned grid. Windows that reach past the image edge are
filled by mirroring the image (numpy ``reflect``), so that a particle near the edge keeps
the texture statistics the min-max normalisation sees, rather than a constant band that
would own the window's minimum or maximum. Each window is min-max normalised to [0, 1],
as Autopick-BC scales each particle PNG to 0–255 (the first BatchNorm makes the two
scales equivalent).

Coordinates: original pixel ``p`` (row or column, pixel centres at integers) lies at
``(p + 0.5) / bin − 0.5`` in the binned image, and back.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...errors import InputError


def window_size(box_size: int, bin_factor: int) -> int:
    """Side of a window in binned pixels: ``box_size / bin_factor``, rounded."""
    return max(1, int(round(box_size / bin_factor)))


def to_binned(coords, bin_factor: int) -> np.ndarray:
    return (np.asarray(coords, dtype=np.float64) + 0.5) / bin_factor - 0.5


def to_original(coords, bin_factor: int) -> np.ndarray:
    return (np.asarray(coords, dtype=np.float64) + 0.5) * bin_factor - 0.5


def normalise(windows: np.ndarray) -> np.ndarray:
    """Min-max each window to [0, 1] (float32); a flat window becomes 0."""
    windows = np.asarray(windows, dtype=np.float32)
    lo = windows.min(axis=(-2, -1), keepdims=True)
    span = windows.max(axis=(-2, -1), keepdims=True) - lo
    return np.divide(windows - lo, span, out=np.zeros_like(windows), where=span > 0)


class WindowCutter:
    """Cuts normalised ``size``×``size`` windows around binned centres of one binned image.

    Examples
    --------
    >>> cutter = WindowCutter(np.arange(100.0).reshape(10, 10), 4)
    >>> cutter.cut([[5, 5], [0, 9]]).shape
    (2, 4, 4)
    """

    def __init__(self, binned: np.ndarray, size: int):
        self.size = int(size)
        self.shape = binned.shape
        half = self.size // 2
        pad = self.size + 1
        mode = "reflect" if min(binned.shape) > pad else "symmetric"
        self.padded = np.pad(np.asarray(binned, dtype=np.float32), pad, mode=mode)
        self.offset = pad - half  # padded index of a window's first pixel = centre + offset
        self.view = sliding_window_view(self.padded, (self.size, self.size))

    def cut(self, centres) -> np.ndarray:
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(centres).all():
            raise InputError("window centres must be finite numbers")
        # a centre on the far edge (row = height, allowed by the readers) rounds onto the last pixel
        index = np.clip(np.rint(centres), 0, np.array(self.shape) - 1).astype(np.int64) + self.offset
        return normalise(self.view[index[:, 0], index[:, 1]])


def grid_centres(shape, stride: float) -> np.ndarray:
    """Sliding-window centres (binned pixels) every ``stride`` pixels along both axes, the
    first at ``stride / 2`` so that the grid sits symmetrically in the image."""
    if not stride > 0:
        raise InputError(f"--stride must be positive, got {stride}")
    axes = [np.arange(stride / 2 - 0.5, n - 0.5, stride) for n in shape]
    axes = [np.unique(np.clip(np.rint(a), 0, n - 1)) for a, n in zip(axes, shape)]
    rows, cols = np.meshgrid(*axes, indexing="ij")
    return np.column_stack([rows.ravel(), cols.ravel()]).astype(np.float64)


def binned_micrograph(path, bin_factor: int, pixel_size: float | None = None):
    """``(micrograph, binned image)``: read once, binned once, for all the windows of a file."""
    from ...io.micrographs import bin_image, read_micrograph

    micrograph = read_micrograph(path, pixel_size)
    return micrograph, bin_image(micrograph.image, bin_factor)



def model_micrograph(path, bin_factor: int, model_pixel: float | None = None, pixel_size: float | None = None):
    """``(micrograph, binned image, scale)``: the micrograph read (``pixel_size`` overrides its
    header), resampled to the model's pixel size ``model_pixel`` on this worker, binned; a
    point ``p`` of the micrograph lies at ``(p + 0.5)·scale − 0.5`` in the resampled image
    (:func:`to_model`, :func:`from_model`), whose shape is ``rint(shape·scale)``."""
    from ...io.micrographs import bin_image, read_micrograph, resample, sampling_scale

    micrograph = read_micrograph(path, pixel_size)
    scale = sampling_scale(micrograph.pixel_size, model_pixel)
    image = resample(micrograph.image, scale)
    exact = np.array(image.shape) / np.array(micrograph.image.shape)
    return micrograph, bin_image(image, bin_factor), exact


def to_model(coords, scale) -> np.ndarray:
    return (np.asarray(coords, dtype=np.float64) + 0.5) * scale - 0.5


def from_model(coords, scale) -> np.ndarray:
    return (np.asarray(coords, dtype=np.float64) + 0.5) / scale - 0.5
