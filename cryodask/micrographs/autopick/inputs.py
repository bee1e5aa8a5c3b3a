"""Micrographs and their coordinates, resolved and checked on the client before any cluster
work: names must match, centres must lie in their image, selections must not be empty."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError


@dataclass
class MicrographSet:
    """Micrograph files by name, with their (rows, cols) from the headers."""

    paths: dict[str, Path]
    shapes: dict[str, tuple[int, int]]

    @property
    def names(self) -> list[str]:
        return list(self.paths)


def micrograph_set(micrographs) -> MicrographSet:
    """Files, folders, globs or a micrographs STAR (``cryodask.io.micrographs.find_micrographs``)."""
    from ...io.micrographs import find_micrographs, micrograph_name, micrograph_shape

    paths = find_micrographs(micrographs)
    if not paths:
        raise InputError("no micrographs given")
    named = {micrograph_name(p): Path(p) for p in paths}
    return MicrographSet(named, {n: micrograph_shape(p) for n, p in named.items()})


def read_centres(source, mics: MicrographSet, *, flip_y: bool = False, quiet: bool = False) -> dict[str, np.ndarray]:
    """(N, 2) (row, col) centres per micrograph name from a STAR, a coordinate file, a folder
    or a glob of per-micrograph files (``cryodask.io.particles.read_particles``)."""
    from ...io.particles import note_skipped, read_particles

    centres = read_particles(source, mics.names, shapes=mics.shapes, flip_y=flip_y)
    if not quiet:  # a check before the cluster starts reads them once more, quietly
        note_skipped(centres)
    return centres


def check_box(box_size: int, bin_factor: int) -> None:
    from .network import MIN_WINDOW
    from .windows import window_size

    if box_size is None or box_size < 2:
        raise InputError(f"--box-size must be a whole number of pixels ≥ 2, got {box_size}")
    if bin_factor is None or bin_factor < 1:
        raise InputError(f"--bin must be a whole number ≥ 1, got {bin_factor}")
    if window_size(box_size, bin_factor) < MIN_WINDOW:
        raise InputError(f"--box-size {box_size} / --bin {bin_factor} gives {window_size(box_size, bin_factor)} px "
                         f"windows; the classifier needs at least {MIN_WINDOW} (use a smaller --bin)")
