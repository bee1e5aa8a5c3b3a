"""ETSAM's per-slice removal of "parallel-membrane misconnections" (short bridges).

Two parallel membranes are often fused by short rungs; ETSAM cuts them slice by slice on the
skeleton: a piece of <= ``max_bridge_len`` pixels between two junctions is a bridge, and every
mask pixel whose nearest skeleton pixel lies on one goes (optionally dead-end spurs too). This
reproduces ``sever_connections_bridge`` / ``sever_mask_connections`` of ETSAM's ``postprocess.py``
(github.com/jianlin-cheng/ETSAM, commits d5c8de3 and 4c8169d) pixel for pixel
(``tests/test_bridges.py`` checks it against a transcription); only the bookkeeping is
vectorised. Slices are independent, so the 3D function runs on whole z-slabs as dask blocks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from ..errors import InputError

__all__ = ["remove_bridges", "remove_bridges_slice"]

_EIGHT = np.ones((3, 3), dtype=np.uint8)  # 8-connectivity, as ETSAM uses throughout


def remove_bridges_slice(mask2d: np.ndarray, max_bridge_len: int = 5,
                         max_spur_len: int = 0) -> np.ndarray:
    """Cut short skeleton bridges between junctions out of one 2D mask (y, x).

    Parameters
    ----------
    mask2d : ndarray (y, x)
        Binary mask; values > 0 are foreground (bool is taken as is).
    max_bridge_len : int
        Longest junction-to-junction skeleton segment, in pixels, that is removed.
    max_spur_len : int
        If > 0, also remove dead-end skeleton segments up to this many pixels that hang off
        one junction. 0 (ETSAM's default) keeps spurs.

    Returns
    -------
    ndarray (y, x), same dtype as ``mask2d``
        The mask without the carved pixels; like ETSAM, the foreground is written as 1/True.

    Examples
    --------
    >>> m = np.zeros((9, 12), bool); m[2, 1:11] = m[6, 1:11] = m[3:6, 5] = True
    >>> int(ndi.label(remove_bridges_slice(m))[1])
    2
    """
    if mask2d.ndim != 2:
        raise InputError(f"remove_bridges_slice: expected a 2D (y, x) mask, got {mask2d.shape}")
    fg = mask2d if mask2d.dtype == np.bool_ else mask2d > 0
    return _sever(fg, max_bridge_len, max_spur_len).astype(mask2d.dtype, copy=False)


def remove_bridges(mask: np.ndarray, max_bridge_len: int = 5, max_spur_len: int = 0) -> np.ndarray:
    """Apply :func:`remove_bridges_slice` to every z-slice of a (z, y, x) mask.

    Each slice is processed on its own (as in ETSAM), so any z-slab of whole slices gives the
    same result as the full volume: ``dask.array.map_blocks(remove_bridges, mask)`` with chunks
    spanning all of y and x is exact without halos. Returns the input dtype.
    """
    if mask.ndim != 3:
        raise InputError(f"remove_bridges: expected a 3D (z, y, x) mask, got shape {mask.shape}")
    fg = mask if mask.dtype == np.bool_ else mask > 0
    out = np.empty(mask.shape, dtype=bool)
    for z, plane in enumerate(fg):
        out[z] = _sever(plane, max_bridge_len, max_spur_len)
    return out.astype(mask.dtype, copy=False)


def _sever(mask: np.ndarray, max_bridge_len: int, max_spur_len: int) -> np.ndarray:
    """ETSAM's ``sever_connections_bridge`` on one bool slice; returns a new bool array."""
    skel = skeletonize(mask) if mask.any() else mask
    if not skel.any():
        return mask.copy()

    # Degree = number of 8-neighbours on the skeleton; junctions have >= 3, endpoints exactly 1.
    skel_u8 = skel.astype(np.uint8)
    degree = (ndi.convolve(skel_u8, _EIGHT, mode="constant") - skel_u8) * skel_u8
    junctions = skel & (degree >= 3)
    endpoints = skel & (degree == 1)

    # Segments: 8-connected pieces of skeleton left after removing the junction pixels.
    seg_lbl, n_seg = ndi.label(skel & ~junctions, structure=_EIGHT)
    if n_seg == 0:
        return mask.copy()
    ids = np.arange(1, n_seg + 1)
    seg_len = np.bincount(seg_lbl.ravel(), minlength=n_seg + 1)[1:]

    # Distinct junction clusters touching each segment: the smallest and the largest cluster id
    # in the 8-neighbourhood of its pixels differ exactly when it touches two or more.
    jun_lbl, n_jun = ndi.label(junctions, structure=_EIGHT)
    none = n_jun + 1
    lo = ndi.minimum_filter(np.where(junctions, jun_lbl, none), footprint=_EIGHT,
                            mode="constant", cval=none)
    hi = ndi.maximum_filter(jun_lbl, footprint=_EIGHT, mode="constant", cval=0)
    on_seg = seg_lbl > 0  # reduce over the few skeleton pixels only (ndi.minimum sorts its input)
    lo = np.asarray(ndi.minimum(lo[on_seg], seg_lbl[on_seg], ids))
    hi = np.asarray(ndi.maximum(hi[on_seg], seg_lbl[on_seg], ids))
    bridges = (seg_len <= max_bridge_len) & (hi > 0) & (lo != hi)
    if max_spur_len > 0:
        has_end = np.asarray(ndi.maximum(endpoints[on_seg], seg_lbl[on_seg], ids), dtype=bool)
        one_jun = (hi > 0) & (lo == hi)
        bridges |= (seg_len <= max_spur_len) & one_jun & has_end
    if not bridges.any():
        return mask.copy()

    # Carve: every mask pixel whose nearest skeleton pixel (EDT feature transform) is on a bridge.
    nearest = ndi.distance_transform_edt(~skel, return_distances=False, return_indices=True)
    owner = seg_lbl[tuple(nearest)]
    carve = np.concatenate(([False], bridges))[owner]
    return mask & ~carve
