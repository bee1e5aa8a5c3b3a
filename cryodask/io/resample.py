"""A tomogram on another voxel grid and back, block by block (``--working-voxel-size``).

Methods whose scales were set at one sampling (MemBrain-seg works at 10 Å; a filter whose
scale falls under a voxel) can run on a grid of the voxel size they want: the volume is
resampled on the fly with dask-image's blockwise affine transform, and their outputs are
mapped back onto the input grid. Voxel centres stay aligned: voxel ``i`` of a grid of size ``v``
has its centre at ``(i + 1/2) v`` Å on both grids.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError


def working_grid(shape, voxel_size, working) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, input voxels per working voxel) of the working grid; ``working`` in Å (one or z, y, x)."""
    w = np.broadcast_to(np.asarray(working, dtype=float), (3,))
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise InputError(f"--working-voxel-size must be a positive number of Å, got {working!r}")
    factor = tuple(float(a / v) for a, v in zip(w, voxel_size))
    return tuple(max(1, int(round(n / f))) for n, f in zip(shape, factor)), factor


def to_working(data, voxel_size, working, chunks):
    """``data`` (dask array on the input grid) on the working grid: smoothed first where the new
    grid is coarser (σ = (f − 1)/2 voxels, scikit-image's anti-aliasing rule), then linear."""
    import dask.array as da
    from dask_image.ndfilters import gaussian_filter
    from dask_image.ndinterp import affine_transform

    shape, factor = working_grid(data.shape, voxel_size, working)
    data = da.asarray(data).astype(np.float32)
    sigma = [max(0.0, (f - 1) / 2) for f in factor]
    if any(sigma):
        data = gaussian_filter(data, sigma)
    # a full matrix: dask-image reads a 1-D one differently from scipy (measured)
    return affine_transform(data, matrix=np.diag(factor), offset=[f / 2 - 0.5 for f in factor],
                            output_shape=shape, order=1, output_chunks=tuple(chunks), mode="nearest")


def from_working(data, shape, voxel_size, working, chunks, *, order: int):
    """An output on the working grid mapped back onto the input grid of ``shape`` (order 0 for
    masks and labels, 1 for scores)."""
    from dask_image.ndinterp import affine_transform

    _, factor = working_grid(shape, voxel_size, working)
    inverse = [1 / f for f in factor]
    return affine_transform(data, matrix=np.diag(inverse), offset=[g / 2 - 0.5 for g in inverse],
                            output_shape=tuple(shape), order=order, output_chunks=tuple(chunks), mode="nearest")
