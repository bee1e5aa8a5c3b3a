"""Autopick-BC: the network, in-memory windows, NMS, and training / re-picking / classifying
synthetic micrographs end to end on a real LocalCluster, through the library and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.spatial import cKDTree

from conftest import cli_error
from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.io.particles import read_particles, write_box, write_particles_star
from cryodask.metrics.picking import match_picks
from cryodask.micrographs.autopick.classify import classify
from cryodask.micrographs.autopick.metrics import classification_scores, roc_auc
from cryodask.micrographs.autopick.network import AutopickNet, MaxPool2, flat_features
from cryodask.micrographs.autopick.nms import nms_points
from cryodask.micrographs.autopick.repick import RepickParams, repick
from cryodask.micrographs.autopick.score import load_model
from cryodask.micrographs.autopick.train import TrainParams, augment, split, train
from cryodask.micrographs.autopick.windows import WindowCutter, grid_centres, normalise, to_binned, to_original
from cryodask.synth import synth_micrograph, write_micrograph

SHAPE, DIAMETER, BOX, BIN = (256, 256), 24, 48, 2


def make_set(folder, seeds):
    """Synthetic MRC micrographs with good (.box at every particle) and bad (.box at empty and
    contaminated places at least a diameter from any particle) coordinates; returns the truth."""
    for sub in ("mics", "good", "bad"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    truth = {}
    for seed in seeds:
        m = synth_micrograph(SHAPE, diameter=DIAMETER, seed=seed, snr=0.3)
        name = f"mic{seed:02d}"
        paths = write_micrograph(folder / "mics" / f"{name}.mrc", m)
        for kind in ("mask", "contaminants", "particles"):
            paths[kind].unlink()
        rng = np.random.default_rng(100 + seed)
        places = rng.uniform(0, np.array(SHAPE) - 1, (2000, 2))
        places = places[cKDTree(m.particles).query(places)[0] > DIAMETER]
        dirty = m.contaminants[places[:, 0].astype(int), places[:, 1].astype(int)] > 0
        half = len(m.particles) // 2
        bad = np.concatenate([places[dirty][:half], places[~dirty][:half]])
        write_box(folder / "good" / f"{name}.box", m.particles, BOX)
        write_box(folder / "bad" / f"{name}.box", bad, BOX)
        truth[name] = (m.particles, bad)
    return truth


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("autopick")
    return root, make_set(root / "train", range(4)), make_set(root / "held", [40])


@pytest.fixture(scope="module")
def trained(synthetic, client):
    root, _, _ = synthetic
    params = TrainParams(box_size=BOX, bin=BIN, epochs=8, lr=1e-3, patience=8, seed=1)
    result = train(root / "train" / "mics", root / "train" / "good", root / "train" / "bad", root / "model",
                   params=params, client=client)
    return root, result


# ------------------------------------------------------------------ pieces

def test_network_is_autopick_bc_layer_for_layer():
    net = AutopickNet(54)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (2, 2)), (32, 64, (2, 2)),
                                                                              (64, 128, (2, 2))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 3
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(flat_features(54), 32), (32, 1)]
    assert flat_features(54) == 128 * 6 * 6  # 54 → 27 → 13 → 6
    probability = net.eval().probability(torch.rand(3, 1, 54, 54))
    assert probability.shape == (3,) and bool(((probability > 0) & (probability < 1)).all())
    with pytest.raises(InputError, match="at least"):
        AutopickNet(8)
    x = torch.randn(2, 3, 27, 26)
    assert torch.equal(MaxPool2()(x), torch.nn.MaxPool2d(2)(x))
    windows = torch.rand(4, 1, 54, 54)
    with torch.no_grad():
        net(torch.rand(8, 1, 54, 54) * 3)  # train-mode pass: BatchNorm statistics away from 0 / 1
        torch.testing.assert_close(net.fused()(windows), net.eval()(windows), atol=1e-5, rtol=1e-5)


def test_windows_are_centred_mirrored_and_normalised():
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    cutter = WindowCutter(image, 6)
    w = cutter.cut([[10, 20], [0, 0], [39, 49]])
    assert w.shape == (3, 6, 6) and w.min() == 0 and w.max() == 1
    raw = cutter.view[10 + cutter.offset, 20 + cutter.offset]
    assert raw[3, 3] == image[10, 20] and raw[0, 0] == image[7, 17]  # centre at index size // 2
    corner = cutter.view[cutter.offset, cutter.offset]
    assert corner[3, 3] == image[0, 0] and corner[2, 3] == image[1, 0]  # mirrored past the edge
    np.testing.assert_allclose(to_original(to_binned([[5.0, 7.25]], 4), 4), [[5.0, 7.25]])
    assert to_binned([[1.5, 5.5]], 4).tolist() == [[0.0, 1.0]]  # binned pixel 0 covers original 0..3
    flat = normalise(np.ones((1, 4, 4)))
    assert (flat == 0).all()
    grid = grid_centres((100, 60), 20)
    assert sorted(set(grid[:, 0])) == [10, 30, 50, 70, 90] and sorted(set(grid[:, 1])) == [10, 30, 50]


def test_nms_keeps_the_best_of_each_cluster():
    points = np.array([[0, 0], [0, 3], [0, 10], [0, 12.5], [50, 50]])
    scores = np.array([0.9, 0.95, 0.5, 0.6, 0.1])
    assert nms_points(points, scores, 5).tolist() == [1, 3, 4]
    assert nms_points(points, scores, 5, highest_first=False).tolist() == [4, 2, 0]
    assert nms_points(np.empty((0, 2)), [], 5).size == 0


def test_classification_scores_and_auc():
    s = classification_scores([1, 1, 1, 0, 0], [0.9, 0.8, 0.3, 0.6, 0.1])
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 1)
    assert s["accuracy"] == 0.6 and s["precision"] == 2 / 3 and s["recall"] == 2 / 3
    # 5 of the 6 (good, bad) pairs ranked right
    assert roc_auc([1, 1, 1, 0, 0], [0.9, 0.8, 0.3, 0.6, 0.1]) == pytest.approx(5 / 6)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_split_and_augmentation_are_seeded():
    parts = split(100, 0.2, 0.2, seed=3)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [64, 16, 20]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(100))
    assert (split(100, 0.2, 0.2, seed=3)["test"] == parts["test"]).all()
    x = torch.rand(4, 1, 24, 24)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert float(a.min()) >= 0 and float(a.max()) <= 1  # bilinear with mirrored borders stays in range


# ------------------------------------------------------------------ end to end (real LocalCluster)

def test_training_separates_particles_from_junk(trained, synthetic):
    root, result = trained
    _, _, held = synthetic
    assert result.counts["good"] == sum(len(g) for g, _ in synthetic[1].values())
    assert result.test["accuracy"] > 0.75 and result.test["auc"] > 0.85  # chance: ~0.5
    for name in ("model.pt", "config.json", "training_log.json", "test_results.json", "train_and_test_results.png"):
        assert (root / "model" / name).is_file()
    log = json.loads((root / "model" / "training_log.json").read_text())
    assert len(log) == len(result.history) >= 1 and {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(log[0])
    assert json.loads((root / "model" / "test_results.json").read_text())["n"] == result.counts["test"]
    net, config = load_model(root / "model")
    assert (config.box_size, config.bin, config.window, config.pixel_size) == (BOX, BIN, BOX // BIN,
                                                                               pytest.approx(1.77))

    # a micrograph it never saw: its particles score higher than its junk
    good, bad = held["mic40"]
    result = classify(root / "held" / "mics", root / "model", root / "held" / "good", root / "classified_good")
    junk = classify(root / "held" / "mics", root / "model", root / "held" / "bad", root / "classified_bad")
    labels = np.r_[np.ones(len(good)), np.zeros(len(bad))]
    assert roc_auc(labels > 0, np.r_[result.scores["mic40"], junk.scores["mic40"]]) > 0.85
    assert (root / "classified_good" / "mic40_true.star").is_file()


def test_repick_finds_the_particles(trained, synthetic, client):
    root, _ = trained
    particles = synthetic[2]["mic40"][0]
    out = root / "repick"
    report = repick(root / "held" / "mics", root / "model", out, client=client)
    assert [r["status"] for r in report.results] == ["picked"]
    true = starfile.read(out / "mic40_true.star", always_dict=True)
    assert list(true["particles"].columns[:4]) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                                   "rlnAutopickFigureOfMerit"]
    assert float(true["optics"]["rlnMicrographPixelSize"][0]) == pytest.approx(1.77)
    assert (true["particles"]["rlnAutopickFigureOfMerit"] >= 0.5).all()
    false = starfile.read(out / "mic40_false.star", always_dict=True)["particles"]
    assert (false["rlnAutopickFigureOfMerit"] < 0.5).all()
    picks = read_particles(out / "mic40_true.star", ["mic40"])["mic40"]
    assert len(cKDTree(picks).query_pairs(BOX / 2 - 1e-6)) == 0  # NMS at box/2
    assert match_picks(picks, particles, DIAMETER / 2).recall > 0.6  # measured 0.84 (precision 1.0)
    assert (out / "mic40_picks.png").stat().st_size > 1000
    again = repick(root / "held" / "mics", root / "model", out, client=client)
    assert [r["status"] for r in again.results] == ["skipped"]
    # new parameters (or a retrained model) redo it without --overwrite; --overwrite redoes the same
    redo = repick(root / "held" / "mics", root / "model", out, params=RepickParams(stride=6, threshold=0.9))
    assert redo.results[0]["status"] == "picked" and redo.results[0]["windows"] > report.results[0]["windows"]
    forced = repick(root / "held" / "mics", root / "model", out, params=RepickParams(stride=6, threshold=0.9),
                    overwrite=True)
    assert forced.results[0]["status"] == "picked"


def test_classify_splits_a_relion_star_keeping_its_rows(trained, synthetic, tmp_path):
    root, _ = trained
    good, bad = synthetic[2]["mic40"]
    mic = root / "held" / "mics" / "mic40.mrc"
    star = write_particles_star(tmp_path / "particles.star", {str(mic): np.concatenate([good, bad])},
                                pixel_size=1.77)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@Extract/mic40.mrcs" for i in range(len(good) + len(bad))]
    starfile.write(blocks, star, overwrite=True)
    result = classify(root / "held" / "mics", root / "model", star, tmp_path / "out")
    true = starfile.read(tmp_path / "out" / "particles_true.star", always_dict=True)
    false = starfile.read(tmp_path / "out" / "particles_false.star", always_dict=True)
    assert set(true) == {"optics", "particles"}
    assert len(true["particles"]) + len(false["particles"]) == len(good) + len(bad)
    rows = pd.concat([true["particles"], false["particles"]]).sort_values("rlnImageName")
    assert rows["rlnImageName"].tolist() == blocks["particles"]["rlnImageName"].tolist()
    scores = result.scores["mic40"]
    index = true["particles"]["rlnImageName"].str[:6].astype(int).to_numpy() - 1
    np.testing.assert_allclose(true["particles"]["rlnAutopickFigureOfMerit"], scores[index], rtol=1e-6)
    assert (index < len(good)).mean() > 0.7  # the true split is mostly the particles


# ------------------------------------------------------------------ CLI

def test_cli_trains_repicks_and_classifies(synthetic, client, tmp_path, capsys):
    root, _, _ = synthetic
    cluster = ["--cluster", client.scheduler.address]  # the session's cluster: no new one per command
    train_dir = root / "train"
    model = tmp_path / "model"
    code = main(["autopick", "train", "--micrographs", str(train_dir / "mics"), "--good", str(train_dir / "good"),
                 "--bad", str(train_dir / "bad"), "--box-size", str(BOX), "--bin", str(BIN), "--epochs", "1",
                 "--lr", "1e-3", "--out", str(model), "--report", str(tmp_path / "rt"), *cluster])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "test: accuracy" in out and (model / "model.pt").is_file()
    stages = [(r["stage"], r["block"]) for r in json.loads((tmp_path / "rt" / "report.json").read_text())["records"]]
    assert sorted(stages) == sorted([("train", "model")] + [(s, f"mic{i:02d}.mrc") for i in range(4)
                                                            for s in ("read", "preprocess")])
    code = main(["autopick", "repick", "--model", str(model), "--micrographs", str(root / "held" / "mics"),
                 "--out", str(tmp_path / "picks"), "--show-false", "--report", str(tmp_path / "report"), *cluster])
    assert code == 0 and (tmp_path / "picks" / "mic40_true.star").is_file()
    out = capsys.readouterr().out
    assert "1 micrographs re-picked" in out and "run report: autopick repick" in out
    records = json.loads((tmp_path / "report" / "report.json").read_text())["records"]
    assert {(r["stage"], r["block"]) for r in records} == {(s, "mic40.mrc")
                                                           for s in ("read", "infer", "post-process", "write")}
    assert ([r["bytes_read"] for r in records if r["stage"] == "read"]
            == [(root / "held" / "mics" / "mic40.mrc").stat().st_size])
    # boxes for micrographs not given are skipped, said once; the stages are reported
    both = tmp_path / "both_good"
    both.mkdir()
    for box in (root / "held" / "good").iterdir():
        (both / box.name).write_bytes(box.read_bytes())
    write_box(both / "mic99.box", [[50, 50]], BOX)
    code = main(["autopick", "classify", "--model", str(model), "--micrographs", str(root / "held" / "mics"),
                 "--particles", str(both), "--out", str(tmp_path / "split"), "--report", str(tmp_path / "rc"),
                 *cluster])
    assert code == 0 and (tmp_path / "split" / "mic40_false.star").is_file()
    err = capsys.readouterr().err
    assert err.count("note: coordinates of 1 micrograph(s) not given were skipped") == 1, err
    records = json.loads((tmp_path / "rc" / "report.json").read_text())["records"]
    assert {(r["stage"], r["block"]) for r in records} == {(s, "mic40.mrc") for s in ("read", "preprocess", "infer")}


def test_cli_bad_input_is_one_line(synthetic, tmp_path, capsys):
    root, _, _ = synthetic
    held = root / "held"
    base = ["autopick", "train", "--micrographs", str(held / "mics"), "--box-size", str(BOX), "--bin", str(BIN),
            "--out", str(tmp_path / "m")]
    stray = tmp_path / "stray"
    stray.mkdir()
    write_box(stray / "other_micrograph.box", [[50, 50]] * 6, BOX)
    assert "matches no micrograph" in cli_error(capsys, base + ["--good", str(stray), "--bad", str(held / "bad")])
    outside = tmp_path / "outside"
    outside.mkdir()
    write_box(outside / "mic40.box", [[50, 50], [900, 40]], BOX)
    assert "outside" in cli_error(capsys, base + ["--good", str(outside), "--bad", str(held / "bad")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "mic40.box").write_text("")
    assert "no coordinates" in cli_error(capsys, base + ["--good", str(held / "good"), "--bad", str(empty)])
    few = tmp_path / "few"
    few.mkdir()
    write_box(few / "mic40.box", [[50, 50]], BOX)
    assert "at least" in cli_error(capsys, base + ["--good", str(held / "good"), "--bad", str(few)])
    small = ["autopick", "train", "--micrographs", str(held / "mics"), "--box-size", "8", "--bin", str(BIN),
             "--out", str(tmp_path / "m"), "--good", str(held / "good"), "--bad", str(held / "bad")]
    assert "--box-size" in cli_error(capsys, small)
    repick_args = ["--micrographs", str(held / "mics"), "--out", str(tmp_path / "p")]
    assert "no such model folder" in cli_error(capsys,
                                               ["autopick", "repick", "--model", str(tmp_path / "none")] + repick_args)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"not a model")
    assert "cannot be read as a model" in cli_error(capsys,
                                                    ["autopick", "repick", "--model", str(broken)] + repick_args)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": 1}, foreign / "model.pt")
    assert "not an Autopick-BC model" in cli_error(capsys,
                                                   ["autopick", "repick", "--model", str(foreign)] + repick_args)
    assert not (tmp_path / "p").exists()  # nothing written, no cluster started


def test_flip_y_reads_and_writes_y_from_the_bottom(trained, synthetic, tmp_path):
    root, _ = trained
    good, _ = synthetic[2]["mic40"]
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    write_box(flipped / "mic40.box", np.column_stack([SHAPE[0] - good[:, 0], good[:, 1]]), BOX)
    plain = classify(root / "held" / "mics", root / "model", root / "held" / "good", tmp_path / "plain")
    result = classify(root / "held" / "mics", root / "model", flipped, tmp_path / "out", flip_y=True)
    np.testing.assert_allclose(result.scores["mic40"], plain.scores["mic40"], atol=1e-6)  # the same windows
    written = np.concatenate([read_particles(tmp_path / "out" / f"mic40_{k}.star", ["mic40"])["mic40"]
                         for k in ("true", "false")])  # as written: y from the bottom again
    assert sorted(map(tuple, np.round(written, 6))) == sorted(map(tuple, np.round(
        np.column_stack([SHAPE[0] - good[:, 0], good[:, 1]]), 6)))
