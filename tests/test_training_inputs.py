"""Micrograph training inputs checked: y-flipped coordinates, unbalanced classes and a held-out
result at the class prior are refused in one line (or the orientation chosen with
``--flip-y auto``); models record their pixel size, and re-picking rescales micrographs taken at
another pixel size and keeps picks off the border. Synthetic micrographs, a real LocalCluster."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import zoom
from scipy.spatial import cKDTree

from conftest import cli_error
from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.io.particles import read_particles, write_box
from cryodask.micrographs.autopick.checks import (
    check_balance,
    check_held_out,
    flip_energies,
    flip_test,
)
from cryodask.micrographs.autopick.inputs import micrograph_set
from cryodask.micrographs.autopick.repick import RepickParams, repick
from cryodask.micrographs.autopick.score import check_model, sampling_note
from cryodask.micrographs.autopick.train import check_orientation, training_inputs
from cryodask.synth import synth_micrograph, write_micrograph

SHAPE, DIAMETER, BOX, BIN, PIXEL = (256, 256), 24, 48, 2, 1.77


def make_set(folder, seeds, *, flipped: bool = False):
    """Synthetic micrographs with good boxes at the particles and bad boxes a diameter away
    from any; ``flipped`` writes y counted from the bottom (autopick-bc .box)."""
    for sub in ("mics", "good", "bad"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    truth = {}
    for seed in seeds:
        m = synth_micrograph(SHAPE, pixel_size=PIXEL, diameter=DIAMETER, seed=seed, snr=0.3)
        name = f"mic{seed:02d}"
        for kind, path in write_micrograph(folder / "mics" / f"{name}.mrc", m).items():
            if kind in ("mask", "contaminants", "particles"):
                path.unlink()
        places = np.random.default_rng(100 + seed).uniform(0, np.array(SHAPE) - 1, (2000, 2))
        bad = places[cKDTree(m.particles).query(places)[0] > DIAMETER][:len(m.particles)]
        good = m.particles
        if flipped:
            good, bad = (np.column_stack([SHAPE[0] - c[:, 0], c[:, 1]]) for c in (good, bad))
        write_box(folder / "good" / f"{name}.box", good, BOX)
        write_box(folder / "bad" / f"{name}.box", bad, BOX)
        truth[name] = m.particles
    return truth


@pytest.fixture(scope="module")
def flipped_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("flipped")
    return root, make_set(root, range(4), flipped=True)


def _held_out(tmp_path):
    """A held-out micrograph at the training pixel size (``held/mics``), its truth, its image, and
    the same micrograph upsampled 2x at half the pixel size (``fine``)."""
    held = tmp_path / "held"
    held_truth = make_set(held, [40])["mic40"]
    image = np.squeeze(mrcfile.read(held / "mics" / "mic40.mrc"))
    fine = tmp_path / "fine"
    fine.mkdir()
    with mrcfile.new(fine / "mic40.mrc") as mrc:
        mrc.set_data(zoom(image, 2, order=1, grid_mode=True, mode="grid-mirror").astype(np.float32))
        mrc.voxel_size = PIXEL / 2
    return held, held_truth, image, fine


def _train_args(root, out, *extra):
    return ["autopick", "train", "--micrographs", str(root / "mics"), "--good", str(root / "good"),
            "--bad", str(root / "bad"), "--box-size", str(BOX), "--bin", str(BIN), "--epochs", "6", "--lr", "1e-3",
            "--patience", "6", "--seed", "1", "--out", str(out), *extra]


# ------------------------------------------------------------------ the rules

def test_flip_test_tells_the_orientation_of_synthetic_particles(flipped_set):
    root, truth = flipped_set
    mics = micrograph_set(root / "mics")
    pairs = [flip_energies(np.squeeze(mrcfile.read(mics.paths[n])), truth[n], DIAMETER) for n in mics.names]
    right = flip_test(pairs)
    wrong = flip_test([(f, g) for g, f in pairs])
    assert right.verdict == "given" and right.given > 2 * right.flipped, right
    assert wrong.verdict == "flipped"
    # as read: without flip_y the boxes look flipped, with it they are right, auto flips them
    as_given = training_inputs(root / "mics", root / "good", root / "bad")
    with pytest.raises(InputError, match="look flipped.*--flip-y yes"):
        check_orientation(mics, as_given[1], BOX, "no")
    good = training_inputs(root / "mics", root / "good", root / "bad", flip_y=True)[1]
    kept, flipped = check_orientation(mics, good, BOX, "yes")
    assert not flipped and kept is good
    chosen, flipped = check_orientation(mics, as_given[1], BOX, "auto")
    assert flipped
    for name in mics.names:
        np.testing.assert_allclose(chosen[name], good[name])


def test_empiar_boxes_both_ways_round(data_dir):
    """The real autopick-bc boxes (y from the bottom, see the data README): refused as read,
    accepted with --flip-y, chosen by auto (2 micrographs, to stay fast)."""
    root = data_dir / "empiar10017"
    if not root.exists():
        pytest.skip("EMPIAR-10017 data not found")
    mics = sorted((root / "micrographs").glob("*.jpg"))[:2]
    as_read = training_inputs(mics, root / "boxes" / "pos", root / "boxes" / "neg")
    with pytest.raises(InputError, match="look flipped"):
        check_orientation(as_read[0], as_read[1], 216, "no")
    right = training_inputs(mics, root / "boxes" / "pos", root / "boxes" / "neg", flip_y=True)
    assert check_orientation(right[0], right[1], 216, "yes")[1] is False
    assert check_orientation(as_read[0], as_read[1], 216, "auto")[1] is True


def test_unbalanced_classes_are_refused():
    good = {"a": np.zeros((40, 2)), "b": np.zeros((40, 2))}
    with pytest.raises(InputError, match="5.0 good for each bad"):
        check_balance(good, {"a": np.zeros((8, 2)), "b": np.zeros((8, 2))})
    check_balance(good, {"a": np.zeros((20, 2)), "b": np.zeros((20, 2))})
    # good from one micrograph, bad from others: the classifier would learn the micrograph
    with pytest.raises(InputError, match="same micrographs"):
        check_balance({"a": np.zeros((30, 2))}, {"a": np.zeros((2, 2)), "b": np.zeros((14, 2)),
                                                 "c": np.zeros((14, 2))})


def test_held_out_result_at_the_class_prior_is_refused():
    # the measured failure: every window called a particle, accuracy = the majority rate
    at_prior = {"accuracy": 0.774, "auc": 0.42, "tp": 387, "fp": 113, "tn": 0, "fn": 0, "n": 500}
    with pytest.raises(InputError, match="class prior"):
        check_held_out(at_prior)
    learned = {"accuracy": 0.9, "auc": 0.95, "tp": 370, "fp": 33, "tn": 80, "fn": 17, "n": 500}
    check_held_out(learned)
    # undertrained (one epoch): accuracy near the prior, but it ranks the windows well
    check_held_out({"accuracy": 0.554, "auc": 0.807, "tp": 34, "fp": 29, "tn": 2, "fn": 0, "n": 65})
    chance = {"accuracy": 0.95, "auc": 0.52, "tp": 370, "fp": 8, "tn": 105, "fn": 17, "n": 500}
    with pytest.raises(InputError, match="AUC 0.520"):
        check_held_out(chance)


# ------------------------------------------------------------------ the CLI

def test_cli_refuses_flipped_and_unbalanced_inputs(flipped_set, tmp_path, capsys):
    root, _ = flipped_set
    err = cli_error(capsys, _train_args(root, tmp_path / "m"))
    assert "look flipped" in err and "--flip-y yes" in err
    assert not (tmp_path / "m" / "model.pt").exists()
    one = tmp_path / "one_good"
    one.mkdir()
    (one / "mic00.box").write_bytes((root / "good" / "mic00.box").read_bytes())
    args = _train_args(root, tmp_path / "u", "--flip-y", "yes")
    args[args.index("--good") + 1] = str(one)
    err = cli_error(capsys, args)
    assert "for each good" in err or "same micrographs" in err, err
    assert not (tmp_path / "u" / "model.pt").exists()


def test_cli_auto_flip_trains_and_records_pixel_size(flipped_set, tmp_path, capsys, client):
    root, _ = flipped_set
    model = tmp_path / "model"
    code = main(_train_args(root, model, "--flip-y", "auto", "--cluster", client.scheduler.address))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--flip-y auto: y counted from the bottom" in out
    config = json.loads((model / "config.json").read_text())
    assert config["flip_y"] is True
    assert config["model"]["pixel_size"] == pytest.approx(PIXEL, abs=1e-3)
    assert config["model"]["normalisation"] == "minmax"
    assert check_model(model).pixel_size == pytest.approx(PIXEL, abs=1e-3)

    # repick a held-out micrograph as taken (1.77 Å/px) and upsampled 2× (0.885 Å/px)
    held, held_truth, image, fine = _held_out(tmp_path)
    lines = sampling_note(check_model(model), micrograph_set(fine))
    assert lines and "rescaled to the model's 1.77 Å/px" in lines[0]
    coarse = repick(held / "mics", model, tmp_path / "p1", client=client)
    fine_report = repick(fine, model, tmp_path / "p2", client=client)
    assert fine_report.results[0]["scale"] == pytest.approx(0.5)
    a = read_particles(tmp_path / "p1" / "mic40_true.star", ["mic40"])["mic40"]
    b = read_particles(tmp_path / "p2" / "mic40_true.star", ["mic40"])["mic40"]
    assert len(a) >= 0.3 * len(held_truth) and abs(len(a) - len(b)) <= 0.25 * len(a) + 2, (len(a), len(b))
    # the same physical places: fine-pixel picks halved land on the coarse picks and on the particles
    physical = (b + 0.5) / 2 - 0.5
    assert np.median(cKDTree(a).query(physical)[0]) < DIAMETER / 4
    assert np.mean(cKDTree(held_truth).query(physical)[0] < DIAMETER / 2) > 0.6

    # classify: the same particles scored on either micrograph score alike (windows cut after rescaling)
    from cryodask.micrographs.autopick.classify import score_picks

    at_coarse = score_picks(micrograph_set(held / "mics"), {"mic40": held_truth}, model)["mic40"]
    at_fine = score_picks(micrograph_set(fine), {"mic40": (held_truth + 0.5) * 2 - 0.5}, model)["mic40"]
    assert np.mean(at_coarse >= 0.5) > 0.6 and np.mean(np.abs(at_coarse - at_fine) < 0.25) > 0.8

    # --margin keeps picks off the border (in the model's pixels: 2× in the fine micrograph)
    margin = 30
    code = main(["autopick", "repick", "--model", str(model), "--micrographs", str(fine), "--out",
                 str(tmp_path / "p3"), "--margin", str(margin), "--cluster", client.scheduler.address])
    assert code == 0
    assert "rescaled" in capsys.readouterr().out
    c = read_particles(tmp_path / "p3" / "mic40_true.star", ["mic40"])["mic40"]
    edge = np.minimum(c + 0.5, np.array(image.shape) * 2 - 0.5 - c).min(axis=1)
    assert len(c) and edge.min() >= 2 * margin
    default = repick(held / "mics", model, tmp_path / "p4", params=RepickParams(margin=0), client=client)
    d = read_particles(tmp_path / "p4" / "mic40_true.star", ["mic40"])["mic40"]
    assert default.results[0]["windows"] > coarse.results[0]["windows"]  # the default margin (box/2) dropped some
    far = np.minimum(a + 0.5, np.array(image.shape) - 0.5 - a).min(axis=1)
    assert far.min() >= BOX / 2 and len(d) >= len(a)


def test_crisp_train_refuses_flipped_boxes_and_auto_flips(flipped_set, tmp_path, capsys, client):
    root, _ = flipped_set
    base = ["crisp", "train", "--micrographs", str(root / "mics"), "--particles", str(root / "good"), "--diameter",
            str(DIAMETER), "--bin", "2", "--widths", "8,16,32", "--epochs", "20", "--crop", "64", "--lr", "0.01",
            "--threads", "1"]
    err = cli_error(capsys, base + ["--out", str(tmp_path / "m")])
    assert "look flipped" in err and "--flip-y yes" in err
    assert not (tmp_path / "m" / "model.pt").exists()
    assert main(base + ["--out", str(tmp_path / "a"), "--flip-y", "auto"]) == 0
    assert "--flip-y auto: y counted from the bottom" in capsys.readouterr().out
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["flip_y"] is True and config["pixel_size"] == pytest.approx(PIXEL, abs=1e-3)

    # crisp predict on a micrograph at half the pixel size: rescaled, the same particles found
    held, held_truth, image, fine = _held_out(tmp_path)
    found = {}
    for name, mics, factor in (("coarse", held / "mics", 1), ("fine", fine, 2)):
        code = main(["crisp", "predict", "--model", str(tmp_path / "a"), "--micrographs", str(mics), "--out",
                     str(tmp_path / name), "--crf", "off", "--cluster", client.scheduler.address])
        assert code == 0
        assert ("rescaled to the model's 1.77 Å/px" in capsys.readouterr().out) == (factor == 2)
        picks = read_particles(tmp_path / name / "mic40_particles.star", ["mic40"])["mic40"]
        found[name] = (picks + 0.5) / factor - 0.5
        assert np.mean(cKDTree(held_truth).query(found[name])[0] < DIAMETER / 2) > 0.8
    assert abs(len(found["fine"]) - len(found["coarse"])) <= 0.1 * len(found["coarse"]) + 1


def test_unknown_pixel_size_is_said_in_one_line(data_dir):
    """JPEGs state no pixel size: the model's is assumed, and said; a model without one says so."""
    jpgs = sorted((data_dir / "empiar10017" / "micrographs").glob("*.jpg"))[:2]
    if not jpgs:
        pytest.skip("EMPIAR-10017 JPEGs not found")
    mics = micrograph_set(jpgs)
    assert sampling_note(1.77, mics) == [("pixel size of 2 micrograph(s) unknown: assuming the model's 1.77 Å/px "
                                          "(state it with --pixel-size)")]
    assert "rescaled to the model's 1.77" in sampling_note(1.77, mics, pixel_size=0.885)[0]
    assert "neither the model nor the micrographs" in sampling_note(None, mics)[0]
