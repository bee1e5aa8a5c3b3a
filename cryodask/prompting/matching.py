"""CryoSAM's Hierarchical Feature Matching, computed block by block over the whole volume.

CryoSAM (``xulabs/aitom``, ``CryoSAM.match``) matches one query vector — the mean feature of
the prompted particles — against a feature pyramid, coarse to fine:

1. at the coarsest ratio (16) every grid point is scored with the cosine similarity;
2. at each finer ratio (8, then 4) the candidates are the children (nearest upsampling) of
   the previous level's survivors, and only they are scored; every other point keeps the
   previous level's similarity, upsampled trilinearly (it can still suppress a neighbour in
   the NMS, but it is never a detection);
3. on every level but the last, candidates below ``sim_threshold`` (0.5) are dropped;
4. on the last level, a candidate is a detection when it is the maximum of its 5×5×5
   window (``max_pool3d(prob, 5, stride=1, padding=2)``); the ``top_k`` (512) best
   detections are kept, at voxel ``grid index * ratio``.

``matching="naive"`` scores every point of the finest level and applies the same NMS and
top-K: the baseline the hierarchy is measured against.

Here the pyramid lives on disk (zarr) and is never loaded whole: each level is cut into
blocks of grid points, and a block task reads only the chunks that hold candidates (a block
with none is never read) and converts and scores only the candidates. The coarse levels'
similarity volumes are small (1/512 of the voxels at ratio 8) and are assembled on the
client. The last level's is not: each candidate block's scores stay with the task that
computed them (on a worker, with a client), and each block's NMS takes a halo of
``nms_window // 2`` grid points from its neighbours' scores, so it is exact across block
boundaries; each block keeps its own ``top_k`` and the client merges them (the global top-K
is a subset of the union of the blocks' top-K). With a ``client`` the block tasks run on its
workers; without one, in this process, one after the other.

How fast the hierarchy is depends on the feature store's chunks: a read costs whole chunks,
so chunks much smaller than a particle's footprint (e.g. 4×4×4 grid points × D, 16³ voxels
at ratio 4) let it skip most of the volume, while 16×32×32-point chunks are nearly all hit
by a few hundred particles (``benchmarks/matching.py``).

Feature pyramid protocol: ``features[r]`` (r in ``ratios``) has shape ``(Zr, Yr, Xr, D)``
with ``Zr = ceil(Z / r)``; grid point ``i`` sits at voxel ``i * r``; basic slicing returns
an array (numpy, zarr; float16/32). Vectors need not be L2-normalised: each one is divided
by its norm when it is scored.

Deviations from CryoSAM's code, all deliberate:

* geometry: grid point ``i`` of ratio ``r`` sits at voxel ``i * r`` (the protocol above; it
  is also where CryoSAM's ``down_sample`` puts it, with ``align_corners=True``), so the
  previous similarity is interpolated linearly at ``i * r_child / r_parent`` parent steps
  (CryoSAM: PyTorch's half-pixel ``align_corners=False`` mapping, which shifts it by half a
  coarse step). The children of a survivor are CryoSAM's by default (``parent = (i *
  r_child) // r_parent``); ``children="nearest"`` makes them symmetric around it (see
  ``MatchParams``);
* top-K keeps exactly ``top_k`` detections, ties broken by grid position (z, y, x order);
  CryoSAM keeps every detection tied with the K-th score, so it can return more;
* a similarity is clipped to [-1, 1], a zero vector scores 0 and a non-finite one -1, so
  ``sim_threshold=-1`` disables pruning exactly (hierarchical == naive);
* ``top_k=0`` means "keep every detection" (CryoSAM's ``0 < top_k`` test).
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
from ..errors import InputError

try:  # zarr 3 runs its asyncio API on its own event loop; ``sync`` waits for a coroutine there
    from zarr.core.sync import sync as _sync
except ImportError:  # pragma: no cover - zarr 2, or a future layout: plain sequential reads
    _sync = None

ROWS = 2048  # feature vectors converted to float32 and scored at a time (~9 MB at D = 1152)
FILL = 0.5  # a cluster of chunks with candidates is read as one box when they fill this much of it
BATCH, BATCH_BYTES = 10, 64 * 2**20  # zarr reads issued together


# ------------------------------------------------------------------ parameters

@dataclass(frozen=True)
class MatchParams:
    """Parameters of Hierarchical Feature Matching (CryoSAM's defaults).

    Parameters
    ----------
    sim_threshold : float
        Candidates with a cosine similarity below it are dropped on every level but the
        last (``similarity_threshold``). -1 keeps everything.
    ratios : tuple of int
        Downsampling ratios of the pyramid, coarse to fine (``down_sample_ratios``).
    top_k : int
        Detections kept after NMS; 0 keeps all of them.
    nms_window : int
        Odd side of the cubic NMS window, in grid points of the last level.
    matching : {"hierarchical", "naive"}
        "naive" scores every point of the finest level (``ratios[-1]``) instead.
    centre : bool
        Report grid point ``i`` at voxel ``i * r + r // 2`` instead of ``i * r`` (CryoSAM:
        no centring). Only for features that describe a cell ``[i*r, (i+1)*r)``.
    children : {"cryosam", "nearest"}
        Which finer points a survivor passes on as candidates. "cryosam": CryoSAM's
        ``F.interpolate(mode="nearest")`` index mapping, ``parent = (i * r_child) // r_parent``,
        which on grids whose point ``i`` sits at voxel ``i * r`` reaches only forward (+z,
        +y, +x) of each survivor, so a particle whose lower-corner coarse point was dropped
        is found one grid point off its centre. "nearest": the finer points whose nearest
        coarse point (in voxels) it is, both coarse points on a tie, so the candidates
        surround every survivor and the detections are naive matching's — at the price of
        about 2.5× more candidates (``benchmarks/matching.py``).
    """

    sim_threshold: float = 0.5
    ratios: tuple[int, ...] = (16, 8, 4)
    top_k: int = 512
    nms_window: int = 5
    matching: str = "hierarchical"
    centre: bool = False
    children: str = "cryosam"

    def __post_init__(self):
        t = self.sim_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) or not -1 <= t <= 1:
            raise InputError(f"sim_threshold must be a number in [-1, 1], got {t!r}")
        try:
            ratios = tuple(self.ratios)
        except TypeError:
            raise InputError(f"ratios must be a sequence of integers, got {self.ratios!r}") from None
        if (not ratios or any(not _is_int(r) or r < 1 for r in ratios)
                or any(a <= b for a, b in zip(ratios, ratios[1:]))):
            raise InputError(f"ratios must be positive integers, strictly decreasing (coarse to fine), got {self.ratios!r}")
        object.__setattr__(self, "ratios", tuple(int(r) for r in ratios))
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 keeps every detection), got {self.top_k!r}")
        if not _is_int(self.nms_window) or self.nms_window < 1 or self.nms_window % 2 == 0:
            raise InputError(f"nms_window must be an odd integer >= 1, got {self.nms_window!r}")
        if self.matching not in ("hierarchical", "naive"):
            raise InputError(f"matching must be 'hierarchical' or 'naive', got {self.matching!r}")
        if not isinstance(self.centre, (bool, np.bool_)):
            raise InputError(f"centre must be True or False, got {self.centre!r}")
        if self.children not in ("nearest", "cryosam"):
            raise InputError(f"children must be 'nearest' or 'cryosam', got {self.children!r}")

    @property
    def levels(self) -> tuple[int, ...]:
        """The ratios actually visited: all of them, or only the finest for naive matching."""
        return self.ratios if self.matching == "hierarchical" else self.ratios[-1:]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


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
    and converts and scores only the candidates.
    """
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


# ------------------------------------------------------------------ running blocks

class _InProcess:
    """Runs block tasks here, one after the other (the ``client``'s interface, eagerly)."""

    def submit(self, fn, *args):
        return fn(*args)

    def gather(self, values):
        return values

    def scatter(self, value):
        return value


class _OnClient:
    def __init__(self, client):
        self.client = client

    def submit(self, fn, *args):
        from ..report import recorded

        return self.client.submit(recorded(fn, "infer", step="cryosam-match"), *args, pure=False)

    def gather(self, futures):
        return self.client.gather(futures)

    def scatter(self, value):
        return self.client.scatter(value, hash=False) if isinstance(value, np.ndarray) else value


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
    array = _level(features, ratio)
    if interpolation not in ("linear", "nearest"):
        raise InputError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    points = np.asarray(points_zyx, np.float64)
    if points.ndim == 1:
        points = points.reshape(1, -1)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise InputError(f"points_zyx must be an (N, 3) array of z, y, x voxel coordinates, got shape {points.shape}")
    grid = np.asarray(array.shape[:3])
    if not np.isfinite(points).all() or (points < 0).any() or (points >= grid * ratio).any():
        raise InputError(f"points_zyx must lie in the volume, 0 <= z, y, x < {tuple(int(g) for g in grid * ratio)} voxels")
    position = np.minimum(points / ratio, grid - 1)
    total = np.zeros(array.shape[3], np.float64)
    for p in position:
        if interpolation == "nearest":
            i = np.minimum(np.floor(p + 0.5).astype(int), grid - 1)
            total += _read(array, (i[0], i[1], i[2])).astype(np.float64)
            continue
        i0 = np.floor(p).astype(int)
        i1 = np.minimum(i0 + 1, grid - 1)
        t = p - i0
        cube = _read(array, tuple(slice(a, b + 1) for a, b in zip(i0, i1))).astype(np.float64)
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
        The feature pyramid (see the module docstring); zarr arrays are read block by block.
    query : (D,) array
        The query feature (``query_vector``); normalised here.
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
    runner = _OnClient(client) if client is not None else _InProcess()

    stats, parent, started = [], None, time.perf_counter()
    for level, (ratio, array) in enumerate(zip(levels, arrays)):
        last = level == len(levels) - 1
        t0 = time.perf_counter()
        shape = tuple(array.shape[:3])
        source = runner.scatter(array)
        blocks = plan_blocks(shape, _block_shape(array, block))
        tasks, candidates = {}, 0
        for b in blocks:  # score the candidates, block by block; skip blocks without any
            cand = parent.children(b.region, ratio) if parent else np.ones(b.shape, bool)
            if cand.any():
                candidates += int(cand.sum())
                tasks[b.index] = (b, runner.submit(_score_block, source, b.region, cand, q, _tile(array)))
        if not last:
            prob, keep = _start(tuple(slice(0, n) for n in shape), ratio, parent)
            for (b, _), scores in zip(tasks.values(), runner.gather([f for _, f in tasks.values()])):
                scored = ~np.isnan(scores)
                prob[b.region][scored] = scores[scored]
            keep &= prob >= np.float32(params.sim_threshold)
            parent = _Parent(prob, keep, (0, 0, 0), shape, ratio, params.children)
        else:
            grid = [math.ceil(n / s) for n, s in zip(shape, blocks[0].shape)] if blocks else [0, 0, 0]
            peaks = []
            for index, (b, _) in tasks.items():  # NMS where there are candidates, with a halo
                near = product(*[range(max(i - 1, 0), min(i + 2, g)) for i, g in zip(index, grid)])
                neighbours = [(tasks[j][0].region, tasks[j][1]) for j in near if j in tasks]
                window = parent.window(_grow(b.region, params.nms_window // 2, shape), ratio) if parent else None
                peaks.append(runner.submit(_nms_block, b.region, shape, ratio, window, neighbours,
                                           params.nms_window, params.top_k))
            peaks = runner.gather(peaks)
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
