"""Reference implementations the package is measured against, kept out of the package.

``reference_two_stage``: how ETSAM's ``etsam.py``/``inference.py`` run a tomogram (normalise the
whole array, preprocess every slice into one N×3×S×S float32 tensor, run ``SAM2VideoPredictor``
frame by frame over the whole stack, fuse the stage-1 logits into the stage-2 input). It needs
the whole tomogram and its frames in RAM; cryodask's ETSAM path must give the same logits
(tests/test_membranes_etsam.py, benchmarks/membranes.py).

``query_vector``: the query of Hierarchical Feature Matching sampled at points, as CryoSAM's
``grid_sample`` does; cryodask's own query pools the prompted masks
(``cryodask.prompting.matching.query_from_instances``). Used by tests/test_matching.py and
benchmarks/matching.py, which need a query from known particle centres without running SAM2.

Here and not in tests/ because tests already depend on benchmarks/ (tests/test_bench*.py run
them) while benchmarks must not need the test suite to run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cryodask.errors import InputError
from cryodask.io.normalize import Normalization, from_extremes
from cryodask.membranes.etsam import STAGE1_THRESHOLD
from cryodask.membranes.preprocess import frames as to_frames
from cryodask.membranes.prompts import prompt_masks
from cryodask.membranes.propagate import add_prompts, new_state
from cryodask.models.sam2 import autocast_for


def reference_stage(predictor, volume: np.ndarray, prompt: str, *, grid_interval: int = 50,
                    stage1_mask: np.ndarray | None = None, device: str = "cpu") -> np.ndarray:
    """One ETSAM stage over a whole (normalised) volume in RAM: (N, H, W) float32 logits."""
    import torch

    n, height, width = volume.shape
    images = to_frames(volume, predictor.image_size)  # the N×3×S×S array ETSAM holds
    state = new_state(predictor, images, height, width, device)
    autocast = autocast_for(device)
    prompts = prompt_masks(prompt, n, height, width, grid_interval,
                           stage1_mask=(lambda z: stage1_mask[z]) if stage1_mask is not None else None)
    add_prompts(predictor, state, prompts, autocast)
    logits = {}
    with torch.inference_mode(), autocast():
        for z, _, masks in predictor.propagate_in_video(state):
            logits[z] = masks[0, 0].float().cpu().numpy()
    return np.stack([logits[z] for z in range(n)])


def fuse(normalised: np.ndarray, stage1_logits: np.ndarray) -> np.ndarray:
    """ETSAM's stage-2 input: the tomogram plus min-max(clip(stage-1 logits, -5, 5))."""
    clipped = np.clip(stage1_logits, -5, 5)
    scaled = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    return normalised + scaled


def reference_two_stage(stage1, stage2, tomogram: np.ndarray, *, normalize: str = "min_max_positive_values",
                        stage1_prompt: str = "grid_zero", stage2_prompt: str = "zero", grid_interval: int = 50,
                        split_processing: bool = False, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """ETSAM's two stages on a whole tomogram: (stage-1 logits, stage-2 logits).

    ``split_processing`` runs both stages on each quadrant of the normalised tomogram on its
    own (cut at H//2, W//2) and reassembles them, as ETSAM's ``--split-processing``."""
    tomogram = np.asarray(tomogram, dtype=np.float32)
    norm: Normalization = from_extremes(normalize, float(tomogram.min()), float(tomogram.max()))
    normalised = norm.apply(tomogram)
    _, height, width = normalised.shape
    parts = [(slice(0, height), slice(0, width))]
    if split_processing:
        ym, xm = height // 2, width // 2
        parts = [(slice(0, ym), slice(0, xm)), (slice(0, ym), slice(xm, width)),
                 (slice(ym, height), slice(0, xm)), (slice(ym, height), slice(xm, width))]
    first, second = np.zeros_like(normalised), np.zeros_like(normalised)
    for ys, xs in parts:
        part = normalised[:, ys, xs]
        logits1 = reference_stage(stage1, part, stage1_prompt, grid_interval=grid_interval, device=device)
        mask = (logits1 > STAGE1_THRESHOLD).astype(np.uint8)
        first[:, ys, xs] = logits1
        second[:, ys, xs] = reference_stage(stage2, fuse(part, logits1), stage2_prompt, grid_interval=grid_interval,
                                            stage1_mask=mask, device=device)
    return first, second


def query_vector(features, ratio: int, points_zyx, *, interpolation: str = "linear") -> np.ndarray:
    """The query of Hierarchical Feature Matching: the mean feature at the prompts, L2-normalised.

    Samples level ``ratio`` of the pyramid (use the finest) at each prompt's voxel
    coordinates (z, y, x; fractional allowed): trilinearly between the 8 surrounding grid
    points (``interpolation="linear"``, like CryoSAM's ``grid_sample``) or at the nearest
    one (``"nearest"``). As in CryoSAM, the raw samples are averaged and the mean is
    normalised. Points must lie in the volume (0 <= coordinate < grid size * ratio).

    Examples
    --------
    >>> f = {4: np.ones((2, 2, 2, 3), np.float32)}
    >>> query_vector(f, 4, [[1.0, 2.0, 3.0]]).astype(float).round(3).tolist()
    [0.577, 0.577, 0.577]
    """
    array = features.get(ratio) if isinstance(features, Mapping) else None
    if array is None or len(array.shape) != 4:
        raise InputError(f"features must be a mapping {{ratio: array (Z, Y, X, D)}} with level {ratio}")
    if interpolation not in ("linear", "nearest"):
        raise InputError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    points = np.asarray(points_zyx, np.float64)
    if points.ndim == 1:
        points = points.reshape(1, -1)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise InputError(f"points_zyx must be an (N, 3) array of z, y, x voxel coordinates, got shape {points.shape}")
    grid = np.asarray(array.shape[:3])
    if not np.isfinite(points).all() or (points < 0).any() or (points >= grid * ratio).any():
        raise InputError(f"points_zyx must lie in the volume, 0 <= z, y, x < {tuple(int(g) for g in grid * ratio)} "
                         "voxels")
    position = np.minimum(points / ratio, grid - 1)
    total = np.zeros(array.shape[3], np.float64)
    for p in position:
        if interpolation == "nearest":
            i = np.minimum(np.floor(p + 0.5).astype(int), grid - 1)
            total += np.asarray(array[i[0], i[1], i[2]]).astype(np.float64)
            continue
        i0 = np.floor(p).astype(int)
        i1 = np.minimum(i0 + 1, grid - 1)
        t = p - i0
        cube = np.asarray(array[tuple(slice(a, b + 1) for a, b in zip(i0, i1))]).astype(np.float64)
        for axis in range(3):  # collapse z, then y, then x
            if cube.shape[0] == 2:
                cube = cube[0] * (1 - t[axis]) + cube[1] * t[axis]
            else:
                cube = cube[0]
        total += cube
    norm = np.linalg.norm(total)
    if not np.isfinite(norm) or norm == 0:
        raise InputError("the features at the prompts average to zero (or are not finite): no query")
    return (total / norm).astype(np.float32)
