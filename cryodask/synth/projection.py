"""A physics-based tomogram simulator: density → tilt series (CTF, shot noise) → weighted back-projection.

Independent of :mod:`.tomogram` on purpose, so that a method tuned on one generator can be
checked on another: here the missing wedge, the streaks and the CTF fringes are not painted on
in Fourier space but come out of a reconstruction, as in real data. Steps:

1. a 3D potential (volts above vitreous ice): bilayers (two Gaussian headgroup leaflets) with
   transmembrane proteins on them, particles of a real map (EMD-3197, resampled to the voxel
   size) and of a simple shape, and optionally filaments and gold beads;
2. one projection per tilt about y (line integrals through the tilted volume, vectorised over y);
3. each projection turned into an image by the weak-phase CTF (defocus, amplitude contrast,
   300 kV, Cs), attenuated by the ice it crosses (thicker when tilted, optionally a gradient);
4. shot noise: Poisson at a dose per tilt, or Gaussian scaled to a target SNR in the volume;
5. R-weighted (ramp) back-projection. With a single tilt axis every y row is its own 2D x–z
   problem, so both passes work on all rows at once.

The truth (membrane mask, particle centres and kinds 1 = large, 2 = small) follows the same
contract as :func:`.tomogram.synth_tomogram`, so every command reads either generator's output.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from ..errors import InputError, where
from . import imaging
from .tomogram import SynthTomogram

MAP_PATH = Path(__file__).resolve().parent / "maps" / "EMD-3197.map"  # shipped with the package (EMDB, CC0)
LEAFLET_PEAK_A = 20.0  # headgroup peaks ±20 Å from the mid-plane: 40 Å apart
LEAFLET_SIGMA_A = 4.0
BILAYER_A = 2 * (LEAFLET_PEAK_A + LEAFLET_SIGMA_A)  # truth mask: the bilayer out to 1 σ past the peaks
LIPID_V, PROTEIN_V, GOLD_V = 2.0, 2.0, 25.0  # potential above vitreous ice, volts
MEMBRANE_PROTEIN_RADIUS_A = 38.0  # spans the bilayer and stands out of it on both sides
FILAMENT_RADIUS_A = 35.0  # actin-like
GOLD_RADIUS_A = 50.0
SIGMA_E = 6.53e-4  # interaction constant at 300 kV, rad / (V·Å)
CS_MM = 2.7
MEAN_FREE_PATH_A = 3500.0  # inelastic, 300 kV: what an energy filter removes
SMALL_AXES_A = (60.0, 42.0, 42.0)  # the simple kind: a prolate ellipsoid 120 Å long
KIND_NAMES = ["large", "small"]


def synth_projection_tomogram(shape=(64, 128, 128), voxel_size=10.0, seed=0, snr=0.5, dose=None, tilt_max=60.0,
                              tilt_step=3.0, defocus=3.0, *, n_vesicles=None, n_particles=None, n_filaments=0,
                              n_gold=0, ice_gradient=0.0, polarity="dark", map_path=None) -> SynthTomogram:
    """A tomogram reconstructed by WBP from a simulated tilt series, with its truth.

    Parameters
    ----------
    shape : (z, y, x) voxels, each at least 16; y is the tilt axis.
    voxel_size : Å per voxel (also the detector pixel).
    seed : the same seed gives identical arrays.
    snr : var(signal) / var(noise) in the reconstruction, from Gaussian noise added to each tilt.
    dose : e⁻/Å² per tilt; when given, Poisson shot noise replaces ``snr``.
    tilt_max, tilt_step : tilts from −tilt_max to +tilt_max degrees in tilt_step steps.
    defocus : µm underfocus (0: no CTF, a plain projection).
    n_vesicles, n_particles : how many to try to place (default: from the volume).
    n_filaments, n_gold : distractors (not in the truth): 70 Å filaments, 100 Å gold beads.
    ice_gradient : relative change of ice thickness across x (0.5: 50 % thicker at one edge).
    polarity : "dark" (dense matter dark, as real tomograms) or "bright" (negated).
    map_path : the density map of the large kind (default EMD-3197, shipped in ``synth/maps``).

    Examples
    --------
    >>> t = synth_projection_tomogram((32, 64, 64), seed=1)  # doctest: +SKIP
    >>> t.volume.shape, t.kind_names  # doctest: +SKIP
    ((32, 64, 64), ['large', 'small'])
    """
    return _synthesise(shape, voxel_size, seed, snr, dose, tilt_max, tilt_step, defocus, n_vesicles, n_particles,
                       n_filaments, n_gold, ice_gradient, polarity, map_path)[0]


def _synthesise(shape, voxel_size, seed, snr, dose, tilt_max, tilt_step, defocus, n_vesicles=None,
                n_particles=None, n_filaments=0, n_gold=0, ice_gradient=0.0, polarity="dark", map_path=None,
                ctf=True):
    """The tomogram and the clean potential it was made from (for tests)."""
    shape = imaging.check_shape(shape)
    voxel_size = imaging.positive("voxel_size", voxel_size)
    snr = imaging.positive("snr", snr)
    if dose is not None:
        dose = imaging.positive("dose", dose)
    tilt_max = imaging.number("tilt_max", tilt_max, lambda x: 0 <= x < 90, "in [0, 90) degrees")
    tilt_step = imaging.number("tilt_step", tilt_step, lambda x: x > 0, "a positive number of degrees")
    defocus = imaging.number("defocus", defocus, lambda x: x >= 0, ">= 0 µm")
    ice_gradient = imaging.number("ice_gradient", ice_gradient, lambda x: -1 < x < 1, "in (-1, 1)")
    if polarity not in ("dark", "bright"):
        raise InputError(f"polarity must be 'dark' or 'bright', got {polarity!r}")
    n_vesicles, n_particles = imaging.count("n_vesicles", n_vesicles), imaging.count("n_particles", n_particles)
    n_filaments, n_gold = imaging.count("n_filaments", n_filaments), imaging.count("n_gold", n_gold)
    template = _large_template(Path(map_path or MAP_PATH), voxel_size)
    rng = np.random.default_rng(imaging.count("seed", seed))

    potential, membranes = _membranes(shape, voxel_size, rng, n_vesicles)
    _filaments(potential, voxel_size, rng, n_filaments)
    _gold(potential, voxel_size, rng, n_gold)
    particles, kinds, diameters = _particles(potential, voxel_size, rng, n_particles, template)

    angles = np.radians(np.arange(-tilt_max, tilt_max + tilt_step / 2, tilt_step))
    images = _images(potential, angles, voxel_size, defocus if ctf else 0.0, ice_gradient)
    exposure = images.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    if dose is not None:
        electrons = dose * voxel_size**2
        images = rng.poisson(np.clip(images, 0, None) * electrons).astype(np.float32) / np.float32(electrons)
        volume = _reconstruct(images, angles, shape[0], exposure)
    else:  # shot-noise-like: variance follows each tilt's exposure
        volume = _reconstruct(images, angles, shape[0], exposure)
        noise = rng.standard_normal(images.shape, dtype=np.float32) * np.sqrt(exposure)
        noise = _reconstruct(noise, angles, shape[0], exposure)
        scale = np.sqrt(volume.var(dtype=np.float64) / snr / noise.var(dtype=np.float64))
        volume += noise * np.float32(scale)
    volume = imaging.standardise(volume)
    if polarity == "bright":
        volume = -volume
    truth = SynthTomogram(volume=volume, membranes=membranes, particles=particles, kinds=kinds,
                          kind_names=list(KIND_NAMES), diameters_A=diameters, voxel_size=voxel_size)
    return truth, potential, angles


@lru_cache(maxsize=8)
def _large_template(map_path: Path, voxel_size: float) -> tuple[np.ndarray, float]:
    """The real map as a particle, and its diameter in Å: background removed, masked to a sphere,
    resampled to the voxel size.

    The map's own box is filled to its edges, so density above its median inside a soft sphere
    of 0.45 box is kept; ``scipy.ndimage.zoom`` resamples it (linear, so nothing overshoots).
    """
    import mrcfile

    if not map_path.is_file():
        raise where(map_path, "particle map not found; give one with --map (a 3D density MRC, e.g. from EMDB)")
    try:
        with mrcfile.open(map_path, permissive=True) as mrc:
            data = np.asarray(mrc.data, np.float32)
            spacing = float(mrc.voxel_size.x)
    except (OSError, ValueError) as exc:
        raise where(map_path, f"cannot read the particle map: {exc}") from None
    if data is None or data.ndim != 3 or not spacing > 0:
        raise where(map_path, "the particle map must be a 3D MRC with a voxel size")
    centre = (np.asarray(data.shape) - 1) / 2
    radius = 0.45 * min(data.shape)
    distance = np.sqrt(sum(g * g for g in imaging.offsets(tuple(slice(0, n) for n in data.shape), centre)))
    density = np.clip(data - np.median(data), 0, None) * imaging.soft_ball(distance, radius - 0.5, 0.5)
    density = ndi.zoom(density, spacing / voxel_size, order=1, grid_mode=True, mode="grid-constant")
    density = np.clip(density, 0, None)
    support = density[density > 0.05 * density.max()]
    density *= np.float32(PROTEIN_V / max(float(np.percentile(support, 75)), 1e-12))  # its denser parts ~ protein
    density = np.minimum(density, np.float32(1.5 * PROTEIN_V)).astype(np.float32)
    density.setflags(write=False)  # cached and shared between calls
    return density, 2 * radius * spacing


def _template_radius(template: np.ndarray) -> float:
    """Radius (voxels) of the smallest centred ball holding the template's density."""
    centre = (np.asarray(template.shape) - 1) / 2
    distance = np.sqrt(sum(g * g for g in imaging.offsets(tuple(slice(0, n) for n in template.shape), centre)))
    return float(distance[template > 0.02 * template.max()].max()) + 0.5


def _membranes(shape, voxel_size, rng, n_vesicles):
    """Bilayer potential and its truth mask: one gently curved sheet crossing the volume, and vesicles.

    The sheet is a cap of a sphere several volumes wide whose normal stays within ±20° of the
    xy plane (a membrane seen face-on falls in the missing wedge and would vanish: real data
    have such membranes, but a truth mask cannot be scored there). Vesicles are spheres.
    """
    shape_arr = np.asarray(shape, float)
    whole = tuple(slice(0, n) for n in shape)
    phi, elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(-20, 20))
    normal = np.array([np.sin(elevation), np.cos(elevation) * np.sin(phi), np.cos(elevation) * np.cos(phi)])
    radius = rng.uniform(3, 6) * shape_arr.max()
    through = (shape_arr - 1) / 2 + normal * rng.uniform(-0.3, 0.3) * (np.abs(normal) @ shape_arr)
    centre = through - normal * radius
    distance = np.abs(np.sqrt(sum(g * g for g in imaging.offsets(whole, centre))) - np.float32(radius))
    distance *= np.float32(voxel_size)  # Å from the nearest mid-surface

    thick = BILAYER_A / voxel_size
    r_max = min(450.0 / voxel_size, 0.4 * shape_arr.min())
    r_min = min(180.0 / voxel_size, 0.6 * r_max)
    if r_max < 2 * thick:
        n_vesicles = 0
    elif n_vesicles is None:
        n_vesicles = max(1, round(0.12 * shape_arr.prod() / (4 / 3 * np.pi * ((r_min + r_max) / 2) ** 3)))
    if n_vesicles:
        radii = np.sort(rng.uniform(r_min, r_max, n_vesicles))[::-1]
        free = distance > (BILAYER_A + 2 * voxel_size)
        centres, placed = imaging.place(rng, n_vesicles, radii + thick, shape, free, gap=thick)
        reach = (BILAYER_A / 2 + 3 * LEAFLET_SIGMA_A) / voxel_size + 2
        for c, r in zip(centres, radii[placed]):
            region = imaging.box(c, r + reach, shape)
            d = np.abs(np.sqrt(sum(g * g for g in imaging.offsets(region, c))) - np.float32(r)) * np.float32(voxel_size)
            np.minimum(distance[region], d, out=distance[region])

    membranes = (distance <= BILAYER_A / 2).astype(np.uint8)
    sigma2 = np.float32(2 * (LEAFLET_SIGMA_A**2 + voxel_size**2 / 12))  # a voxel averages over its width,
    peak = np.float32(LIPID_V * LEAFLET_SIGMA_A / np.sqrt(sigma2 / 2))  # which keeps the leaflet's integral
    potential = peak * (np.exp(-(distance - np.float32(LEAFLET_PEAK_A)) ** 2 / sigma2)
                                       + np.exp(-(distance + np.float32(LEAFLET_PEAK_A)) ** 2 / sigma2))
    potential = potential.astype(np.float32)

    # transmembrane proteins: one per (35 nm)² of membrane, centred on the mid-surface
    surface = np.argwhere(distance <= voxel_size / 2)
    area = len(surface) * voxel_size**2
    n_proteins = min(len(surface), int(rng.poisson(area / 350.0**2)))
    r = MEMBRANE_PROTEIN_RADIUS_A / voxel_size
    edge = np.float32(max(voxel_size, 8.0) / 2 / voxel_size)
    for c in surface[rng.choice(len(surface), n_proteins, replace=False)] if n_proteins else []:
        c = c + rng.uniform(-0.5, 0.5, 3)
        region = imaging.box(c, r + 3 * edge, shape)
        d = np.sqrt(sum(g * g for g in imaging.offsets(region, c)))
        np.maximum(potential[region], np.float32(PROTEIN_V) * imaging.soft_ball(d, np.float32(r), edge),
                   out=potential[region])
    return potential, membranes


def _filaments(potential, voxel_size, rng, n):
    """Straight filaments across the volume, roughly in the xy plane (they lie flat in thin ice)."""
    shape = np.asarray(potential.shape, float)
    grids = imaging.offsets(tuple(slice(0, int(s)) for s in shape), (shape - 1) / 2)
    r, edge = FILAMENT_RADIUS_A / voxel_size, np.float32(max(voxel_size, 8.0) / 2 / voxel_size)
    for _ in range(n):
        phi, elevation = rng.uniform(0, np.pi), np.radians(rng.uniform(-15, 15))
        direction = np.array([np.sin(elevation), np.cos(elevation) * np.sin(phi), np.cos(elevation) * np.cos(phi)])
        point = rng.uniform(-0.3, 0.3, 3) * shape
        rel = [g - np.float32(p) for g, p in zip(grids, point)]
        along = sum(x * np.float32(d) for x, d in zip(rel, direction))
        d = np.sqrt(np.maximum(sum(x * x for x in rel) - along * along, 0))
        np.maximum(potential, np.float32(PROTEIN_V) * imaging.soft_ball(d, np.float32(r), edge), out=potential)


def _gold(potential, voxel_size, rng, n):
    """Gold beads (fiducials), very dense: they streak in a WBP as in real tomograms."""
    if not n:
        return
    r = GOLD_RADIUS_A / voxel_size
    centres, _ = imaging.place(rng, n, np.full(n, r), potential.shape, potential < 0.05 * PROTEIN_V, gap=1.0)
    edge = np.float32(max(voxel_size, 5.0) / 2 / voxel_size)
    for c in centres:
        region = imaging.box(c, r + 3 * edge, potential.shape)
        d = np.sqrt(sum(g * g for g in imaging.offsets(region, c)))
        np.maximum(potential[region], np.float32(GOLD_V) * imaging.soft_ball(d, np.float32(r), edge),
                   out=potential[region])


def _particles(potential, voxel_size, rng, n_particles, large):
    """Place the two kinds off everything already there and off each other, then add them.

    Large: the real map, turned by a random rotation (``affine_transform``, linear); small: a
    soft prolate ellipsoid. Centres are placed on the voxel grid's continuum (sub-voxel).
    """
    shape = potential.shape
    template, diameter_A = large
    small_r = max(SMALL_AXES_A) / voxel_size
    radii = np.array([_template_radius(template), small_r])
    diameters = {1: float(diameter_A), 2: 2 * max(SMALL_AXES_A)}
    if n_particles is None:
        n_particles = max(2, round(0.08 * np.prod(shape) / np.mean(4 / 3 * np.pi * radii**3)))
    kinds = np.repeat([1, 2], [n_particles - n_particles // 2, n_particles // 2])
    centres, placed = imaging.place(rng, len(kinds), radii[kinds - 1], shape, potential < 0.05 * PROTEIN_V, gap=1.0)
    kinds = kinds[placed]
    t_centre = (np.asarray(template.shape) - 1) / 2
    edge = np.float32(max(voxel_size, 8.0) / 2 / voxel_size)
    for c, kind in zip(centres, kinds):
        rotation = imaging.random_rotation(rng)
        region = imaging.box(c, radii[kind - 1] + 1, shape)
        if kind == 1:
            start = np.array([s.start for s in region])
            # output voxel o (in the region) samples template at R (o + start − c) + t_centre
            blob = ndi.affine_transform(template, rotation, offset=t_centre - rotation @ (c - start),
                                        output_shape=potential[region].shape, order=1, mode="constant")
        else:
            p = imaging.offsets(region, c)
            q = [sum(np.float32(rotation[j, k]) * p[j] for j in range(3)) for k in range(3)]
            rho = np.sqrt(sum((qk * np.float32(voxel_size / a)) ** 2 for qk, a in zip(q, SMALL_AXES_A)))
            blob = np.float32(PROTEIN_V) * imaging.soft_ball(rho * np.float32(small_r), np.float32(small_r), edge)
        np.maximum(potential[region], blob.astype(np.float32), out=potential[region])
    return centres, kinds.astype(int), diameters


def _images(potential, angles, voxel_size, defocus_um, ice_gradient) -> np.ndarray:
    """The tilt series (n_tilts, y, x): weak-phase images of each projection, mean about 1.

    ``I = a · (1 − 2 φ ⊛ w)`` with phase ``φ = σ ∫V dz`` and ``w`` the CTF's inverse transform,
    ``W = √(1−A²) sin χ + A cos χ``, ``χ = π λ Δz s² − π/2 Cs λ³ s⁴``; ``a = exp(−t / (cos θ Λ))``
    is the share of electrons not scattered inelastically by the ice (thickness ``t``, thicker
    in the beam's path when tilted, and along x by ``ice_gradient``).
    """
    nz, ny, nx = potential.shape
    phase = _project(np.ascontiguousarray(potential.transpose(0, 2, 1)), angles) * np.float32(SIGMA_E * voxel_size)
    if defocus_um > 0:
        ky = sfft.fftfreq(ny, d=voxel_size).astype(np.float32)[:, None]
        kx = sfft.rfftfreq(nx, d=voxel_size).astype(np.float32)[None, :]
        s2 = ky * ky + kx * kx
        lam = imaging.WAVELENGTH_A
        chi = np.pi * lam * defocus_um * 1e4 * s2 - np.pi / 2 * CS_MM * 1e7 * lam**3 * s2 * s2
        a = imaging.AMPLITUDE_CONTRAST
        ctf = (np.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi)).astype(np.float32)
        phase = sfft.irfft2(sfft.rfft2(phase, workers=-1) * ctf, s=(ny, nx), workers=-1).astype(np.float32)
    x = (np.arange(nx) - (nx - 1) / 2) / nx
    thickness = nz * voxel_size * (1 + ice_gradient * x[None, :] / np.cos(angles)[:, None])  # x under the beam
    attenuation = np.exp(-thickness / np.cos(angles)[:, None] / MEAN_FREE_PATH_A)
    attenuation /= attenuation.max()
    return (attenuation[:, None, :].astype(np.float32) * (1 - 2 * phase)).astype(np.float32)


def _project(volume_zxy: np.ndarray, angles) -> np.ndarray:
    """Line integrals through ``volume`` (z, x, y) for each tilt about y: (n_tilts, y, x), in voxels.

    Detector coordinate ``u = x cos θ + z sin θ`` (centred); each ray is sampled at unit steps
    with bilinear interpolation in x–z. The sampling is one sparse matrix per tilt acting on
    every y row at once; samples off the box read zero.
    """
    nz, nx, ny = volume_zxy.shape
    cz, cx = (nz - 1) / 2, (nx - 1) / 2
    reach = int(np.ceil(np.hypot(cz, cx))) + 1
    t = np.arange(-reach, reach + 1, dtype=np.float64)[:, None]
    u = np.arange(nx, dtype=np.float64)[None, :]
    rows, cols, weights = [], [], []
    for i, theta in enumerate(angles):
        c, s = np.cos(theta), np.sin(theta)
        x = (u - cx) * c - t * s + cx
        z = (u - cx) * s + t * c + cz
        keep = (z > -1) & (z < nz) & (x > -1) & (x < nx)
        x, z, detector = x[keep], z[keep], np.broadcast_to(u, keep.shape)[keep] + i * nx
        x0, z0 = np.floor(x).astype(np.intp), np.floor(z).astype(np.intp)
        wx, wz = x - x0, z - z0
        for dz, dx, w in ((0, 0, (1 - wz) * (1 - wx)), (0, 1, (1 - wz) * wx), (1, 0, wz * (1 - wx)), (1, 1, wz * wx)):
            zi, xi = z0 + dz, x0 + dx
            ok = (zi >= 0) & (zi < nz) & (xi >= 0) & (xi < nx)
            rows.append(detector[ok])
            cols.append(zi[ok] * nx + xi[ok])
            weights.append(w[ok])
    matrix = _sparse(rows, cols, weights, (len(angles) * nx, nz * nx))
    return np.ascontiguousarray((matrix @ volume_zxy.reshape(nz * nx, ny)).reshape(len(angles), nx, ny)
                                .transpose(0, 2, 1))


def _sparse(rows, cols, weights, shape):
    """A CSR matrix (float32) from lists of coordinates and weights; repeated entries add up."""
    from scipy.sparse import coo_matrix

    return coo_matrix((np.concatenate(weights).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=shape).tocsr()


def _reconstruct(images: np.ndarray, angles, nz: int, exposure=None) -> np.ndarray:
    """Weighted back-projection: ramp (R-weighting) filter along x, then smear back along each ray.

    Each tilt is divided by its ``exposure`` (default: its mean), as reconstruction programs
    normalise tilts, so thick ice at high tilt makes them noisier, not fainter; its mean is then
    removed (the ramp has no DC). The filter works on a zero-padded row so it does not wrap around.
    """
    _, ny, nx = images.shape
    if exposure is None:
        exposure = images.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    contrast = images / exposure
    contrast -= contrast.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    size = sfft.next_fast_len(2 * nx)
    ramp = np.abs(sfft.rfftfreq(size)).astype(np.float32)
    filtered = sfft.irfft(sfft.rfft(contrast, n=size, axis=-1, workers=-1) * ramp, n=size, axis=-1, workers=-1)
    filtered = np.ascontiguousarray(filtered[..., :nx].transpose(0, 2, 1), np.float32)  # (tilt, x, y)
    cz, cx = (nz - 1) / 2, (nx - 1) / 2
    z, x = np.meshgrid(np.arange(nz) - cz, np.arange(nx) - cx, indexing="ij")
    voxel = np.arange(nz * nx).reshape(nz, nx)
    rows, cols, weights = [], [], []
    for i, theta in enumerate(angles):  # each voxel reads the detector where its ray lands, linearly
        u = x * np.cos(theta) + z * np.sin(theta) + cx
        u0 = np.floor(u).astype(np.intp)
        for du, w in ((0, 1 - (u - u0)), (1, u - u0)):
            ok = (u0 + du >= 0) & (u0 + du < nx)
            rows.append(voxel[ok])
            cols.append(u0[ok] + du + i * nx)
            weights.append(w[ok])
    matrix = _sparse(rows, cols, weights, (nz * nx, len(angles) * nx))
    volume = (matrix @ filtered.reshape(len(angles) * nx, ny)).reshape(nz, nx, ny)
    volume *= np.float32(np.pi / max(len(angles), 1))
    return np.ascontiguousarray(volume.transpose(0, 2, 1))
