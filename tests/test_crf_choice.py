"""CRISP's CRF chosen on the training micrographs and applied only where it helped there, and
prediction metrics pooled over the micrographs that have truth: on synthetic micrographs, through
the CLI, on the real LocalCluster."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cryodask.cli import main
from cryodask.io.micrographs import read_micrograph
from cryodask.io.particles import read_particles
from cryodask.micrographs.crisp.crf import CRFParams, choose, grid, refine
from cryodask.micrographs.crisp.labels import bin_mask, disk_mask
from cryodask.micrographs.crisp.predict import PredictParams, segment
from cryodask.micrographs.crisp.train import TrainParams, load_model, train
from cryodask.synth import synth_micrograph, write_micrograph

DIAMETER = 20
FAST = ["--bin", "2", "--widths", "8,16,32", "--epochs", "20", "--crop", "64", "--lr", "0.01", "--threads", "1"]
# a CRF that smooths everything into one class: it can only lower IoU
HARMFUL = CRFParams(features="image", sxy=80, srgb=255, compat=50, gaussian_sxy=20, gaussian_compat=50)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Three training micrographs; three test micrographs of which m12 has no truth (no mask, no
    coordinates) and m11 has coordinates but no mask (in ``masks_m10``)."""
    root = tmp_path_factory.mktemp("crf_choice")
    for split, seeds in (("train", (0, 1, 2)), ("test", (10, 11, 12))):
        for kind in ("mics", "stars", "masks"):
            (root / split / kind).mkdir(parents=True)
        for seed in seeds:
            paths = write_micrograph(root / split / "mics" / f"m{seed}.mrc",
                                     synth_micrograph((192, 192), diameter=DIAMETER, seed=seed, snr=0.5))
            if seed != 12:
                shutil.move(paths["particles"], root / split / "stars" / paths["particles"].name)
                shutil.move(paths["mask"], root / split / "masks" / paths["mask"].name)
            paths["contaminants"].unlink()
    (root / "test" / "masks_m10").mkdir()
    shutil.copy(next((root / "test" / "masks").glob("m10_mask.*")), root / "test" / "masks_m10")
    return root


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """A model trained through the CLI (default CRF grid), and the line it printed."""
    model = synthetic / "model"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["crisp", "train", "--micrographs", str(synthetic / "train" / "mics"), "--particles",
                     str(synthetic / "train" / "stars"), "--diameter", str(DIAMETER), *FAST, "--out", str(model)])
    assert code == 0, buffer.getvalue()
    return model, buffer.getvalue()


def _with_choice(model, folder, apply: bool):
    """A copy of ``model`` whose stored CRF decision is ``apply`` (everything else unchanged)."""
    shutil.copytree(model, folder)
    state = torch.load(folder / "model.pt", weights_only=True)
    state["config"]["crf"]["apply"] = apply
    torch.save(state, folder / "model.pt")
    return folder


def _predict(synthetic, model, out, *extra, client):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["crisp", "predict", "--model", str(model), "--micrographs", str(synthetic / "test" / "mics"),
                     "--out", str(out), "--cluster", client.scheduler.address, *map(str, extra)])
    assert code == 0, buffer.getvalue()
    return buffer.getvalue(), json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}


# ------------------------------------------------------------------------------------ the choice itself

def _noisy_case(seed=0):
    """Confident isolated mistakes on clean disks: the case a CRF is for (test_crisp.noisy_case)."""
    rng = np.random.default_rng(seed)
    truth = disk_mask((84, 90), [[20, 20], [20, 60], [60, 30], [64, 70], [40, 44]], 18)
    image = truth * 1.0 + rng.normal(0, 0.3, truth.shape)
    p = np.where(truth == 1, 0.7, 0.3)
    salt = rng.random(truth.shape) < 0.06
    p[salt] = 1 - p[salt] + np.where(truth[salt] == 1, -0.1, 0.1)
    probabilities = np.stack([1 - p, p]).astype(np.float32)
    return probabilities, np.log(probabilities), image, truth


def _iou(pred, truth):
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return np.sum(pred & truth) / np.sum(pred | truth)


def test_choose_applies_a_crf_that_helps_and_not_one_that_hurts():
    case = _noisy_case()
    helpful = CRFParams(iterations=10, sxy=8, srgb=30, compat=3, gaussian_sxy=1.5, gaussian_compat=10)
    result = choose([case], [HARMFUL, helpful])
    assert result["apply"] and result["params"]["compat"] == 3 and result["settings_tried"] == 2
    assert result["iou_nocrf"] == pytest.approx(_iou(case[0][1] > 0.5, case[3]))
    assert result["iou_crf"] == pytest.approx(_iou(refine(case[0], image=case[2], params=helpful)[1] > 0.5, case[3]))
    assert result["iou_crf"] > result["iou_nocrf"] + 0.2
    worse = choose([case], [HARMFUL])
    assert not worse["apply"] and worse["iou_crf"] < worse["iou_nocrf"]
    # a gain within the margin is not taken as one: the best of a grid wins by a hair by chance
    gain = result["iou_crf"] - result["iou_nocrf"]
    assert (not choose([case], [helpful], min_gain=gain + 1e-9)["apply"]
            and choose([case], [helpful], min_gain=gain - 1e-9)["apply"])
    assert len(grid(DIAMETER)) == 37 and grid(DIAMETER)[0] == CRFParams()  # CRISP's defaults are tried too


# ------------------------------------------------------------------------------------ train stores, predict follows

def test_train_stores_both_ious_and_they_are_the_real_ones(synthetic, trained):
    model, printed = trained
    crf = json.loads((model / "config.json").read_text())["crf"]
    assert crf["micrographs"] == ["m0", "m1", "m2"] and crf["settings_tried"] == len(grid(DIAMETER / 2))
    assert crf["apply"] == (crf["iou_crf"] > crf["iou_nocrf"] + crf["min_gain"]) and crf["min_gain"] == 0.005
    line = next(line for line in printed.splitlines() if line.startswith("CRF on 3 training micrograph(s)"))
    assert f"IoU {crf['iou_nocrf']:.3f} without, {crf['iou_crf']:.3f} with" in line
    assert ("applied by default" if crf["apply"] else "not applied by default") in line
    _, config = load_model(model)
    assert config["crf"] == crf  # stored with the weights, not only in config.json
    # recompute both pooled IoUs from the network's output on the training micrographs
    network, config = load_model(model)
    coords = read_particles(synthetic / "train" / "stars", ["m0", "m1", "m2"])
    counts = {"nocrf": np.zeros(2), "crf": np.zeros(2)}
    for name in ("m0", "m1", "m2"):
        image = read_micrograph(synthetic / "train" / "mics" / f"{name}.mrc").image
        truth = bin_mask(disk_mask(image.shape, coords[name], DIAMETER), 2) != 0
        parts = segment(network, config, image, PredictParams(crf="on", crf_params=CRFParams(**crf["params"])))
        for variant in counts:
            counts[variant] += [np.sum(parts[variant] & truth), np.sum(parts[variant] | truth)]
    assert crf["iou_nocrf"] == pytest.approx(counts["nocrf"][0] / counts["nocrf"][1], abs=1e-6)
    assert crf["iou_crf"] == pytest.approx(counts["crf"][0] / counts["crf"][1], abs=1e-6)


def test_crf_is_off_when_it_lowers_training_iou_and_predict_follows(synthetic, tmp_path, client):
    model = tmp_path / "harmful"
    result = train(synthetic / "train" / "mics", model, particles=synthetic / "train" / "stars", diameter=DIAMETER,
                   params=TrainParams(bin=2, widths=(8, 16, 32), epochs=20, crop=64, lr=0.01), threads=1,
                   crf_grid=[HARMFUL])
    crf = json.loads((model / "config.json").read_text())["crf"]
    assert crf == result.crf and not crf["apply"] and crf["iou_crf"] < crf["iou_nocrf"] - 0.2
    truth = ["--truth-masks", synthetic / "test" / "masks", "--truth-particles", synthetic / "test" / "stars"]
    printed, metrics = _predict(synthetic, model, tmp_path / "auto", *truth, client=client)
    assert "CRF off (chosen by crisp train on 3 training micrograph(s)" in printed
    assert list(metrics["summary"]) == ["nocrf"] and not (tmp_path / "auto" / "m10_mask_nocrf.png").exists()
    # --crf on applies the stored settings anyway, and on the test micrographs they hurt too
    printed, metrics = _predict(synthetic, model, tmp_path / "on", "--crf", "on", *truth, client=client)
    assert "CRF on (--crf on; features image, sxy 80, srgb 255, compat 50" in printed
    summary = metrics["summary"]
    assert summary["crf"]["pooled"]["iou"] < summary["nocrf"]["pooled"]["iou"]
    auto_mask = np.asarray(Image.open(tmp_path / "auto" / "m10_mask.png"))
    assert np.array_equal(auto_mask, np.asarray(Image.open(tmp_path / "on" / "m10_mask_nocrf.png")))


def test_predict_follows_the_stored_decision(synthetic, trained, tmp_path, client):
    model, _ = trained
    crf = json.loads((model / "config.json").read_text())["crf"]
    on = _with_choice(model, tmp_path / "on_model", True)
    printed, _ = _predict(synthetic, on, tmp_path / "p_on", client=client)
    p = crf["params"]
    assert f"CRF on (chosen by crisp train on 3 training micrograph(s): IoU {crf['iou_nocrf']:.3f} without" in printed
    assert (f"features {p['features']}, sxy {p['sxy']:g}" in printed
            and (tmp_path / "p_on" / "m10_mask_nocrf.png").exists())
    off = _with_choice(model, tmp_path / "off_model", False)
    printed, _ = _predict(synthetic, off, tmp_path / "p_off", client=client)
    assert "CRF off (chosen by crisp train" in printed and not (tmp_path / "p_off" / "m10_mask_nocrf.png").exists()
    printed, _ = _predict(synthetic, on, tmp_path / "p_forced_off", "--crf", "off", client=client)
    assert "CRF off (--crf off)" in printed and not (tmp_path / "p_forced_off" / "m10_mask_nocrf.png").exists()


def test_bad_crf_mode_is_one_line(synthetic, trained, capsys):
    model, _ = trained
    code = main(["crisp", "predict", "--model", str(model), "--micrographs", str(synthetic / "test" / "mics"),
                 "--out", str(synthetic / "never"), "--crf", "maybe"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "--crf must be one of auto, on, off" in err


# ------------------------------------------------------------------------------------ metrics over truth only

def test_metrics_pool_only_the_micrographs_with_truth(synthetic, trained, tmp_path, client):
    model, _ = trained
    out = tmp_path / "pred"
    printed, metrics = _predict(synthetic, model, out, "--crf", "off", "--truth-masks", synthetic / "test" / "masks",
                                "--truth-particles", synthetic / "test" / "stars", client=client)
    assert "3 micrograph(s) segmented" in printed
    assert "metrics over the 2 micrograph(s) with truth; 1 had none and are not scored (m12)" in printed
    assert metrics["without_truth"] == ["m12"] and (out / "m12_mask.png").exists()  # segmented, not scored
    table = pd.read_csv(out / "metrics.csv")
    assert sorted(table["micrograph"]) == ["m10", "m11"]
    pooled, entry = metrics["summary"]["nocrf"]["pooled"], metrics["summary"]["nocrf"]
    assert entry["micrographs"] == entry["micrographs_masks"] == entry["micrographs_particles"] == 2
    tp, fp, fn = (table[k].sum() for k in ("tp", "fp", "fn"))
    assert pooled["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert pooled["pick_tp"] == table["pick_tp"].sum() and pooled["pick_fp"] == table["pick_fp"].sum()
    m12_picks = json.loads((out / ".cryodask" / "crisp-predict" / "m12.json").read_text())["picks"]
    assert m12_picks > 0 and pooled["pick_precision"] > 0.8  # m12's picks would all be false positives
    # masks for m10 only, coordinates for m10 and m11: each pool over its own micrographs
    out = tmp_path / "partial"
    printed, metrics = _predict(synthetic, model, out, "--crf", "off", "--truth-masks",
                                synthetic / "test" / "masks_m10",
                                "--truth-particles", synthetic / "test" / "stars", client=client)
    entry = metrics["summary"]["nocrf"]
    assert (entry["micrographs_masks"] == 1 and entry["micrographs_particles"] == 2
            and metrics["without_truth"] == ["m12"])
    table = pd.read_csv(out / "metrics.csv").set_index("micrograph")
    assert entry["pooled"]["iou"] == pytest.approx(table.loc["m10", "iou"])
    assert np.isnan(table.loc["m11", "iou"]) and table.loc["m11", "pick_tp"] > 0
