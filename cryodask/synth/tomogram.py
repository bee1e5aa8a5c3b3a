"""Synthetic cryo-ET tomograms with ground truth: a membrane mask, particle centres and kinds.

Geometry is built in Å and sampled at the voxel size, so a bilayer stays 4.5 nm thick and a
ribosome 25 nm wide whatever the binning. Membranes are rendered from their signed distance to
the mid-surface (analytic for spheres, first order for ellipsoids); the truth mask is the
voxels within half a bilayer thickness of it. The volume is inverted: dense matter is dark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.mrc import write_mrc
from ..io.picks import write_picks
from . import imaging

BILAYER_A = 45.0  # total bilayer thickness, Å
LEAFLET_PEAK_A = 0.35 * BILAYER_A  # headgroup density peaks sit ±15.75 Å from the mid-plane
LEAFLET_SIGMA_A = 0.10 * BILAYER_A
PROTEIN_DENSITY = 0.8  # relative to a lipid headgroup peak
# name, diameter (Å), lobes as (centre offset in particle radii (z, y, x), lobe radius in radii)
KINDS = (
    ("large", 250.0, (((0.0, 0.0, 0.36), 0.62), ((0.0, 0.0, -0.48), 0.50))),  # ribosome: two subunits
    ("small", 120.0, tuple((((0.0, 0.45 * math.sin(a), 0.45 * math.cos(a)), 0.5))
                           for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3))),  # compact trimer
)


@dataclass
class SynthTomogram:
    """A synthetic tomogram and its ground truth; arrays are (z, y, x), coordinates in voxels."""

    volume: np.ndarray
    membranes: np.ndarray
    particles: np.ndarray
    kinds: np.ndarray
    kind_names: list[str]
    diameters_A: dict[int, float]
    voxel_size: float


def synth_tomogram(shape=(64, 128, 128), voxel_size=10.0, seed=0, snr=0.5, missing_wedge=60.0,
                   n_vesicles=None, n_particles=None, *, defocus=3.0) -> SynthTomogram:
    """A noisy tomogram of vesicles, a curved membrane sheet and two kinds of particle.

    Parameters
    ----------
    shape : (z, y, x) voxels, each at least 16.
    voxel_size : Å per voxel.
    seed : the same seed gives identical arrays.
    snr : var(signal) / var(noise) of the returned volume.
    missing_wedge : total missing tilt range in degrees around the y tilt axis (60 means tilts
        to ±60°); 0 disables it.
    n_vesicles, n_particles : how many to try to place (default: from the volume); fewer are
        placed when they do not fit without overlapping.
    defocus : µm, sets the CTF (applied phase-flipped, as after CTF correction); 0 for none.

    Returns
    -------
    SynthTomogram
        ``volume`` (float32, zero mean, unit std, dense = low), ``membranes`` (uint8 mask of the
        bilayers), ``particles`` (N, 3) centres and their ``kinds`` (1 = large, 2 = small).

    Examples
    --------
    >>> t = synth_tomogram((32, 64, 64), seed=1)
    >>> t.volume.shape, t.membranes.dtype, t.kind_names
    ((32, 64, 64), dtype('uint8'), ['large', 'small'])
    """
    return _synthesise(shape, voxel_size, seed, snr, missing_wedge, n_vesicles, n_particles, defocus)[0]


def _synthesise(shape, voxel_size, seed, snr, missing_wedge, n_vesicles, n_particles, defocus):
    """The tomogram, with its clean (filtered, inverted) signal and its noise kept apart for tests."""
    shape = imaging.check_shape(shape)
    voxel_size = imaging.positive("voxel_size", voxel_size)
    snr = imaging.positive("snr", snr)
    missing_wedge = imaging.number("missing_wedge", missing_wedge, lambda x: 0 <= x < 180, "in [0, 180) degrees")
    defocus = imaging.number("defocus", defocus, lambda x: x >= 0, ">= 0 µm")
    n_vesicles, n_particles = imaging.count("n_vesicles", n_vesicles), imaging.count("n_particles", n_particles)
    rng = np.random.default_rng(imaging.count("seed", seed))

    distance = _membrane_distance(shape, voxel_size, rng, n_vesicles)
    membranes = (distance <= BILAYER_A / 2).astype(np.uint8)
    sigma2 = LEAFLET_SIGMA_A**2 + voxel_size**2 / 12  # a voxel averages the profile over its width
    density = (np.exp(-(distance - LEAFLET_PEAK_A) ** 2 / np.float32(2 * sigma2))
               + np.exp(-(distance + LEAFLET_PEAK_A) ** 2 / np.float32(2 * sigma2))).astype(np.float32)
    del distance
    particles, kinds = _particles(density, membranes, voxel_size, rng, n_particles)

    freqs = imaging.frequencies(shape, voxel_size)
    keep = imaging.wedge_keep(freqs, missing_wedge)
    weights = imaging.transfer(freqs, voxel_size, defocus, phase_flipped=True)
    if keep is not None:
        weights *= keep
    signal = -imaging.filtered(density, weights)  # periodic, unpadded: the wedge stays exactly empty
    noise = imaging.noise_like(signal, snr, rng, keep)
    truth = SynthTomogram(volume=imaging.standardise(signal + noise), membranes=membranes, particles=particles,
                          kinds=kinds, kind_names=[k[0] for k in KINDS],
                          diameters_A={i + 1: k[1] for i, k in enumerate(KINDS)}, voxel_size=voxel_size)
    return truth, signal, noise


def _membrane_distance(shape, voxel_size, rng, n_vesicles) -> np.ndarray:
    """Unsigned distance (Å) from each voxel to the nearest membrane mid-surface.

    One sheet — a patch of a sphere several volumes wide, its normal near the xy plane so the
    missing wedge does not erase it — crosses the volume; vesicles (spheres and ellipsoids) are
    then placed without touching it or each other.
    """
    shape_arr = np.asarray(shape, float)
    reach = (BILAYER_A / 2 + 4 * LEAFLET_SIGMA_A + voxel_size) / voxel_size  # voxels worth rendering
    phi, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3)
    normal = np.array([np.sin(tilt), np.cos(tilt) * np.cos(phi), np.cos(tilt) * np.sin(phi)])
    sheet_radius = rng.uniform(2, 4) * shape_arr.max()
    extent = np.abs(normal) @ shape_arr  # width of the volume along the normal
    crossing = (shape_arr - 1) / 2 + normal * rng.uniform(-0.35, 0.35) * extent
    sheet_centre = crossing - normal * sheet_radius
    grids = imaging.offsets(tuple(slice(0, n) for n in shape), sheet_centre)
    distance = np.abs(np.sqrt(sum(g * g for g in grids)) - np.float32(sheet_radius)) * np.float32(voxel_size)

    thick = BILAYER_A / voxel_size
    r_max = min(500.0 / voxel_size, 0.4 * shape_arr.min())
    r_min = min(150.0 / voxel_size, 0.6 * r_max)
    if r_max < 2 * thick:  # voxels so fine that no vesicle fits: the sheet alone
        n_vesicles = 0
    elif n_vesicles is None:
        mean_volume = 4 / 3 * np.pi * ((r_min + r_max) / 2) ** 3
        n_vesicles = max(1, round(0.15 * shape_arr.prod() / mean_volume))
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n_vesicles):
        r = rng.uniform(r_min, r_max)
        axes = r * (rng.uniform(0.8, 1.2, 3) if rng.random() < 0.5 else np.ones(3))
        axes = np.minimum(axes, (shape_arr.min() - 3) / 2)
        rotation, a_max = imaging.random_rotation(rng), axes.max()
        for _ in range(100):
            centre = a_max + 1 + rng.random(3) * (shape_arr - 3 - 2 * a_max)
            if abs(np.linalg.norm(centre - sheet_centre) - sheet_radius) < a_max + 2 * thick:
                continue
            if all(np.linalg.norm(centre - c) > a_max + a + 2 * thick for c, a in placed):
                placed.append((centre, a_max))
                region = imaging.box(centre, a_max + reach, shape)
                d = _ellipsoid_distance(imaging.offsets(region, centre), rotation, axes)
                np.minimum(distance[region], d * np.float32(voxel_size), out=distance[region])
                break
    return distance


def _ellipsoid_distance(p, rotation, axes) -> np.ndarray:
    """|signed distance| (voxels) to an ellipsoid surface, to first order: (ρ − 1) / |∇ρ|.

    ρ is the normalised radius; the formula is exact for a sphere and keeps the bilayer at
    constant thickness all around an ellipsoid, where ``(ρ − 1) · mean radius`` would not.
    """
    q = [sum(rotation[j, k] * p[j] for j in range(3)).astype(np.float32) for k in range(3)]
    rho = np.sqrt(sum((qk / np.float32(a)) ** 2 for qk, a in zip(q, axes)))
    gradient = np.sqrt(sum(qk * qk / np.float32(a**4) for qk, a in zip(q, axes)))
    return np.abs((rho - 1) * rho / np.maximum(gradient, np.float32(1e-6)))


def _particles(density, membranes, voxel_size, rng, n_particles):
    """Place non-overlapping particles clear of the membranes and add their density.

    Large ones are placed first (they are the hard ones to fit). Each particle is a few soft
    spherical lobes, turned by a random rotation.
    """
    shape = density.shape
    radii_vox = np.array([k[1] / 2 / voxel_size for k in KINDS])
    if n_particles is None:
        mean_volume = np.mean(4 / 3 * np.pi * radii_vox**3)
        n_particles = max(len(KINDS), round(0.08 * np.prod(shape) / mean_volume))
    counts = [n_particles // len(KINDS) + (i < n_particles % len(KINDS)) for i in range(len(KINDS))]
    kinds = np.repeat(np.arange(1, len(KINDS) + 1), counts)
    centres, placed = imaging.place(rng, len(kinds), radii_vox[kinds - 1], shape, membranes == 0, gap=1.0)
    kinds = kinds[placed]
    edge = max(voxel_size, 10.0) / 2 / voxel_size
    for centre, kind in zip(centres, kinds):
        r, lobes = radii_vox[kind - 1], KINDS[kind - 1][2]
        rotation = imaging.random_rotation(rng)
        region = imaging.box(centre, r + 2 * edge, shape)
        p = imaging.offsets(region, centre)
        blob = np.zeros(density[region].shape, np.float32)
        for offset, size in lobes:
            o = rotation @ np.asarray(offset) * r
            d = np.sqrt(sum((pj - np.float32(oj)) ** 2 for pj, oj in zip(p, o)))
            np.maximum(blob, imaging.soft_ball(d, np.float32(size * r), np.float32(edge)), out=blob)
        np.maximum(density[region], PROTEIN_DENSITY * blob, out=density[region])
    return centres, kinds.astype(int)


def write_tomogram(out_path, synth: SynthTomogram) -> dict[str, Path]:
    """Write ``X.mrc`` (volume) and its truth: ``truth/X_membranes.mrc`` (mask) and
    ``truth/X_particles.star``.

    The STAR file has ``rlnCoordinateX/Y/Z`` in voxels, ``rlnClassNumber`` = kind,
    ``rlnTomoName`` and the voxel size (``rlnTomoTiltSeriesPixelSize``).

    Examples
    --------
    >>> paths = write_tomogram(tmp_path / "t.mrc", synth_tomogram((32, 64, 64)))  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['membranes', 'particles', 'tomogram']
    """
    out = imaging.output_path(out_path)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    paths = {"tomogram": out, **imaging.truth_paths(out, membranes="_membranes.mrc", particles="_particles.star")}
    write_mrc(paths["tomogram"], synth.volume, synth.voxel_size)
    write_mrc(paths["membranes"], synth.membranes.astype(np.int8), synth.voxel_size)  # mode 0
    write_picks(paths["particles"], synth.particles,
                {"rlnClassNumber": synth.kinds, "rlnTomoName": stem, "rlnTomoTiltSeriesPixelSize": synth.voxel_size})
    return paths
