"""Intensity normalisations, each fixed by whole-volume statistics from one pass, then applied to any slab.

ETSAM's two global normalisations need only the raw minimum and maximum (softplus is monotonic,
so softplus_minmax's extremes are softplus of the raw ones); CryoSAM's slices are mapped to
[0, 1] by the 0.5 / 99.5 percentiles of a strided sample. Being fixed per volume, a slab
normalised alone gets the float32 values ETSAM's or CryoSAM's whole-array code would give it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import validate
from ..errors import InputError

METHODS = ("min_max_positive_values", "softplus_minmax")


def softplus(x: np.ndarray) -> np.ndarray:
    """torch's softplus (beta 1, threshold 20) in float32, as ETSAM calls it."""
    import torch

    return torch.nn.functional.softplus(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


@dataclass(frozen=True)
class Normalization:
    """A per-voxel map fixed by global statistics: ``apply`` works on any slab."""

    method: str
    low: float
    high: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.method == "min_max_positive_values":
            x = x.copy()
            x[x < 0] = 0
            return x / np.float32(self.high)
        s = softplus(x)
        return (s - np.float32(self.low)) / (np.float32(self.high) - np.float32(self.low))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"--normalize must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def from_extremes(method: str, vmin: float, vmax: float, name="tomogram") -> Normalization:
    """The normalisation of a volume whose raw minimum and maximum are ``vmin``, ``vmax``."""
    check_method(method)
    if method == "min_max_positive_values":
        if not vmax > 0:
            raise InputError(f"{name}: no positive values, so min_max_positive_values is undefined "
                             "(use --normalize softplus_minmax)")
        return Normalization(method, 0.0, float(np.float32(vmax)))
    low, high = (float(v) for v in softplus(np.array([vmin, vmax], dtype=np.float32)))
    if not high > low:
        raise InputError(f"{name}: constant volume, softplus_minmax is undefined")
    return Normalization(method, low, high)


def robust_range(read, shape, *, percentiles=(0.5, 99.5), samples: int = 1 << 22,
                 slab_voxels: int = 8 << 20) -> tuple[float, float]:
    """The values at two percentiles of the whole volume, from one strided pass.

    Reads z-slabs of about ``slab_voxels`` and keeps every k-th voxel (k chosen so about
    ``samples`` are kept), then takes the percentiles of the sample: deterministic, bounded
    memory, and the 0.5 / 99.5 percentiles of a few million voxels are stable to far below
    the noise.

    Examples
    --------
    >>> v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    >>> robust_range(lambda r: v[r], v.shape, percentiles=(0, 100))
    (0.0, 999.0)
    """
    shape = validate.shape("shape", shape)
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise InputError(f"percentiles must be two increasing numbers in [0, 100], got {percentiles!r}")
    total = math.prod(shape)
    step = max(1, total // max(1, int(samples)))
    plane = shape[1] * shape[2]
    depth = max(1, int(slab_voxels) // plane)
    parts, offset = [], 0
    for z in range(0, shape[0], depth):
        data = np.asarray(read((slice(z, min(z + depth, shape[0])), slice(0, shape[1]), slice(0, shape[2]))),
                          np.float32).ravel()
        first = (-offset) % step
        parts.append(data[first::step])
        offset += data.size
    sample = np.concatenate(parts)
    if not np.isfinite(sample).all():
        raise InputError("the volume contains NaN or Inf values")
    lo, hi = (float(v) for v in np.percentile(sample, [lo_p, hi_p]))
    if not hi > lo:
        raise InputError(f"the volume is constant between the {lo_p:g} and {hi_p:g} percentiles: nothing to segment")
    return lo, hi


def unit_reader(read, value_range):
    """``read`` with its values mapped from ``value_range`` (lo, hi) to [0, 1], clipped."""
    lo, hi = (float(v) for v in value_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise InputError(f"value_range must be two finite numbers lo < hi, got {value_range!r}")
    return _UnitReader(read, lo, hi)


class _UnitReader:
    def __init__(self, read, lo, hi):
        self.read, self.lo, self.hi = read, lo, hi

    def __call__(self, region):
        data = np.asarray(self.read(region), np.float32)
        return np.clip((data - np.float32(self.lo)) / np.float32(self.hi - self.lo), 0, 1)
