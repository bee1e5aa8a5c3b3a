"""TIFF stacks (tifffile): one page per z-slice, read page range by page range.

The voxel size comes from ImageJ metadata (``unit`` with XResolution / ``spacing``) when it
is in nm, µm or Å; otherwise it must be given with ``--voxel-size``.
"""

from __future__ import annotations

import logging

import numpy as np
import tifffile

from ..errors import where

UNIT_TO_ANGSTROM = {"nm": 10.0, "nanometer": 10.0, "um": 1e4, "µm": 1e4, "micron": 1e4, "\\u00B5m": 1e4,
                    "a": 1.0, "å": 1.0, "angstrom": 1.0}


def _open(path):
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.ERROR)  # its warning about a broken file would be a second line; ours says it
    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise where(path, f"not a readable TIFF file ({exc})") from None
    finally:
        log.setLevel(level)


def describe(path):
    """Shape (z, y, x), dtype, voxel size (z, y, x) in Å or None, and metadata."""
    with _open(path) as tif:
        if not tif.series:
            raise where(path, "not a readable TIFF file (no image in it)")
        series = tif.series[0]
        shape = tuple(series.shape)
        if len(shape) == 2:
            shape = (1, *shape)
        voxel = None
        meta = tif.imagej_metadata or {}
        factor = UNIT_TO_ANGSTROM.get(str(meta.get("unit", "")).lower())
        tag = tif.pages[0].tags.get("XResolution")
        if factor and tag:
            num, den = tag.value
            xy = factor * den / num if num else 0.0
            z = float(meta["spacing"]) * factor if "spacing" in meta else xy
            voxel = (z, xy, xy)
        return shape, series.dtype, voxel, {"imagej": {k: str(v) for k, v in meta.items()}, "pages": len(tif.pages)}


def read_region(path, region) -> np.ndarray:
    """Read the pages of ``region[0]`` only, then crop y and x."""
    zs, ys, xs = region
    with _open(path) as tif:
        if len(tif.pages) >= zs.stop:
            data = tif.asarray(key=range(zs.start, zs.stop))
            data = data.reshape((zs.stop - zs.start, *data.shape[-2:]))
        else:  # one multi-dimensional page: no lazier read is possible
            data = tif.series[0].asarray().reshape((-1, *tif.series[0].shape[-2:]))[zs]
        return data[:, ys, xs]
