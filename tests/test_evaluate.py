"""``cryodask evaluate`` on real files: MRC, OME-Zarr (image and labels), STAR and CSV picks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_image, write_labels
from typer.testing import CliRunner

import cryodask.cli
import cryodask.cli.evaluate  # noqa: F401  (registers ``cryodask evaluate``)
from cryodask.errors import InputError
from cryodask.evaluate import evaluate_membranes, evaluate_picks, load_volume
from cryodask.io.mrc import write_mrc
from cryodask.io.picks import read_picks, write_picks
from cryodask.metrics import match_picks, pr_curve, segmentation_scores
from cryodask.viz import orthoslices

SHAPE = (24, 32, 40)


@pytest.fixture(scope="module")
def membranes(tmp_path_factory):
    """Truth mask, a noisy logit volume and its thresholded mask, as MRC files and one OME-Zarr."""
    root = tmp_path_factory.mktemp("membranes")
    rng = np.random.default_rng(0)
    truth = np.zeros(SHAPE, np.uint8)
    truth[:, 10:14, :] = 1
    truth[8:11, :, :] = 1
    logits = (truth * 2.0 - 1.0 + rng.normal(0, 0.8, SHAPE)).astype(np.float32)
    pred = (logits > 0).astype(np.uint8)
    files = {name: write_mrc(root / f"{name}.mrc", data, 10.0)
             for name, data in (("truth", truth), ("pred", pred), ("logits", logits))}
    # an OME-Zarr image with a label image, written by ome-zarr itself as other tools would
    image = root / "tomo.zarr"
    group = zarr.open_group(image, mode="w", zarr_format=2)
    options = {"axes": "zyx", "fmt": FormatV04(), "scale_factors": (2,), "storage_options": {"chunks": (8, 16, 16)}}
    write_image(logits, group, **options)
    write_labels(pred, group, "membranes", **options)
    return root, {"truth": truth, "pred": pred, "logits": logits}, files, image


def test_membranes_from_mrc(membranes, tmp_path):
    _, arrays, files, _ = membranes
    metrics = evaluate_membranes(files["pred"], files["truth"], logits=files["logits"], out=tmp_path, chunks=5)
    expected = segmentation_scores(arrays["pred"], arrays["truth"])
    for key in ("dice", "iou", "precision", "recall", "tp", "fp", "fn"):
        assert metrics[key] == expected[key]
    assert metrics["average_precision"] == pr_curve(arrays["logits"], arrays["truth"]).average_precision
    assert 0.8 < metrics["average_precision"] <= 1
    table = pd.read_csv(tmp_path / "membranes_metrics.csv")
    assert len(table) == 1 and table["dice"][0] == pytest.approx(metrics["dice"]) and table["tp"][0] == metrics["tp"]
    pr = pd.read_csv(tmp_path / "membranes_pr.csv")
    assert list(pr.columns) == ["threshold", "precision", "recall", "tp", "fp"] and len(pr) == 1000
    assert (tmp_path / "membranes_pr.png").stat().st_size > 10_000
    assert sorted(metrics["files"]) == sorted(str(tmp_path / n) for n in
                                              ("membranes_metrics.csv", "membranes_pr.csv", "membranes_pr.png"))


def test_membranes_from_omezarr(membranes, tmp_path):
    _, arrays, files, image = membranes
    labels = load_volume(image / "labels" / "membranes")
    assert labels.shape == SHAPE and labels.chunks[0][0] == 8  # the zarr's own chunks
    metrics = evaluate_membranes(image / "labels" / "membranes", files["truth"], logits=image, out=tmp_path)
    reference = evaluate_membranes(files["pred"], files["truth"], logits=files["logits"])
    assert {k: v for k, v in metrics.items() if k != "files"} == {k: v for k, v in reference.items() if k != "files"}
    assert reference["files"] == []  # out=None writes nothing


def test_load_volume_reads_mrc_in_z_slabs(membranes):
    _, arrays, files, _ = membranes
    volume = load_volume(files["logits"], chunks=10)
    assert volume.chunks == ((10, 10, 4), (32,), (40,))
    np.testing.assert_array_equal(volume[12:15, 3].compute(), arrays["logits"][12:15, 3])


def test_membranes_bad_inputs(membranes, tmp_path):
    _, _, files, image = membranes
    small = write_mrc(tmp_path / "small.mrc", np.zeros((4, 5, 6), np.uint8), 10.0)
    with pytest.raises(InputError, match=f"{small}: shape \\(4, 5, 6\\) differs"):
        evaluate_membranes(files["pred"], small)
    with pytest.raises(InputError, match=f"{small}: shape"):
        evaluate_membranes(files["pred"], files["truth"], logits=small)
    with pytest.raises(InputError, match="missing.mrc: no such file"):
        evaluate_membranes(tmp_path / "missing.mrc", files["truth"])
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file at all")
    with pytest.raises(InputError, match="junk.mrc"):
        evaluate_membranes(tmp_path / "junk.mrc", files["truth"])
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="empty.zarr"):
        evaluate_membranes(tmp_path / "empty.zarr", files["truth"])


@pytest.fixture
def picks(tmp_path):
    rng = np.random.default_rng(5)
    truth = rng.uniform(0, 200, (60, 3))
    pred = np.concatenate([truth[:50] + rng.normal(0, 1.5, (50, 3)), rng.uniform(0, 200, (8, 3))])
    files = {"truth": write_picks(tmp_path / "truth.star", truth, {"rlnImagePixelSize": np.full(60, 5.0)}),
             "pred": write_picks(tmp_path / "pred.csv", pred),
             "pred_star": write_picks(tmp_path / "pred.star", pred)}
    return truth, pred, files


def test_picks_in_pixels(picks, tmp_path):
    truth, pred, files = picks
    metrics = evaluate_picks(files["pred"], files["truth"], radius=6, out=tmp_path / "out")
    pred, truth = read_picks(files["pred"]).coords, read_picks(files["truth"]).coords  # as stored
    expected = match_picks(pred, truth, 6.0)
    assert metrics == {**expected.scores(), "radius_px": 6.0, "files": metrics["files"]}
    assert metrics["tp"] >= 48 and metrics["fp"] >= 8
    matches = pd.read_csv(tmp_path / "out" / "picks_matches.csv")
    assert list(matches.columns) == ["pred_index", "truth_index", "distance_px"] and len(matches) == metrics["tp"]
    np.testing.assert_allclose(matches["distance_px"],
                               np.linalg.norm(pred[matches["pred_index"]] - truth[matches["truth_index"]], axis=1))
    row = pd.read_csv(tmp_path / "out" / "picks_metrics.csv").iloc[0]
    assert row["f1"] == pytest.approx(metrics["f1"]) and row["radius_px"] == 6.0
    sweep = pd.read_csv(tmp_path / "out" / "picks_f1_vs_radius.csv")
    assert sweep["radius"].min() == 1.5 and sweep["radius"].max() == 12 and sweep["recall"].is_monotonic_increasing
    assert (tmp_path / "out" / "picks_f1_vs_radius.png").stat().st_size > 10_000


def test_picks_in_angstrom(picks):
    truth, pred, files = picks
    from_file = evaluate_picks(files["pred"], files["truth"], radius=30, unit="angstrom")  # 5 Å/px in the STAR
    assert from_file["radius_px"] == 6.0
    given = evaluate_picks(files["pred"], files["truth"], radius=30, unit="angstrom", voxel_size=2.5)
    assert given["radius_px"] == 12.0 and given["tp"] >= from_file["tp"]
    with pytest.raises(InputError, match=f"{files['pred']}: no pixel size"):
        evaluate_picks(files["pred"], files["pred_star"], radius=30, unit="angstrom")


def test_picks_bad_inputs(picks, tmp_path):
    _, pred, files = picks
    flat = write_picks(tmp_path / "flat.star", pred[:, 1:])
    with pytest.raises(InputError, match=f"{flat}: has 2D coordinates"):
        evaluate_picks(files["pred"], flat, radius=5)
    broken = tmp_path / "broken.star"
    broken.write_text("data_particles\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1.0\n")
    with pytest.raises(InputError, match="broken.star"):
        evaluate_picks(broken, files["truth"], radius=5)
    with pytest.raises(InputError, match="radius"):
        evaluate_picks(files["pred"], files["truth"], radius=0)
    with pytest.raises(InputError, match="unit"):
        evaluate_picks(files["pred"], files["truth"], radius=5, unit="nm")


def test_cli(membranes, picks, tmp_path, client):
    runner = CliRunner()
    _, _, files, _ = membranes
    result = runner.invoke(cryodask.cli.app, ["evaluate", "membranes", str(files["pred"]), str(files["truth"]),
                                              "--logits", str(files["logits"]), "--out", str(tmp_path),
                                              "--cluster", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "dice" in result.output and "average_precision" in result.output
    assert f"wrote {tmp_path / 'membranes_pr.png'}" in result.output
    _, _, pick_files = picks
    result = runner.invoke(cryodask.cli.app, ["evaluate", "picks", str(pick_files["pred"]), str(pick_files["truth"]),
                                              "--radius", "30", "--unit", "angstrom", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "radius_px          6.0000" in result.output and (tmp_path / "picks_matches.csv").exists()
    result = runner.invoke(cryodask.cli.app, ["evaluate", "picks", str(pick_files["pred"]),
                                              str(pick_files["pred_star"]), "--radius", "30", "--unit", "angstrom"])
    assert isinstance(result.exception, InputError) and "no pixel size" in str(result.exception)


def test_cli_checks_inputs_before_starting_a_cluster(membranes, tmp_path, capsys, monkeypatch):
    import cryodask.engine.cluster
    from cryodask.cli import main

    monkeypatch.setattr(cryodask.engine.cluster, "make_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    _, _, files, _ = membranes
    code = main(["evaluate", "membranes", str(files["pred"]), str(tmp_path / "missing.mrc")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {tmp_path / 'missing.mrc'}: no such file"


class Recording:
    """An array that remembers what was read from it."""

    def __init__(self, data):
        self.data, self.shape, self.reads = data, data.shape, []

    def __getitem__(self, region):
        self.reads.append(region)
        return self.data[region]


def test_orthoslices(membranes, tmp_path):
    _, arrays, _, image = membranes
    volume = Recording(arrays["logits"])
    points = np.array([[12, 16, 20], [0, 0, 0]])
    png = orthoslices(volume, tmp_path / "preview.png", overlay=arrays["pred"], points=points, title="logits")
    assert png.stat().st_size > 10_000
    assert len(volume.reads) == 3 and all(any(isinstance(i, int) for i in r) for r in volume.reads)
    load = load_volume(image / "labels" / "membranes")
    assert orthoslices(load, tmp_path / "labels.png").stat().st_size > 1000
    assert orthoslices(arrays["logits"][3], tmp_path / "2d.png", points=points[:, 1:]).stat().st_size > 1000


def test_membranes_on_a_cluster(membranes, client):
    """Blocks are read and reduced on distributed workers (the readers must travel by pickle)."""
    _, arrays, files, _ = membranes
    metrics = evaluate_membranes(files["pred"], files["truth"], logits=files["logits"], chunks=5)
    assert metrics["dice"] == segmentation_scores(arrays["pred"], arrays["truth"])["dice"]
    assert metrics["average_precision"] == pr_curve(arrays["logits"], arrays["truth"]).average_precision


def test_real_micrograph_picks_and_preview(data_dir, tmp_path):
    """CryoPPP picks on an EMPIAR-10017 micrograph (1.77 Å/px, particles ≈ 108 px across)."""
    from matplotlib.image import imread

    name = "Falcon_2012_06_12-14_33_35_0"
    truth = data_dir / "empiar10017" / "cryoppp" / f"{name}.star"
    coords = read_picks(truth).coords
    assert len(coords) == 629
    same = evaluate_picks(truth, truth, radius=1)
    assert (same["f1"], same["tp"]) == (1.0, 629)
    # every pick moved 20 px and a tenth dropped: matched within a particle radius (≈ 95 Å), not within 10 px
    rng = np.random.default_rng(0)
    moved = coords + 20 * np.stack([np.cos(a := rng.uniform(0, 2 * np.pi, len(coords))), np.sin(a)], axis=1)
    picked = write_picks(tmp_path / "picked.csv", moved[rng.random(len(coords)) > 0.1])
    near = evaluate_picks(picked, truth, radius=95, unit="angstrom", voxel_size=1.77, out=tmp_path)
    assert near["precision"] == 1.0 and near["recall"] == pytest.approx(0.9, abs=0.03)
    assert evaluate_picks(picked, truth, radius=10)["tp"] == 0
    micrograph = imread(data_dir / "empiar10017" / "micrographs" / f"{name}.jpg")
    mask = imread(data_dir / "empiar10017" / "masks" / f"{name}_mask.jpg") > 127
    png = orthoslices(micrograph, tmp_path / "preview.png", overlay=mask[..., 0] if mask.ndim == 3 else mask,
                      points=coords, title=name)
    assert png.stat().st_size > 50_000
