"""``cryodask crisp train|predict`` end to end on synthetic micrographs, on the real LocalCluster,
and the one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile
from PIL import Image

from cryodask.cli import main
from cryodask.synth import synth_micrograph, write_micrograph

DIAMETER = 20


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Three training and two test micrographs (192², diameter 20 px), each kind of file in its
    own folder: micrographs, particle STARs, truth masks."""
    root = tmp_path_factory.mktemp("crisp")
    for split, seeds in (("train", (0, 1, 2)), ("test", (10, 11))):
        for kind in ("mics", "stars", "masks"):
            (root / split / kind).mkdir(parents=True)
        for seed in seeds:
            paths = write_micrograph(root / split / "mics" / f"m{seed}.mrc",
                                     synth_micrograph((192, 192), diameter=DIAMETER, seed=seed, snr=0.5))
            shutil.move(paths["particles"], root / split / "stars" / paths["particles"].name)
            shutil.move(paths["mask"], root / split / "masks" / paths["mask"].name)
            paths["contaminants"].unlink()
    return root


@pytest.fixture(scope="module")
def trained(synthetic):
    model = synthetic / "model"
    code = main(["crisp", "train", "--micrographs", str(synthetic / "train" / "mics"), "--particles",
                 str(synthetic / "train" / "stars"), "--diameter", str(DIAMETER), "--bin", "2", "--model", "unet",
                 "--loss", "dice", "--widths", "8,16,32", "--epochs", "20", "--crop", "64", "--lr", "0.01", "--threads",
                 "1", "--out", str(model), "--report", str(synthetic / "train_report")])
    assert code == 0
    return model


def test_train_writes_the_model_folder(synthetic, trained):
    for name in ("model.pt", "config.json", "training_log.json", "loss_curve.png"):
        assert (trained / name).is_file()
    config = json.loads((trained / "config.json").read_text())
    assert config["network"] == "unet" and config["bin"] == 2 and config["diameter"] == DIAMETER
    losses = [row["loss"] for row in json.loads((trained / "training_log.json").read_text())]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    records = json.loads((synthetic / "train_report" / "report.json").read_text())["records"]
    assert [r["stage"] for r in records] == ["read", "train"]
    assert records[0]["bytes_read"] == sum(p.stat().st_size for p in (synthetic / "train" / "mics").glob("*.mrc"))


def test_predict_beats_the_iou_bound_and_resumes(synthetic, trained, client, capsys):
    out = synthetic / "pred"
    args = ["crisp", "predict", "--model", str(trained), "--micrographs", str(synthetic / "test" / "mics"),
            "--out", str(out), "--truth-masks", str(synthetic / "test" / "masks"),
            "--truth-particles", str(synthetic / "test" / "stars"), "--crf-features", "logits",
            "--crf-compat", "1", "--crf-gaussian-compat", "1", "--extract", "peaks", "--probability",
            "--cluster", client.scheduler.address]
    assert main(args + ["--report", str(synthetic / "report")]) == 0
    assert "run report: crisp predict" in capsys.readouterr().out
    stages = {(r["stage"], r["block"])
              for r in json.loads((synthetic / "report" / "report.json").read_text())["records"]}
    assert stages == {(s, f"{m}.mrc") for s in ("read", "infer", "post-process", "write") for m in ("m10", "m11")}
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    for variant in ("nocrf", "crf"):
        pooled = summary[variant]["pooled"]
        assert pooled["iou"] > 0.7, (variant, pooled)  # measured 0.83 (bin 2, 8-16-32 U-Net, 20 epochs)
        assert pooled["pixel_accuracy"] > 0.9 and pooled["pick_f1"] > 0.85, (variant, pooled)
    table = pd.read_csv(out / "metrics.csv")
    assert sorted(set(table["variant"])) == ["crf", "nocrf"] and len(table) == 4
    for name in ("m10", "m11"):
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == (192, 192) and set(np.unique(mask)) <= {0, 255}
        assert (out / f"{name}_mask_nocrf.png").is_file() and (out / f"{name}_probability.mrc").is_file()
        picks = starfile.read(out / f"{name}_particles.star", always_dict=True)["particles"]
        assert set(picks["rlnMicrographName"]) == {f"{name}.mrc"}
        assert picks["rlnCoordinateX"].between(0, 192).all() and picks["rlnCoordinateY"].between(0, 192).all()
    assert not list(out.rglob("*.partial"))
    capsys.readouterr()
    assert main(args) == 0  # a rerun finds everything done
    assert "2 micrograph(s) already done, 0 to do" in capsys.readouterr().out


def test_components_extraction_through_the_cli_without_crf(synthetic, trained, client):
    out = synthetic / "pred_components"
    assert main(["crisp", "predict", "--model", str(trained), "--micrographs", str(synthetic / "test" / "mics"),
                 "--out", str(out), "--no-crf", "--extract", "components",
                 "--truth-particles", str(synthetic / "test" / "stars"), "--cluster", client.scheduler.address]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert "crf" not in summary and summary["nocrf"]["pooled"]["pick_recall"] > 0.7
    assert not (out / "m10_mask_nocrf.png").exists()


def _error(capsys, args) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line(synthetic, trained, tmp_path, capsys):
    train_mics, test_mics = str(synthetic / "train" / "mics"), str(synthetic / "test" / "mics")
    base = ["crisp", "train", "--micrographs", train_mics, "--out", str(tmp_path / "m")]
    stars = str(synthetic / "train" / "stars")
    assert "--loss" in _error(capsys, base + ["--particles", stars, "--diameter", "20", "--loss", "focal"])
    assert "--model" in _error(capsys, base + ["--particles", stars, "--diameter", "20", "--model", "segformer"])
    assert "--diameter" in _error(capsys, base + ["--particles", stars])
    assert "exactly one" in _error(capsys, base)
    assert "--threads" in _error(capsys, base + ["--particles", stars, "--diameter", "20", "--threads", "0"])
    # the test micrographs' coordinates name micrographs that are not given
    assert "matches no micrograph given" in _error(capsys, base + ["--particles", str(synthetic / "test" / "stars"),
                                                                 "--diameter", "20"])
    outside = tmp_path / "outside.star"
    starfile.write(pd.DataFrame({"rlnMicrographName": ["m0.mrc"], "rlnCoordinateX": [500.0],
                                 "rlnCoordinateY": [10.0]}), outside)
    assert "outside" in _error(capsys, base + ["--particles", str(outside), "--diameter", "20"])
    assert "holds no mask" in _error(capsys, base + ["--masks", str(synthetic / "test" / "masks")])

    predict = ["crisp", "predict", "--micrographs", test_mics, "--out", str(tmp_path / "p")]
    assert "no model.pt" in _error(capsys, predict + ["--model", str(tmp_path / "nothing")])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt").write_bytes(b"not a model")
    assert "not a usable CRISP model" in _error(capsys, predict + ["--model", str(corrupt)])
    assert "--extract" in _error(capsys, predict + ["--model", str(trained), "--extract", "contours"])
    assert "--crf-features" in _error(capsys, predict + ["--model", str(trained), "--crf-features", "rgb"])
    assert "holds no mask" in _error(capsys, predict + ["--model", str(trained), "--truth-masks",
                                                        str(synthetic / "train" / "masks")])
    assert not (tmp_path / "p" / "metrics.csv").exists()
