"""ETSAM's two stages on one column of a tomogram (all z, one y/x tile), as one worker task.

Stage 1 propagates SAM2 through the normalised slices and streams its logits to a zarr array;
stage 2 reads the tomogram again, adds min-max(clip(stage-1 logits, -5, 5)) and propagates
the second model (ETSAM's ``run_two_stage_inference_on_tomogram``). The min-max uses the extremes of this
column's stage-1 logits, exactly as ETSAM's split-processing normalises each quadrant on its own. Host memory is one
encoder batch plus one z-chunk of logits, whatever the tomogram's size.

A column is ETSAM's whole tomogram when there is no tiling, or one of ``--tile`` parts (ETSAM's
``--split-processing`` is ``tile = (H // 2, W // 2)``). Each stage writes a done-mark after its
logits, so a rerun resumes at the first unfinished stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..io import normalize as norm_mod
from . import prompts as prompt_mod
from .params import EtsamParams
from .propagate import propagate

STAGE1_THRESHOLD = -0.25  # ETSAM hard-codes it
Z_CHUNK = 16



def tiles(height: int, width: int, tile: tuple[int, int] | None, split: bool = False) -> list[tuple[slice, slice]]:
    """Near-equal y/x parts no larger than ``tile``; ``split`` gives ETSAM's quadrants (cut at H//2, W//2)."""
    if split:
        tile = (-(-height // 2), -(-width // 2))
    if tile is None:
        return [(slice(0, height), slice(0, width))]
    ny, nx = math.ceil(height / tile[0]), math.ceil(width / tile[1])
    ys = [slice(i * height // ny, (i + 1) * height // ny) for i in range(ny)]
    xs = [slice(j * width // nx, (j + 1) * width // nx) for j in range(nx)]
    return [(y, x) for y in ys for x in xs]


def tile_name(ys: slice, xs: slice) -> str:
    return f"y{ys.start}-{ys.stop}_x{xs.start}-{xs.stop}"


class SlabWriter:
    """Collects slices and writes whole z-chunks of a zarr array (the block rule)."""

    def __init__(self, array):
        self.array = array
        self.depth = array.chunks[0]
        self.start = 0
        self.slab: list[np.ndarray] = []

    def add(self, z: int, data: np.ndarray) -> None:
        if z != self.start + len(self.slab):
            raise RuntimeError(f"slices out of order: got {z}, expected {self.start + len(self.slab)}")
        self.slab.append(data)
        if len(self.slab) == self.depth:
            self.flush()

    def flush(self) -> None:
        if self.slab:
            self.array[self.start:self.start + len(self.slab)] = np.stack(self.slab)
            self.start += len(self.slab)
            self.slab = []


def _logits_array(path: str, shape):
    import zarr

    return zarr.create_array(path, shape=shape, chunks=(min(Z_CHUNK, shape[0]),) + tuple(shape[1:]),
                             dtype="float32", fill_value=0, overwrite=True)


def _run_stage(predictor, read, shape, prompts, path, device, batch) -> tuple[float, float]:
    """One stage into a zarr array; returns the min and max of its logits clipped to [-5, 5]."""
    array = _logits_array(path, shape)
    writer = SlabWriter(array)
    low, high = np.float32(np.inf), np.float32(-np.inf)
    for z, logits in propagate(predictor, read, shape[0], shape[1], shape[2], prompts, device=device, batch=batch):
        writer.add(z, logits.astype(np.float32, copy=False))
        clipped = np.clip(logits, -5, 5)
        low, high = min(low, clipped.min()), max(high, clipped.max())
    writer.flush()
    if writer.start != shape[0]:
        raise RuntimeError(f"propagation returned {writer.start} of {shape[0]} slices")
    return float(low), float(high)


def _clipped_extremes(path: str) -> tuple[float, float]:
    import zarr

    array = zarr.open_array(path, mode="r")
    low, high = np.inf, -np.inf
    for z in range(0, array.shape[0], array.chunks[0]):
        slab = np.clip(array[z:z + array.chunks[0]], -5, 5)
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    return low, high


def two_stage_column(read_raw, norm: norm_mod.Normalization, n_slices: int, ys: slice, xs: slice,
                     params: EtsamParams, folder: str, marks, *, device: str = "cpu", batch: int | None = None,
                     seed: int = 0) -> str:
    """Run both stages on one column; logits go to ``<folder>/<tile>/stage{1,2}.zarr``.

    ``read_raw(region)`` reads the raw tomogram; ``marks`` (``DoneMarks``) records finished stages.
    ``batch`` slices go through the encoder per call: by default what half the free GPU memory
    holds on CUDA (``models/batching.py``), 1 on CPU, where a batch saves no time but costs
    activation memory (benchmarks/results/README.md).
    Returns the tile name.
    """
    from ..engine.blocks import fault_injection_delay
    from ..models.batching import sam2_batch
    from ..models.sam2 import cached_predictor, pick_device, worker_threads

    worker_threads()
    device = pick_device(device)
    requested = batch
    name = tile_name(ys, xs)
    shape = (n_slices, ys.stop - ys.start, xs.stop - xs.start)
    stage1_path, stage2_path = f"{folder}/{name}/stage1.zarr", f"{folder}/{name}/stage2.zarr"

    def read_normalised(z0, z1):
        return norm.apply(read_raw((slice(z0, z1), ys, xs)))

    if marks.done(f"stage1-{name}"):
        low, high = _clipped_extremes(stage1_path)
    else:
        model = cached_predictor(params.config, params.stage1_checkpoint, device=device,
                                 image_size=params.image_size, seed=seed, compile=params.compile)
        prompts = prompt_mod.prompt_masks(params.stage1_prompt, shape[0], shape[1], shape[2], params.grid_interval)
        low, high = _run_stage(model, read_normalised, shape, prompts, stage1_path, device,
                               sam2_batch(model, device, requested, config=params.config, compile=params.compile))
        fault_injection_delay(f"etsam {folder} stage1-{name}")
        marks.mark(f"stage1-{name}")
    if marks.done(f"stage2-{name}"):
        return name

    import zarr

    first = zarr.open_array(stage1_path, mode="r")
    low32, high32 = np.float32(low), np.float32(high)
    span = high32 - low32

    def read_fused(z0, z1):
        clipped = np.clip(first[z0:z1], -5, 5)
        scaled = (clipped - low32) / span if span > 0 else np.zeros_like(clipped)
        return read_normalised(z0, z1) + scaled

    model = cached_predictor(params.config, params.stage2_checkpoint, device=device,
                             image_size=params.image_size, seed=seed + 1, compile=params.compile)
    prompts = prompt_mod.prompt_masks(params.stage2_prompt, shape[0], shape[1], shape[2], params.grid_interval,
                                      stage1_mask=lambda z: first[z] > STAGE1_THRESHOLD)
    _run_stage(model, read_fused, shape, prompts, stage2_path, device,
               sam2_batch(model, device, requested, config=params.config, compile=params.compile))
    fault_injection_delay(f"etsam {folder} stage2-{name}")
    marks.mark(f"stage2-{name}")
    return name


@dataclass(frozen=True)
class TiledLogits:
    """The stage-2 (or stage-1) logits of a whole tomogram, read across its column arrays.

    Array-like (``shape``, ``dtype``, ``ndim``, basic slicing), so ``dask.array.from_array``
    and ``write_mrc`` stream it.
    """

    folder: str
    shape: tuple
    tile: tuple | None
    split: bool = False
    stage: int = 2

    dtype = np.dtype(np.float32)
    ndim = 3

    def __getitem__(self, region):
        import zarr

        from ..io.volumes import _bounding_box

        box, after = _bounding_box(region, self.shape)
        zs, ys, xs = box
        out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), dtype=np.float32)
        for ty, tx in tiles(self.shape[1], self.shape[2], self.tile, self.split):
            y0, y1 = max(ys.start, ty.start), min(ys.stop, ty.stop)
            x0, x1 = max(xs.start, tx.start), min(xs.stop, tx.stop)
            if y0 >= y1 or x0 >= x1:
                continue
            array = zarr.open_array(f"{self.folder}/{tile_name(ty, tx)}/stage{self.stage}.zarr", mode="r")
            out[:, y0 - ys.start:y1 - ys.start, x0 - xs.start:x1 - xs.start] = \
                array[zs, y0 - ty.start:y1 - ty.start, x0 - tx.start:x1 - tx.start]
        return out[after]

