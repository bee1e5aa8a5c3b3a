"""The classical membrane filter: Hessian sheet score, ridge thinning, hysteresis. No weights.

A membrane is a thin dark sheet: at the bilayer's scale one Hessian eigenvalue is large and the
other two near zero (TomoSegMemTV's idea). The ridge of that score inside a hysteresis mask,
given back the bilayer's thickness, is a full-thickness mask like the truth masks of
MemBrain-seg and ETSAM; thresholds in units of the score's robust spread let one default work
across noise levels, voxel sizes and tomogram sizes. The passes, the halo and the speed:
docs/architecture.md, "Classical membranes".
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import validate
from ..engine.blocks import DoneMarks, plan_blocks
from ..engine.runner import Region, grow, lazy, run_blocks, volume_input, within
from ..errors import InputError
from .hessian import GaussianHessian, ridge, sheet_eigen
from .params import ClassicalParams

TRUNCATE = 4.0  # Gaussian kernels reach 4 sigma (scipy's default); the halo follows from it
# The score histogram lives on u = asinh(score / HIST_EPS): ~0.5 % relative bins for any score
# from 1e-4 to 1e4, with no score range to know in advance, and integer counts that add up to
# the same totals however the volume is cut into blocks.
HIST_EPS = 1e-4
HIST_U = 20.0
HIST_BINS = 8192
IQR_TO_SIGMA = 1.349  # interquartile range of a unit normal distribution
TOP_QUANTILE = 0.999  # "the strongest membranes": 0.995 and 0.9995 gave the same Dice
MIN_SIGMA_VOXELS = 1.0  # the smallest Hessian scale the grid resolves (sigma_A says why)


# ------------------------------------------------------------------ geometry in voxels

def _spacing(voxel_size) -> tuple[float, float, float]:
    """(z, y, x) voxel size in Å from a number or a triple (``validate.voxel_size``, None refused)."""
    return validate.voxel_size(voxel_size if voxel_size is not None else math.nan)


def sigma_A(spacing, params: ClassicalParams) -> float:
    """The Hessian's sigma in Å at this sampling: ``params.sigma()``, but at least
    ``MIN_SIGMA_VOXELS`` of the coarsest axis's voxels.

    Why a floor: below about one voxel a sampled Gaussian second derivative is no longer a
    second derivative (its taps are a few samples of a curve narrower than the grid), and a
    membrane one voxel thick scores as noise does. At 45 Å and 0.7 x thickness this applies from
    31.5 Å/voxel on; the mask's thickness still follows ``params.thickness`` (see ``_mask_task``).
    """
    return max(params.sigma(), MIN_SIGMA_VOXELS * max(spacing))


def _sigmas(spacing, params: ClassicalParams) -> tuple[float, ...]:
    """The Hessian's sigma per axis in voxels: isotropic in Å, so anisotropic voxels work."""
    return tuple(sigma_A(spacing, params) / s for s in spacing)


def halo(voxel_size, params: ClassicalParams) -> tuple[int, int, int]:
    """Halo in voxels needed so blockwise scoring equals whole-array scoring in the interior.

    A separable Gaussian (derivative) filter along one axis reads ``int(4 sigma + 0.5)`` voxels
    each side (scipy's kernel radius), and filtering along the other axes does not carry an
    edge error along this one. So the halo is that radius, per axis.

    Examples
    --------
    >>> halo(10.0, ClassicalParams())
    (13, 13, 13)
    >>> halo((20.0, 10.0, 10.0), ClassicalParams())
    (6, 13, 13)
    """
    return tuple(int(TRUNCATE * s + 0.5) for s in _sigmas(_spacing(voxel_size), params))


def _band_radii(spacing, params: ClassicalParams) -> tuple[float, ...]:
    """How far (voxels) from a ridge voxel the band test looks: half the thickness, plus one voxel
    because the sheet's mid-surface lies up to half a voxel off the ridge voxel, either way."""
    return tuple(params.thickness / 2 / s + 1 for s in spacing)


def _mask_halo(spacing, params: ClassicalParams) -> tuple[int, ...]:
    """Halo of the mask pass: the hysteresis reach, plus the radius that gives back the thickness."""
    return tuple(math.ceil(params.reach / s) + math.ceil(r) for s, r in zip(spacing, _band_radii(spacing, params)))


def band_level(spacing, params: ClassicalParams) -> float:
    """The fraction of a ridge's score at half the membrane thickness from its mid-surface.

    Across a sheet the score follows the Gaussian second derivative of the bilayer: a box of
    width t (std t / (2 sqrt 3)) seen at the Hessian's sigma gives ``(1 - d²/s²) exp(-d²/2s²)``
    with ``s² = σ² + t²/12``. Voxels near a ridge that score at least this fraction of it lie
    within t/2 of the sheet, wherever the sheet falls between voxel centres: so the mask is as
    thick as the membrane at any sampling (a ball of radius t/2 around ridge voxels makes a band
    one voxel thick for t/2 < 1 voxel, and rounds the thickness to whole voxels above it).

    Examples
    --------
    >>> round(band_level((10.0,) * 3, ClassicalParams()), 3), round(band_level((40.0,) * 3, ClassicalParams()), 3)
    (0.453, 0.619)
    """
    s2 = sigma_A(spacing, params) ** 2 + params.thickness**2 / 12
    d2 = (params.thickness / 2) ** 2
    return float((1 - d2 / s2) * math.exp(-d2 / (2 * s2)))


def _ellipsoid(radii) -> np.ndarray:
    """A boolean ball of the given radius per axis (voxels), for anisotropic voxels."""
    reach = [int(math.floor(r + 1e-6)) for r in radii]
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in reach)]
    return sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1 + 1e-6


# ------------------------------------------------------------------ the score

def _hessian(x: np.ndarray, sigmas) -> dict[tuple[int, int], np.ndarray]:
    """The six Gaussian second derivatives of ``x`` (voxel units), sharing separable passes.

    Computed when first read: :func:`_eigen` asks for its region only, which saves passes.
    """
    return GaussianHessian(x, sigmas, TRUNCATE, mode="reflect")


def _eigen(hessian, spacing, sigma: float, region=None):
    """Sheet score and unit sheet normal ((..., 3), z, y, x components in Å space) over ``region``.

    The Hessian is taken in Å and scaled by sigma² (Lindeberg's scale normalisation), so the
    score of the same membrane is the same at any voxel size. The score is λ_max - |λ_mid|.
    For a dark sheet this is λ_max, since the other two are ~0. A dark tube (λ_max = λ_mid)
    or blob (all equal) scores 0, and bright or flat regions score <= 0. The normal is the
    eigenvector of λ_max.
    """
    region = region or tuple(slice(None) for _ in range(3))
    if isinstance(hessian, GaussianHessian):
        parts = hessian.at(region)
    else:
        parts = {key: h[region] for key, h in hessian.items()}
    scale = {(i, j): sigma * sigma / (spacing[i] * spacing[j]) for i, j in parts}
    return sheet_eigen(parts, scale)  # closed form, float32; the normal up to sign as eigh's


def _normalised(block, mean, std, params: ClassicalParams) -> np.ndarray:
    """``(block - mean) / std`` with the GLOBAL statistics, negated for bright membranes."""
    std = float(std) if std and math.isfinite(std) else 1.0  # a constant volume scores 0
    sign = 1.0 if params.dark else -1.0
    return ((np.asarray(block, dtype=np.float32) - np.float32(mean)) * np.float32(sign / std)).astype(np.float32)


def membrane_score(block: np.ndarray, voxel_size, params: ClassicalParams, *, mean=0.0, std=1.0) -> np.ndarray:
    """float32 sheet score of a (z, y, x) block. Positive on membranes, ~0 or negative elsewhere.

    The input is normalised with the GLOBAL ``mean`` and ``std`` passed in, so the score never
    depends on block boundaries. Scored with a halo of :func:`halo` voxels, a block's interior
    equals the whole array's score there. The score is dimensionless: λ_max - |λ_mid| of the
    σ²-normalised Hessian of the z-scored volume, at σ = ``params.scale × params.thickness`` Å.

    Parameters
    ----------
    block : 3D array, (z, y, x).
    voxel_size : Å per voxel, one number or (z, y, x).
    params : the filter's parameters.
    mean, std : global statistics of the whole tomogram.

    Examples
    --------
    >>> z = np.arange(32)[:, None, None] * np.ones((1, 16, 16))
    >>> sheet = 1.0 - np.exp(-((z - 16) ** 2) / 8.0)  # a dark plane at z = 16
    >>> s = membrane_score(sheet, 10.0, ClassicalParams(thickness=30.0))
    >>> int(s[:, 8, 8].argmax()), bool(s[16, 8, 8] > 0.05 > abs(s[2, 8, 8]))
    (16, True)
    """
    spacing = _spacing(voxel_size)
    block = np.asarray(block)
    if block.ndim != 3:
        raise InputError(f"membrane_score needs a 3D (z, y, x) block, got shape {block.shape}")
    x = _normalised(block, mean, std, params)
    return _eigen(_hessian(x, _sigmas(spacing, params)), spacing, sigma_A(spacing, params))[0]


def sheet_score(array, voxel_size, params: ClassicalParams | None = None, *, mean=None, std=None):
    """:func:`membrane_score` of a whole (z, y, x) dask (or numpy) array, lazily: a dask array.

    Each chunk is scored with :func:`halo` voxels of its neighbours, so the result equals the
    whole-array score and, given the same ``mean`` and ``std``, the score ``classical_segment``
    writes. Without them the array is normalised with its own (lazy) mean and std.

    >>> import dask.array as da
    >>> score = sheet_score(da.zeros((32, 64, 64), chunks=16), 10.0)  # nothing computed yet
    >>> score.shape, score.dtype
    ((32, 64, 64), dtype('float32'))
    """

    params = params or ClassicalParams()
    if not isinstance(params, ClassicalParams):
        raise InputError(f"params must be ClassicalParams, got {type(params).__name__}")
    spacing = _spacing(voxel_size)
    array, mean, std = volume_input(array, mean, std, what="sheet_score's array")
    return lazy(membrane_score, array, halo(spacing, params), voxel_size=spacing, params=params, mean=mean, std=std)


def _ridge(score: np.ndarray, normal: np.ndarray, inner, spacing) -> np.ndarray:
    """Non-maximum suppression across the sheet: True where the score is at least its value
    one step either side along the normal (trilinear interpolation; the step is the smallest
    voxel size, so at most one voxel along any axis).

    ``score`` covers a region one voxel wider than ``inner`` (clipped at the volume's edges,
    where the edge value is repeated, as on the whole array); ``normal`` covers ``inner``.
    """
    step = min(spacing)
    return ridge(score, normal, inner, [step / s for s in spacing])


# ------------------------------------------------------------------ global statistics

def _moments_kernel(region: Region, data):
    data = np.asarray(data, dtype=np.float64)
    mean = float(data.mean()) if data.size else 0.0
    return data.size, mean, float(((data - mean) ** 2).sum())


def _combine_moments(parts) -> tuple[float, float]:
    """Global mean and std from per-block (count, mean, sum of squared deviations) (Chan et al.)."""
    n, mean, m2 = 0, 0.0, 0.0
    for nb, mb, m2b in parts:
        if nb:
            delta = mb - mean
            total = n + nb
            mean += delta * nb / total
            m2 += m2b + delta * delta * n * nb / total
            n = total
    return mean, math.sqrt(m2 / n) if n else 0.0


def _histogram(score: np.ndarray) -> np.ndarray:
    # float32 throughout: u's rounding (~2e-6) is far below a bin (~5e-3)
    u = np.arcsinh(np.ravel(score).astype(np.float32, copy=False) * np.float32(1 / HIST_EPS))
    u += np.float32(HIST_U)
    u *= np.float32(HIST_BINS / (2 * HIST_U))
    np.clip(u, 0, HIST_BINS - 1, out=u)
    index = u.astype(np.intp)
    np.clip(index, 0, HIST_BINS - 1, out=index)  # a NaN score casts to anything
    return np.bincount(index, minlength=HIST_BINS)


def _quantile(counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of the scores binned by :func:`_histogram` (linear within a bin)."""
    cumulative = np.cumsum(counts)
    rank = q * cumulative[-1]
    k = int(np.searchsorted(cumulative, rank))
    below = cumulative[k - 1] if k else 0
    fraction = (rank - below) / counts[k] if counts[k] else 0.0
    u = -HIST_U + (k + fraction) * (2 * HIST_U / HIST_BINS)
    return float(HIST_EPS * np.sinh(u))


def robust_stats(counts: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (IQR / 1.349) of the scores behind a histogram."""
    q25, median, q75 = (_quantile(counts, q) for q in (0.25, 0.5, 0.75))
    return median, (q75 - q25) / IQR_TO_SIGMA


# ------------------------------------------------------------------ block kernels (the runner does the rest)

def _score_kernel(region: Region, data, shape, spacing, params: ClassicalParams, mean: float, std: float):
    """Score and ridge of one block from its data read with :func:`halo`; the halo trimmed."""
    near = grow(region.write, (1, 1, 1), shape)  # what the ridge test needs
    x = _normalised(data, mean, std, params)
    hessian = _hessian(x, _sigmas(spacing, params))
    score, normal = _eigen(hessian, spacing, sigma_A(spacing, params), within(near, region.read))
    inner = within(region.write, near)
    return score[inner], _ridge(score, normal[inner], inner, spacing).astype(np.uint8)


@dataclass(frozen=True)
class _Arrays:
    """Reads (with a tuple of regions' worth of arrays) or writes whole chunks of zarr arrays."""

    paths: tuple[str, ...]

    def __call__(self, region):
        import zarr

        return tuple(zarr.open_array(p, mode="r")[region] for p in self.paths)

    def write(self, region: Region, arrays):
        import zarr

        for path, data in zip(self.paths, arrays):
            zarr.open_array(path, mode="r+")[region.write] = data
        return arrays


@dataclass(frozen=True)
class _WriteScore(_Arrays):
    def __call__(self, region: Region, result):
        """Score and ridge as whole chunks; the block hands back (and marks) the score's histogram."""
        self.write(region, result)
        return _histogram(result[0])


@dataclass(frozen=True)
class _WriteMask(_Arrays):
    def __call__(self, region: Region, mask):
        self.write(region, (mask,))
        return int(np.count_nonzero(mask))


def _hysteresis(score, low, high):
    """skimage's apply_hysteresis_threshold (6-connected components of score > low that hold a
    voxel > high), labelled by cc3d (a dependency already) instead of ndimage.label + sum_labels."""
    import cc3d

    labels = cc3d.connected_components(score > low, connectivity=6)
    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[labels[score > high]] = True
    keep[0] = False
    return keep[labels]


def _sparse_peak(centres, score, footprint):
    """ndimage.maximum_filter(np.where(centres, score, -inf), footprint=footprint, mode="constant",
    cval=-inf), for sparse ``centres``: each footprint offset moves every centre's score at once
    (within one offset the targets are distinct, so a plain fancy-index max is exact)."""
    reach = [k // 2 for k in footprint.shape]
    shape = centres.shape
    padded_shape = tuple(n + 2 * r for n, r in zip(shape, reach))
    peak = np.full(padded_shape, -np.inf, np.float32)
    where_ = np.nonzero(centres)
    values = score[where_].astype(np.float32)
    strides = (padded_shape[1] * padded_shape[2], padded_shape[2], 1)
    base = sum((w + r) * s for w, r, s in zip(where_, reach, strides))
    flat = peak.ravel()
    for offset in zip(*np.nonzero(footprint)):
        target = base + sum((o - r) * s for o, r, s in zip(offset, reach, strides))
        flat[target] = np.maximum(flat[target], values)
    return peak[tuple(slice(r, r + n) for r, n in zip(reach, shape))]


def _mask_kernel(region: Region, data, shape, spacing, params: ClassicalParams, low: float, high: float):
    """Hysteresis on the score around one block (read with :func:`_mask_halo`), ridge kept,
    thickness given back (voxels near a kept ridge that score at least :func:`band_level` of it)."""
    score, ridge = data
    radii = _band_radii(spacing, params)
    near = grow(region.write, tuple(math.ceil(r) for r in radii), shape)
    centres = _hysteresis(score, low, high) & ridge.astype(bool)
    local = within(near, region.read)
    peak = _sparse_peak(centres[local], score[local], _ellipsoid(radii))
    inner, own = within(region.write, near), region.inner
    mask = centres[own] | (np.isfinite(peak[inner]) & (score[own] >= band_level(spacing, params) * peak[inner]))
    return mask.astype(np.uint8)


# ------------------------------------------------------------------ the step

def classical_segment(read, shape, voxel_size, chunks, params: ClassicalParams, score_path: str, mask_path: str, *,
                      client=None, mean=None, std=None, marks: DoneMarks | None = None) -> dict:
    """Segment membranes in a whole tomogram with the classical sheet filter, block by block.

    Writes the sheet score (:func:`membrane_score`, float32) to a zarr array at ``score_path``
    and the membrane mask (uint8 0/1) to one at ``mask_path``. Both are created here, chunked by
    ``chunks``, and every task writes whole chunks with its halo trimmed. The mask keeps the
    score's ridge (its maximum across the sheet) where the hysteresis mask holds it, and gives
    it back ``params.thickness``.

    Hysteresis is local to a halo of ``params.reach`` Å. A voxel above ``low`` joins the mask
    only if it connects to a voxel above ``high`` within that distance of its block. On a whole
    array it could connect through any path, so a weak membrane stretch longer than the reach
    on both sides may be kept whole on the array and only partly here. The score is exact.

    Parameters
    ----------
    read : picklable callable; ``read(region)`` returns the float32 data of a tuple of slices.
    shape : (z, y, x) of the volume.
    voxel_size : Å per voxel, one number or (z, y, x).
    chunks : (z, y, x) chunks of both outputs, and the blocks' grid.
    params : :class:`ClassicalParams`.
    score_path, mask_path : where the two zarr arrays go (overwritten).
    client : a ``distributed.Client`` to run the block tasks on. Without one they run here.
    mean, std : global statistics of the input; one reduction pass computes them if None.
    marks : ``DoneMarks`` for the block tasks (keyed by the parameters): with them, a rerun keeps
        the arrays and skips every block already marked; without them, everything is redone.

    Returns
    -------
    dict with ``mean``, ``std`` (of the input), ``median``, ``spread``, ``top`` (the score's
    median, robust std and 99.9th percentile), ``low``, ``high`` (the thresholds in score
    units), ``mask_fraction``, ``blocks`` and ``seconds`` per pass.

    Examples
    --------
    >>> from cryodask.synth import synth_tomogram
    >>> t = synth_tomogram((32, 64, 64), seed=1)
    >>> stats = classical_segment(lambda r: t.volume[r], t.volume.shape, 10.0, (32, 32, 32), ClassicalParams(),
    ...                           "score.zarr", "mask.zarr")  # doctest: +SKIP
    >>> stats["mask_fraction"]  # doctest: +SKIP
    0.09...
    """
    import zarr

    spacing = _spacing(voxel_size)
    shape, chunks = tuple(int(n) for n in shape), tuple(int(c) for c in chunks)
    if len(shape) != 3 or len(chunks) != 3 or min(shape) < 1 or min(chunks) < 1:
        raise InputError(f"the classical filter needs a non-empty 3D volume and 3 positive chunks, got {shape}, "
                         f"{chunks}")
    if not isinstance(params, ClassicalParams):
        raise InputError(f"params must be ClassicalParams, got {type(params).__name__}")
    blocks = plan_blocks(shape, chunks)
    seconds = {}

    clock = time.perf_counter()
    if mean is None or std is None:
        mean, std = _combine_moments(run_blocks(client, _moments_kernel, blocks, step="moments", read=read,
                                                stage="preprocess", name="classical-moments"))
    mean, std = float(mean), float(std)
    seconds["moments"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mask_path = str(mask_path)
    ridge_path = str(Path(mask_path).with_name(f".{Path(mask_path).name}.ridge"))
    if marks is None or not any(marks.done(f"score/{b.name}") for b in blocks):  # else resume in them
        for path, dtype in ((score_path, np.float32), (mask_path, np.uint8), (ridge_path, np.uint8)):
            zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True)
    label = f"classical {Path(score_path).parent}"  # the fault-injection line names the tomogram's work folder
    counts = sum(run_blocks(client, _score_kernel, blocks, step="score", args=(shape, spacing, params, mean, std),
                            marks=marks, shape=shape, halo=halo(spacing, params), read=read,
                            write=_WriteScore((str(score_path), ridge_path)), label=label, name="classical-score"))
    median, spread = robust_stats(counts)
    spread = max(spread, np.finfo(np.float32).tiny)  # a constant score: nothing passes the thresholds
    top = _quantile(counts, TOP_QUANTILE)
    # A membrane's score is positive (a dark sheet): nothing at or below 0 passes.
    low = max(median + params.low * spread, params.low_fraction * top, 0.0)
    high = max(median + params.high * spread, params.high_fraction * top, low)
    seconds["score"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ones = sum(run_blocks(client, _mask_kernel, blocks, step="mask", args=(shape, spacing, params, low, high),
                          marks=marks, shape=shape, halo=_mask_halo(spacing, params),
                          read=_Arrays((str(score_path), ridge_path)), write=_WriteMask((mask_path,)),
                          restore=int, stage="post-process", label=label, name="classical-mask"))
    shutil.rmtree(ridge_path, ignore_errors=True)
    seconds["mask"] = time.perf_counter() - clock
    return {"mean": mean, "std": std, "median": median, "spread": spread, "top": top, "low": low, "high": high,
            "mask_fraction": ones / math.prod(shape), "blocks": len(blocks), "seconds": seconds}
