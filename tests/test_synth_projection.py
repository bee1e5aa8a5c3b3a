"""The projection simulator: density → tilt series (CTF, noise) → WBP, checked against physics, on real files."""

from __future__ import annotations

import time

import mrcfile
import numpy as np
import pytest
import scipy.fft as sfft
import starfile
from conftest import one_line_error
from scipy import ndimage as ndi

from cryodask.errors import InputError
from cryodask.evaluate import load_volume
from cryodask.io.picks import read_picks
from cryodask.synth import projection as projection_module
from cryodask.synth import synth_projection_tomogram, write_tomogram

SMALL = (32, 64, 64)


@pytest.fixture(scope="module")
def noiseless():
    """A 64×128×128 volume, its potential and the tilts, reconstructed without CTF or noise."""
    truth, potential, angles = projection_module._synthesise((64, 128, 128), 10.0, 0, 0.5, None, 60.0, 3.0, 0.0)
    images = projection_module._images(potential, angles, 10.0, 0.0, 0.0)
    return truth, potential, angles, projection_module._reconstruct(images, angles, 64)


def correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def wavelength_A(kv=300.0):
    """Relativistic electron wavelength, from the constants (not the module's value)."""
    h, m, e, c = 6.62607015e-34, 9.1093837e-31, 1.602176634e-19, 2.99792458e8
    v = kv * 1e3
    return h / np.sqrt(2 * m * e * v * (1 + e * v / (2 * m * c * c))) * 1e10


def test_deterministic_by_seed_and_typed():
    a, b = synth_projection_tomogram(SMALL, seed=3), synth_projection_tomogram(SMALL, seed=3)
    c = synth_projection_tomogram(SMALL, seed=4)
    for name in ("volume", "membranes", "particles", "kinds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.volume, c.volume) and not np.array_equal(a.membranes, c.membranes)
    assert a.volume.shape == a.membranes.shape == SMALL
    assert a.volume.dtype == np.float32 and a.membranes.dtype == np.uint8
    assert abs(a.volume.mean()) < 1e-4 and abs(a.volume.std() - 1) < 1e-4
    assert a.kind_names == ["large", "small"] and set(a.diameters_A) == {1, 2}


def test_polarity_bright_is_dark_negated():
    dark = synth_projection_tomogram(SMALL, seed=5, polarity="dark")
    bright = synth_projection_tomogram(SMALL, seed=5, polarity="bright")
    np.testing.assert_array_equal(bright.volume, -dark.volume)
    np.testing.assert_array_equal(bright.membranes, dark.membranes)


def test_dense_matter_is_dark_and_membranes_stand_out(noiseless):
    """In a dark reconstruction the bilayer voxels are darker than the rest, particle centres too."""
    truth = synth_projection_tomogram((64, 128, 128), seed=0, snr=10.0)
    vol = truth.volume
    assert vol[truth.membranes == 1].mean() < vol[truth.membranes == 0].mean() - 0.3
    smooth = ndi.gaussian_filter(vol, 2)
    centres = np.round(truth.particles).astype(int)
    assert np.median(smooth[tuple(centres.T)]) < np.median(smooth)


def test_particles_are_clear_of_membranes_and_each_other():
    t = synth_projection_tomogram((64, 128, 128), seed=2)
    assert set(np.unique(t.kinds)) == {1, 2} and len(t.kinds) >= 6
    radii = np.array([t.diameters_A[k] / 2 / t.voxel_size for k in t.kinds])
    grid = np.indices(t.membranes.shape, sparse=True)
    for c, r in zip(t.particles, radii):
        ball = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r**2
        assert not t.membranes[ball].any()
    gaps = np.linalg.norm(t.particles[:, None] - t.particles[None], axis=-1) - radii[:, None] - radii[None]
    assert np.all(gaps[~np.eye(len(radii), dtype=bool)] >= 0)


def test_truth_files_read_by_cryodask_starfile_and_mrcfile(tmp_path):
    t = synth_projection_tomogram(SMALL, voxel_size=12.0, seed=1)
    paths = write_tomogram(tmp_path / "p.mrc", t)
    for key in ("tomogram", "membranes"):
        assert mrcfile.validate(str(paths[key])), key
    with mrcfile.open(paths["membranes"]) as mrc:
        np.testing.assert_array_equal(mrc.data, t.membranes)
        assert mrc.voxel_size.x == pytest.approx(12.0)
    np.testing.assert_array_equal(load_volume(paths["tomogram"]).compute(), t.volume)
    table = starfile.read(paths["particles"])
    np.testing.assert_allclose(table[["rlnCoordinateZ", "rlnCoordinateY", "rlnCoordinateX"]].to_numpy(), t.particles,
                               atol=1e-4)
    np.testing.assert_array_equal(table["rlnClassNumber"].to_numpy(), t.kinds)
    picks = read_picks(paths["particles"])
    np.testing.assert_allclose(picks.coords, t.particles, atol=1e-4)
    assert picks.pixel_size == pytest.approx(12.0)
    np.testing.assert_array_equal(picks.table["rlnClassNumber"].to_numpy(), t.kinds)


def test_missing_wedge_comes_from_the_tilt_range(noiseless):
    """Fourier amplitude inside the ±30° wedge around kz is a small fraction of that outside."""
    _, _, _, volume = noiseless
    amplitude = np.abs(sfft.fftn(volume))
    kz, _, kx = np.meshgrid(*(sfft.fftfreq(n) for n in volume.shape), indexing="ij", sparse=True)
    k = np.sqrt(kz**2 + kx**2)
    band = (k > 0.05) & (k < 0.4)  # off DC and short of the corners
    angle = np.degrees(np.arctan2(np.abs(kx), np.abs(kz)))  # 0 along kz
    inside = np.broadcast_to(band & (angle < 20), amplitude.shape)
    outside = np.broadcast_to(band & (angle > 40), amplitude.shape)
    # a full tilt range fills it
    _, potential, _, _ = noiseless
    full = np.radians(np.arange(-88.5, 90.0, 3.0))
    filled = np.abs(sfft.fftn(projection_module._reconstruct(projection_module._images(potential, full, 10.0, 0, 0),
                                                             full, 64)))
    phantom = np.abs(sfft.fftn(potential))
    expected = phantom[inside].mean() / phantom[outside].mean()  # the phantom's own anisotropy
    assert amplitude[inside].mean() / amplitude[outside].mean() < 0.15 * expected
    assert filled[inside].mean() / filled[outside].mean() > 0.6 * expected


def test_wbp_of_a_noiseless_phantom_matches_it(noiseless):
    _, potential, _, volume = noiseless
    assert correlation(ndi.gaussian_filter(-volume, 1.0), ndi.gaussian_filter(potential, 1.0)) > 0.8


def test_ctf_zero_where_the_defocus_puts_it():
    """Projection of white-noise density: the image/no-CTF power ratio is CTF², zero at the first root."""
    rng = np.random.default_rng(0)
    potential = rng.standard_normal((8, 256, 256)).astype(np.float32)
    tilt = np.zeros(1)
    spacing, defocus = 4.0, 2.0
    with_ctf = projection_module._images(potential, tilt, spacing, defocus, 0.0)[0]
    without = projection_module._images(potential, tilt, spacing, 0.0, 0.0)[0]
    ratio = np.abs(sfft.fft2(with_ctf - with_ctf.mean())) ** 2 / np.maximum(
        np.abs(sfft.fft2(without - without.mean())) ** 2, 1e-12)
    ky, kx = np.meshgrid(sfft.fftfreq(256, spacing), sfft.fftfreq(256, spacing), indexing="ij")
    s = np.hypot(ky, kx)
    step = 1 / (256 * spacing)
    shells = np.round(s / step).astype(int)
    radial = np.bincount(shells.ravel(), ratio.ravel()) / np.maximum(np.bincount(shells.ravel()), 1)
    # first zero of sqrt(1-A²) sin χ + A cos χ, χ = π λ Δz s² − π/2 Cs λ³ s⁴, solved here independently
    lam, amp, cs = wavelength_A(), 0.07, 2.7e7
    grid = np.linspace(1e-4, 0.1, 100000)
    chi = np.pi * lam * defocus * 1e4 * grid**2 - np.pi / 2 * cs * lam**3 * grid**4
    w = np.sqrt(1 - amp**2) * np.sin(chi) + amp * np.cos(chi)
    first_zero = grid[np.argmax(w < 0)]
    lo, hi = int(0.7 * first_zero / step), int(1.3 * first_zero / step)
    found = (lo + np.argmin(radial[lo:hi])) * step
    assert abs(found - first_zero) <= 1.5 * step
    assert radial[lo:hi].min() < 0.05 * radial[int(0.5 * first_zero / step):lo].max()


def test_shot_noise_from_the_dose():
    """Poisson noise: more electrons per tilt, closer to the noiseless reconstruction."""
    clean = synth_projection_tomogram(SMALL, seed=6, snr=1e6).volume
    low = synth_projection_tomogram(SMALL, seed=6, dose=0.5).volume
    high = synth_projection_tomogram(SMALL, seed=6, dose=50.0).volume
    assert np.isfinite(low).all() and correlation(low, clean) < correlation(high, clean) - 0.2


def test_distractors_and_ice_gradient_stay_out_of_the_truth():
    plain = synth_projection_tomogram((48, 96, 96), seed=7)
    busy = synth_projection_tomogram((48, 96, 96), seed=7, n_gold=2, n_filaments=1, ice_gradient=0.5)
    assert not np.array_equal(plain.volume, busy.volume)
    np.testing.assert_array_equal(plain.membranes, busy.membranes)
    assert set(np.unique(busy.kinds)) <= {1, 2}


def test_fast_enough():
    start = time.perf_counter()
    synth_projection_tomogram((64, 128, 128), seed=0)
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("kwargs, match", [({"tilt_max": 95}, "tilt_max"), ({"tilt_step": 0}, "tilt_step"),
                                           ({"polarity": "grey"}, "polarity"), ({"dose": -1}, "dose"),
                                           ({"shape": (8, 64, 64)}, "shape"), ({"n_gold": 1.5}, "n_gold")])
def test_bad_parameters_are_one_line(kwargs, match):
    with pytest.raises(InputError, match=match) as info:
        synth_projection_tomogram(**{"shape": SMALL, **kwargs})
    assert "\n" not in str(info.value)


def test_unreadable_map_names_the_file(tmp_path):
    bad = tmp_path / "map.mrc"
    bad.write_bytes(b"not a map")
    one_line_error(lambda: synth_projection_tomogram(SMALL, map_path=bad), bad, "particle map")
    one_line_error(lambda: synth_projection_tomogram(SMALL, map_path=tmp_path / "none.mrc"), tmp_path / "none.mrc",
                   "not found")


def test_another_map_sets_the_large_kind(tmp_path):
    """A map written by mrcfile (a 180 Å dumbbell at 6 Å/voxel) is resampled and becomes kind 1."""
    z, y, x = np.indices((32, 32, 32)) - 15.5
    dumbbell = ((z**2 + y**2 + (x - 6) ** 2 < 36) | (z**2 + y**2 + (x + 6) ** 2 < 36)).astype(np.float32)
    path = tmp_path / "dumbbell.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(dumbbell)
        mrc.voxel_size = 6.0
    t = synth_projection_tomogram(SMALL, seed=1, map_path=path)
    default = synth_projection_tomogram(SMALL, seed=1)
    assert t.diameters_A[1] == pytest.approx(2 * 0.45 * 32 * 6.0) and t.diameters_A[1] != default.diameters_A[1]
    assert not np.array_equal(t.volume, default.volume)


def test_cli_end_to_end_and_evaluate_against_own_truth(tmp_path, capsys, client):
    from cryodask.cli import main
    from cryodask.evaluate import evaluate_picks

    out = tmp_path / "p.mrc"
    assert main(["synth", "tomogram", "--model", "projection", "--out", str(out), "--shape", "32,64,64",
                 "--voxel-size", "12", "--seed", "1", "--tilt-max", "54", "--tilt-step", "2", "--polarity", "bright",
                 "--gold", "1"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"p.mrc", "truth"}
    expected = synth_projection_tomogram((32, 64, 64), 12.0, seed=1, tilt_max=54, tilt_step=2, polarity="bright",
                                         n_gold=1)
    with mrcfile.open(out) as mrc:
        np.testing.assert_array_equal(mrc.data, expected.volume)
    truth = tmp_path / "truth" / "p_membranes.mrc"
    capsys.readouterr()
    assert main(["evaluate", "membranes", str(truth), str(truth), "--out", str(tmp_path / "eval"),
                 "--cluster", client.scheduler.address]) == 0
    dice = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["dice"]]
    assert dice and float(dice[0][1]) == pytest.approx(1.0)
    stars = tmp_path / "truth" / "p_particles.star"
    assert evaluate_picks(stars, stars, radius=3)["f1"] == pytest.approx(1.0)
    simple = tmp_path / "s.mrc"  # the default model can be written bright too
    assert main(["synth", "tomogram", "--out", str(simple), "--shape", "32,48,48", "--polarity", "bright"]) == 0
    from cryodask.synth import synth_tomogram

    np.testing.assert_array_equal(mrcfile.read(simple), -synth_tomogram((32, 48, 48)).volume)
    assert main(["synth", "tomogram", "--model", "wrong", "--out", str(tmp_path / "x.mrc")]) == 2
    assert main(["synth", "tomogram", "--polarity", "grey", "--out", str(tmp_path / "x.mrc")]) == 2
    assert capsys.readouterr().err.count("error: ") == 2 and not (tmp_path / "x.mrc").exists()
