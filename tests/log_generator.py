"""An independent tomogram generator for the LoG picker's tests and calibration.

Written apart from ``cryodask.synth`` on purpose (issue 14): soft dense spheres on a flat
background, optional dark membranes (planes and vesicle shells) as distractors, a missing
wedge cut in Fourier space about the y tilt axis, white noise at a given SNR. Nothing here
shares code or constants with the picker or with cryodask's own simulators.
"""

from __future__ import annotations

import numpy as np


def soft_spheres(shape=(64, 192, 192), voxel_size=10.0, diameter=220.0, n=25, snr=0.1, wedge=60.0, seed=0,
                 planes=0, vesicles=0, membrane_A=45.0, dark=True, wedge_noise=True):
    """``(volume, centres, membranes)``: ``n`` non-overlapping soft spheres of ``diameter`` Å (density 1,
    edge a 1-voxel tanh) in a volume of ``shape``, darker than the background when ``dark``.

    ``planes`` flat sheets and ``vesicles`` spherical shells ``membrane_A`` thick (density 1,
    as dense as the particles) are added where they do not touch a particle. The missing
    wedge removes frequencies within ``90 - wedge`` degrees of the z axis (tilts to ±wedge);
    the noise is white (filtered by the wedge too when ``wedge_noise``: as in a reconstruction),
    scaled to var(signal) / var(noise) = ``snr``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    r = diameter / 2 / voxel_size
    grid = np.indices(shape, dtype=np.float32)
    density = np.zeros(shape, np.float32)
    centres = []
    margin = np.array([r] * 3)
    for _ in range(20000):
        if len(centres) == n:
            break
        c = rng.uniform(margin, np.array(shape) - 1 - margin) if all(s > 2 * r + 2 for s in shape) \
            else rng.uniform(0, np.array(shape) - 1)
        if all(np.linalg.norm(c - p) >= 2 * r + 1 for p in centres):
            centres.append(c)
    centres = np.array(centres).reshape(-1, 3)
    for c in centres:
        d = np.sqrt(sum((g - x) ** 2 for g, x in zip(grid, c)))
        density = np.maximum(density, 0.5 * (1 - np.tanh((d - r) / 1.0)))
    half = membrane_A / 2 / voxel_size
    clear = r + half + 2  # membranes stay this far (voxels) from particle centres
    sheets = np.zeros(shape, np.float32)
    for _ in range(planes):
        for _try in range(200):
            normal = rng.standard_normal(3)
            normal /= np.linalg.norm(normal)
            offset = rng.uniform(0.2, 0.8) * np.array(shape)
            if len(centres) == 0 or np.abs((centres - offset) @ normal).min() > clear:
                break
        d = np.abs(sum((g - o) * k for g, o, k in zip(grid, offset, normal)))
        sheets = np.maximum(sheets, 0.5 * (1 - np.tanh((d - half) / 0.7)))
    for _ in range(vesicles):
        for _try in range(200):
            radius = rng.uniform(2.5, 5.0) * r
            c = rng.uniform(0, np.array(shape) - 1)
            if len(centres) == 0 or np.abs(np.linalg.norm(centres - c, axis=1) - radius).min() > clear:
                break
        d = np.abs(np.sqrt(sum((g - x) ** 2 for g, x in zip(grid, c))) - radius)
        sheets = np.maximum(sheets, 0.5 * (1 - np.tanh((d - half) / 0.7)))
    density = np.maximum(density, sheets)
    signal = -density if dark else density
    keep = _wedge(shape, wedge)
    if keep is not None:
        signal = np.fft.irfftn(np.fft.rfftn(signal) * keep, s=shape, axes=(0, 1, 2)).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    if keep is not None and wedge_noise:
        noise = np.fft.irfftn(np.fft.rfftn(noise) * keep, s=shape, axes=(0, 1, 2)).astype(np.float32)
    noise *= np.sqrt(signal.var() / snr / noise.var())
    volume = signal + noise
    return ((volume - volume.mean()) / volume.std()).astype(np.float32), centres, sheets > 0.5


def _wedge(shape, wedge):
    """1 where a single-axis tilt series to ±wedge degrees about y samples (kz, kx), else 0."""
    if not wedge:
        return None
    kz = np.fft.fftfreq(shape[0])[:, None, None]
    kx = np.fft.rfftfreq(shape[2])[None, None, :]
    # sampled: the frequency's angle from the x axis (in the kz-kx plane) is at most `wedge`
    keep = np.abs(kz) <= np.abs(kx) * np.tan(np.radians(wedge))
    keep = keep | ((kz == 0) & (kx == 0))
    return np.broadcast_to(keep, (shape[0], shape[1], shape[2] // 2 + 1)).astype(np.float32)


def scipy_baseline(volume, voxel_size, diameter, k=3.0, dark=True):
    """The issue's ten lines: LoG at σ = r/√3, local maxima within r, response above k std."""
    from scipy import ndimage as ndi

    r = diameter / 2 / voxel_size
    response = ndi.gaussian_laplace(volume.astype(np.float32), r / np.sqrt(3)) * (1 if dark else -1)
    size = 2 * int(r) + 1
    peaks = (response == ndi.maximum_filter(response, size=size)) & (response > response.mean() + k * response.std())
    return np.argwhere(peaks).astype(float)
