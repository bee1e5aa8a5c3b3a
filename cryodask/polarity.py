"""Contrast polarity of a tomogram: is dense matter dark (low values) or bright?

Every weight-free filter looks for dark sheets or dark balls and ETSAM was trained on dark
density, so a bright tomogram is negated once, at its reader, and everything downstream sees
dark density. ``auto`` reads the sign of the skewness of the band-passed volume (dense matter
stands out of the ice on one side only); the rule, its limits and what it was measured on:
docs/architecture.md, "Contrast polarity".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

CHOICES = ("auto", "dark", "bright")
FINE_A = 20.0  # σ of the band's fine edge: about half a bilayer, the scale of the dense things
COARSE = 8.0  # σ of the coarse edge, as a multiple of the fine one
MIN_Z = 3.0  # skewness beyond this many standard errors of pure noise decides
MAX_VOXELS = 2**24  # the binned copy: 64 MB of float32


@dataclass(frozen=True)
class Polarity:
    """The polarity used for one tomogram, how it was chosen, and the evidence."""

    polarity: str  # "dark" or "bright"
    decided: str  # "given", "auto" or "auto-undecided"
    skewness: float = math.nan
    z: float = math.nan  # skewness in standard errors of pure noise

    @property
    def dark(self) -> bool:
        return self.polarity == "dark"

    def describe(self) -> str:
        if self.decided == "given":
            return f"polarity {self.polarity} (given)"
        how = f"band-pass skewness {self.skewness:+.2f}, {abs(self.z):.0f} standard errors"
        if self.decided == "auto-undecided":
            return f"polarity dark (auto could not tell: {how}; pass --polarity if it is bright)"
        return f"polarity {self.polarity} (auto: {how})"

    def metadata(self) -> dict:
        """What goes into the outputs' metadata."""
        return {"polarity": self.polarity, "decided": self.decided,
                **({} if self.decided == "given" else {"skewness": round(self.skewness, 4), "z": round(self.z, 2)})}


def check_polarity(value) -> str:
    if value not in CHOICES:
        raise InputError(f"--polarity must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def binned(read, shape, factor: int) -> np.ndarray:
    """The volume averaged over ``factor``³ cells (trailing partial cells dropped), read in
    slabs of ``factor`` z-slices so that only one slab is in memory beside the result."""
    shape = tuple(int(n) for n in shape)
    f = int(factor)
    out_shape = tuple(max(1, n // f) for n in shape)
    if f == 1:
        return np.asarray(read(tuple(slice(0, n) for n in shape)), dtype=np.float32)
    out = np.empty(out_shape, np.float32)
    ny, nx = out_shape[1] * f, out_shape[2] * f
    for k in range(out_shape[0]):
        slab = np.asarray(read((slice(k * f, (k + 1) * f), slice(0, min(ny, shape[1])), slice(0, min(nx, shape[2])))),
                          dtype=np.float32)
        ry, rx = slab.shape[1] // out_shape[1], slab.shape[2] // out_shape[2]
        slab = slab[:, :out_shape[1] * ry, :out_shape[2] * rx]
        out[k] = slab.reshape(slab.shape[0], out_shape[1], ry, out_shape[2], rx).mean(axis=(0, 2, 4))
    return out


def band_skewness(volume: np.ndarray, voxel_size) -> tuple[float, float]:
    """Skewness of the difference-of-Gaussians band of ``volume`` and its size in standard
    errors of pure noise's skewness."""
    from scipy import ndimage as ndi
    from scipy.stats import skew

    vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    x = np.asarray(volume, dtype=np.float32)
    x = x - np.float32(x.mean())
    fine = np.maximum(FINE_A / vs, 0.5)
    band = ndi.gaussian_filter(x, fine, mode="reflect") - ndi.gaussian_filter(x, fine * COARSE, mode="reflect")
    s = float(skew(band, axis=None))
    cells = x.size / max(1.0, float(np.prod(2 * math.sqrt(math.pi) * fine)))
    return s, s / math.sqrt(6.0 / max(cells, 1.0))


def decide_polarity(read, shape, voxel_size, *, max_voxels: int = MAX_VOXELS) -> Polarity:
    """``auto``: the polarity of a tomogram from its data (docs/architecture.md has the rule).

    Examples
    --------
    >>> from cryodask.synth import synth_tomogram
    >>> t = synth_tomogram((32, 64, 64), seed=1, snr=0.3)
    >>> decide_polarity(lambda r: t.volume[r], t.volume.shape, 10.0).polarity
    'dark'
    >>> decide_polarity(lambda r: -t.volume[r], t.volume.shape, 10.0).polarity
    'bright'
    """
    shape = tuple(int(n) for n in shape)
    factor = max(1, math.ceil((math.prod(shape) / max_voxels) ** (1 / 3)))
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)) * factor
    volume = binned(read, shape, factor)
    if not np.isfinite(volume).all():
        raise InputError("contains NaN or Inf values")
    if not volume.std() > 0:
        return Polarity("dark", "auto-undecided", 0.0, 0.0)
    s, z = band_skewness(volume, vs)
    if abs(z) < MIN_Z:
        return Polarity("dark", "auto-undecided", s, z)
    return Polarity("bright" if s > 0 else "dark", "auto", s, z)


def resolve_polarity(choice, read, shape, voxel_size) -> Polarity:
    """The polarity to use: the one given (a name, or a :class:`Polarity` already decided), or the
    one ``auto`` decides."""
    if isinstance(choice, Polarity):
        return choice
    if check_polarity(choice) != "auto":
        return Polarity(choice, "given")
    return decide_polarity(read, shape, voxel_size)


@dataclass(frozen=True)
class Negated:
    """``read(region)`` of a bright tomogram, negated so that dense matter is dark (picklable)."""

    read: object

    def __call__(self, region):
        return -np.asarray(self.read(region), dtype=np.float32)


def dark_reader(read, polarity: Polarity):
    """The reader as dark density: itself for a dark tomogram, negated for a bright one."""
    return read if polarity.dark else Negated(read)
