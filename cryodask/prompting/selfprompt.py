"""CryoSAM's Cross-Plane Self-Prompting: one point -> one 3-D instance, slice after slice.

The slice through the prompt is decoded from the point; each next slice is prompted with the
previous winner's most confident point and its logits, until no candidate passes CryoSAM's
filters; the ±z, ±y, ±x directions are united. The slices come from a
:class:`~cryodask.models.sam2_slices.SliceDecoder` (SAM2, or known masks in tests). The
algorithm and its deliberate deviations from CryoSAM's code: docs/architecture.md, "CryoSAM".
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..io.normalize import unit_reader
from ..models.sam2_slices import EmbeddingCache, SAM2Slices, SliceDecoder, SliceGeometry, view_axis
from .params import SelfPromptParams



# ------------------------------------------------------------------ parameters

# ------------------------------------------------------------------ one slice, one instance

@dataclass
class Step:
    """The winning candidate of one slice."""

    index: int
    logits: np.ndarray  # (lowres, lowres): the mask prompt of the next slice
    mask: np.ndarray  # (height, width) bool
    score: float


def best_candidate(logits, scores, geometry: SliceGeometry, params: SelfPromptParams, previous=None,
                   index: int = 0) -> Step | None:
    """CryoSAM's filters on one slice's candidates; the passing one with the highest score.

    A candidate passes when ``0 < area < max_area``, ``score > score_threshold`` and, given
    the previous slice's mask, ``IoU >= iou_threshold``. None when nothing passes.
    """
    masks = geometry.upsample(logits) > params.logit_threshold
    limit = params.area_limit(geometry.height, geometry.width)
    scores = np.asarray(scores, np.float64).reshape(-1)
    best = None
    for m, (mask, score) in enumerate(zip(masks, scores)):
        area = int(mask.sum())
        if not (0 < area < limit) or not score > params.score_threshold:
            continue
        if previous is not None:
            union = int(np.logical_or(mask, previous).sum())
            if np.logical_and(mask, previous).sum() < params.iou_threshold * union:
                continue
        if best is None or score > scores[best]:
            best = m
    if best is None:
        return None
    return Step(int(index), np.asarray(logits[best], np.float32), masks[best], float(scores[best]))


class Instance(tuple):
    """``(box, mask)`` of one prompt — a tuple, so it unpacks as the pair — with what the
    propagation saw: ``point`` (the prompt, z y x), ``score`` (mean predicted IoU of the
    accepted slices, 0 if none) and ``extents`` ({view: (first, stop) slice indices
    accepted, or None when the prompted slice had no candidate})."""

    def __new__(cls, box, mask, point=None, score=0.0, extents=None):
        self = super().__new__(cls, (box, mask))
        self.point = point
        self.score = float(score)
        self.extents = dict(extents or {})
        return self

    def __getnewargs__(self):
        return self[0], self[1], self.point, self.score, self.extents

    @property
    def box(self) -> tuple[slice, ...]:
        return self[0]

    @property
    def mask(self) -> np.ndarray:
        return self[1]


def check_point(point_zyx, shape) -> tuple[float, float, float]:
    """A prompt as three floats inside the volume, else a one-line ``InputError``."""
    try:
        p = np.asarray(point_zyx, np.float64).reshape(-1)
    except (TypeError, ValueError):
        p = np.empty(0)
    if p.shape != (3,) or not np.isfinite(p).all():
        raise InputError(f"a prompt must be 3 finite voxel coordinates (z, y, x), got {point_zyx!r}")
    if (p < 0).any() or (p >= np.asarray(shape)).any():
        raise InputError(f"prompt (z, y, x) = ({p[0]:g}, {p[1]:g}, {p[2]:g}) lies outside the volume "
                         f"of shape {tuple(int(n) for n in shape)}")
    return tuple(float(v) for v in p)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be 3 positive integers (z, y, x), got {shape!r}")
    return shape


def _crop(mask: np.ndarray):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _assemble(pieces, shape) -> tuple[tuple[slice, ...], np.ndarray]:
    """Union of per-slice masks (axis, index, row0, col0, crop) as (box, mask in the box)."""
    lo, hi = [None] * 3, [None] * 3
    placed = []
    for axis, index, r0, c0, crop in pieces:
        others = [a for a in range(3) if a != axis]
        start = [0] * 3
        stop = [0] * 3
        start[axis], stop[axis] = index, index + 1
        start[others[0]], stop[others[0]] = r0, r0 + crop.shape[0]
        start[others[1]], stop[others[1]] = c0, c0 + crop.shape[1]
        placed.append((axis, start, stop, crop))
        for a in range(3):
            lo[a] = start[a] if lo[a] is None else min(lo[a], start[a])
            hi[a] = stop[a] if hi[a] is None else max(hi[a], stop[a])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros([b - a for a, b in zip(lo, hi)], bool)
    for axis, start, stop, crop in placed:
        region = tuple(slice(s - l, e - l) for s, e, l in zip(start, stop, lo))
        out[region] |= np.expand_dims(crop, axis)
    return box, out


def _near(negatives: np.ndarray, axis: int, index: int, reach: float) -> list:
    """The negative points within ``reach`` slices of ``index``, as (row, col) of that slice."""
    keep = np.abs(negatives[:, axis] - index) <= reach
    return [tuple(float(v) for a, v in enumerate(q) if a != axis) for q in negatives[keep]]


def self_prompt(decoder: SliceDecoder, shape, point_zyx, params: SelfPromptParams, *, batch: int = 8,
                negatives=()) -> Instance:
    """Cross-Plane Self-Prompting from one point with any :class:`SliceDecoder`.

    ``negatives``: z, y, x points the instance must leave out (a person's negative clicks); each
    joins the point prompt, labelled negative, of the slices within half a diameter of it (the
    slice itself without a diameter).

    Returns an :class:`Instance`: the bounding box of the union of the accepted slice masks
    and the bool mask inside it; an empty box (size 0, at the prompt) when no view's prompted
    slice has a passing candidate.
    """
    shape = _check_shape(shape)
    if not isinstance(params, SelfPromptParams):
        raise InputError(f"params must be a SelfPromptParams, got {type(params).__name__}")
    point = check_point(point_zyx, shape)
    voxel = [min(int(math.floor(p + 0.5)), n - 1) for p, n in zip(point, shape)]
    cap = params.extent_limit()
    batch = max(1, int(batch))
    pieces, scores, extents = [], [], {}
    negatives = np.asarray(negatives, np.float64).reshape(-1, 3)
    reach = params.diameter_voxels / 2 if params.diameter_voxels else 0.5

    def decode(view, axis, index, rc, prompt):
        near = _near(negatives, axis, index, reach) if len(negatives) else []
        extra = {"negatives": near} if near else {}
        return decoder.decode(view, index, rc, prompt, True, **extra)

    def accept(axis, step):
        r0, c0, crop = _crop(step.mask)
        pieces.append((axis, step.index, r0, c0, crop))
        scores.append(step.score)

    for view in params.views:
        axis = view_axis(view)
        n = shape[axis]
        geo = decoder.geometry(view)
        i0 = voxel[axis]
        rc = tuple(p for a, p in enumerate(point) if a != axis)
        decoder.need(view, [i0])
        logits, iou = decode(view, axis, i0, rc, None)
        first = best_candidate(logits, iou, geo, params, None, i0)
        if first is None:
            extents[view] = None
            continue
        accept(axis, first)
        bounds = [i0, i0 + 1]
        for d in (1, -1):
            prev, k = first, 1
            while True:
                j = i0 + d * k
                if not 0 <= j < n or (cap is not None and k > cap):
                    break
                last = n - 1 if d > 0 else 0
                if cap is not None:
                    last = min(last, i0 + cap) if d > 0 else max(last, i0 - cap)
                ahead = min(batch, k, abs(last - j) + 1)  # k slices accepted so far: look k ahead
                decoder.need(view, [j + d * s for s in range(ahead)])
                prompt = prev.logits if params.mask_prompt == "logits" else \
                    (prev.logits > params.logit_threshold).astype(np.float32)
                logits, iou = decode(view, axis, j, geo.argmax(prev.logits), prompt)
                step = best_candidate(logits, iou, geo, params, prev.mask, j)
                if step is None:
                    break
                accept(axis, step)
                bounds[0 if d < 0 else 1] = j if d < 0 else j + 1
                prev, k = step, k + 1
        extents[view] = tuple(bounds)
    if not pieces:
        box = tuple(slice(v, v) for v in voxel)
        return Instance(box, np.zeros((0, 0, 0), bool), point, 0.0, extents)
    box, mask = _assemble(pieces, shape)
    return Instance(box, mask, point, float(np.mean(scores)), extents)


# ------------------------------------------------------------------ public functions

def segment_instance(predictor, volume_reader, shape, point_zyx, params: SelfPromptParams, *, cache=None,
                     device: str | None = None, batch: int = 8, decoder: SliceDecoder | None = None) -> Instance:
    """One particle's 3-D mask from one point: CryoSAM's Cross-Plane Self-Prompting on SAM2.

    Parameters
    ----------
    predictor : SAM2 model (``cryodask.models.sam2.build_predictor``); its ``image_size`` is used
    volume_reader : callable(region) -> float32 array of the region, values in [0, 1]
        (see :func:`cryodask.io.normalize.unit_reader`); region is a tuple of three slices
    shape : (Z, Y, X) of the volume
    point_zyx : the prompt, voxel coordinates (fractional allowed; the slice is the nearest)
    params : :class:`SelfPromptParams`
    cache : :class:`EmbeddingCache` shared by the prompts of one volume (default: a new one)
    device : "cpu" or "cuda": must be where ``predictor`` lives (default: there)
    batch : most slices per image-encoder call
    decoder : a :class:`SliceDecoder` replacing SAM2 (tests); ``predictor``, ``volume_reader``,
        ``cache`` and ``device`` are then unused

    Returns
    -------
    Instance
        ``(box, mask)``: a tuple of three slices into the volume and the bool mask of that
        shape; size 0 at the prompt when nothing was segmented (no candidate passed the
        filters on any prompted slice).

    Examples
    --------
    >>> p = build_predictor("sam2.1_hiera_t", image_size=128)  # doctest: +SKIP
    >>> box, mask = segment_instance(p, lambda r: vol[r], vol.shape, (16, 30, 30), SelfPromptParams())  # doctest: +SKIP
    """
    if not isinstance(params, SelfPromptParams):
        raise InputError(f"params must be a SelfPromptParams, got {type(params).__name__}")
    shape = _check_shape(shape)
    check_point(point_zyx, shape)
    if decoder is None:
        if predictor is None:
            raise InputError("segment_instance needs a SAM2 predictor (or a decoder)")
        decoder = SAM2Slices(predictor, volume_reader, shape, resize=params.resize, cache=cache,
                             device=device, batch=batch)
    return self_prompt(decoder, shape, point_zyx, params, batch=batch)


_KEPT: dict = {}  # the one embedding cache a process keeps between calls (keep_cache=True)
_KEPT_LOCK = threading.Lock()


def _kept_cache(identity, size: int) -> EmbeddingCache:
    """The kept cache when ``identity`` (volume reader, model, input size...) is the last one's,
    else a new one replacing it."""
    from dask.base import tokenize

    key = tokenize(*identity)
    with _KEPT_LOCK:
        if key not in _KEPT:
            _KEPT.clear()
            _KEPT[key] = EmbeddingCache(size)
        return _KEPT[key]


def segment_instances(read, shape, points_zyx, params: SelfPromptParams, *, config, checkpoint,
                      image_size: int | None = None, device: str = "auto", batch: int | None = None, seed: int = 0,
                      value_range=None, cache_bytes: int | None = None, compile: bool = False,
                      negatives=(), keep_cache: bool = False) -> list[Instance]:
    """One worker task's worth of prompts: the model once per process, one embedding cache.
    ``negatives`` (z, y, x points) are left out of every instance (:func:`self_prompt`).

    Prompts run sorted by (z, y, x), so neighbours follow each other and share cached slices;
    the result is in the input order. ``read(region)`` returns float32; with ``value_range``
    ``(lo, hi)`` (from :func:`cryodask.io.normalize.robust_range`, once per volume) it is
    mapped to [0, 1] here, without it the values must already be in [0, 1]. ``cache_bytes`` bounds the embedding
    cache (default 1 GiB on CPU, 8 GiB on CUDA; hiera at 1024 takes 16 MB per slice in float32).
    ``keep_cache``: the cache (8 GiB by default) outlives the task, one volume's per process, so
    the next call on the same volume and model (a person's next click) reuses the slices already
    encoded.

    Examples
    --------
    >>> segment_instances(lambda r: vol[r], vol.shape, [(16, 30, 30)], SelfPromptParams(diameter_voxels=12),
    ...                   config="sam2.1_hiera_t", checkpoint=None, image_size=128)  # doctest: +SKIP
    """
    from ..models.sam2 import cached_predictor, pick_device, worker_threads

    if not isinstance(params, SelfPromptParams):
        raise InputError(f"params must be a SelfPromptParams, got {type(params).__name__}")
    shape = _check_shape(shape)
    try:
        array = np.asarray(points_zyx, np.float64)
    except (TypeError, ValueError):
        array = np.empty((1, 0))
    if array.size == 0 and array.ndim <= 2 and array.shape[-1] in (0, 3):
        return []
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"points_zyx must be an (N, 3) array of z, y, x voxel coordinates, got shape {array.shape}")
    points = [check_point(p, shape) for p in array]
    device = pick_device(device)
    worker_threads()
    # a kept cache must hold a whole click's slices (3 views x a diameter, 16 MB each for hiera at
    # 1024): smaller, the next click's walk over them evicts each before its turn and every slice misses
    size = cache_bytes or (8 << 30 if device == "cuda" or keep_cache else 1 << 30)
    identity = (read, value_range, shape, config, str(checkpoint), image_size, seed, params.resize, device, size)
    if value_range is not None:
        read = unit_reader(read, value_range)
    predictor = cached_predictor(config, checkpoint, device=device, image_size=image_size, seed=seed, compile=compile)
    cache = _kept_cache(identity, size) if keep_cache else EmbeddingCache(size)
    from ..models.batching import sam2_batch

    batch = sam2_batch(predictor, device, batch, config=config, compile=compile, cpu_default=8)
    decoder = SAM2Slices(predictor, read, shape, resize=params.resize, cache=cache, device=device, batch=batch)
    out: list = [None] * len(points)
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        out[i] = self_prompt(decoder, shape, points[i], params, batch=batch, negatives=negatives)
    return out
