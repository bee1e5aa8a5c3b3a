"""Contrast polarity: decided from the data on both simulators, the real crops and noise, and
applied once at the reader so that a bright tomogram segments as its dark twin does."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from conftest import write_raw_mrc
from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.polarity import Negated, binned, check_polarity, decide_polarity, resolve_polarity
from cryodask.synth import synth_projection_tomogram, synth_tomogram


def _decide(volume, voxel_size, **kwargs):
    return decide_polarity(lambda r: volume[r], volume.shape, voxel_size, **kwargs)


@pytest.mark.parametrize("make", [synth_tomogram, synth_projection_tomogram], ids=["simple", "projection"])
@pytest.mark.parametrize("voxel_size,snr", [(10.0, 0.05), (28.0, 0.3)])
def test_both_simulators_are_read_right_in_both_polarities(make, voxel_size, snr):
    volume = make((48, 96, 96), voxel_size=voxel_size, snr=snr, seed=5).volume
    dark, bright = _decide(volume, voxel_size), _decide(-volume, voxel_size)
    assert (dark.polarity, dark.decided) == ("dark", "auto") and dark.z < -3
    assert (bright.polarity, bright.decided) == ("bright", "auto")
    assert bright.skewness == pytest.approx(-dark.skewness, rel=1e-4)  # the rule is odd in the contrast


def test_real_crops(data_dir):
    for name in ("cylindra_13pf_MT.tif", "cylindra_14pf_MT.tif"):  # density bright (data README)
        volume = tifffile.imread(data_dir / "tomograms" / name).astype(np.float32)
        decided = _decide(volume, 10.52)
        assert (decided.polarity, decided.decided) == ("bright", "auto"), (name, decided)
        assert "bright (auto: band-pass skewness +" in decided.describe()
    with warnings.catch_warnings(), mrcfile.open(data_dir / "mrc" / "serialem-int8-3d.mrc", permissive=True) as m:
        warnings.simplefilter("ignore")
        volume = m.data.astype(np.float32)
    assert _decide(volume, 23.2).polarity == "dark"


def test_noise_and_constant_volumes_are_undecided_and_taken_as_dark():
    noise = np.random.default_rng(1).normal(size=(32, 64, 64)).astype(np.float32)
    for volume in (noise, np.ones((16, 16, 16), np.float32)):
        decided = _decide(volume, 10.0)
        assert (decided.polarity, decided.decided) == ("dark", "auto-undecided")
        assert "could not tell" in decided.describe()
    nan = noise.copy()
    nan[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        _decide(nan, 10.0)


def test_binning_reads_slabs_and_matches_a_block_mean():
    volume = np.random.default_rng(2).random((13, 20, 22)).astype(np.float32)
    reads = []

    def read(region):
        reads.append(region)
        return volume[region]

    out = binned(read, volume.shape, 3)
    assert out.shape == (4, 6, 7) and len(reads) == 4
    np.testing.assert_allclose(out, volume[:12, :18, :21].reshape(4, 3, 6, 3, 7, 3).mean(axis=(1, 3, 5)), rtol=1e-6)
    small = synth_tomogram((32, 64, 64), voxel_size=10.0, snr=0.3, seed=1).volume
    assert _decide(small, 10.0, max_voxels=2**13).polarity == "dark"  # binned 4x, still decided


def test_choices_given_and_negated_reader():
    assert resolve_polarity("bright", None, (1, 1, 1), 1.0).metadata() == {"polarity": "bright", "decided": "given"}
    with pytest.raises(InputError, match="--polarity must be one of auto, dark, bright"):
        check_polarity("inverted")
    volume = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    np.testing.assert_array_equal(Negated(lambda r: volume[r])((slice(0, 1),)), -volume[:1])


def test_a_bright_tomogram_segments_as_its_dark_twin(tmp_path, capsys, client):
    """auto negates the bright copy at its reader: the classical mask is the same, voxel for voxel,
    and the decision is printed and kept with the mask's label properties."""
    from cryodask.io.omezarr import open_image

    t = synth_tomogram((32, 64, 64), voxel_size=10.0, seed=3, snr=0.3)
    write_raw_mrc(tmp_path / "dark.mrc", t.volume)
    write_raw_mrc(tmp_path / "bright.mrc", -t.volume)
    out = tmp_path / "out"
    assert main(["membranes", str(tmp_path / "dark.mrc"), str(tmp_path / "bright.mrc"), "--out", str(out),
                 "--method", "classical", "--cluster", client.scheduler.address]) == 0
    stdout = capsys.readouterr().out
    assert "polarity dark (auto: band-pass skewness -" in stdout and "polarity bright (auto" in stdout
    masks = {}
    for name in ("dark", "bright"):
        with mrcfile.open(out / f"{name}_classical_predicted_mask.mrc") as m:
            masks[name] = m.data.copy()
        label = out / f"{name}.zarr" / "labels" / "classical_predicted_mask"
        attrs = dict(zarr.open_group(str(label), mode="r").attrs)
        attrs = attrs.get("ome", attrs)["image-label"]
        assert attrs["properties"][0]["cryodask-polarity"]["polarity"] == name
    assert masks["dark"].any() and np.array_equal(masks["dark"], masks["bright"])
    # given as dark, the bright copy's membranes are bright sheets: a different, mostly empty mask
    assert main(["membranes", str(tmp_path / "bright.mrc"), "--out", str(tmp_path / "given"), "--method",
                 "classical", "--polarity", "dark", "--cluster", client.scheduler.address]) == 0
    assert "polarity dark (given)" in capsys.readouterr().out
    with mrcfile.open(tmp_path / "given" / "bright_classical_predicted_mask.mrc") as m:
        overlap = np.logical_and(m.data > 0, masks["dark"] > 0).sum() / masks["dark"].sum()
    assert overlap < 0.5
    _, arrays, _, _ = open_image(out / "dark.zarr")
    assert arrays[0].shape == (32, 64, 64)


def test_a_bad_polarity_is_one_line_before_any_cluster(tmp_path, capsys):
    write_raw_mrc(tmp_path / "t.mrc", np.zeros((16, 16, 16), np.float32))
    assert main(["membranes", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "o"), "--polarity", "inverted",
                 "--cluster", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --polarity must be one of auto, dark, bright, got 'inverted'"]


def test_working_voxel_size_round_trip_keeps_masks_and_values():
    import dask.array as da

    from cryodask.io.resample import from_working, to_working, working_grid

    t = synth_tomogram((32, 64, 64), voxel_size=28.0, snr=100, seed=0)
    truth = t.membranes.astype(np.float32)
    assert working_grid(truth.shape, (28.0,) * 3, 14.0) == ((64, 128, 128), (0.5, 0.5, 0.5))
    fine = to_working(da.from_array(truth, chunks=(16, 32, 32)), (28.0,) * 3, 14.0, (32, 64, 64))
    back = from_working((fine > 0.5).astype(np.uint8), truth.shape, (28.0,) * 3, (14.0,) * 3, (16, 32, 32),
                        order=0).compute()
    assert back.shape == truth.shape and 2 * (back * truth).sum() / (back.sum() + truth.sum()) > 0.9
    coarse = to_working(da.from_array(t.volume, chunks=(16, 32, 32)), (28.0,) * 3, 56.0, (16, 32, 32))
    assert coarse.shape == (16, 32, 32)
    # a coarser grid keeps what it can hold: the volume comes back smoothed, not shifted
    back = from_working(coarse, t.volume.shape, (28.0,) * 3, (56.0,) * 3, (16, 32, 32), order=1).compute()
    assert np.corrcoef(back.ravel(), t.volume.ravel())[0, 1] > 0.8
    with pytest.raises(InputError, match="--working-voxel-size must be a positive number"):
        working_grid((1, 1, 1), (1.0,) * 3, 0)


def test_membranes_on_a_working_grid_come_back_on_the_input_grid(tmp_path, capsys, client):
    """Segmented on a 14 Å grid and mapped back, the mask is on the tomogram's 28 Å grid and as
    close to the truth as the one made on that grid."""
    from cryodask.evaluate import evaluate_membranes
    from cryodask.synth.tomogram import write_tomogram

    paths = write_tomogram(tmp_path / "t.mrc", synth_tomogram((48, 96, 96), voxel_size=28.0, snr=0.3, seed=2))
    dice = {}
    for name, extra in (("input", []), ("working", ["--working-voxel-size", "14"])):
        assert main(["membranes", str(paths["tomogram"]), "--out", str(tmp_path / name), "--method", "classical",
                     "--cluster", client.scheduler.address] + extra) == 0
        mask = tmp_path / name / "t_classical_predicted_mask.mrc"
        with mrcfile.open(mask) as m:
            assert m.data.shape == (48, 96, 96) and float(m.voxel_size.x) == 28.0
        dice[name] = evaluate_membranes(mask, paths["membranes"])["dice"]
    assert min(dice.values()) > 0.7 and abs(dice["working"] - dice["input"]) < 0.08, dice
    assert main(["membranes", str(paths["tomogram"]), "--out", str(tmp_path / "bad"), "--working-voxel-size", "-1",
                 "--cluster", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --working-voxel-size must be")


def test_pick_reads_a_bright_tomogram_as_dark_and_says_so(tmp_path, capsys):
    """LoG picks on the negated copy equal the dark one's; the decision is the first line printed."""
    import pandas as pd

    t = synth_tomogram((48, 96, 96), voxel_size=10.0, seed=4, snr=0.3)
    write_raw_mrc(tmp_path / "dark.mrc", t.volume)
    write_raw_mrc(tmp_path / "bright.mrc", -t.volume)
    picks = {}
    for name in ("dark", "bright"):
        assert main(["pick", str(tmp_path / f"{name}.mrc"), "--out", str(tmp_path / name), "--method", "log",
                     "--diameter", str(t.diameters_A[1]), "--workers", "1"]) == 0
        out = capsys.readouterr().out
        assert f"polarity {name} (auto: band-pass skewness" in out
        picks[name] = pd.read_csv(tmp_path / name / f"{name}_log_picks.csv")
    assert len(picks["dark"]) >= 2
    np.testing.assert_allclose(picks["bright"].to_numpy(), picks["dark"].to_numpy())
