"""LoG blob picker: every particle of a given diameter, with no weights (``--method log``).

Why a Laplacian of Gaussian: a dense particle in a tomogram is a dark ball, and the
scale-normalised LoG ``σ²∇²G_σ * image`` answers most strongly at the centre of a ball of
radius ``r`` when ``σ = r/√3`` (the pick scale). A LoG alone also fires on the other dark
things of a tomogram, membranes and particles of another size; three tests keep it to the
particles asked for. The defaults were chosen on three generators that share no code (an
independent one of soft spheres with a Fourier missing wedge, planes and vesicles; the
projection simulator, WBP of a CTF tilt series; ``synth tomogram``) at 7-40 Å/voxel, SNR
0.05-0.5, tilts to ±60° and ±45°, for the best worst case, not the best score on one of them:

* **significance**: the score is the response above its median over the whole tomogram, in
  robust standard deviations (1.4826 × median absolute deviation; ``threshold``, default 4).
  The median and MAD follow the background (noise, ice) and not the objects: a plain standard
  deviation grows with the membranes and particles themselves and lost weak particles where
  they fill many voxels (at 7 Å: F1 0.57 with 3.5 plain standard deviations, 0.81 with 4
  robust ones, same shape tests). 3.5 lets in more small dense things that are not the
  particle asked for (projection simulator); 4.5 loses weak particles at 7 and 20 Å.
* **roundness**: a membrane is a sheet, dark across it and flat along it: its Hessian has one
  large eigenvalue and two near zero, a ball three equal ones. The missing wedge stretches a
  ball along z (its z eigenvalue falls towards zero at ±45°) but never in y, x; a sheet that
  survives the wedge is a sheet in y, x too. So roundness is the smaller of ``middle
  eigenvalue / trace`` (0 for any sheet) and ``smallest / trace`` of the y, x block (0 for a
  sheet or a filament that the wedge leaves visible); a ball gives 1/3 without a wedge and
  0.35-0.38 with tilts to ±60°-±30°, noisy particles 0.22-0.4 (2nd-98th percentile), sheets 0
  before noise (the old ``smallest / trace`` gave balls 0.2 at ±60°, 0.05-0.1 at ±45°, 0 at ±30°).
  Candidates under ``min_roundness`` (default 0.2) are dropped.
* **size**: a larger particle also peaks at the small scale but answers more at a larger one.
  Candidates whose normalised response at ``1.5σ`` is above ``max_scale_ratio`` (default 0.85)
  times the one at ``σ`` are dropped: a ball of the asked diameter gives 0.7 (less with noise),
  one 1.25x as large 1.1, one 1.5x 1.8, under any wedge. A lobe of a larger particle that is
  itself about the asked size passes: this test cannot tell it from a particle.

Peaks on the first or last voxel of the volume are dropped (mirrored edges fold there).
Non-maximum suppression then keeps a candidate only if no higher candidate that passed the
tests lies within ``min_distance`` (default: the particle radius; centres of particles that
do not overlap are at least a diameter apart, so the radius never removes a true neighbour,
and a second pick within the radius of a particle could only ever be a false positive).

Blockwise and exact: the tomogram is normalised with one global mean and standard deviation
(one reduction pass), every block is read with a halo that covers the filters, the suppression
distance and the shape tests, and a block keeps only the picks inside it. Each rule above
depends on the data within that halo only, and the threshold's median and MAD come from the
response on a lattice of voxels fixed by the volume's shape (about 2 million), so the picks
and the per-rule counts are the same for any block size, on a cluster or in-process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ..engine.blocks import Block, DoneMarks, fault_injection_delay, plan_blocks
from ..errors import InputError
from ..report.stages import RecordedRead, stage

SIGMA_PER_RADIUS = 1 / math.sqrt(3)  # where the normalised LoG of a solid ball peaks
LARGER_SCALE = 1.5  # the scale of the size test, as a multiple of σ
TRUNCATE = 4.0  # Gaussian kernels reach 4σ, scipy's default
COLUMNS = ["z", "y", "x", "score"]


@dataclass(frozen=True)
class LogParams:
    """Everything that changes the picks (lengths in Å; its hash can key a done-mark).

    Parameters
    ----------
    diameter : particle diameter, Å.
    threshold : minimum score, in robust standard deviations (1.4826 × MAD) of the LoG response
        over the volume, above its median.
    min_distance : Å between two picks at least (``None``: the particle radius).
    dark : particles are darker than their surroundings (cryo-ET convention); ``False`` for bright ones.
    max_picks : keep at most this many picks, the highest scores first (``None``: all).
    min_roundness : the smaller of the middle Hessian eigenvalue / trace and of the smallest
        eigenvalue / trace of its y, x block, at a pick (``None``: no test).
    max_scale_ratio : response at 1.5σ over response at σ, at most (``None``: no test).
    """

    diameter: float
    threshold: float = 4.0
    min_distance: float | None = None
    dark: bool = True
    max_picks: int | None = None
    min_roundness: float | None = 0.2
    max_scale_ratio: float | None = 0.85

    def __post_init__(self):
        _check(self.diameter, "--diameter", "a positive number of Å", lambda x: x > 0)
        _check(self.threshold, "--threshold", "a number >= 0 (robust standard deviations of the response)",
               lambda x: x >= 0)
        if self.min_distance is not None:
            _check(self.min_distance, "--min-distance", "a positive number of Å", lambda x: x > 0)
        if not isinstance(self.dark, (bool, np.bool_)):
            raise InputError(f"--dark must be true or false, got {self.dark!r}")
        if self.max_picks is not None and (isinstance(self.max_picks, (bool, np.bool_))
                                           or not isinstance(self.max_picks, (int, np.integer)) or self.max_picks < 1):
            raise InputError(f"--max-picks must be a whole number >= 1, got {self.max_picks!r}")
        if self.min_roundness is not None:
            _check(self.min_roundness, "--min-roundness", "in [0, 0.5)", lambda x: 0 <= x < 0.5)
        if self.max_scale_ratio is not None:
            _check(self.max_scale_ratio, "--max-scale-ratio", "a positive number", lambda x: x > 0)

    @property
    def distance(self) -> float:
        """The suppression distance in Å."""
        return float(self.min_distance) if self.min_distance is not None else self.diameter / 2

    @property
    def sigma(self) -> float:
        """The pick scale in Å."""
        return self.diameter / 2 * SIGMA_PER_RADIUS


def number_or_none(value, option: str):
    """A shape test's CLI value: ``"none"`` switches the test off (``None``), else a number."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{option} must be a number or none, got {value!r}") from None


def _check(value, option: str, rule: str, ok) -> None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, (bool, np.bool_)) or not (math.isfinite(x) and ok(x)):
        raise InputError(f"{option} must be {rule}, got {value!r}")


def voxel_sizes(voxel_size) -> tuple[float, float, float]:
    """``voxel_size`` (one number, or z, y, x) as three positive floats in Å."""
    try:
        values = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)))
    except (TypeError, ValueError):
        values = (math.nan,)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--voxel-size must be a positive number of Å (or three, z,y,x), got {voxel_size!r}")
    return values


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
            raise InputError(f"--diameter {params.diameter:g} Å is under 4 voxels of {max(vs):g} Å: "
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
        edge = [(g.patch[a] if o.start == 0 else 0, g.patch[a] if o.stop == shape[a] else 0) for a, o in enumerate(outer)]
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


def _block_stats(read, block: Block) -> tuple[float, float, int]:
    from ..io.mrc import region_stats

    with stage("preprocess", block=block.name, step="log-stats"):
        data = np.asarray(RecordedRead(read)(block.region), dtype=np.float32)
        _, _, total, squares, count = region_stats(data)
    return total, squares, count


def _mean_std(stats) -> tuple[float, float]:
    total, squares, count = (sum(s[i] for s in stats) for i in range(3))
    if count == 0:
        return 0.0, 0.0
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


def volume_stats(read, shape, *, chunks=(64, 256, 256), client=None) -> tuple[float, float]:
    """Mean and standard deviation of a whole volume, one block-wise reduction pass."""
    blocks = plan_blocks(shape, chunks)
    return _mean_std(_map(client, _block_stats, read, [(b,) for b in blocks], {}, "log-stats"))


def _pick_task(read, block: Block, shape, voxel_size, params: LogParams, *, mean: float, std: float,
               floor: float | None = None, marks: DoneMarks | None = None, step: str = "pick") -> BlockPicks:
    """:func:`pick_block` as a block task; with ``marks``, its picks are kept on disk
    (``<marks>/<step>-picks/<block>.npz``) and the block marked, so a rerun reads them back."""
    path = marks.folder / f"{step}-picks" / f"{block.name}.npz" if marks is not None else None
    if marks is not None and marks.done(f"{step}/{block.name}"):
        with np.load(path) as saved:
            return BlockPicks(saved["coords"], saved["response"], saved["sample"], float(saved["floor"]),
                              saved["fates"], int(saved["below"]))
    fault_injection_delay(f"log {step}/{block.name}")
    with stage("infer", block=block.name, step=f"log-{step}"):  # its read is a stage of its own
        result = pick_block(RecordedRead(read), block, shape, voxel_size, params, mean=mean, std=std, floor=floor)
    if marks is not None:
        partial = path.with_name(path.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with stage("write", block=block.name, step=f"log-{step}") as s, open(partial, "wb") as f:
            np.savez(f, coords=result.coords, response=result.response, floor=result.floor, sample=result.sample,
                     fates=result.fates, below=result.below)
            s.bytes_written = f.tell()
        partial.replace(path)
        marks.mark(f"{step}/{block.name}")
    return result


def _map(client, func, read, items: list[tuple], kwargs: dict, name: str) -> list:
    """``func(read, *item, **kwargs)`` for each item: block tasks on the cluster, or a plain loop.

    On a cluster the reader is scattered once (it may hold an array) and every task retries once.
    """
    if client is None:
        return [func(read, *item, **kwargs) for item in items]
    if not items:
        return []
    import uuid

    token = uuid.uuid4().hex[:8]
    shared = client.scatter(read, hash=False)
    futures = [client.submit(func, shared, *item, **kwargs, key=f"{name}-{token}-{i}", retries=1)
               for i, item in enumerate(items)]
    return client.gather(futures)


def empty_picks() -> pd.DataFrame:
    return pd.DataFrame({c: np.empty(0) for c in COLUMNS})


def log_pick(read, shape, voxel_size, params: LogParams, *, chunks=(64, 256, 256), client=None,
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
        stats = _map(client, _block_stats, read, [(b,) for b in blocks], {}, "log-stats")
        mean, std = _mean_std(stats)
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise InputError(f"the volume has non-finite values (mean {mean}, std {std})")
    if std <= 0 or not blocks:
        return _flat(empty_picks())  # a constant volume has no blobs
    common = dict(mean=float(mean), std=float(std), marks=marks)
    results = _map(client, _pick_task, read, [(b, shape, voxel_size, params) for b in blocks], common, "log-pick")
    median, spread = robust_spread(np.concatenate([r.sample for r in results]))
    if spread <= 0:
        return _flat(empty_picks())
    cut = median + params.threshold * spread
    redo = [i for i, r in enumerate(results) if r.floor > cut]
    if redo:  # a block's own floor was above the global threshold: pick it again down to the threshold
        again = _map(client, _pick_task, read, [(blocks[i], shape, voxel_size, params) for i in redo],
                     {**common, "floor": cut, "step": "again"}, "log-pick-again")
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
