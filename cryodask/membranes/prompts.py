"""ETSAM's mask prompts: which frames get a mask, and which mask.

A "grid" is a binary mask with 1-pixel dots every ``interval`` pixels. ``grid_zero`` puts it on
frame 0 (stage-1 default), ``grid`` on every ``interval``-th frame, ``zero`` puts an empty mask
on frame 0 (stage-2 default since ETSAM v2) and ``etsam_stage1_partial`` the stage-1 mask on
every ``interval``-th frame (the v1 stage-2 default).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

STAGE1 = ("grid_zero", "grid", "zero")
STAGE2 = ("zero", "grid", "grid_zero", "etsam_stage1_partial")


def check(prompt: str, stage: int) -> str:
    allowed = STAGE1 if stage == 1 else STAGE2
    if prompt not in allowed:
        raise InputError(f"--stage{stage}-prompt must be one of {', '.join(allowed)}, got {prompt!r}")
    return prompt


def grid_mask(height: int, width: int, interval: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[::interval, ::interval] = 1
    return mask


def prompt_frames(prompt: str, n_frames: int, interval: int) -> list[int]:
    if prompt in ("grid", "etsam_stage1_partial"):
        return list(range(0, n_frames, interval))
    return [0]


def prompt_masks(prompt: str, n_frames: int, height: int, width: int, interval: int,
                 stage1_mask=None) -> dict[int, np.ndarray]:
    """{frame: mask} for ``prompt``; ``stage1_mask(z)`` gives slice z of the stage-1 mask."""
    frames = prompt_frames(prompt, n_frames, interval)
    if prompt == "zero":
        return {0: np.zeros((height, width), dtype=np.uint8)}
    if prompt == "etsam_stage1_partial":
        if stage1_mask is None:
            raise InputError("etsam_stage1_partial needs the stage-1 mask")
        return {z: np.asarray(stage1_mask(z), dtype=np.uint8) for z in frames}
    grid = grid_mask(height, width, interval)
    return {z: grid for z in frames}
