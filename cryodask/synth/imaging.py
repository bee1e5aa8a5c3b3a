"""What synthetic tomograms and micrographs share: image formation, placement, parameter checks.

Why model it at all: a picker or segmenter tuned on clean blobs fails on real data, whose low
frequencies are suppressed by the contrast transfer function (CTF), whose edges ring, whose
Fourier space lacks a wedge (tomograms), and whose noise dominates. Dense matter is positive in
the clean density; every image returned is inverted so that dense matter is dark, as in real data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.fft as sfft

from ..errors import InputError, where

WAVELENGTH_A = 0.01969  # electron wavelength at 300 kV, Å
AMPLITUDE_CONTRAST = 0.07
LOW_CUT_A = 1000.0  # features larger than this (ice thickness gradients) carry no contrast


def frequencies(shape, spacing: float) -> list[np.ndarray]:
    """Sparse grids of spatial frequency (cycles/Å) along each axis of an ``rfftn`` of ``shape``."""
    axes = [sfft.fftfreq(n, d=spacing) for n in shape[:-1]] + [sfft.rfftfreq(shape[-1], d=spacing)]
    return [a.astype(np.float32) for a in np.meshgrid(*axes, indexing="ij", sparse=True)]


def transfer(freqs, spacing: float, defocus_um: float, phase_flipped: bool) -> np.ndarray:
    """CTF × Gaussian envelope × smooth low cut, on the ``rfftn`` grid.

    The CTF is the weak-phase one, ``sqrt(1-A²)·sin χ + A·cos χ`` with ``χ = π λ Δz s²``
    (spherical aberration is negligible at these resolutions). Tomograms are reconstructed from
    CTF-corrected tilts, so they get ``|CTF|`` (phase flipping); raw micrographs keep the sign
    changes. ``defocus_um = 0`` leaves a plain band-pass. The envelope falls to ``e^-2.8`` at
    Nyquist so that the finest detail is, as in real data, mostly gone.
    """
    s2 = sum(f * f for f in freqs)
    chi = np.float32(np.pi * WAVELENGTH_A * defocus_um * 1e4) * s2
    ctf = np.float32(np.sqrt(1 - AMPLITUDE_CONTRAST**2)) * np.sin(chi) + np.float32(AMPLITUDE_CONTRAST) * np.cos(chi)
    if phase_flipped:
        ctf = np.abs(ctf)
    envelope = np.exp(-s2 / np.float32((0.6 * 0.5 / spacing) ** 2))
    low_cut = 1 - np.exp(-s2 * np.float32(LOW_CUT_A**2))
    return (ctf * envelope * low_cut).astype(np.float32)


def wedge_keep(freqs, missing_wedge: float) -> np.ndarray | None:
    """Fourier components a ±(90 − wedge/2)° tilt series around y measures (``None``: all).

    The measured directions make an angle of at least ``wedge/2`` with kz in the kz–kx plane;
    ky is untouched because the tilt axis is y.
    """
    if missing_wedge == 0:
        return None
    kz, kx = freqs[0], freqs[-1]
    return np.abs(kx) >= np.abs(kz) * np.float32(np.tan(np.radians(missing_wedge / 2)))


def filtered(density: np.ndarray, weights) -> np.ndarray:
    """``density`` with its Fourier transform multiplied by ``weights`` (float32, same shape)."""
    spectrum = sfft.rfftn(density, workers=-1)
    spectrum *= weights
    return sfft.irfftn(spectrum, s=density.shape, workers=-1).astype(np.float32, copy=False)


def noise_like(signal: np.ndarray, snr: float, rng, keep=None) -> np.ndarray:
    """Gaussian noise with ``var(signal) / var(noise) = snr`` (limited to ``keep`` in Fourier space).

    Tomogram noise comes from the tilt images, so it lacks the missing wedge too.
    """
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    if keep is not None:
        noise = filtered(noise, keep)
    variance = float(signal.var(dtype=np.float64))
    scale = np.sqrt(variance / snr / float(noise.var(dtype=np.float64))) if variance > 0 else 1.0
    return noise * np.float32(scale)


def standardise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation, float32."""
    image = image.astype(np.float32, copy=False)
    std = float(image.std(dtype=np.float64))
    return ((image - np.float32(image.mean(dtype=np.float64))) / np.float32(std or 1.0)).astype(np.float32)


def random_rotation(rng) -> np.ndarray:
    """A uniformly random 3×3 rotation matrix (from a normalised Gaussian quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def soft_ball(distance, radius, width):
    """1 inside ``radius``, 0 outside, with a logistic edge of ``width`` (same units)."""
    return 0.5 - 0.5 * np.tanh((distance - radius) / width)


def box(center, reach, shape) -> tuple[slice, ...]:
    """The slices of the box of half-size ``reach`` around ``center``, clipped to ``shape``."""
    return tuple(slice(max(0, int(np.floor(c - reach))), min(n, int(np.ceil(c + reach)) + 1))
                 for c, n in zip(center, shape))


def offsets(region: tuple[slice, ...], center, dtype=np.float32) -> list[np.ndarray]:
    """Sparse coordinate grids of ``region`` relative to ``center``."""
    axes = [(np.arange(s.start, s.stop) - c).astype(dtype) for s, c in zip(region, center)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def place(rng, n, radii, shape, free, gap, tries=200):
    """Rejection sampling of up to ``n`` non-overlapping balls that avoid the ``free == False`` voxels.

    A centre is kept when the ball of radius ``radius + gap`` around it holds only free voxels,
    it keeps ``radius`` from every edge, and it is ``radius_i + radius_j + gap`` from the others.
    Returns (centres (M, ndim), indices into ``radii`` that were placed).
    """
    centres, placed = np.empty((n, len(shape))), []
    for i in range(n):
        r = radii[i]
        lo, hi = np.full(len(shape), r), np.asarray(shape, float) - 1 - r
        if np.any(hi < lo):
            continue
        others = centres[:len(placed)]
        for _ in range(tries):
            c = lo + rng.random(len(shape)) * (hi - lo)
            if np.any(np.linalg.norm(others - c, axis=1) < radii[placed] + r + gap):
                continue
            region = box(c, r + gap, shape)
            inside = sum(o * o for o in offsets(region, c, np.float64)) <= (r + gap) ** 2
            if free[region][inside].all():
                centres[len(placed)] = c
                placed.append(i)
                break
    return centres[:len(placed)].copy(), np.asarray(placed, int)


# Parameter checks: every bad value is a one-line InputError naming the parameter.


def output_path(out_path) -> Path:
    """``out_path`` as a Path, once its folder is known to exist."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise where(out.parent, "output folder does not exist")
    if out.is_dir():
        raise where(out, "is a folder; give a file name such as tomo.mrc")
    return out


def truth_paths(out: Path, **suffixes: str) -> dict[str, Path]:
    """Where the ground truth of ``out`` goes: ``<folder>/truth/<stem><suffix>``, apart from the
    data, so a command given the folder (``cryodask convert synth/``) sees only the data."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    (out.parent / "truth").mkdir(exist_ok=True)
    return {kind: out.parent / "truth" / f"{stem}{suffix}" for kind, suffix in suffixes.items()}


def check_shape(shape, ndim=3, minimum=16, axes="z,y,x") -> tuple[int, ...]:
    """``ndim`` whole numbers, each at least ``minimum`` (smaller leaves no room for a particle)."""
    try:
        values = tuple(shape)
        ok = len(values) == ndim and all(float(v) == int(v) and int(v) >= minimum for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"shape {shape!r}: needs {ndim} integers ({axes}), each at least {minimum}")
    return tuple(int(v) for v in values)


def number(name, value, ok, rule: str) -> float:
    """``value`` as a finite float for which ``ok`` holds; ``rule`` says what ``ok`` asks."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and ok(x)):
        raise InputError(f"{name} must be {rule}, got {value!r}")
    return x


def positive(name, value) -> float:
    return number(name, value, lambda x: x > 0, "a positive number")


def count(name, value) -> int | None:
    """``None`` or a whole number >= 0 (floats are refused rather than silently truncated)."""
    if value is None:
        return None
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be a whole number >= 0, got {value!r}")
    return int(value)
