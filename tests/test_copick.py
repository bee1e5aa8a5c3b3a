"""copick as a sink and a source, checked with copick's own code.

copick 1.31 pins zarr < 3 and cryodask needs zarr 3, so copick's API runs in a separate
environment that this module makes once (``<repo>/.venv-copick``: ``python -m venv`` and
``pip install copick==1.31.0``, about 45 s; reused while it holds that copick, skipped with the
reason when it cannot be made) and runs ``tests/copick_readback.py`` there on the project the
cryodask commands wrote. copick's pydantic models (``copick.models``, which import with zarr 3)
validate the picks file and the config in this environment too (``pip install --no-deps
copick==1.31.0``, done by ``deploy/install.sh`` for the dev extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import zarr
from ome_zarr_models.v04.image import Image as ImageV04

from conftest import ROOT, import_copick, one_line_error
from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.io import copick as cp
from cryodask.io.picks import read_picks, write_picks
from cryodask.synth.tomogram import synth_tomogram, write_tomogram

COPICK = "copick==1.31.0"
VENV = ROOT / ".venv-copick"


def copick_models():
    """copick's pydantic models, imported quietly (``conftest.import_copick``)."""
    return import_copick("copick.models")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="session")
def copick_python():
    """copick 1.31's own environment (zarr 2), made once and reused; its creation time is kept beside it."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", f"import copick, sys; sys.exit(copick.__version__ != {COPICK.split('==')[1]!r})"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    clock = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(VENV)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", COPICK]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"cannot make the copick environment ({' '.join(step[-2:])}): "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    seconds = time.perf_counter() - clock
    (VENV / "cryodask-created.json").write_text(json.dumps({"copick": COPICK, "seconds": round(seconds, 1)}))
    print(f"\nmade {VENV} with {COPICK} in {seconds:.1f} s")
    return python


def read_back(python, config, dump) -> dict:
    done = subprocess.run([str(python), str(ROOT / "tests" / "copick_readback.py"), str(config), str(dump)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def mrc_data(path):
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data)


# ------------------------------------------------------------------ names and the config, in this environment


def test_picks_file_name_and_content_agree_and_copick_models_accept_them(tmp_path):
    models = copick_models()
    coords = np.array([[1.0, 2.0, 3.0], [4.5, 5.5, 6.5]])
    path = cp.write_run_picks(tmp_path / "ExperimentRuns" / "TS_01", coords, 7.5, tool="log", object_name="big_ribo",
                              scores=[0.5, 0.25])
    assert path.name == "cryodask-log_0_big-ribo.json"
    user, session, obj = path.stem.split("_")
    meta = models.CopickPicksFile.model_validate(json.loads(path.read_text()))
    assert (meta.user_id, meta.session_id, meta.pickable_object_name) == (user, session, obj)
    assert meta.run_name == "TS_01"  # run names may hold underscores: copick never splits them
    assert [(p.location.z, p.location.y, p.location.x) for p in meta.points] == [tuple(c * 7.5) for c in coords]
    assert [p.score for p in meta.points] == [0.5, 0.25]
    np.testing.assert_allclose(cp.read_copick(path).coords, coords)
    with pytest.raises(ValueError, match="does not name"):
        cp.write_copick(tmp_path / "cryodask-log_0_particle.json", coords, 7.5, user_id="cryodask")


def test_one_user_per_tool_without_underscores():
    users = [cp.user_id(t) for t in ("log", "cryosam", "membranes", "postprocess")]
    assert users == ["cryodask-log", "cryodask-cryosam", "cryodask-membranes", "cryodask-postprocess"]
    assert cp.copick_part("my_object x") == "my-object-x"
    with pytest.raises(InputError, match="cannot be a copick name"):
        cp.copick_part("__")


def test_config_is_created_kept_and_accepted_by_copick_models(tmp_path):
    models = copick_models()
    config = tmp_path / "project" / "copick.json"
    project = cp.open_project(config, create=True)
    assert project.overlay == config.parent
    labels = cp.add_objects(project, [{"name": "ribosome", "is_particle": True, "radius": 120},
                                      {"name": "membrane", "is_particle": False}])
    again = cp.add_objects(cp.open_project(config, create=True), [{"name": "ribosome", "is_particle": True}])
    assert labels == again == {"ribosome": 1, "membrane": 2}
    data = json.loads(config.read_text())
    validated = models.CopickConfig.model_validate(data)
    assert [(o.name, o.is_particle, o.label, o.radius) for o in validated.pickable_objects] == \
        [("ribosome", True, 1, 120.0), ("membrane", False, 2, None)]
    assert data["config_type"] == "filesystem" and data["overlay_root"] == f"local://{config.parent}"

    # someone else's project: their objects and labels stay, ours get the next free label
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({"config_type": "filesystem", "overlay_root": str(tmp_path / "t"), "name": "x",
                                  "pickable_objects": [{"name": "apo", "is_particle": True, "label": 1,
                                                        "emdb_id": "E"}]}))
    assert (cp.add_objects(cp.open_project(theirs), [{"name": "membrane", "is_particle": False}])
            == {"apo": 1, "membrane": 2})
    kept = models.CopickConfig.model_validate(json.loads(theirs.read_text()))
    assert kept.pickable_objects[0].emdb_id == "E" and kept.name == "x"


def test_bad_configs_are_one_line_errors(tmp_path):
    missing = tmp_path / "none.json"
    one_line_error(lambda: cp.open_project(missing), missing, "no such copick config")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    one_line_error(lambda: cp.open_project(garbage), garbage, "not a readable copick config")
    portal = tmp_path / "portal.json"
    portal.write_text(json.dumps({"config_type": "cryoet_data_portal", "pickable_objects": [], "dataset_ids": [1]}))
    one_line_error(lambda: cp.open_project(portal), portal, "filesystem copick projects only")
    remote = tmp_path / "s3.json"
    remote.write_text(json.dumps({"pickable_objects": [], "overlay_root": "s3://bucket/p"}))
    one_line_error(lambda: cp.open_project(remote), remote, "not on this filesystem")
    one_line_error(lambda: cp.spacing((10.0, 10.0, 12.0), "t.mrc"), "t.mrc", "one voxel size on every axis")


# ------------------------------------------------------------------ the commands into a project, read back by copick


@pytest.fixture(scope="module")
def written(tmp_path_factory, client):
    """convert, pick, membranes and postprocess, each with --copick into one new project."""
    folder = tmp_path_factory.mktemp("copick")
    tomo = write_tomogram(folder / "tomo.mrc", synth_tomogram((48, 96, 96), voxel_size=10.0, seed=2, snr=2.0))
    other = write_tomogram(folder / "other.mrc", synth_tomogram((40, 64, 80), voxel_size=10.0, seed=5, snr=2.0))
    third = write_tomogram(folder / "third.mrc", synth_tomogram((32, 48, 48), voxel_size=10.0, seed=7, snr=2.0))
    config = folder / "project" / "copick.json"
    address = client.scheduler.address
    commands = [
        ["convert", other["tomogram"], third["tomogram"], "--out", folder / "convert", "--copick", config],
        ["pick", tomo["tomogram"], "--out", folder / "pick", "--diameter", "250", "--object", "big_ribo",
         "--copick", config],
        ["membranes", tomo["tomogram"], "--out", folder / "membranes", "--method", "classical", "--copick", config],
        ["postprocess", folder / "membranes" / "tomo_classical_predicted_mask.mrc", "--out", folder / "post" / "m.mrc",
         "--min-voxels", "50", "--copick", config, "--copick-run", "tomo"],
    ]
    for args in commands:
        code = main([str(a) for a in [*args, "--cluster", address]])
        assert code == 0, args[0]
    return {"folder": folder, "config": config, "tomo": tomo, "other": other, "third": third}


def test_copick_reads_back_what_the_commands_wrote(written, copick_python, tmp_path):
    folder, config = written["folder"], written["config"]
    report = read_back(copick_python, config, tmp_path / "dump")
    assert report["copick"] == "1.31.0"
    assert report["users"] == ["cryodask-log", "cryodask-membranes", "cryodask-postprocess"]  # one user per tool
    assert report["objects"] == {"big-ribo": {"is_particle": True, "label": 1},
                                 "membrane": {"is_particle": False, "label": 2}}
    assert sorted(report["runs"]) == ["other", "third", "tomo"]

    # picks: right in Å, found by their user, and store() after loading rewrites the same file
    [picks] = report["runs"]["tomo"]["picks"]
    assert (picks["user"], picks["session"], picks["object"]) == ("cryodask-log", "0", "big-ribo")
    assert picks["found_by_user"] == 1
    assert picks["files_before_store"] == picks["files_after_store"] == ["cryodask-log_0_big-ribo.json"]
    star = read_picks(folder / "pick" / "tomo_log_picks.star")
    assert len(star.coords) > 0
    np.testing.assert_allclose(np.array(picks["points_xyz"]), star.coords[:, ::-1] * 10.0, atol=1e-6)

    # tomograms: each MRC converted straight into its run, level 0 as copick reads it = the MRC
    for run, paths in (("tomo", written["tomo"]), ("other", written["other"]), ("third", written["third"])):
        [tomogram] = report["runs"][run]["tomograms"]
        assert (tomogram["voxel_size"], tomogram["type"]) == (10.0, "wbp")
        np.testing.assert_array_equal(np.load(tmp_path / "dump" / tomogram["npy"]), mrc_data(paths["tomogram"]))
    assert (config.parent / "ExperimentRuns" / "tomo" / "VoxelSpacing10.000" / "wbp.zarr" / ".zattrs").exists()
    assert not (folder / "convert" / "other.zarr").exists()  # written where it belongs, not copied

    # segmentations: the membranes mask and the post-processed one, as copick reads them
    segs = {s["user"]: s for s in report["runs"]["tomo"]["segmentations"]}
    assert sorted(segs) == ["cryodask-membranes", "cryodask-postprocess"]
    for user, mask in (("cryodask-membranes", folder / "membranes" / "tomo_classical_predicted_mask.mrc"),
                       ("cryodask-postprocess", folder / "post" / "m.mrc")):
        seg = segs[user]
        assert (seg["name"], seg["session"], seg["voxel_size"], seg["multilabel"]) == ("membrane", "0", 10.0, False)
        assert seg["file"] == f"10.000_{user}_0_membrane.zarr"
        data = np.load(tmp_path / "dump" / seg["npy"])
        expected = (mrc_data(mask) > 0).astype(np.uint8)
        assert expected.any()
        np.testing.assert_array_equal(data, expected)


def test_files_the_commands_wrote_pass_copick_models(written):
    """In this environment: the picks file and the config written by the commands, through copick's models."""
    models = copick_models()
    config = json.loads(written["config"].read_text())
    assert [o.name for o in models.CopickConfig.model_validate(config).pickable_objects] == ["big-ribo", "membrane"]
    path = written["config"].parent / "ExperimentRuns" / "tomo" / "Picks" / "cryodask-log_0_big-ribo.json"
    meta = models.CopickPicksFile.model_validate(json.loads(path.read_text()))
    assert f"{meta.user_id}_{meta.session_id}_{meta.pickable_object_name}.json" == path.name
    assert meta.run_name == "tomo" and meta.voxel_spacing == 10.0 and len(meta.points) > 0


def test_multilabel_segmentation_reads_back(tmp_path, copick_python, client):
    project = cp.open_project(tmp_path / "p" / "copick.json", create=True)
    labels = cp.add_objects(project,
                            [{"name": "membrane", "is_particle": False}, {"name": "ribo", "is_particle": True}])
    volume = np.zeros((20, 24, 28), dtype=np.uint8)
    volume[2:6] = labels["membrane"]
    volume[10:12, 5:9, 5:9] = labels["ribo"]
    path = cp.write_segmentation(project, "TS_1", volume, (8.0, 8.0, 8.0), tool="membranes", name="cellparts",
                                 multilabel=True, chunks=(8, 16, 16), levels=2)
    assert path.name == "8.000_cryodask-membranes_0_cellparts-multilabel.zarr"
    report = read_back(copick_python, project.config, tmp_path / "dump")
    [seg] = report["runs"]["TS_1"]["segmentations"]
    assert (seg["name"], seg["multilabel"], seg["voxel_size"]) == ("cellparts", True, 8.0)
    np.testing.assert_array_equal(np.load(tmp_path / "dump" / seg["npy"]), volume)


def test_segmentation_keeps_the_tomograms_place(tmp_path):
    """A mask from an MRC with an origin lands in copick with the same NGFF translation as the
    tomogram converted from that MRC, so the two overlay in viewers that use it."""
    from cryodask.io.omezarr import image_translation

    mask = tmp_path / "mask.mrc"
    with mrcfile.new(mask) as m:
        m.set_data(np.pad(np.ones((4, 6, 8), np.int8), 2))
        m.voxel_size = 10.0
        m.header.origin = (1230.0, 4560.0, 7890.0)
    project = cp.open_project(tmp_path / "p" / "copick.json", create=True)
    path = cp.segmentation_from_file(project, "TS_1", mask, tool="postprocess", name="membrane")
    assert image_translation(path) == (7890.0, 4560.0, 1230.0)
    assert ImageV04.from_zarr(zarr.open_group(str(path), mode="r")) is not None  # still valid NGFF 0.4


# ------------------------------------------------------------------ a project as input


def test_a_copick_config_as_input_is_its_runs(written, tmp_path, capsys, client):
    config = written["config"]
    code, out, err = run(capsys, "membranes", config, "--out", tmp_path, "--method", "classical",
                         "--cluster", client.scheduler.address)
    assert code == 0, err
    for run_name in ("tomo", "other", "third"):
        paths = written[run_name]
        mask = tmp_path / f"{run_name}_classical_predicted_mask.mrc"  # named after the run, not "wbp"
        assert mrc_data(mask).shape == mrc_data(paths["tomogram"]).shape

    # a second tomogram type: the runs are ambiguous until one type is chosen
    run_dir = config.parent / "ExperimentRuns" / "other" / "VoxelSpacing10.000"
    os.symlink(run_dir / "wbp.zarr", run_dir / "denoised.zarr")
    one_line_error(lambda: cp.expand_config(config), config, "several tomograms .*choose one with --copick-type")
    chosen = cp.expand_config(config, tomo_type="denoised")
    assert [p.name for p in chosen] == ["other.zarr"] and chosen[0].resolve() == (run_dir / "wbp.zarr").resolve()
    assert ([Path(p).name for p in cp.expand_inputs([str(config)], tomo_type="wbp")]
            == ["other.zarr", "third.zarr", "tomo.zarr"])
    one_line_error(lambda: cp.expand_config(config, voxel_spacing=7.0), config, "no tomogram of voxel spacing 7.0")
    os.unlink(run_dir / "denoised.zarr")


def test_a_project_made_by_copick_itself_is_segmented_and_picked(copick_python, tmp_path, capsys, client):
    """The input side checked by the real tool: copick's own API writes the project (its config, its
    OME-Zarr tomograms); cryodask reads it as a collection, names outputs after the runs, and its
    picks of the synthetic particles score against the truth."""
    from cryodask.evaluate import evaluate_picks

    runs = {}
    for i, name in enumerate(("TS_A", "TS_B")):
        synth = synth_tomogram(shape=(64, 128, 128), voxel_size=10.0, n_particles=10, seed=20 + i)
        np.save(tmp_path / f"{name}.npy", synth.volume)
        write_picks(tmp_path / f"{name}_truth.csv", synth.particles[synth.kinds == 1])  # the 250 Å kind
        runs[name] = synth
    config, overlay = tmp_path / "project" / "config.json", tmp_path / "project" / "overlay"
    done = subprocess.run([str(copick_python), str(ROOT / "tests" / "copick_project.py"), str(config), str(overlay),
                           "10.0", *(f"{n}={tmp_path / n}.npy" for n in runs)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]

    code, out, err = run(capsys, "membranes", config, "--out", tmp_path / "m", "--method", "classical",
                         "--cluster", client.scheduler.address)
    assert code == 0, err
    for name, synth in runs.items():
        assert mrc_data(tmp_path / "m" / f"{name}_classical_predicted_mask.mrc").shape == synth.volume.shape
    code, out, err = run(capsys, "pick", config, "--out", tmp_path / "p", "--diameter", "250",
                         "--cluster", client.scheduler.address)
    assert code == 0, err
    for name in runs:
        picks = read_picks(tmp_path / "p" / f"{name}_log_picks.star")
        assert picks.pixel_size == pytest.approx(10.0)  # copick's voxel spacing, read from its NGFF scale
        scores = evaluate_picks(tmp_path / "p" / f"{name}_log_picks.star", tmp_path / f"{name}_truth.csv",
                                radius=5.0)
        assert scores["f1"] >= 0.8, (name, scores)


def test_bad_copick_options_are_one_line_errors(written, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, out, err = run(capsys, "pick", written["tomo"]["tomogram"], "--out", tmp_path / "o", "--diameter", "250",
                         "--copick", bad)
    assert code == 2 and err.strip() == (f"error: {bad}: not a copick config "
                                         "(a JSON object with pickable_objects expected)")
    code, out, err = run(capsys, "convert", written["other"]["tomogram"], "--out", tmp_path / "c", "--ngff", "0.5",
                         "--copick", tmp_path / "new.json")
    assert code == 2 and "--copick needs --ngff 0.4" in err and len(err.strip().splitlines()) == 1
