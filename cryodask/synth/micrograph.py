"""Synthetic cryo-EM micrographs with ground truth: particle centres, particle disks, contaminants.

Particles are projections of a D2-symmetric tetramer of soft lobes (β-galactosidase-like) seen
from random directions, so their outline varies from view to view as in real data. Ice crystals
and a carbon edge are the distractors a picker must learn to reject; particles never touch them.
The raw CTF (not phase-flipped) is applied, and the image is inverted: dense matter is dark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..io.mrc import write_mrc
from ..io.picks import write_picks
from . import imaging

# lobe centres of a D2 tetramer, in particle radii (z, y, x); every lobe has radius 0.42
TETRAMER = np.array([[0.18, 0.30, 0.42], [-0.18, -0.30, 0.42], [-0.18, 0.30, -0.42], [0.18, -0.30, -0.42]])
LOBE_RADIUS = 0.42


@dataclass
class SynthMicrograph:
    """A synthetic micrograph and its ground truth; arrays are (y, x), coordinates in pixels."""

    image: np.ndarray
    mask: np.ndarray
    particles: np.ndarray
    contaminants: np.ndarray
    pixel_size: float
    diameter_px: float


def synth_micrograph(shape=(512, 512), pixel_size=1.77, diameter=108.0, n_particles=None, seed=0, snr=0.3,
                     *, defocus=1.5) -> SynthMicrograph:
    """A noisy micrograph of particles among ice contaminants and, sometimes, a carbon edge.

    Parameters
    ----------
    shape : (y, x) pixels, each at least 32.
    pixel_size : Å per pixel.
    diameter : particle diameter in pixels (smaller than the image).
    n_particles : how many to try to place (default: about 30 % coverage); fewer are placed
        when they do not fit without overlapping each other or the contaminants.
    seed : the same seed gives identical arrays.
    snr : var(signal) / var(noise).
    defocus : µm, sets the CTF (0 for a plain band-pass).

    Returns
    -------
    SynthMicrograph
        ``image`` (float32, zero mean, unit std, dense = low), ``mask`` (uint8 disks of the
        particle diameter at each centre), ``particles`` (N, 2) centres, ``contaminants`` (uint8).

    Examples
    --------
    >>> m = synth_micrograph((256, 256), diameter=40, seed=2)
    >>> m.image.shape, m.particles.shape[1]
    ((256, 256), 2)
    """
    return _synthesise(shape, pixel_size, diameter, n_particles, seed, snr, defocus)[0]


def _synthesise(shape, pixel_size, diameter, n_particles, seed, snr, defocus):
    """The micrograph, with its clean (filtered, inverted) signal and its noise kept apart for tests."""
    shape = imaging.check_shape(shape, ndim=2, minimum=32, axes="y,x")
    pixel_size, snr = imaging.positive("pixel_size", pixel_size), imaging.positive("snr", snr)
    diameter = imaging.number("diameter", diameter, lambda x: 2 <= x < min(shape),
                              f"from 2 to under {min(shape)} pixels (the image side)")
    defocus = imaging.number("defocus", defocus, lambda x: x >= 0, ">= 0 µm")
    n_particles = imaging.count("n_particles", n_particles)
    rng = np.random.default_rng(imaging.count("seed", seed))

    density, contaminants = _contaminants(shape, diameter, rng)
    radius = diameter / 2
    if n_particles is None:
        n_particles = max(1, round(0.3 * np.prod(shape) / (np.pi * radius**2)))
    centres, _ = imaging.place(rng, n_particles, np.full(n_particles, radius), shape, contaminants == 0,
                               gap=max(2.0, 0.05 * diameter))
    mask = np.zeros(shape, np.uint8)
    for centre in centres:
        region = imaging.box(centre, radius + 1, shape)
        y, x = imaging.offsets(region, centre, np.float64)  # float64: the truth disk is exact
        mask[region] |= (y * y + x * x <= radius**2).astype(np.uint8)
        density[region] += _projection(y.astype(np.float32), x.astype(np.float32), radius,
                                       imaging.random_rotation(rng))

    # mirror-pad before filtering so that the CTF fringes of one edge do not wrap onto the other
    pad = min(64, min(shape) // 4)
    padded = np.pad(density, pad, mode="reflect")
    weights = imaging.transfer(imaging.frequencies(padded.shape, pixel_size), pixel_size, defocus, phase_flipped=False)
    signal = -imaging.filtered(padded, weights)[pad:-pad, pad:-pad]
    noise = imaging.noise_like(signal, snr, rng)
    truth = SynthMicrograph(image=imaging.standardise(signal + noise), mask=mask, particles=centres,
                            contaminants=contaminants, pixel_size=pixel_size, diameter_px=diameter)
    return truth, signal, noise


def _projection(y, x, radius, rotation) -> np.ndarray:
    """Projected density (along z) of the tetramer turned by ``rotation``: Σ 2·√(a² − r²) per lobe."""
    lobes = TETRAMER @ rotation.T * radius
    a2 = np.float32((LOBE_RADIUS * radius) ** 2)
    total = sum(np.sqrt(np.maximum(a2 - (y - np.float32(ly)) ** 2 - (x - np.float32(lx)) ** 2, 0))
                for _, ly, lx in lobes)
    return (2 * total / np.float32(2 * radius)).astype(np.float32)


def _contaminants(shape, diameter, rng):
    """Density and mask of ice crystals (irregular, dark or bright) and, half the time, a carbon edge.

    Ice crystals are star-shaped blobs (a radius modulated by a few angular harmonics) from
    0.6 to 2.4 particle diameters wide; the carbon is the outside of a hole edge, an arc of a
    circle several images wide, with a fine granular texture.
    """
    density = np.zeros(shape, np.float32)
    contaminants = np.zeros(shape, bool)
    area_scale = np.prod(shape) / 512**2
    for _ in range(max(1, round(rng.uniform(1, 3.5) * area_scale))):
        centre = rng.random(2) * (np.asarray(shape) - 1)
        size = rng.uniform(0.3, 1.2) * diameter
        harmonics = [(k, rng.uniform(0, 0.6) / k, rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
        region = imaging.box(centre, 1.8 * size + 8, shape)  # the harmonics add at most 0.77·size
        y, x = imaging.offsets(region, centre)
        theta = np.arctan2(y, x)
        edge = size * (1 + sum(a * np.cos(k * theta + phase) for k, a, phase in harmonics))
        r = np.sqrt(y * y + x * x)
        amplitude = rng.uniform(1.5, 3.0) * (1 if rng.random() < 0.7 else -0.5)  # thin-ice patches are bright
        density[region] += amplitude * imaging.soft_ball(r, edge, 2.0).astype(np.float32)
        contaminants[region] |= r <= edge
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        normal = np.array([np.sin(angle), np.cos(angle)])
        hole_radius = rng.uniform(2, 5) * max(shape)
        hole_centre = (np.asarray(shape) - 1) / 2 + normal * (rng.uniform(0.25, 0.45) * min(shape) - hole_radius)
        y, x = imaging.offsets(tuple(slice(0, n) for n in shape), hole_centre)
        r = np.sqrt(y * y + x * x)
        texture = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
        density += (rng.uniform(0.8, 1.5) + 0.5 * texture) * imaging.soft_ball(-r, -hole_radius, 2.0)
        contaminants |= r > hole_radius
    return density, contaminants.astype(np.uint8)


def write_micrograph(out_path, synth: SynthMicrograph) -> dict[str, Path]:
    """Write ``X.mrc`` and its truth: ``truth/X_mask.mrc`` (particle disks),
    ``truth/X_contaminants.mrc`` and ``truth/X_particles.star``.

    The STAR file has ``rlnCoordinateX/Y`` in pixels, ``rlnMicrographName`` and
    ``rlnMicrographPixelSize``.

    Examples
    --------
    >>> paths = write_micrograph(tmp_path / "m.mrc", synth_micrograph())  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['contaminants', 'mask', 'micrograph', 'particles']
    """
    out = imaging.output_path(out_path)
    paths = {"micrograph": out, **imaging.truth_paths(out, mask="_mask.mrc", contaminants="_contaminants.mrc",
                                                       particles="_particles.star")}
    write_mrc(paths["micrograph"], synth.image, synth.pixel_size)
    write_mrc(paths["mask"], synth.mask.astype(np.int8), synth.pixel_size)  # mode 0
    write_mrc(paths["contaminants"], synth.contaminants.astype(np.int8), synth.pixel_size)
    write_picks(paths["particles"], synth.particles,
                {"rlnMicrographName": out.name, "rlnMicrographPixelSize": synth.pixel_size})
    return paths
