"""Overlapping tiled inference with ramp blending (CRISP's ``reconstruct_patched``: 512 tiles,
overlap 64), so a micrograph of any size goes through a network in bounded memory.

Each tile's logits are weighted by a ramp that rises linearly over the overlap from the tile's
inner edges (not at the image border), and the sum is divided by the summed weights: where
tiles agree the result is exact, and where a network's border effects make them differ the
transition is gradual instead of a seam.
"""

from __future__ import annotations

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of ``tile`` covering ``size`` with neighbours overlapping
    by at least ``overlap``, spread evenly; the first starts at 0 and the last ends at the border.

    >>> tile_starts(1000, 512, 64)
    [0, 244, 488]
    """
    if size <= tile:
        return [0]
    n = int(np.ceil((size - overlap) / (tile - overlap)))
    return [int(round(s)) for s in np.linspace(0, size - tile, n)]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1D weight: rises over ``overlap`` pixels at an inner start, falls at an inner end; > 0."""
    weight = np.ones(length, np.float32)
    ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
    n = min(overlap, length)
    if overlap and not at_start:
        weight[:n] = np.minimum(weight[:n], ramp[:n])
    if overlap and not at_end:
        weight[length - n:] = np.minimum(weight[length - n:], ramp[:n][::-1])
    return weight


def predict_tiled(network, image: np.ndarray, tile: int = 512, overlap: int = 64, batch: int = 4,
                  device: str = "cpu") -> np.ndarray:
    """Logits (C, H, W) of ``network`` (in eval mode) over a standardised image (H, W).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Conv2d(1, 2, 1).eval()
    >>> predict_tiled(net, np.zeros((70, 90), np.float32), tile=32, overlap=8).shape
    (2, 70, 90)
    """
    import torch

    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape
    th, tw = min(tile, h), min(tile, w)
    overlap = max(0, min(int(overlap), th - 1, tw - 1))
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    total, weights = None, np.zeros((h, w), np.float32)
    with torch.inference_mode():
        for i in range(0, len(boxes), batch):
            part = boxes[i:i + batch]
            tiles = np.stack([image[y:y + th, x:x + tw] for y, x in part])[:, None]
            logits = network(torch.from_numpy(tiles).to(device)).float().cpu().numpy()
            if total is None:
                total = np.zeros((logits.shape[1], h, w), np.float32)
            for (y, x), out in zip(part, logits):
                wy = _ramp(th, overlap, y == 0, y + th == h)
                wx = _ramp(tw, overlap, x == 0, x + tw == w)
                weight = wy[:, None] * wx[None, :]
                total[:, y:y + th, x:x + tw] += out * weight
                weights[y:y + th, x:x + tw] += weight
    return total / weights
