"""Make a copick project with copick's own API, as a copick user's would be: the input side of
cryodask's copick support, written by copick, not by cryodask.

Runs in ``.venv-copick`` (copick 1.31, zarr 2), like ``copick_readback.py``. Usage:
``python copick_project.py CONFIG OVERLAY VOXEL_SIZE RUN=TOMOGRAM.npy ...``: one run per pair,
its ``wbp`` tomogram at that voxel spacing, written with ``CopickTomogram.from_numpy``.
"""

import sys

import numpy as np

import copick
from copick.models import PickableObject


def main(config: str, overlay: str, voxel_size: float, pairs: list[str]) -> None:
    objects = [PickableObject(name="ribosome", is_particle=True, label=1, radius=125.0)]
    root = copick.new_config(config, overlay, proj_name="made by copick", pickable_objects=objects)
    for pair in pairs:
        name, path = pair.split("=", 1)
        spacing = root.new_run(name).new_voxel_spacing(voxel_size)
        spacing.new_tomogram("wbp").from_numpy(np.load(path).astype(np.float32))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:])
