"""ETSAM's global intensity normalisations, computed from one reduction pass.

Both of ETSAM's normalisations need whole-volume statistics. ``min_max_positive_values`` sets
negatives to 0 and divides by the global maximum; ``softplus_minmax`` applies softplus and
then a global min-max. Softplus is monotonic, so its min and max are softplus of the raw min
and max: one pass for the raw extremes is enough, and each slice is then normalised alone,
giving the same float32 values as ETSAM's whole-array code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
