"""The parameters of ``cryodask postprocess`` (and of membranes' post-processing): each default
lives in one field here. Light on purpose: the command line reads its defaults from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import validate
from ..io.layouts import check_layout
from .components import check_connectivity


@dataclass(frozen=True)
class PostprocessParams:
    """Everything that changes the output (its hash keys the done-marks).

    connectivity : 6, 18 or 26.
    min_slices : keep a component only if its bounding box spans at least this many z slices
        (ETSAM's 10; 0: off).
    min_voxels : keep a component only if it has at least this many voxels.
    remove_bridges, max_bridge_len, max_spur_len : ETSAM's per-slice removal of short skeleton
        bridges (pixels), and of dead-end spurs up to ``max_spur_len`` pixels when > 0.
    labels : also write the kept components' labels (1..n in raster order of their first voxel).
    layout : "portal" writes a ``.zarr`` out the CryoET Data Portal's way: int8 mask, 3 levels,
        256^3 chunks (also the blocks), Blosc lz4, the labels as their own ``<out>_components.zarr``.
    """

    connectivity: int = 26
    min_slices: int = 10
    min_voxels: int = 0
    remove_bridges: bool = False
    max_bridge_len: int = 5
    max_spur_len: int = 0
    labels: bool = False
    layout: str = "default"

    def __post_init__(self):
        check_layout(self.layout)
        check_connectivity(self.connectivity)
        for name in ("min_slices", "min_voxels", "max_bridge_len", "max_spur_len"):
            object.__setattr__(self, name, validate.count(name, getattr(self, name), 0))
        for name in ("remove_bridges", "labels"):
            object.__setattr__(self, name, validate.boolean(name, getattr(self, name)))
