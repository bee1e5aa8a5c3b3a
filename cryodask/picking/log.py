"""LoG blob picker: every particle of a given diameter, with no weights (``--method log``).

A dense particle is a dark ball, and the scale-normalised LoG answers most at the centre of a
ball of radius r when σ = r/√3; three tests (a robust significance threshold, roundness that
tells balls from sheets under a missing wedge, and a scale ratio against larger particles) keep
it to the particles asked for. Blockwise and exact: the picks are the same for any block size.
How the defaults were chosen and why each test: docs/architecture.md, "LoG picker".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .. import validate
from ..engine.blocks import Block, DoneMarks, plan_blocks
from ..engine.runner import Region, lazy, run_blocks, volume_input
from ..errors import InputError
from ..report.stages import RecordedRead
from ..io.layouts import CHUNKS
from .params import LogParams

LARGER_SCALE = 1.5  # the scale of the size test, as a multiple of σ
TRUNCATE = 4.0  # Gaussian kernels reach 4σ, scipy's default
COLUMNS = ["z", "y", "x", "score"]


def voxel_sizes(voxel_size) -> tuple[float, float, float]:
    """``voxel_size`` (one number, or z, y, x) as three positive floats in Å (``validate.voxel_size``)."""
    return validate.voxel_size(voxel_size if voxel_size is not None else math.nan)


# ------------------------------------------------------------------ geometry of one pick scale

@dataclass(frozen=True)
class Geometry:
    """The pick scale in voxels along z, y, x, and how far each rule looks (voxels)."""

    voxel_size: tuple[float, float, float]
    sigma_A: float
    sigma: tuple[float, float, float]
    sigma_big: tuple[float, float, float]
    patch: tuple[int, int, int]  # reach of the shape tests (the larger scale's kernel)
    reach: tuple[int, int, int]  # reach of the suppression distance
    halo: tuple[int, int, int]

    @classmethod
    def of(cls, params: LogParams, voxel_size) -> Geometry:
        vs = voxel_sizes(voxel_size)
        sigma = tuple(params.sigma / v for v in vs)
        if params.diameter < 4 * max(vs):  # σ would be about a voxel: the filters are not sampled
            raise validate.FieldError("diameter", f"{params.diameter:g} Å is under 4 voxels of {max(vs):g} Å: "
                                      "too small to pick at this voxel size (check the units, or bin less)")
        sigma_big = tuple(s * LARGER_SCALE for s in sigma)
        field = tuple(int(TRUNCATE * s + 0.5) for s in sigma)  # scipy's kernel radius
        patch = tuple(max(f, int(TRUNCATE * s + 0.5)) for f, s in zip(field, sigma_big))
        reach = tuple(int(math.floor(params.distance / v)) for v in vs)
        tests = params.min_roundness is not None or params.max_scale_ratio is not None
        halo = tuple(r + 1 + (p if tests else f) for r, p, f in zip(reach, patch, field))
        return cls(vs, params.sigma, sigma, sigma_big, patch, reach, halo)


# ------------------------------------------------------------------ the response

def log_response(block, voxel_size, params: LogParams, *, mean=0.0, std=1.0) -> np.ndarray:
    """Scale-normalised LoG response of ``(block - mean) / std``: high at particle centres.

    ``σ² Σᵢ ∂²(G_σ * image)/∂xᵢ²`` with lengths in Å (so anisotropic voxels are fine),
    ``σ = radius/√3`` of ``params.diameter``, the sign flipped for bright particles; the block's edges
    are mirrored (pass a block with a halo to get exact values inside it).

    Examples
    --------
    >>> z, y, x = np.mgrid[:24, :24, :24]
    >>> ball = -np.exp(-((z - 12) ** 2 + (y - 12) ** 2 + (x - 10) ** 2) / 18.0)  # dark
    >>> r = log_response(ball, 10.0, LogParams(diameter=60))
    >>> [int(i) for i in np.unravel_index(r.argmax(), r.shape)]
    [12, 12, 10]
    """
    g = Geometry.of(params, voxel_size)
    x = (np.asarray(block, dtype=np.float32) - np.float32(mean)) / np.float32(std)
    return _response(x, g, params.dark)


def laplacian_of_gaussian(array, voxel_size, params: LogParams, *, mean=None, std=None):
    """:func:`log_response` of a whole (z, y, x) dask (or numpy) array, lazily: a dask array.

    Each chunk is filtered with the kernels' reach (scipy's radius, ``4σ``) of its neighbours,
    so the result equals the whole-array response. Without ``mean`` and ``std`` the array is
    normalised with its own (lazy) mean and std.

    >>> import dask.array as da
    >>> r = laplacian_of_gaussian(da.zeros((32, 64, 64), chunks=16), 10.0, LogParams(diameter=80))
    >>> r.shape, r.dtype
    ((32, 64, 64), dtype('float32'))
    """

    g = Geometry.of(params, voxel_size)
    array, mean, std = volume_input(array, mean, std)
    return lazy(log_response, array, response_halo(g), voxel_size=g.voxel_size, params=params, mean=mean, std=std)


def response_halo(g: Geometry) -> tuple[int, int, int]:
    """Voxels of neighbours the response of a block needs to equal the whole array's."""
    return tuple(int(TRUNCATE * s + 0.5) for s in g.sigma)


def _response(x: np.ndarray, g: Geometry, dark: bool) -> np.ndarray:
    """``σ²∇²G`` with shared smoothing passes (8 one-dimensional filters instead of 9)."""

    def pass1d(a, axis, order):
        return ndi.gaussian_filter1d(a, g.sigma[axis], axis=axis, order=order, mode="reflect",
                                     truncate=TRUNCATE, output=np.float32)

    scale = [np.float32((g.sigma_A / v) ** 2 * (1 if dark else -1)) for v in g.voxel_size]
    smooth_x = pass1d(x, 2, 0)
    smooth_yx = pass1d(smooth_x, 1, 0)
    out = pass1d(smooth_yx, 0, 2) * scale[0]
    del smooth_yx
    out += pass1d(pass1d(smooth_x, 1, 2), 0, 0) * scale[1]
    del smooth_x
    out += pass1d(pass1d(pass1d(x, 2, 2), 1, 0), 0, 0) * scale[2]
    return out


# ------------------------------------------------------------------ shape tests at candidates

def _kernels(sigma: float, radius: int, orders) -> np.ndarray:
    """Gaussian derivative weights (one row per order) over ``-radius..radius``, zero beyond scipy's reach."""
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    own = int(TRUNCATE * sigma + 0.5)
    phi = np.where(np.abs(k) <= own, np.exp(-0.5 * (k / sigma) ** 2), 0.0)
    phi /= phi.sum()
    rows = {0: phi, 1: k / sigma**2 * phi, 2: (k * k / sigma**4 - 1 / sigma**2) * phi}
    return np.stack([rows[o] for o in orders])


def shape_tests(x: np.ndarray, points: np.ndarray, g: Geometry, dark: bool, batch: int = 32):
    """Roundness (at σ: the smaller of the middle Hessian eigenvalue / trace and of the smallest
    eigenvalue / trace of the y, x block) and scale ratio (normalised LoG at 1.5σ / at σ) at
    ``points`` of ``x``, which must lie ``g.patch`` voxels from its edges.

    Evaluated on the patch around each point with separable kernels, so a candidate costs a
    few patch-sized dot products and a block never holds six Hessian volumes.
    """
    n = len(points)
    roundness, ratio = np.full(n, -np.inf), np.full(n, np.inf)
    if n == 0:
        return roundness, ratio
    windows = np.lib.stride_tricks.sliding_window_view(x, tuple(2 * p + 1 for p in g.patch))
    small = [_kernels(s, p, (0, 1, 2)) for s, p in zip(g.sigma, g.patch)]
    big = [_kernels(s, p, (0, 2)) for s, p in zip(g.sigma_big, g.patch)]
    vz, vy, vx = g.voxel_size
    sign = 1.0 if dark else -1.0
    corner = points - np.asarray(g.patch)
    for start in range(0, n, batch):
        c = corner[start:start + batch]
        patches = windows[c[:, 0], c[:, 1], c[:, 2]].astype(np.float64)
        cs = np.einsum("nzyx,ox,py,qz->nqpo", patches, small[2], small[1], small[0], optimize=True)
        cb = np.einsum("nzyx,ox,py,qz->nqpo", patches, big[2], big[1], big[0], optimize=True)
        hessian = np.empty((len(c), 3, 3))
        hessian[:, 0, 0] = cs[:, 2, 0, 0] / vz**2
        hessian[:, 1, 1] = cs[:, 0, 2, 0] / vy**2
        hessian[:, 2, 2] = cs[:, 0, 0, 2] / vx**2
        hessian[:, 0, 1] = hessian[:, 1, 0] = cs[:, 1, 1, 0] / (vz * vy)
        hessian[:, 0, 2] = hessian[:, 2, 0] = cs[:, 1, 0, 1] / (vz * vx)
        hessian[:, 1, 2] = hessian[:, 2, 1] = cs[:, 0, 1, 1] / (vy * vx)
        hessian *= sign
        trace = np.trace(hessian, axis1=1, axis2=2)
        larger = sign * (cb[:, 1, 0, 0] / vz**2 + cb[:, 0, 1, 0] / vy**2 + cb[:, 0, 0, 1] / vx**2) * LARGER_SCALE**2
        ok = trace > 0
        middle = np.linalg.eigvalsh(hessian)[:, 1] / np.where(ok, trace, 1.0)
        across = hessian[:, 1:, 1:]  # y, x: the plane the missing wedge leaves alone
        across = np.linalg.eigvalsh(across)[:, 0] / np.maximum(np.trace(across, axis1=1, axis2=2), 1e-30)
        roundness[start:start + batch] = np.where(ok, np.minimum(middle, across), -np.inf)
        ratio[start:start + batch] = np.where(ok, larger / np.where(ok, trace, 1.0), np.inf)
    return roundness, ratio


# ------------------------------------------------------------------ one block

@dataclass
class BlockPicks:
    """The picks inside one block (global voxel coordinates, raw response), what became of the
    block's other candidates, a sample of its response and the response floor under which it
    dropped candidates.

    ``fates`` holds the raw response and the rule that removed each candidate inside the block
    at or above ``floor`` (:data:`KEPT`, :data:`ROUND`, :data:`LARGE`, :data:`NEAR`); ``below``
    counts those under it. ``sample`` is the response on a lattice fixed by the volume's shape
    (so the same voxels whatever the block grid) for the threshold's robust statistics.
    """

    coords: np.ndarray
    response: np.ndarray
    sample: np.ndarray
    floor: float
    fates: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))
    below: int = 0


KEPT, ROUND, LARGE, NEAR = 0, 1, 2, 3  # the fate of a candidate above the floor
SAMPLE_SIZE = 2_000_000  # response values behind the threshold's median and MAD


def sample_stride(shape) -> int:
    """Step of the response sample's lattice: about :data:`SAMPLE_SIZE` voxels of the volume."""
    return max(1, math.ceil((math.prod(shape) / SAMPLE_SIZE) ** (1 / 3)))


def robust_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 × median absolute deviation (the standard deviation for Gaussian values).

    Why robust: the response of the background (noise, ice) sets how high a peak must be to
    mean something; membranes, gold and the particles themselves fatten the tails and inflate a
    plain standard deviation, the more so the more crowded the tomogram, which lost weak particles.
    Falls back to the standard deviation where over half the values are equal (a flat volume).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0, 0.0
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    return median, spread if spread > 0 else float(values.std())


def _padded(block: Block, halo, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - h), min(n, s.stop + h)) for s, h, n in zip(block.region, halo, shape))


def pick_block(read, block: Block, shape, voxel_size, params: LogParams, *, mean: float, std: float,
               floor: float | None = None) -> BlockPicks:
    """Picks inside one block, exact whatever the block grid.

    Reads the block with a halo of ``Geometry.halo`` voxels, computes the response, finds the
    local maxima (3×3×3) within ``min_distance`` of the block, drops those under ``floor`` (by
    default half the threshold in robust units of this block's own response: the caller redoes
    a block whose floor turns out above the global threshold) and those failing the shape
    tests, suppresses every candidate that has a higher one within ``min_distance`` (ties: the
    lower z, y, x index wins) and keeps those inside the block, refined to sub-voxel positions
    by a parabola through the response on each axis.
    """
    g = Geometry.of(params, voxel_size)
    outer = _padded(block, g.halo, shape)
    data = np.asarray(read(outer))
    if data.shape != tuple(s.stop - s.start for s in outer):
        raise InputError(f"reader returned shape {data.shape} for region {outer}")
    x = (data.astype(np.float32, copy=False) - np.float32(mean)) / np.float32(std)
    response = _response(x, g, params.dark)
    inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(block.region, outer))
    step = sample_stride(shape)
    lattice = tuple(slice(i.start + (-b.start) % step, i.stop, step) for i, b in zip(inner, block.region))
    sample = response[lattice].astype(np.float32).ravel()
    if floor is None:
        median, spread = robust_spread(response[inner])
        floor = median + 0.5 * params.threshold * spread
    starts = np.array([o.start for o in outer])

    # candidates: local maxima within the suppression reach of the block
    near = tuple(slice(max(0, i.start - r), min(n, i.stop + r)) for i, r, n in zip(inner, g.reach, response.shape))
    peak = response == ndi.maximum_filter(response, size=3, mode="reflect")
    points = np.argwhere(peak[near] & (response[near] > 0)) + np.array([s.start for s in near])
    scores = response[tuple(points.T)]
    # a peak on the volume's first or last voxel is the mirror fold of the edge, not a centre
    on_face = ((points + starts == 0) | (points + starts == np.asarray(shape) - 1)) & (np.asarray(shape) > 2)
    points, scores = points[~on_face.any(axis=1)], scores[~on_face.any(axis=1)]

    def within(p):
        return np.all((p >= [s.start for s in inner]) & (p < [s.stop for s in inner]), axis=1)

    high = scores.astype(np.float64) >= floor
    below = int(np.count_nonzero(~high & within(points)))
    points, scores = points[high], scores[high]
    fate = np.full(len(points), KEPT)
    if len(points) and (params.min_roundness is not None or params.max_scale_ratio is not None):
        # mirror where the block meets the volume's edge, as the filters do; elsewhere the halo has room
        edge = [(g.patch[a] if o.start == 0 else 0,
                 g.patch[a] if o.stop == shape[a] else 0) for a, o in enumerate(outer)]
        mirrored = np.pad(x, edge, mode="symmetric") if any(map(any, edge)) else x
        roundness, ratio = shape_tests(mirrored, points + np.array([e[0] for e in edge]), g, params.dark)
        if params.max_scale_ratio is not None:
            fate[ratio > params.max_scale_ratio] = LARGE
        if params.min_roundness is not None:
            fate[roundness < params.min_roundness] = ROUND  # the first rule that fails is the one counted

    # suppression: a candidate goes when a higher one (or an equal one earlier in raster order) is near
    passed = fate == KEPT
    index = np.ravel_multi_index(tuple((points[passed] + starts).T), shape)
    order = np.lexsort((index, -scores[passed].astype(np.float64)))
    ranked = np.flatnonzero(passed)[order]
    pairs = cKDTree(points[ranked] * np.asarray(g.voxel_size)).query_pairs(params.distance, output_type="ndarray")
    if len(pairs):
        fate[ranked[np.unique(pairs.max(axis=1))]] = NEAR
    inside = within(points)
    fates = np.column_stack([scores[inside].astype(np.float64), fate[inside]])
    keep = ranked[inside[ranked] & (fate[ranked] == KEPT)]
    return BlockPicks(_refine(response, points[keep]) + starts, scores[keep].astype(np.float64), sample, floor,
                      fates, below)


def _refine(response: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sub-voxel peak positions: the vertex of a parabola through 3 samples on each axis
    (mirrored at the array's edge, as the filters are), moved at most half a voxel."""
    out = points.astype(np.float64)
    if len(points) == 0:
        return out
    centre = response[tuple(points.T)].astype(np.float64)
    for axis in range(3):
        lo, hi = points.copy(), points.copy()
        lo[:, axis] = np.maximum(lo[:, axis] - 1, 0)
        hi[:, axis] = np.minimum(hi[:, axis] + 1, response.shape[axis] - 1)
        a, b = response[tuple(lo.T)].astype(np.float64), response[tuple(hi.T)].astype(np.float64)
        curvature = a - 2 * centre + b
        step = np.where(curvature < 0, 0.5 * (a - b) / np.where(curvature < 0, curvature, -1.0), 0.0)
        out[:, axis] += np.clip(step, -0.5, 0.5)
    return out


# ------------------------------------------------------------------ the whole volume

@dataclass(frozen=True)
class ArrayReader:
    """``read(region)`` for an array already in memory."""

    array: np.ndarray

    def __call__(self, region):
        return self.array[region]


def _stats_kernel(region: Region, data) -> tuple[float, float, int]:
    from ..io.mrc import region_stats

    _, _, total, squares, count = region_stats(np.asarray(data, dtype=np.float32))
    return total, squares, count


def _mean_std(stats) -> tuple[float, float]:
    total, squares, count = (sum(s[i] for s in stats) for i in range(3))
    if count == 0:
        return 0.0, 0.0
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


def _stats(client, read, blocks) -> tuple[float, float]:
    return _mean_std(run_blocks(client, _stats_kernel, blocks, step="stats", read=read, stage="preprocess",
                                name="log-stats"))


def _pick_kernel(region: Region, read, shape, voxel_size, params: LogParams, mean: float, std: float,
                 floor: float | None) -> BlockPicks:
    """:func:`pick_block` (its halo is ``Geometry.halo``; its read is a stage of its own)."""
    return pick_block(RecordedRead(read), region.block, shape, voxel_size, params, mean=mean, std=std, floor=floor)


def _keep(picks: BlockPicks) -> dict:
    """A block's picks as a done-mark payload, so a rerun reads them back."""
    return {"coords": picks.coords, "response": picks.response, "sample": picks.sample, "floor": picks.floor,
            "fates": picks.fates, "below": picks.below}


def _restore(saved: dict) -> BlockPicks:
    return BlockPicks(saved["coords"], saved["response"], saved["sample"], float(saved["floor"]), saved["fates"],
                      int(saved["below"]))


def _pick(client, read, blocks, shape, voxel_size, params, mean, std, marks, floor=None, step="pick") -> list:
    return run_blocks(client, _pick_kernel, blocks, step=step, args=(read, shape, voxel_size, params, mean, std, floor),
                      marks=marks, keep=_keep, restore=_restore, label="log", name=f"log-{step}")


def empty_picks() -> pd.DataFrame:
    return pd.DataFrame({c: np.empty(0) for c in COLUMNS})


def log_pick(read, shape, voxel_size, params: LogParams, *, chunks=CHUNKS, client=None,
             mean=None, std=None, marks: DoneMarks | None = None) -> pd.DataFrame:
    """Pick every particle of ``params.diameter`` in a tomogram with the LoG blob detector.

    Parameters
    ----------
    read : ``read(region) -> array`` for a tuple of slices (picklable: it runs on the workers),
        e.g. a zarr or MRC region reader; a numpy array is accepted too.
    shape : (z, y, x) voxels of the volume.
    voxel_size : Å per voxel, one number or (z, y, x).
    params : :class:`LogParams`.
    chunks : block shape (voxels); each block is read with a halo (``Geometry.halo``).
    client : a ``distributed.Client`` to run the block tasks on; ``None`` runs them here.
    mean, std : the volume's statistics when known (skips the reduction pass).
    marks : ``DoneMarks`` keyed by everything that changes the picks (parameters, chunks, the
        input): each block's picks are kept and marked, so a rerun picks only unfinished blocks.

    Returns
    -------
    pandas.DataFrame
        Columns ``z, y, x`` (voxels, sub-voxel floats) and ``score`` (the response above its
        median over the volume, in robust standard deviations), highest score first.
        ``attrs["log"]`` holds how many candidates each rule removed (:func:`describe`) and the
        threshold's median, spread and cut.

    Examples
    --------
    >>> from cryodask.synth.tomogram import synth_tomogram
    >>> t = synth_tomogram((64, 128, 128), seed=0, snr=0.1)
    >>> picks = log_pick(t.volume, t.volume.shape, 10.0, LogParams(diameter=250))
    >>> list(picks.columns)
    ['z', 'y', 'x', 'score']
    """
    if not isinstance(params, LogParams):
        raise TypeError(f"params must be LogParams, got {type(params).__name__}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise InputError(f"a tomogram must be 3D (z, y, x), got shape {shape}")
    Geometry.of(params, voxel_size)  # refuse bad sizes before any work
    if isinstance(read, np.ndarray):
        if read.shape != shape:
            raise InputError(f"array shape {read.shape} differs from shape {shape}")
        read = ArrayReader(read)
    blocks = plan_blocks(shape, chunks)
    if mean is None or std is None:
        mean, std = _stats(client, read, blocks)
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise InputError(f"the volume has non-finite values (mean {mean}, std {std})")
    if std <= 0 or not blocks:
        return _flat(empty_picks())  # a constant volume has no blobs
    results = _pick(client, read, blocks, shape, voxel_size, params, float(mean), float(std), marks)
    median, spread = robust_spread(np.concatenate([r.sample for r in results]))
    if spread <= 0:
        return _flat(empty_picks())
    cut = median + params.threshold * spread
    redo = [i for i, r in enumerate(results) if r.floor > cut]
    if redo:  # a block's own floor was above the global threshold: pick it again down to the threshold
        again = _pick(client, read, [blocks[i] for i in redo], shape, voxel_size, params, float(mean), float(std),
                      marks, floor=cut, step="again")
        for i, r in zip(redo, again):
            results[i] = r
    coords = np.concatenate([r.coords for r in results])
    response = np.concatenate([r.response for r in results])
    keep = response >= cut
    coords, score = coords[keep], (response[keep] - median) / spread
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0], -score))
    fates = np.concatenate([r.fates for r in results])
    high = fates[:, 0] >= cut
    counts = {"maxima": sum(r.below for r in results) + len(fates),
              "threshold": sum(r.below for r in results) + int(np.count_nonzero(~high)),
              **{name: int(np.count_nonzero(high & (fates[:, 1] == code)))
                 for name, code in (("roundness", ROUND), ("scale ratio", LARGE), ("suppression", NEAR))},
              "max picks": max(0, len(order) - params.max_picks) if params.max_picks else 0}
    order = order[: params.max_picks]
    counts["picks"] = len(order)
    picks = pd.DataFrame({"z": coords[order, 0], "y": coords[order, 1], "x": coords[order, 2], "score": score[order]})
    picks.attrs["log"] = {"counts": counts, "median": median, "spread": spread, "cut": cut}
    return picks


def _flat(picks: pd.DataFrame) -> pd.DataFrame:
    picks.attrs["log"] = {"flat": True}
    return picks


def describe(picks: pd.DataFrame, params: LogParams) -> str:
    """What each rule removed, in one line (``log_pick`` keeps the counts in ``picks.attrs``)."""
    info = picks.attrs.get("log")
    if not info:
        return f"LoG: {len(picks)} picks"
    if info.get("flat"):
        return "LoG: the volume (or its response) is constant: nothing to pick; 0 picks"
    c = info["counts"]
    removed = [f"{c['threshold']} under the threshold ({params.threshold:g} robust σ above the median response)"]
    if params.min_roundness is not None:
        removed.append(f"{c['roundness']} not round (roundness < {params.min_roundness:g})")
    if params.max_scale_ratio is not None:
        removed.append(f"{c['scale ratio']} larger than the diameter (scale ratio > {params.max_scale_ratio:g})")
    removed.append(f"{c['suppression']} within {params.distance:g} Å of a higher pick")
    if c["max picks"]:
        removed.append(f"{c['max picks']} past --max-picks {params.max_picks}")
    return f"LoG: {c['maxima']} candidates, removed " + ", ".join(removed) + f"; {c['picks']} picks"
