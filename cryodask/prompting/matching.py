"""CryoSAM's Hierarchical Feature Matching, block by block over a feature pyramid on disk.

The query (the mean feature inside the prompted instances) is scored coarse to fine: only the
children of a coarser level's survivors are read and scored, so a sparse particle field costs
a small part of naive matching, with exact NMS across block boundaries. The algorithm, the
pyramid protocol and the deliberate deviations from CryoSAM's code: docs/architecture.md, "CryoSAM".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd
from scipy import ndimage

from ..engine.blocks import overlap, plan_blocks
from ..engine.runner import run_blocks
from ..errors import InputError
from .instances import check_instance
from .params import MatchParams, _is_int
from .selfprompt import check_point

try:  # zarr 3 runs its asyncio API on its own event loop; ``sync`` waits for a coroutine there
    from zarr.core.sync import sync as _sync
except ImportError:  # pragma: no cover - zarr 2, or a future layout: plain sequential reads
    _sync = None

ROWS = 2048  # feature vectors converted to float32 and scored at a time (~9 MB at D = 1152)
FILL = 0.5  # a cluster of chunks with candidates is read as one box when they fill this much of it
BATCH, BATCH_BYTES = 10, 64 * 2**20  # zarr reads issued together




# ------------------------------------------------------------------ scoring

def _cosine(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row with the unit ``query`` (float32).

    Each row's value depends on that row alone (``einsum`` reduces every row in the same
    order, whatever the batch), so a point scores the same in any block or level pass.
    """
    out = np.empty(len(vectors), np.float32)
    buf = np.empty((min(ROWS, len(vectors)), vectors.shape[1]), np.float32)
    for start in range(0, len(vectors), ROWS):
        rows = buf[:min(ROWS, len(vectors) - start)]
        np.copyto(rows, vectors[start:start + len(rows)], casting="unsafe")
        dot = np.einsum("ij,j->i", rows, query)
        norm = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(norm > 0, dot / norm, np.float32(0))
        sim[~np.isfinite(sim)] = -1
        out[start:start + len(rows)] = np.clip(sim, -1, 1)
    return out


def _read(array, box) -> np.ndarray:
    return np.asarray(array[box])


def _read_boxes(array, boxes):
    """``_read`` of each box, in order. A zarr (v3) array is read a few boxes at a time through
    its asyncio API: zarr's fixed cost per read overlaps, which halves the time of many small
    reads. A batch holds at most ``BATCH`` boxes and ``BATCH_BYTES`` of data."""
    asynchronous = getattr(array, "async_array", None)
    if asynchronous is None or _sync is None or len(boxes) < 2:
        for box in boxes:
            yield _read(array, box)
        return

    async def gather(batch):
        return await asyncio.gather(*[asynchronous.getitem(box) for box in batch])

    row = array.shape[-1] * np.dtype(array.dtype).itemsize
    batch, nbytes = [], 0
    for box in boxes + [None]:
        size = 0 if box is None else math.prod(s.stop - s.start for s in box) * row
        if batch and (box is None or len(batch) == BATCH or nbytes + size > BATCH_BYTES):
            yield from (np.asarray(data) for data in _sync(gather(batch)))
            batch, nbytes = [], 0
        if box is not None:
            batch.append(box)
            nbytes += size


def _score_block(array, region, cand: np.ndarray, query: np.ndarray, tile) -> np.ndarray:
    """Similarities of a block's candidates: float32 of the block's shape, NaN elsewhere.

    Reads only the chunks (``tile``) of the feature array that hold candidates (``_reads``),
    and converts and scores only the candidates. A projected store level scores from scalars.
    """
    if hasattr(array, "score"):
        return array.score(region, cand)
    out = np.full(cand.shape, np.nan, np.float32)
    start = [s.start for s in region]
    boxes = _reads(cand, tile)
    shifted = [tuple(slice(a + s.start, a + s.stop) for a, s in zip(start, box)) for box in boxes]
    for box, data in zip(boxes, _read_boxes(array, shifted)):
        mask = cand[box]
        vectors = data.reshape(-1, data.shape[-1]) if mask.all() else data[mask]
        out[box][mask] = _cosine(vectors, query)
    return out


def _reads(cand: np.ndarray, tile) -> list[tuple[slice, ...]]:
    """Boxes (block coordinates) that cover every candidate, made of whole chunks that hold one.

    A read costs a fixed overhead plus its bytes, so neighbouring chunks with candidates are
    read together: each cluster of them (26-connected) in one box when at most half of the
    box's chunks are empty, else row by row (runs of consecutive chunks along x). Every box
    is then trimmed to the candidates inside it.
    """
    if cand.all():
        return [tuple(slice(0, n) for n in cand.shape)]
    tile = tile or cand.shape
    grid = tuple(math.ceil(n / t) for n, t in zip(cand.shape, tile))
    padded = np.zeros(tuple(g * t for g, t in zip(grid, tile)), bool)
    padded[tuple(slice(0, n) for n in cand.shape)] = cand
    occupied = padded.reshape(grid[0], tile[0], grid[1], tile[1], grid[2], tile[2]).any(axis=(1, 3, 5))
    labels, _ = ndimage.label(occupied, structure=np.ones((3, 3, 3)))
    tiles = []
    for cluster in ndimage.find_objects(labels):
        if occupied[cluster].sum() >= FILL * occupied[cluster].size:
            tiles.append(cluster)
            continue
        for z, y in product(range(cluster[0].start, cluster[0].stop), range(cluster[1].start, cluster[1].stop)):
            row = np.concatenate([[False], occupied[z, y, cluster[2]], [False]])
            edges = np.flatnonzero(np.diff(row.astype(np.int8)))
            for a, b in zip(edges[::2], edges[1::2]):
                x0 = cluster[2].start + int(a)
                tiles.append((slice(z, z + 1), slice(y, y + 1), slice(x0, cluster[2].start + int(b))))
    boxes = []
    for t in tiles:
        box = tuple(slice(s.start * k, min(s.stop * k, n)) for s, k, n in zip(t, tile, cand.shape))
        trimmed = _bbox(cand[box], [s.start for s in box])
        if trimmed is not None:
            boxes.append(trimmed)
    return boxes


def _bbox(mask: np.ndarray, offset) -> tuple[slice, ...] | None:
    """Bounding box of the True values of a 3-D mask, shifted by ``offset``, or None."""
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(offset[axis] + int(hit[0]), offset[axis] + int(hit[-1]) + 1))
    return tuple(box)


# ------------------------------------------------------------------ from one level to the next

@dataclass(frozen=True)
class _Parent:
    """The previous level around a region: similarity and survivors, from grid index ``offset``."""

    prob: np.ndarray
    keep: np.ndarray
    offset: tuple[int, ...]
    shape: tuple[int, ...]  # of the whole previous level
    ratio: int
    rule: str = "cryosam"

    def window(self, region, ratio) -> _Parent:
        """The part of this level that ``region`` of level ``ratio`` needs (what a task ships)."""
        box = []
        for axis, s in enumerate(region):
            lo = (s.start * ratio) // self.ratio
            hi = min(((s.stop - 1) * ratio) // self.ratio + 2, self.shape[axis])
            box.append(slice(lo - self.offset[axis], hi - self.offset[axis]))
        box = tuple(box)
        return _Parent(self.prob[box], self.keep[box], tuple(b.start + o for b, o in zip(box, self.offset)),
                       self.shape, self.ratio, self.rule)

    def children(self, region, ratio) -> np.ndarray:
        """The candidates on ``region`` of level ``ratio``: the survivors' children.

        Per axis, child ``i`` sits at ``i * ratio / self.ratio`` parent steps: its parent is
        the floor of that ("cryosam"), or the nearest parent, both on a tie ("nearest");
        the 3-D rule is the OR over the axes' choices, applied axis by axis."""
        keep = self.keep
        for axis, s in enumerate(region):
            scaled = np.arange(s.start, s.stop) * ratio  # parent steps, times self.ratio
            lo = scaled // self.ratio
            if self.rule == "cryosam":
                keep = np.take(keep, lo - self.offset[axis], axis=axis)
                continue
            twice = 2 * (scaled % self.ratio)  # > ratio: nearer the upper parent; == ratio: a tie
            first = np.where(twice > self.ratio, lo + 1, lo)
            second = np.where(twice == self.ratio, lo + 1, first)
            last = self.shape[axis] - 1
            first, second = np.minimum(first, last), np.minimum(second, last)
            keep = (np.take(keep, first - self.offset[axis], axis=axis)
                    | np.take(keep, second - self.offset[axis], axis=axis))
        return keep

    def upsample(self, region, ratio) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, candidates) on ``region`` of level ``ratio``: the previous similarity
        interpolated linearly along each axis, and the survivors' children (nearest)."""
        prob = self.prob
        for axis, s in enumerate(region):
            index = np.arange(s.start, s.stop)
            position = index * ratio / self.ratio
            i0 = np.floor(position).astype(np.intp)
            t = (position - i0).astype(np.float32)
            i1 = np.minimum(i0 + 1, self.shape[axis] - 1)
            shape = [1, 1, 1]
            shape[axis] = -1
            t = t.reshape(shape)
            lo = np.take(prob, i0 - self.offset[axis], axis=axis)
            hi = np.take(prob, i1 - self.offset[axis], axis=axis)
            prob = lo * (1 - t) + hi * t
        return prob.astype(np.float32, copy=False), self.children(region, ratio)


def _start(region, ratio, parent: _Parent | None):
    """(similarity, candidates) of a region before scoring: level 0 starts at 0, all candidates."""
    shape = tuple(s.stop - s.start for s in region)
    if parent is None:
        return np.zeros(shape, np.float32), np.ones(shape, bool)
    return parent.upsample(region, ratio)


# ------------------------------------------------------------------ NMS and top-K

def _order(flat: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Indices sorting by score (descending), ties by flat grid index; the first ``k`` (0: all)."""
    order = np.lexsort((flat, -scores.astype(np.float64)))
    return order[:k] if k else order


def nms_top_k(similarity: np.ndarray, window: int, k: int, *, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a whole similarity volume and the ``k`` best of them (the reference).

    A point is kept when it equals the maximum of the ``window``³ cube around it (the volume
    padded with -inf, as ``max_pool3d(prob, window, stride=1, padding=window // 2)``), so
    every point of a tied plateau is kept; with ``mask``, only points where it is True can be
    kept (others still suppress their neighbours). Then the ``k`` highest scores, ties broken
    by position (z, y, x order); ``k=0`` keeps all.

    Returns
    -------
    coords : (n, 3) int64 grid indices, n <= k
    scores : (n,) the similarity there, sorted descending

    Examples
    --------
    >>> s = np.zeros((1, 1, 7)); s[0, 0, [1, 3, 6]] = [0.5, 0.9, 0.7]
    >>> nms_top_k(s, 3, 0)[1].tolist(), nms_top_k(s, 5, 0)[1].tolist(), nms_top_k(s, 5, 1)[0].tolist()
    ([0.9, 0.7, 0.5], [0.9, 0.7], [[0, 0, 3]])
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 3:
        raise InputError(f"similarity must be a 3-D array, got shape {similarity.shape}")
    MatchParams(nms_window=window, top_k=k)  # the same checks as the parameters
    peaks = similarity == ndimage.maximum_filter(similarity, size=window, mode="constant", cval=-np.inf)
    if mask is not None:
        peaks &= np.asarray(mask, bool)
    flat = np.flatnonzero(peaks)
    scores = similarity.ravel()[flat]
    chosen = _order(flat, scores, k)
    return np.stack(np.unravel_index(flat[chosen], similarity.shape), axis=1).astype(np.int64), scores[chosen]


def _nms_block(core, shape, ratio, parent: _Parent | None, neighbours, window: int, k: int):
    """Detections of one block of the last level: (flat grid indices, scores), its top ``k``.

    The block's similarity is rebuilt on the core plus a halo of ``window // 2`` points: the
    previous level upsampled, overwritten by the scores of every block that overlaps it
    (``neighbours``: (region, scores with NaN at non-candidates))."""

    halo = window // 2
    region = tuple(slice(max(s.start - halo, 0), min(s.stop + halo, n)) for s, n in zip(core, shape))
    prob, _ = _start(region, ratio, parent)
    cand = np.zeros(prob.shape, bool)
    for other, scores in neighbours:
        common = overlap(region, other)
        if common is None:
            continue
        here, there = common
        values = scores[there]
        scored = ~np.isnan(values)
        prob[here][scored] = values[scored]
        cand[here] |= scored
    peaks = prob == ndimage.maximum_filter(prob, size=window, mode="constant", cval=-np.inf)
    inner = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, region))
    local = np.nonzero(peaks[inner] & cand[inner])
    scores = prob[inner][local]
    flat = np.ravel_multi_index(tuple(i + c.start for i, c in zip(local, core)), shape)
    chosen = _order(flat, scores, k)
    return flat[chosen], scores[chosen]


# ------------------------------------------------------------------ block kernels (run by engine.runner)

def _score_kernel(region, array, candidates: dict, query, tile):
    return _score_block(array, region.write, candidates[region.name], query, tile)


def _nms_kernel(region, shape, ratio, windows: dict, scored: dict, near: dict, window: int, k: int):
    neighbours = [scored[name] for name in near[region.name]]
    return _nms_block(region.write, shape, ratio, windows[region.name], neighbours, window, k)


def _block_shape(array, block) -> tuple[int, ...]:
    """``block`` rounded up to whole chunks of the feature array (when it has chunks)."""
    chunks = getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 4 and all(_is_int(c) for c in chunks):
        return tuple(max(1, math.ceil(b / c)) * int(c) for b, c in zip(block, chunks[:3]))
    return tuple(block)


def _tile(array):
    chunks = getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 4 and all(_is_int(c) for c in chunks):
        return tuple(int(c) for c in chunks[:3])
    return None


# ------------------------------------------------------------------ checking inputs

def _level(features, ratio):
    if not isinstance(features, Mapping):
        raise InputError(f"features must be a mapping {{ratio: array (Z, Y, X, D)}}, got {type(features).__name__}")
    if ratio not in features:
        raise InputError(f"features has no level for ratio {ratio} (it has {sorted(features)})")
    array = features[ratio]
    shape = tuple(getattr(array, "shape", ()))
    if len(shape) != 4 or min(shape) < 1:
        raise InputError(f"features[{ratio}] must have shape (Z, Y, X, D), got {shape}")
    kind = np.dtype(getattr(array, "dtype", np.float32)).kind
    if kind != "f":
        raise InputError(f"features[{ratio}] must hold floats, got dtype {array.dtype}")
    return array


def _check_pyramid(features, ratios) -> list:
    arrays = [_level(features, r) for r in ratios]
    dims = {a.shape[3] for a in arrays}
    if len(dims) > 1:
        raise InputError(f"features levels {list(ratios)} have different feature sizes {[a.shape[3] for a in arrays]}")
    for (r0, a0), (r1, a1) in zip(zip(ratios, arrays), zip(ratios[1:], arrays[1:])):
        for axis in range(3):
            n0, n1 = a0.shape[axis], a1.shape[axis]
            # the volume extents each level allows: (n - 1) * r + 1 .. n * r voxels
            if max((n0 - 1) * r0 + 1, (n1 - 1) * r1 + 1) > min(n0 * r0, n1 * r1):
                raise InputError(f"features[{r0}] {a0.shape[:3]} and features[{r1}] {a1.shape[:3]} "
                                 f"do not describe the same volume (axis {'zyx'[axis]})")
    return arrays


def _check_query(query, dim) -> np.ndarray:
    q = np.asarray(query, np.float64)
    if q.shape != (dim,):
        raise InputError(f"query must be a vector of {dim} values (the features' size), got shape {q.shape}")
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm == 0:
        raise InputError("query must be finite and non-zero")
    return (q / norm).astype(np.float32)


def _check_block(block) -> tuple[int, int, int]:
    try:
        block = tuple(block)
    except TypeError:
        block = ()
    if len(block) != 3 or any(not _is_int(b) or b < 1 for b in block):
        raise InputError(f"block must be 3 positive integers (grid points z, y, x), got {block!r}")
    return tuple(int(b) for b in block)


# ------------------------------------------------------------------ public functions

def query_from_instances(features, ratio: int, instances, *, points=None, at: str = "masks") -> np.ndarray:
    """The query of Hierarchical Feature Matching: the mean feature inside the prompted masks.

    CryoSAM's masked average pooling (paper eq. 4): every grid point of level ``ratio``
    (use the finest; grid point (i, j, k) is voxel (i*r, j*r, k*r)) that lies inside an
    instance mask contributes its vector, pooled over all instances, and the mean is
    L2-normalised. An instance whose mask holds no grid point (empty, or thinner than the
    grid) contributes the grid point nearest to its prompt instead (``points``, default each
    instance's ``point``). ``at="centroids"``: CryoSAM's released code instead, the features
    sampled trilinearly at each mask's centroid (:func:`query_at_points`; an empty mask gives
    its prompt).

    Examples
    --------
    >>> f = {4: np.zeros((2, 2, 2, 2), np.float32)}; f[4][0, 0, 0] = (3, 0); f[4][0, 0, 1] = (0, 1)
    >>> inst = ((slice(0, 1), slice(0, 1), slice(0, 5)), np.ones((1, 1, 5), bool))
    >>> query_from_instances(f, 4, [inst]).astype(float).round(3).tolist()
    [0.949, 0.316]
    """
    if not hasattr(features, "__getitem__") or not hasattr(features, "__contains__") or ratio not in features:
        raise InputError(f"features must be a mapping {{ratio: array (Z, Y, X, D)}} with level {ratio}")
    array = features[ratio]
    grid = tuple(int(n) for n in getattr(array, "shape", ())[:3])
    if len(getattr(array, "shape", ())) != 4 or min(grid) < 1:
        raise InputError(f"features[{ratio}] must have shape (Z, Y, X, D), got {getattr(array, 'shape', None)}")
    r = int(ratio)
    instances = list(instances)
    if not instances:
        raise InputError("no instances to make a query from")
    if points is not None and len(points) != len(instances):
        raise InputError(f"points must give one prompt per instance ({len(instances)}), got {len(points)}")
    if at not in ("masks", "centroids"):
        raise InputError(f"at must be 'masks' or 'centroids', got {at!r}")
    if at == "centroids":
        centres = []
        for i, inst in enumerate(instances):
            box, mask = check_instance(inst, i)
            if mask.any():
                centres.append([b.start + float(np.mean(c)) for b, c in zip(box, np.nonzero(mask))])
            else:
                point = points[i] if points is not None else getattr(inst, "point", None)
                if point is None:
                    raise InputError(f"instance {i} is empty and has no prompt point to fall back on")
                centres.append(list(check_point(point, tuple(g * r for g in grid))))
        return query_at_points(features, r, np.minimum(centres, np.asarray(grid) * r - 1))
    total = np.zeros(array.shape[3], np.float64)
    count = 0
    for i, inst in enumerate(instances):
        box, mask = check_instance(inst, i)
        if any(b.start < 0 or b.stop > g * r for b, g in zip(box, grid)):
            raise InputError(f"instance {i}: box {box} lies outside the features' volume {tuple(g * r for g in grid)}")
        first = [-(-b.start // r) for b in box]
        stop = [min(-(-b.stop // r), g) for b, g in zip(box, grid)]
        inside = None
        if all(a < b for a, b in zip(first, stop)):
            inside = mask[tuple(slice(f * r - b.start, None, r) for f, b in zip(first, box))]
        if inside is not None and inside.any():
            vectors = np.asarray(array[tuple(slice(a, b) for a, b in zip(first, stop))])[inside]
            total += vectors.astype(np.float64).sum(0)
            count += len(vectors)
            continue
        point = points[i] if points is not None else getattr(inst, "point", None)
        if point is None:
            raise InputError(f"instance {i} holds no grid point of ratio {r} and has no prompt point to fall back on")
        p = check_point(point, tuple(g * r for g in grid))
        index = tuple(min(int(math.floor(v / r + 0.5)), g - 1) for v, g in zip(p, grid))
        total += np.asarray(array[index[0]:index[0] + 1, index[1]:index[1] + 1, index[2]:index[2] + 1],
                            np.float64).reshape(-1)
        count += 1
    norm = np.linalg.norm(total)
    if not np.isfinite(norm) or norm == 0:
        raise InputError("the features inside the instances average to zero (or are not finite): no query")
    return (total / norm).astype(np.float32)


def query_at_points(features, ratio: int, points_zyx, *, interpolation: str = "linear") -> np.ndarray:
    """CryoSAM's query: the mean feature sampled at points (its code: the mask centroids), L2-normalised.

    Samples level ``ratio`` of the pyramid (use the finest) at each prompt's voxel
    coordinates (z, y, x; fractional allowed): trilinearly between the 8 surrounding grid
    points (``interpolation="linear"``, like CryoSAM's ``grid_sample``) or at the nearest
    one (``"nearest"``). As in CryoSAM, the raw samples are averaged and the mean is
    normalised. Points must lie in the volume (0 <= coordinate < grid size * ratio).

    Examples
    --------
    >>> f = {4: np.ones((2, 2, 2, 3), np.float32)}
    >>> query_at_points(f, 4, [[1.0, 2.0, 3.0]]).astype(float).round(3).tolist()
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


def similarity(array, query, *, block=(16, 64, 64)) -> np.ndarray:
    """The cosine similarity of every grid point of one level with ``query`` (whole volume).

    Reads the level block by block but returns the whole (Z, Y, X) float32 volume: a
    reference for small data; the values are bit for bit those ``match`` computes."""
    shape = tuple(array.shape[:3])
    q = _check_query(query, array.shape[3])
    out = np.empty(shape, np.float32)
    for b in plan_blocks(shape, _block_shape(array, _check_block(block))):
        out[b.region] = _score_block(array, b.region, np.ones(b.shape, bool), q, _tile(array))
    return out


def match(features, query, params: MatchParams | None = None, *, client=None, block=(16, 64, 64)):
    """Find every location whose feature matches ``query``: CryoSAM's Hierarchical Feature Matching.

    Parameters
    ----------
    features : mapping ratio -> array (Zr, Yr, Xr, D)
        The feature pyramid: ``Zr = ceil(Z / r)``, grid point ``i`` at voxel ``i * r``, float16/32,
        vectors not necessarily L2-normalised; zarr arrays are read block by block. A features
        store (``open_features``) is scored exactly from the query's projection on its stored
        tokens (``FeatureStore.project``), never reading a point's D values; pass
        ``dict(store)`` to score its sampled vectors instead (the reference).
    query : (D,) array
        The query feature (``query_from_instances``); normalised here.
    params : MatchParams
        Threshold, ratios, top-K, NMS window, hierarchical or naive.
    client : distributed.Client, optional
        Runs the block tasks on its workers; None runs them in this process.
    block : 3 ints
        Grid points per block task at every level (z, y, x), rounded up to whole chunks.

    Returns
    -------
    pandas.DataFrame
        Columns ``z, y, x`` (voxels of the full-resolution volume) and ``score`` (cosine
        similarity, float32), sorted by score descending then by position, at most
        ``top_k`` rows. ``df.attrs["matching"]`` records, per level, the grid size, the
        candidates scored and the blocks read.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f = {r: rng.normal(size=(64 // r, 64 // r, 64 // r, 8)).astype(np.float32) for r in (16, 8, 4)}
    >>> f[4][5, 6, 7] = f[16][1, 1, 1] = f[8][2, 3, 3] = np.ones(8)
    >>> match(f, np.ones(8), MatchParams(top_k=1))[["z", "y", "x"]].values.tolist()
    [[20, 24, 28]]
    """
    params = MatchParams() if params is None else params
    if not isinstance(params, MatchParams):
        raise InputError(f"params must be a MatchParams, got {type(params).__name__}")
    levels = params.levels
    arrays = _check_pyramid(features, levels)
    q = _check_query(query, arrays[0].shape[3])
    block = _check_block(block)
    started = time.perf_counter()
    if hasattr(features, "project"):  # a features store: every level scored from the query's projection
        projection = features.project(q, client=client)
        arrays = [projection.level(r) for r in levels]

    stats, parent = [], None
    for level, (ratio, array) in enumerate(zip(levels, arrays)):
        last = level == len(levels) - 1
        t0 = time.perf_counter()
        shape = tuple(array.shape[:3])
        blocks = plan_blocks(shape, _block_shape(array, block))
        cands = {}
        for b in blocks:  # score the candidates, block by block; skip blocks without any
            cand = parent.children(b.region, ratio) if parent else np.ones(b.shape, bool)
            if cand.any():
                cands[b.name] = cand
        candidates = sum(int(c.sum()) for c in cands.values())
        scored = [b for b in blocks if b.name in cands]
        results = run_blocks(client, _score_kernel, scored, step="score", args=(array, cands, q, _tile(array)),
                             name="cryosam-match-score", report="cryosam-match", fault=False)
        tasks = {b.index: (b, scores) for b, scores in zip(scored, results)}
        del cands
        if not last:
            prob, keep = _start(tuple(slice(0, n) for n in shape), ratio, parent)
            for b, scores in tasks.values():
                scored = ~np.isnan(scores)
                prob[b.region][scored] = scores[scored]
            keep &= prob >= np.float32(params.sim_threshold)
            parent = _Parent(prob, keep, (0, 0, 0), shape, ratio, params.children)
        else:
            grid = [math.ceil(n / s) for n, s in zip(shape, blocks[0].shape)] if blocks else [0, 0, 0]
            near, windows = {}, {}
            for index, (b, _) in tasks.items():  # NMS where there are candidates, with a halo
                around = product(*[range(max(i - 1, 0), min(i + 2, g)) for i, g in zip(index, grid)])
                near[b.name] = [tasks[j][0].name for j in around if j in tasks]
                reach = _grow(b.region, params.nms_window // 2, shape)
                windows[b.name] = parent.window(reach, ratio) if parent else None
            regions = {b.name: (b.region, scores) for b, scores in tasks.values()}
            peaks = run_blocks(client, _nms_kernel, [b for b, _ in tasks.values()], step="nms",
                               args=(shape, ratio, windows, regions, near, params.nms_window, params.top_k),
                               name="cryosam-match-nms", report="cryosam-match", fault=False)
            flat = np.concatenate([p[0] for p in peaks]) if peaks else np.empty(0, np.int64)
            scores = np.concatenate([p[1] for p in peaks]) if peaks else np.empty(0, np.float32)
            chosen = _order(flat, scores, params.top_k)
            flat, scores = flat[chosen], scores[chosen]
        stats.append({"ratio": ratio, "grid_points": math.prod(shape), "candidates": candidates,
                      "blocks": len(blocks), "blocks_read": len(tasks), "seconds": time.perf_counter() - t0})
        del tasks

    ratio = levels[-1]
    coords = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64) * ratio
    if params.centre:
        coords += ratio // 2
    df = pd.DataFrame({"z": coords[:, 0], "y": coords[:, 1], "x": coords[:, 2], "score": scores.astype(np.float32)})
    df.attrs["matching"] = {"matching": params.matching, "ratio": ratio, "levels": stats,
                            "seconds": time.perf_counter() - started}
    return df


def _grow(region, halo, shape):
    return tuple(slice(max(s.start - halo, 0), min(s.stop + halo, n)) for s, n in zip(region, shape))
