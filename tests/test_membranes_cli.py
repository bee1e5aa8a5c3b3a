"""``cryodask membranes`` without weights: the classical filter from the command line."""

from __future__ import annotations

import mrcfile
import numpy as np

from conftest import write_raw_mrc
from cryodask.cli import main
from cryodask.evaluate import evaluate_membranes
from cryodask.io.omezarr import open_image
from cryodask.synth.tomogram import synth_tomogram, write_tomogram


def test_classical_is_the_default_without_weights_and_scores(tmp_path, capsys, client, monkeypatch):
    monkeypatch.delenv("CRYODASK_WEIGHTS", raising=False)
    paths = write_tomogram(tmp_path / "tomo.mrc", synth_tomogram((48, 96, 96), voxel_size=10.0, seed=3, snr=0.1))
    bad = np.ones((16, 16, 16), np.float32)
    bad[3, 3, 3] = np.nan
    write_raw_mrc(tmp_path / "bad.mrc", bad)
    out = tmp_path / "out"
    args = ["membranes", str(paths["tomogram"]), str(tmp_path / "bad.mrc"), "--out", str(out), "--post-process",
            "--store-logits", "--cluster", client.scheduler.address]
    code = main(args)
    stdout, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "bad.mrc" in line and "NaN" in line]
    assert "tomo.mrc: done (classical" in stdout
    mask = out / "tomo_classical_predicted_mask.mrc"
    with mrcfile.open(mask) as m, mrcfile.open(out / "tomo_classical_predicted_logits.mrc") as score:
        assert m.data.shape == score.data.shape == (48, 96, 96) and score.header.mode == 2
        assert float(m.voxel_size.x) == 10.0
    assert evaluate_membranes(mask, paths["membranes"])["dice"] > 0.7
    assert evaluate_membranes(out / "tomo_classical_predicted_post_processed_mask.mrc",
                              paths["membranes"])["dice"] > 0.7
    _, labels, _, _ = open_image(out / "tomo.zarr" / "labels" / "classical_predicted_post_processed_mask")
    assert labels[0].shape == (48, 96, 96)
    assert main(args[:2] + args[3:]) == 0
    assert "skipped" in capsys.readouterr().out


def test_a_folder_or_glob_of_ome_zarr_stores_is_found(tmp_path, client):
    """``cryodask membranes zarr/`` (what the README shows) finds every store in the folder."""
    from cryodask.convert import ConvertParams, convert
    from cryodask.membranes.pipeline import find_inputs

    for name in ("a", "b"):
        write_raw_mrc(tmp_path / f"{name}.mrc", np.random.default_rng(0).random((16, 32, 32), np.float32))
    convert([tmp_path / "a.mrc", tmp_path / "b.mrc"], tmp_path / "zarr", ConvertParams(levels=1), client=client)
    (tmp_path / "zarr" / "notes.txt").write_text("not a tomogram")
    for inputs in ([tmp_path / "zarr"], [str(tmp_path / "zarr" / "*.zarr")], [tmp_path / "zarr" / "a.zarr"]):
        found, failed = find_inputs(inputs)
        assert failed == []
        assert [(kind, path.name) for kind, path in found] == [("zarr", "a.zarr"), ("zarr", "b.zarr")][: len(found)]
        assert len(found) == (1 if str(inputs[0]).endswith("a.zarr") else 2)
