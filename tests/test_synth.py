"""Synthetic data with ground truth: geometry, imaging, files and command line, on real files."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import scipy.fft as sfft
from hypothesis import given, settings
from hypothesis import strategies as st

from cryodask.errors import InputError
from cryodask.io.picks import read_picks
from cryodask.synth import synth_micrograph, synth_tomogram, write_micrograph, write_tomogram
from cryodask.synth import micrograph as micrograph_module
from cryodask.synth import tomogram as tomogram_module

SMALL = (32, 64, 64)


@pytest.fixture(scope="module")
def tomo():
    return tomogram_module._synthesise((64, 128, 128), 10.0, 0, 0.5, 60.0, None, None, 3.0)


@pytest.fixture(scope="module")
def micro():
    return micrograph_module._synthesise((512, 512), 1.77, 108.0, None, 0, 0.3, 1.5)


def runs(mask, axis):
    """Lengths of the runs of 1s along ``axis``."""
    lines = np.moveaxis(mask, axis, -1).reshape(-1, mask.shape[axis]).astype(np.int8)
    steps = np.diff(np.pad(lines, ((0, 0), (1, 1))), axis=1)
    return np.nonzero(steps == -1)[1] - np.nonzero(steps == 1)[1]


def assert_clear_of_membranes(t):
    """Every particle is inside the volume, off the membranes and off the other particles."""
    radii = np.array([t.diameters_A[k] / 2 / t.voxel_size for k in t.kinds])
    shape = np.array(t.membranes.shape)
    assert np.all(t.particles >= radii[:, None]) and np.all(t.particles <= shape - 1 - radii[:, None])
    grid = np.indices(t.membranes.shape, sparse=True)
    for c, r in zip(t.particles, radii):
        ball = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r**2
        assert not t.membranes[ball].any()
    gaps = np.linalg.norm(t.particles[:, None] - t.particles[None], axis=-1) - radii[:, None] - radii[None]
    assert np.all(gaps[~np.eye(len(radii), dtype=bool)] >= 0)


def test_tomogram_is_deterministic_and_typed():
    a, b, c = synth_tomogram(SMALL, seed=3), synth_tomogram(SMALL, seed=3), synth_tomogram(SMALL, seed=4)
    for name in ("volume", "membranes", "particles", "kinds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.volume, c.volume) and not np.array_equal(a.membranes, c.membranes)
    assert a.volume.shape == a.membranes.shape == SMALL
    assert a.volume.dtype == np.float32 and a.membranes.dtype == np.uint8
    assert abs(a.volume.mean()) < 1e-4 and abs(a.volume.std() - 1) < 1e-4
    assert a.particles.shape == (len(a.kinds), 3)


@pytest.mark.parametrize("voxel_size", [5.0, 10.0, 15.0])
def test_bilayer_thickness_follows_the_voxel_size(voxel_size):
    """The commonest run of membrane voxels along an axis is a wall crossed head-on: 4.5 nm."""
    t = synth_tomogram((40, 80, 80), voxel_size=voxel_size, seed=1)
    lengths = np.concatenate([runs(t.membranes, axis) for axis in range(3)])
    assert abs(np.bincount(lengths).argmax() - 45.0 / voxel_size) <= 1


def test_membranes_include_vesicles_and_a_sheet(tomo):
    from scipy import ndimage as ndi

    labels, n = ndi.label(tomo[0].membranes)
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    touching = set(np.unique(np.concatenate([f.ravel() for f in faces]))) - {0}
    assert touching, "the sheet crosses the volume"
    assert n - len(touching) >= 2, "closed vesicles lie wholly inside it"


def test_particles_have_two_kinds_and_do_not_overlap(tomo):
    t = tomo[0]
    assert set(t.kinds) == {1, 2} and t.kind_names == ["large", "small"]
    assert t.diameters_A[1] > t.diameters_A[2]
    assert_clear_of_membranes(t)


@settings(max_examples=8, deadline=None)
@given(shape=st.tuples(*[st.integers(16, 48)] * 3), voxel_size=st.sampled_from([6.0, 10.0, 14.0]),
       seed=st.integers(0, 2**16))
def test_particles_clear_of_membranes_for_any_volume(shape, voxel_size, seed):
    assert_clear_of_membranes(synth_tomogram(shape, voxel_size=voxel_size, seed=seed))


def test_dense_matter_is_dark(tomo):
    t, signal, _ = tomo
    assert signal[t.membranes == 1].mean() < signal[t.membranes == 0].mean()


def test_snr_is_as_asked(tomo):
    t, signal, noise = tomo
    assert signal.var() / noise.var() == pytest.approx(0.5, rel=1e-3)
    # the published volume is that signal plus that noise: its correlation with the signal says so
    r = np.corrcoef(t.volume.ravel(), signal.ravel())[0, 1]
    assert r**2 == pytest.approx(0.5 / 1.5, abs=0.02)


def wedge_power(volume, half_angle_deg):
    """Fraction of the (non-DC) power lying within ``half_angle_deg`` of kz in the kz–kx plane."""
    power = np.abs(sfft.rfftn(volume)) ** 2
    power[0, 0, 0] = 0
    kz = sfft.fftfreq(volume.shape[0])[:, None, None]
    kx = sfft.rfftfreq(volume.shape[2])[None, None, :]
    inside = np.broadcast_to(np.abs(kx) < np.abs(kz) * np.tan(np.radians(half_angle_deg)), power.shape)
    return power[inside].sum() / power.sum()


def test_missing_wedge_is_empty():
    with_wedge = synth_tomogram(SMALL, seed=2, missing_wedge=60)
    without = synth_tomogram(SMALL, seed=2, missing_wedge=0)
    assert wedge_power(with_wedge.volume, 28) < 1e-8
    assert wedge_power(without.volume, 28) > 0.05


def test_write_tomogram_round_trip(tmp_path):
    t = synth_tomogram(SMALL, voxel_size=12.5, seed=5)
    paths = write_tomogram(tmp_path / "tomo.mrc", t)
    assert paths == {"tomogram": tmp_path / "tomo.mrc", "membranes": tmp_path / "truth" / "tomo_membranes.mrc",
                     "particles": tmp_path / "truth" / "tomo_particles.star"}
    with mrcfile.open(paths["tomogram"]) as mrc:
        np.testing.assert_array_equal(mrc.data, t.volume)
        assert tuple(mrc.voxel_size.tolist()) == (12.5, 12.5, 12.5)
    with mrcfile.open(paths["membranes"]) as mrc:
        np.testing.assert_array_equal(mrc.data, t.membranes)
        assert mrc.data.dtype == np.int8
    picks = read_picks(paths["particles"])
    np.testing.assert_allclose(picks.coords, t.particles, atol=1e-5)
    np.testing.assert_array_equal(picks.table["rlnClassNumber"].to_numpy(), t.kinds)
    assert picks.pixel_size == 12.5


def test_micrograph_is_deterministic(micro):
    m = micro[0]
    again, other = synth_micrograph(seed=0), synth_micrograph(seed=1)
    np.testing.assert_array_equal(m.image, again.image)
    np.testing.assert_array_equal(m.particles, again.particles)
    assert not np.array_equal(m.image, other.image)
    assert m.image.shape == m.mask.shape == m.contaminants.shape == (512, 512)
    assert m.image.dtype == np.float32 and m.mask.dtype == m.contaminants.dtype == np.uint8
    assert m.particles.shape[1] == 2 and len(m.particles) >= 3


def disks(shape, centres, radius):
    y, x = np.indices(shape, sparse=True)
    out = np.zeros(shape, bool)
    for cy, cx in centres:
        out |= (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return out


@pytest.mark.parametrize("seed", range(6))
def test_micrograph_particles_avoid_contaminants(seed):
    m = synth_micrograph((384, 384), diameter=60, seed=seed)
    r = m.diameter_px / 2
    assert m.contaminants.any()
    assert not (disks(m.mask.shape, m.particles, r) & (m.contaminants == 1)).any()
    np.testing.assert_array_equal(m.mask, disks(m.mask.shape, m.particles, r))
    assert np.all(m.particles >= r) and np.all(m.particles <= np.array(m.mask.shape) - 1 - r)
    distances = np.linalg.norm(m.particles[:, None] - m.particles[None], axis=-1)
    assert np.all(distances[~np.eye(len(m.particles), dtype=bool)] >= 2 * r)


def test_micrograph_snr_and_contrast(micro):
    m, signal, noise = micro
    assert signal.var() / noise.var() == pytest.approx(0.3, rel=1e-3)
    r = np.corrcoef(m.image.ravel(), signal.ravel())[0, 1]
    assert r**2 == pytest.approx(0.3 / 1.3, abs=0.02)


def test_write_micrograph_round_trip(tmp_path, micro):
    m = micro[0]
    paths = write_micrograph(tmp_path / "mic.mrc", m)
    with mrcfile.open(paths["micrograph"]) as mrc:
        np.testing.assert_array_equal(mrc.data, m.image)
        assert mrc.voxel_size.x == pytest.approx(1.77)
    with mrcfile.open(paths["mask"]) as mrc:
        np.testing.assert_array_equal(mrc.data, m.mask)
    picks = read_picks(paths["particles"])
    np.testing.assert_allclose(picks.coords, m.particles, atol=1e-5)
    assert picks.pixel_size == pytest.approx(1.77)


@pytest.mark.parametrize("kwargs", [
    {"shape": (64, 128)}, {"shape": (8, 64, 64)}, {"shape": (32, 64.5, 64)}, {"shape": "abc"},
    {"voxel_size": 0}, {"voxel_size": float("nan")}, {"snr": -1}, {"missing_wedge": 180},
    {"missing_wedge": -5}, {"n_particles": -1}, {"n_vesicles": 2.5}, {"defocus": -1},
])
def test_bad_tomogram_parameters(kwargs):
    with pytest.raises(InputError):
        synth_tomogram(**{"shape": SMALL, **kwargs})


@pytest.mark.parametrize("kwargs", [
    {"shape": (512,)}, {"shape": (16, 512)}, {"pixel_size": -1}, {"diameter": 600}, {"diameter": 0},
    {"snr": 0}, {"n_particles": 1.5},
])
def test_bad_micrograph_parameters(kwargs):
    with pytest.raises(InputError):
        synth_micrograph(**kwargs)


def test_write_into_missing_folder_or_onto_a_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_tomogram(tmp_path / "absent" / "t.mrc", synth_tomogram(SMALL))
    with pytest.raises(InputError, match="is a folder"):
        write_micrograph(tmp_path, synth_micrograph((64, 64), diameter=10))


def test_cli_writes_the_files(tmp_path, capsys):
    from cryodask.cli import main

    out = tmp_path / "t.mrc"
    assert main(["synth", "tomogram", "--out", str(out), "--shape", "32,48,48", "--voxel-size", "8",
                 "--seed", "1", "--snr", "1", "--missing-wedge", "50"]) == 0
    # only data beside it, so that a command given the folder never takes the truth for data
    assert {p.name for p in tmp_path.iterdir()} == {"t.mrc", "truth"}
    assert {p.name for p in (tmp_path / "truth").iterdir()} == {"t_membranes.mrc", "t_particles.star"}
    assert capsys.readouterr().out.count("wrote") == 3
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (32, 48, 48) and mrc.voxel_size.x == 8
        np.testing.assert_array_equal(mrc.data, synth_tomogram((32, 48, 48), 8, seed=1, snr=1, missing_wedge=50).volume)
    mic = tmp_path / "m.mrc"
    assert main(["synth", "micrograph", "--out", str(mic), "--shape", "200,256", "--diameter", "40",
                 "--pixel-size", "2"]) == 0
    assert (tmp_path / "truth" / "m_particles.star").is_file() and (tmp_path / "truth" / "m_mask.mrc").is_file()
    from cryodask.io.micrographs import find_micrographs
    from cryodask.io.particles import read_particles

    assert find_micrographs(tmp_path) == [mic, out]  # no truth file among them (t.mrc is 3D: refused when read)
    assert len(read_particles(tmp_path / "truth" / "m_particles.star", ["m"])["m"]) > 0


@pytest.mark.parametrize("args", [["tomogram", "--shape", "32,64"], ["tomogram", "--shape", "a,b,c"],
                                  ["tomogram", "--snr", "0"], ["micrograph", "--shape", "64,64,64"]])
def test_cli_rejects_bad_input(tmp_path, capsys, args):
    from cryodask.cli import main

    assert main(["synth", *args[:1], "--out", str(tmp_path / "x.mrc"), *args[1:]]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not list(tmp_path.iterdir())
