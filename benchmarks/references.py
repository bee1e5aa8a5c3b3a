"""Reference implementations the package is measured against, kept out of the package.

``reference_two_stage``: how ETSAM's ``etsam.py``/``inference.py`` run a tomogram (normalise the
whole array, preprocess every slice into one N×3×S×S float32 tensor, run ``SAM2VideoPredictor``
frame by frame over the whole stack, fuse the stage-1 logits into the stage-2 input). It needs
the whole tomogram and its frames in RAM; cryodask's ETSAM path must give the same logits
(tests/test_membranes_etsam.py, benchmarks/membranes.py).

``query_vector``: the query of Hierarchical Feature Matching sampled at points, as CryoSAM's
``grid_sample`` does (the package's ``query_at_points``, which ``--preset cryosam`` uses at the
mask centroids); cryodask's own query pools the prompted masks. Used by tests/test_matching.py
and benchmarks/matching.py, which need a query from known particle centres without running SAM2.

Here and not in tests/ because tests already depend on benchmarks/ (tests/test_bench*.py run
them) while benchmarks must not need the test suite to run.
"""

from __future__ import annotations


import numpy as np

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
    """CryoSAM's point-sampled query (``cryodask.prompting.matching.query_at_points``, which
    ``pick --preset cryosam`` uses at the mask centroids)."""
    from cryodask.prompting.matching import query_at_points

    return query_at_points(features, ratio, points_zyx, interpolation=interpolation)
