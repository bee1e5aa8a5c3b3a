"""Prompting without weights: a click becomes an instance, accepted instances become a template,
and LoG candidates are scored against it. What the napari widget runs on a laptop with no SAM2
or DINOv2; the same three roles as self-prompting, the query and matching.

A click segments the dark blob under it: the box of 1.5 radii around it is smoothed (σ a third
of the radius); the level three quarters of the way from the blob's core (the median within
half a radius) to the shell around it (1.1-1.5 radii) cuts it; the part connected to the core
within 1.25 radii is the instance. A negative click takes the voxels nearer to it than to the
positive one. Everything reads dark density (``polarity.dark_reader``), so bright tomograms
work the same.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import InputError
from .instances import centre
from .selfprompt import Instance, check_point

REACH = 1.5  # the box read around a click, in radii
LEVEL = 0.75  # where the cut lies from core (0) to background (1); 0.5-0.8 scored within 0.1 Dice
EXTENT = 1.25  # an instance stays within this many radii of its click
SHELL = (1.1, 1.5)  # the background shell, in radii


def _radii(diameter: float, voxel_size) -> np.ndarray:
    if not (isinstance(diameter, (int, float)) and math.isfinite(diameter) and diameter > 0):
        raise InputError(f"diameter must be a positive number of Å, got {diameter!r}")
    vs = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))
    return np.maximum(diameter / 2 / vs, 1.0)


def _box(centre, reach, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, int(math.floor(c - r))), min(n, int(math.ceil(c + r)) + 1))
                 for c, r, n in zip(centre, reach, shape))


def _distance(box, centre, radii) -> np.ndarray:
    """Ellipsoidal distance of each voxel of ``box`` from ``centre``, 1 at one radius."""
    axes = np.ogrid[tuple(slice(b.start, b.stop) for b in box)]
    return np.sqrt(sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)))


def click_instance(read, shape, voxel_size, point_zyx, diameter: float, *, negatives=()) -> Instance:
    """The dark blob under one click as an :class:`Instance` (empty where nothing is darker
    than its surroundings). ``negatives``: z, y, x clicks whose side of the blob is excluded.
    ``read(region)`` returns dark density; ``diameter`` is in Å, ``voxel_size`` Å (z, y, x)."""
    from scipy import ndimage

    shape = tuple(int(n) for n in shape)
    point = check_point(point_zyx, shape)
    radii = _radii(diameter, voxel_size)
    box = _box(point, REACH * radii, shape)
    data = np.asarray(read(box), np.float32)
    if not np.isfinite(data).all():
        raise InputError("the volume holds NaN or Inf values near the click")
    smooth = ndimage.gaussian_filter(data, np.maximum(radii / 3, 0.7), mode="nearest")
    d = _distance(box, point, radii)
    core_region = d <= 0.5
    shell = (d >= SHELL[0]) & (d <= SHELL[1])
    if not shell.any():  # the box is clipped to the tomogram: take what lies outside the particle
        shell = d > 1.0
    core = float(np.median(smooth[core_region]))
    background = float(np.median(smooth[shell])) if shell.any() else float(np.median(smooth))
    empty = Instance(tuple(slice(int(round(p)), int(round(p))) for p in point), np.zeros((0, 0, 0), bool), point)
    if not background > core:
        return empty
    mask = (smooth < core + LEVEL * (background - core)) & (d <= EXTENT)
    for q in np.asarray(negatives, np.float64).reshape(-1, 3):
        mask &= _distance(box, q, radii) >= d
    seed = np.unravel_index(int(np.argmin(np.where(core_region & mask, smooth, np.inf))), mask.shape)
    if not mask[seed]:
        return empty
    labels, _ = ndimage.label(mask)
    mask = labels == labels[seed]
    spread = 1.4826 * float(np.median(np.abs(data[shell] - np.median(data[shell])))) if shell.any() else 0.0
    score = (background - core) / spread if spread > 0 else 0.0
    nz = np.nonzero(mask)
    lo, hi = [int(a.min()) for a in nz], [int(a.max()) + 1 for a in nz]
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return Instance(tuple(slice(b.start + a, b.start + c) for b, a, c in zip(box, lo, hi)), crop, point, score)


def _crop(read, shape, centre, half) -> np.ndarray | None:
    """A cube of side ``2 half + 1`` around ``centre`` (mirrored past the tomogram's edge), zero
    mean and unit std; None when flat or when less than half of it lies inside."""
    c = np.floor(np.asarray(centre) + 0.5).astype(int)
    lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, np.asarray(shape))
    if ((hi - lo) * 2 <= 2 * half + 1).any():
        return None
    cube = np.asarray(read(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))), np.float64)
    pad = [(int(a - (x - h)), int(x + h + 1 - b)) for a, b, x, h in zip(lo, hi, c, half)]
    cube = np.pad(cube, pad, mode="symmetric")
    std = cube.std()
    return (cube - cube.mean()) / std if std > 0 else None


def template_from_instances(read, shape, voxel_size, instances, diameter: float) -> np.ndarray:
    """The classical query: the mean of the normalised cubes (1.2 radii each side) centred on the
    instances' masks (their clicks where a mask is empty)."""
    half = np.ceil(1.2 * _radii(diameter, voxel_size)).astype(int)
    cubes = [c for c in (_crop(read, shape, centre(i), half) for i in instances) if c is not None]
    if not cubes:
        raise InputError("every accepted instance lies at the tomogram's edge or on flat density: no template")
    template = np.mean(cubes, axis=0)
    std = template.std()
    if not std > 0:
        raise InputError("the accepted instances average to a flat template: no query")
    return ((template - template.mean()) / std).astype(np.float32)


def template_scores(read, shape, template: np.ndarray, points) -> np.ndarray:
    """Normalised cross-correlation of the template with the cube at each point (−1 … 1; NaN at the edge)."""
    half = np.asarray(template.shape) // 2
    out = np.full(len(points), np.nan)
    for i, p in enumerate(np.asarray(points, np.float64).reshape(-1, 3)):
        cube = _crop(read, shape, p, half)
        if cube is not None:
            out[i] = float(np.mean(cube * template))
    return out


def find_similar(read, shape, voxel_size, template: np.ndarray, diameter: float, *, client=None,
                 batch: int = 256) -> pd.DataFrame:
    """Every LoG candidate at ``diameter``, scored by its correlation with the template: columns
    z, y, x (voxels), ``score`` (the correlation, highest first) and ``log_score``. The LoG runs
    block by block on the cluster, the scores in batches of candidates."""
    from ..picking.log import log_pick
    from ..picking.params import LogParams

    candidates = log_pick(read, shape, voxel_size, LogParams(diameter=float(diameter)), client=client)
    points = candidates[["z", "y", "x"]].to_numpy(np.float64)
    parts = [points[i:i + batch] for i in range(0, len(points), batch)]
    if client is None:
        scores = [template_scores(read, shape, template, p) for p in parts]
    else:
        shared = client.scatter(template, broadcast=False)
        scores = client.gather(client.map(template_scores, [read] * len(parts), [shape] * len(parts),
                                          [shared] * len(parts), parts, pure=False))
    score = np.concatenate(scores) if scores else np.zeros(0)
    found = pd.DataFrame({"z": points[:, 0], "y": points[:, 1], "x": points[:, 2], "score": score,
                          "log_score": candidates["score"].to_numpy(np.float64)})
    found = found[np.isfinite(found["score"])]
    return found.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
