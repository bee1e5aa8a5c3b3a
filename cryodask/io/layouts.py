"""How a converted OME-Zarr is laid out: ``ConvertParams`` and the two layouts (cryodask's and
the CryoET Data Portal's).

Light on purpose (no zarr, no dask): the command line reads its defaults from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import validate
from ..errors import InputError

NGFF = ("0.4", "0.5")
LAYOUTS = ("default", "portal")
# The CryoET Data Portal's ingestion (cryoet-data-portal-backend, ingestion_tools/scripts/common/
# image.py): ome-zarr-py's write_multiscale on a zarr v2 group, 256^3 chunks, zarr 2's default
# Blosc lz4 (clevel 5, byte shuffle), "/" chunk keys, a 2x pyramid of 3 levels, float32 images.
PORTAL_CHUNKS = (256, 256, 256)
PORTAL_LEVELS = 3
CHUNKS = (64, 256, 256)  # the default blocks: a converted store's chunks, an MRC/TIFF file's blocks


def check_layout(layout: str, ngff: str = "0.4") -> str:
    validate.choice("layout", layout, LAYOUTS)
    if layout == "portal" and ngff != "0.4":
        raise InputError(f"--layout portal is NGFF 0.4 (zarr v2), not --ngff {ngff}")
    return layout


@dataclass(frozen=True)
class ConvertParams:
    """Everything that changes the converted store (its hash keys the done-marks).

    chunks : z, y, x of every level's chunks; levels : pyramid levels (2x mean along z, y, x);
    ngff : "0.4" (zarr v2: the Portal, napari) or "0.5" (zarr v3); dtype : "float32", or None to
    keep the input's type; layout : "default" or "portal" (the Portal's chunks and type, whatever
    ``chunks`` and ``dtype`` say).
    """

    chunks: tuple[int, int, int] = CHUNKS
    levels: int = 3
    ngff: str = "0.4"
    dtype: str | None = None
    layout: str = "default"

    def __post_init__(self):
        object.__setattr__(self, "chunks", validate.shape("chunks", self.chunks))
        object.__setattr__(self, "levels", validate.count("levels", self.levels, 1))
        validate.choice("ngff", self.ngff, NGFF)
        if self.dtype not in (None, "float32"):
            raise validate.FieldError("dtype", f"must be float32 or left out (keep the input's), got {self.dtype}")
        check_layout(self.layout, self.ngff)
        if self.layout == "portal":
            object.__setattr__(self, "chunks", PORTAL_CHUNKS)
            object.__setattr__(self, "dtype", "float32")
