"""``cryodask pick``: the LoG picker and CryoSAM end to end, with real files in and out.

CryoSAM runs with small random SAM2 (hiera-t) and DINOv2 models saved as the checkpoints a
user would download, so the loading, the feature pyramid, the matching, the self-prompted
instances and the label writing are the real code paths (random weights: logic, not quality).
"""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import make_cryosam_weights, write_raw_mrc
from cryodask.cli import main
from cryodask.evaluate import evaluate_picks
from cryodask.io.omezarr import open_image
from cryodask.io.picks import read_picks, write_picks
from cryodask.synth.tomogram import synth_tomogram, write_tomogram


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return write_tomogram(folder / "tomo.mrc", synth_tomogram((48, 96, 96), voxel_size=10.0, seed=2, snr=0.5))


def test_log_pick_command_writes_star_csv_copick_and_scores(synthetic, tmp_path, capsys, client):
    code, out, err = run(capsys, "pick", synthetic["tomogram"], "--out", tmp_path, "--method", "log",
                         "--diameter", "250", "--cluster", client.scheduler.address)
    assert code == 0, err
    star, csv = tmp_path / "tomo_log_picks.star", tmp_path / "tomo_log_picks.csv"
    copick = tmp_path / "copick" / "ExperimentRuns" / "tomo" / "Picks" / "cryodask-log_0_particle.json"
    picks = read_picks(star)
    assert picks.pixel_size == 10.0 and len(picks.coords) > 0
    assert np.allclose(read_picks(csv).coords, picks.coords)
    assert np.allclose(read_picks(copick).coords, picks.coords)
    assert json.loads(copick.read_text())["points"][0]["location"]["x"] == pytest.approx(picks.coords[0, 2] * 10)
    truth = read_picks(synthetic["particles"])
    large = truth.coords[truth.table["rlnClassNumber"].to_numpy() == 1]
    write_picks(tmp_path / "large.star", large)
    scores = evaluate_picks(star, tmp_path / "large.star", radius=125, unit="angstrom", voxel_size=10.0)
    assert scores["f1"] > 0.6, scores


@pytest.fixture(scope="module")
def cryosam_weights(tmp_path_factory):
    return make_cryosam_weights(tmp_path_factory.mktemp("weights"))


def test_cryosam_end_to_end_from_one_prompt(cryosam_weights, tmp_path, client):
    from cryodask.io.volumes import open_volume
    from cryodask.picking.pipeline import pick, pick_params

    tomo = synth_tomogram((16, 48, 40), voxel_size=10.0, seed=1, snr=1.0)
    write_raw_mrc(tmp_path / "t.mrc", tomo.volume, voxel_size=10.0)
    write_picks(tmp_path / "prompt.star", tomo.particles[:1])
    from cryodask.report import run_report

    with run_report(tmp_path / "report", client, command="pick", echo=None) as report:
        params = pick_params(method="cryosam", weights=cryosam_weights, config="sam2.1_hiera_t", image_size=128,
                             feature_image_size=56, diameter=250, top_k=4)
        result = pick(open_volume(tmp_path / "t.mrc", chunks=(8, 24, 24)), tmp_path / "out", params,
                      prompts_file=tmp_path / "prompt.star", client=client)
    assert result.prompts == 1 and 1 <= len(result.picks) <= 4
    # features, self-prompting and matching are all reported, each read apart from the compute
    steps = {(r["step"], r["stage"]) for r in report.summary["records"]}
    assert {("cryosam-segment", "infer"), ("cryosam-segment", "read"), ("cryosam-match", "infer"),
            ("pick", "infer")} <= steps, sorted(steps)  # ("pick", "infer"): the DINOv2 feature slabs
    assert (result.picks["score"].diff().dropna() <= 0).all()
    picks = read_picks(tmp_path / "out" / "t_cryosam_picks.star")
    assert np.allclose(picks.coords, result.picks[["z", "y", "x"]].to_numpy())
    store = tmp_path / "out" / "t.zarr"
    _, instances, vs, _ = open_image(store / "labels" / "cryosam_instances")
    _, semantic, _, _ = open_image(store / "labels" / "cryosam_semantic")
    labels = instances[0][...]
    assert labels.shape == tomo.volume.shape and vs == (10.0, 10.0, 10.0)
    assert np.array_equal(semantic[0][...] > 0, labels > 0)
    assert set(np.unique(labels)) <= set(range(len(result.picks) + 1))
    assert (tmp_path / "out" / "t_features.zarr").exists()


def test_cryosam_rerun_skips_the_query_matching_and_finished_instances(cryosam_weights, tmp_path, client,
                                                                       monkeypatch):
    """A run that dies after its instances (here: writing the labels fails) leaves its query,
    matching and instances done-marked: the rerun recomputes none of them (0 instances) and
    writes what an undisturbed run writes; a rerun of a finished run is skipped whole."""
    import cryodask.picking.pipeline as P
    from cryodask.io.volumes import open_volume

    tomo = synth_tomogram((16, 48, 40), voxel_size=10.0, seed=1, snr=1.0)
    write_raw_mrc(tmp_path / "t.mrc", tomo.volume, voxel_size=10.0)
    params = P.pick_params(method="cryosam", weights=cryosam_weights, config="sam2.1_hiera_t", image_size=128,
                           feature_image_size=56, diameter=250, top_k=4)
    volume = open_volume(tmp_path / "t.mrc", chunks=(8, 24, 24))
    prompt = [tuple(tomo.particles[0])]
    whole = P.pick(volume, tmp_path / "whole", params, prompts=prompt, client=client)
    assert whole.status == "done" and whole.instances_computed == len(whole.picks) >= 1

    write_labels = P.write_instance_labels
    monkeypatch.setattr(P, "write_instance_labels", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError):
        P.pick(volume, tmp_path / "out", params, prompts=prompt, client=client)
    monkeypatch.setattr(P, "write_instance_labels", write_labels)
    calls = []
    monkeypatch.setattr("cryodask.prompting.matching.match", lambda *a, **k: calls.append("match"))
    resumed = P.pick(volume, tmp_path / "out", params, prompts=prompt, client=client)
    assert resumed.instances_computed == 0 and calls == [], resumed.notes
    assert f"resumed: query, matching, {len(whole.picks)} of {len(whole.picks)} instances already done, not redone" \
        in resumed.notes
    pd.testing.assert_frame_equal(resumed.picks, whole.picks)
    for name in ("cryosam_instances", "cryosam_semantic"):
        labels = [open_image(folder / "t.zarr" / "labels" / name)[1][0][...] for folder in (tmp_path / "whole",
                                                                                             tmp_path / "out")]
        assert np.array_equal(*labels) and labels[0].any()

    again = P.pick(volume, tmp_path / "out", params, prompts=prompt, client=client)
    assert again.status == "skipped" and again.instances_computed == 0
    pd.testing.assert_frame_equal(again.picks, whole.picks)
    monkeypatch.undo()  # matching runs again
    moved = P.pick(volume, tmp_path / "out", dataclasses.replace(params, top_k=2), prompts=prompt, client=client)
    assert moved.status == "done" and moved.instances_computed == len(moved.picks)  # new parameters: redone


def test_cryosam_prompt_errors_stop_before_any_cluster(cryosam_weights, tmp_path, capsys, monkeypatch):
    import cryodask.engine.cluster

    monkeypatch.setattr(cryodask.engine.cluster, "make_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    write_raw_mrc(tmp_path / "t.mrc", np.zeros((16, 16, 16), np.float32), voxel_size=10.0)
    write_picks(tmp_path / "empty.star", np.zeros((0, 3)))
    (tmp_path / "broken.star").write_text("data_\nloop_\n_rlnCoordinateX #1\nabc def\n")
    base = ["pick", tmp_path / "t.mrc", "--out", tmp_path / "out", "--method", "cryosam", "--weights", cryosam_weights,
            "--model-config", "sam2.1_hiera_t"]
    cases = [
        (["--prompt", "3,3,40"], "outside the volume"),
        (["--prompts", tmp_path / "empty.star"], "no prompt"),
        (["--prompts", tmp_path / "missing.star"], "no such file"),
        ([], "at least one prompt"),
        (["--prompt", "3,3"], "three"),
        (["--prompt", "3,3,3", "--weights", tmp_path], "sam2.1_hiera_tiny.pt"),
    ]
    for extra, words in cases:
        code, _, err = run(capsys, *base, *extra)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], (extra, err)
    code, _, err = run(capsys, "pick", tmp_path / "t.mrc", "--out", tmp_path / "out", "--method", "log")
    assert code == 2 and "--diameter" in err


def test_features_command_builds_the_pyramid_and_refuses_a_missing_model(cryosam_weights, tmp_path, capsys, client):
    import zarr

    from cryodask.prompting.features import open_features

    write_raw_mrc(tmp_path / "t.mrc", np.random.default_rng(0).normal(size=(16, 20, 24)).astype(np.float32), 10.0)
    code, out, err = run(capsys, "features", tmp_path / "t.mrc", "--out", tmp_path, "--checkpoint",
                         cryosam_weights / "dinov2-large", "--image-size", "56", "--cluster", client.scheduler.address,
                         "--report", tmp_path / "report")
    assert code == 0, err
    levels = open_features(tmp_path / "t_features.zarr")
    assert sorted(levels) == [4, 8, 16] and levels[4].shape == (4, 5, 6, 96)
    records = json.loads((tmp_path / "report" / "report.json").read_text())["records"]
    # each view reads its slices on the finest grid (every 4th) once: 4·20·24 = 5·16·24 = 6·16·20 voxels
    assert sum(r["bytes_read"] for r in records if r["stage"] == "read") == 3 * (4 * 20 * 24) * 4
    assert sum(r["bytes_written"] for r in records if r["stage"] == "write") == sum(
        zarr.open_array(str(tmp_path / "t_features.zarr" / kind / v), mode="r").nbytes
        for kind in ("maps", "gram") for v in "zyx")  # patch maps and their Gram maps, each written once
    assert {r["stage"] for r in records} == {"read", "infer", "write"} and "run report: features" in out
    code, _, err = run(capsys, "features", tmp_path / "t.mrc", "--out", tmp_path, "--checkpoint", tmp_path / "nothing")
    assert code == 2 and "nothing" in err and len(err.strip().splitlines()) == 1


def test_cryosam_over_a_collection_matches_one_query_everywhere(cryosam_weights, tmp_path, capsys, client):
    """One tomogram prompted (``--prompt TOMO:z,y,x``), the query made from it matched in both."""
    folder = tmp_path / "tomos"
    folder.mkdir()
    tomos = [synth_tomogram((16, 48, 40), voxel_size=10.0, seed=s, snr=1.0) for s in (1, 2)]
    for i, tomo in enumerate(tomos):
        write_raw_mrc(folder / f"t{i}.mrc", tomo.volume, voxel_size=10.0)
    z, y, x = tomos[0].particles[0]
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "pick", folder, "--out", out, "--method", "cryosam", "--prompt", f"t0:{z},{y},{x}",
                            "--weights", cryosam_weights, "--model-config", "sam2.1_hiera_t", "--image-size", "128",
                            "--feature-image-size", "56", "--diameter", "250", "--top-k", "4", "--chunks", "8,24,24",
                            "--sim-threshold", "-1", "--cluster", client.scheduler.address)  # random weights: any match
    assert code == 0, err
    assert "one query from 1 prompted tomograms, matched in all 2" in stdout
    query = np.load(out / "cryosam_query.npy")
    assert query.shape == (3 * 32,) and np.isclose(np.linalg.norm(query), 1, atol=1e-5)  # 3 views x 32 channels
    for i in range(2):
        assert 1 <= len(read_picks(out / f"t{i}_cryosam_picks.star").coords) <= 4
    every = starfile.read(out / "cryosam_picks.star", always_dict=True)["particles"]
    assert set(every["rlnTomoName"]) == {"t0", "t1"}
    # the same command again: the query is the prompts' marked one, each tomogram skipped whole
    code, again, err = run(capsys, "pick", folder, "--out", out, "--method", "cryosam", "--prompt",
                           f"t0:{z},{y},{x}", "--weights", cryosam_weights, "--model-config", "sam2.1_hiera_t",
                           "--image-size", "128", "--feature-image-size", "56", "--diameter", "250", "--top-k", "4",
                           "--chunks", "8,24,24", "--sim-threshold", "-1", "--cluster", client.scheduler.address)
    assert code == 0, err
    assert "t0.mrc: query from 1 prompts (query already done)" in again, again
    assert again.count("already done with these parameters: nothing recomputed") == 2, again
    assert "pick: 2 tomograms: 0 done, 2 skipped (already done)" in again
    assert np.array_equal(np.load(out / "cryosam_query.npy"), query)
    assert starfile.read(out / "cryosam_picks.star", always_dict=True)["particles"].equals(every)
    code, _, err = run(capsys, "pick", folder, "--out", out, "--method", "cryosam", "--prompt", "t9:1,1,1",
                       "--weights", cryosam_weights, "--model-config", "sam2.1_hiera_t")
    assert code == 2 and "t9" in err and "not among the tomograms" in err


def test_log_blocks_are_whole_chunks_of_the_default_size(tmp_path):
    """LoG's halo is several particle radii: small chunks of a store are merged into blocks of at
    least the default shape (whole chunks), and a file's blocks are what was asked for."""
    import zarr

    from cryodask.io.volumes import open_volume
    from cryodask.picking.pipeline import log_blocks

    write_raw_mrc(tmp_path / "t.mrc", np.zeros((16, 16, 16), np.float32), voxel_size=10.0)
    assert log_blocks(open_volume(tmp_path / "t.mrc", chunks=(8, 16, 16))) == (8, 16, 16)
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(100, 600, 600), chunks=(24, 100, 100), dtype="f4")
    blocks = log_blocks(open_volume(tmp_path / "a.zarr", voxel_size=10.0))
    assert blocks == (72, 300, 300) and all(b % c == 0 for b, c in zip(blocks, (24, 100, 100)))
