"""Slices to SAM2 frames exactly as ETSAM prepares them.

ETSAM stretches every float32 slice to the model's square input with PIL's default filter
for float images (bicubic), repeats it to three channels and applies the ImageNet mean/std.
Doing the same per batch, on demand, replaces ETSAM's N×3×1024² float32 array in RAM.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_slices(slices: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) float32 -> (n, size, size), each slice through ``PIL.Image.resize`` as ETSAM does."""
    from PIL import Image

    out = np.empty((len(slices), size, size), dtype=np.float32)
    for i, image in enumerate(slices):
        out[i] = np.array(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((size, size)))
    return out


def to_frames(resized: np.ndarray):
    """(n, S, S) -> torch (n, 3, S, S): repeated channels, ImageNet-normalised (ETSAM's order of ops)."""
    import torch

    images = torch.from_numpy(resized).float().unsqueeze(1).repeat(1, 3, 1, 1)
    images -= torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    images /= torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return images


def frames(slices: np.ndarray, size: int):
    return to_frames(resize_slices(slices, size))
