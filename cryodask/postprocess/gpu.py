"""Connected-component labelling of one block on the GPU (CuPy), for ``device="cuda"``.

The GPU path is optional (DESIGN rule 6): CuPy is imported inside the functions, so importing
this module never needs a GPU, and a missing CuPy is a one-line ``InputError``, not a traceback.
It returns the same partition of the foreground as the CPU path (ids may differ), so the
cross-block merge in ``components.py`` works on either.

``cupyx.scipy.ndimage.label`` is used with an explicit 3x3x3 structure: its default is face
connectivity (like scipy), while cuCIM's ``measure.label`` defaults to full connectivity; cuCIM
runs the same union-find kernels ("copied from CuPy"), so nothing is gained by requiring it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError

RANK = {6: 1, 18: 2, 26: 3}  # connectivity -> squared-distance rank of generate_binary_structure
# CuPy's label kernels index the flattened array with 32-bit ints: before CuPy PR #9859 (2026-04)
# arrays of 2**31 voxels or more gave wrong labels or illegal memory accesses. Blocks (e.g.
# 64x256x256 = 4 M voxels) are far below it, but a huge block is refused rather than mislabelled.
MAX_VOXELS = 2**31 - 1


def _cupy():
    try:
        import cupy
        import cupyx.scipy.ndimage
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise InputError(f"--device gpu needs CuPy (install cryodask[gpu]); importing it failed: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return cupy, cupyx.scipy.ndimage


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device; never raises."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def label_block_gpu(block: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Label the non-zero voxels of one 3D block on the GPU.

    Parameters
    ----------
    block : 3D array; non-zero voxels are foreground.
    connectivity : 6 (faces), 18 (faces + edges) or 26 (faces + edges + corners).

    Returns
    -------
    labels : uint32 numpy array, 0 = background, components numbered 1..n (in any order).
    n : number of components.
    """
    if connectivity not in RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity!r}")
    block = np.asarray(block)
    if block.ndim != 3:
        raise ValueError(f"expected a 3D block, got shape {block.shape}")
    if block.size > MAX_VOXELS:
        raise ValueError(f"block of {block.size} voxels is too large for CuPy's 32-bit label kernels; use smaller "
                         "chunks")
    cupy, cundi = _cupy()
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    device_block = cupy.asarray(block)
    # int32 labels: n < voxels < 2**31, so the uint32 view of the result is exact
    labels, n = cundi.label(device_block, structure=structure)
    del device_block
    out = cupy.asnumpy(labels).view(np.uint32)  # int32 >= 0 reinterpreted, no copy
    return out, int(n)
