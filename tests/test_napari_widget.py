"""The click-to-cluster widget in a real napari viewer (Xvfb) on a real LocalCluster: opened from
the plugin menu, a click segments a synthetic particle (classical: scored against its truth;
random SAM2: the plumbing), find all returns scored points over the tomogram and the collection,
export writes what ``cryodask evaluate picks`` scores and copick's models accept, the sliders
filter without recomputing, the viewer's thread never waits, cancel cancels the futures, and a
lost scheduler is one message."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari extra is not installed")

from conftest import write_raw_mrc  # noqa: E402
from test_copick import copick_python  # noqa: E402, F401  (the fixture: copick 1.31's own environment)
from cryodask.synth.tomogram import synth_tomogram  # noqa: E402

VOXEL = 10.0
SHAPE = (32, 96, 96)


def wait(widget, timeout=120.0) -> float:
    """Run the viewer's event loop until the widget has no job left; returns the longest single
    pass of the loop (s): what a user would feel as a frozen viewer."""
    from qtpy.QtWidgets import QApplication

    app, longest, end = QApplication.instance(), 0.0, time.monotonic() + timeout
    while True:
        clock = time.perf_counter()
        app.processEvents()
        longest = max(longest, time.perf_counter() - clock)
        if not widget.busy():
            app.processEvents()
            return longest
        assert time.monotonic() < end, f"still busy after {timeout} s: {widget.messages[-3:]}"
        time.sleep(0.01)


def ball(centre, radius):
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def layer_mask(viewer, name):
    """A labels layer placed by its translate, back on the tomogram's voxel grid."""
    layer = next(layer for layer in viewer.layers if layer.name == name)
    out = np.zeros(SHAPE, bool)
    start = np.round((np.asarray(layer.translate) - 0.0) / VOXEL).astype(int)
    data = np.asarray(layer.data) > 0
    out[tuple(slice(s, s + n) for s, n in zip(start, data.shape))] = data
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("widget")
    (folder / "in").mkdir()
    tomograms = {}
    for i, seed in enumerate((4, 8)):  # three particles of 250 Å each
        synth = synth_tomogram(SHAPE, voxel_size=VOXEL, seed=seed, n_particles=12)
        write_raw_mrc(folder / "in" / f"TS_{i}.mrc", synth.volume, voxel_size=VOXEL)
        tomograms[f"TS_{i}"] = synth
    return folder, tomograms


def dock(viewer):
    """The widget as a user opens it: Plugins > cryodask > Click to cluster."""
    _, widget = viewer.window.add_plugin_dock_widget("cryodask", "Click to cluster")
    return widget


def shot(viewer, path):
    """The whole window, the widget included; also kept in ``$CRYODASK_NAPARI_SCREENSHOTS`` if set."""
    import os
    import shutil

    viewer.screenshot(str(path), canvas_only=False)
    keep = os.environ.get("CRYODASK_NAPARI_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / path.name)
    return path


def test_click_accept_find_all_export_classical(viewer, collection, cluster, tmp_path):
    from cryodask.cli import main
    from cryodask.io.picks import read_picks, write_picks

    folder, tomograms = collection
    synth = tomograms["TS_0"]
    widget = dock(viewer)
    widget.out.setText(str(tmp_path / "out"))
    widget.cluster.setText(cluster.scheduler_address)
    widget.connect()
    widget.open(folder / "in")
    wait(widget)  # the files are read in a job (napari's first image layer then takes ~1 s to draw)
    assert [widget.tomograms.itemText(i) for i in range(widget.tomograms.count())] == ["TS_0", "TS_1"]
    assert widget.session.method == "classical"
    assert widget.image.scale.tolist() == [VOXEL] * 3

    large = synth.particles[synth.kinds == 1]
    dices, longest = [], 0.0
    for centre in large[:2]:
        widget.positive.add(centre)  # a click: its data event segments the object
        assert widget.busy()
        longest = max(longest, wait(widget))
        truth = ball(centre, synth.diameters_A[1] / 2 / VOXEL)
        mask = layer_mask(viewer, "instance")
        dices.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
        if len(dices) == 1:
            shot(viewer, tmp_path / "1-click.png")
        widget.accept()
    assert min(dices) > 0.5, dices  # the classical blob against the particle's ball
    assert longest < 1.0, f"the viewer's loop waited {longest:.2f} s in one pass"
    assert len(widget.session.accepted) == 2 and widget._layer("accepted") is not None

    # a negative click beside the centre takes the voxels nearer to it than to the positive one
    centre = large[2]
    widget.positive.add(centre)
    negative = centre + np.array([0, 0, 4.0])
    widget.negative.add(negative)
    wait(widget)
    mask = layer_mask(viewer, "instance")
    zz, yy, xx = np.nonzero(mask)
    points = np.stack([zz, yy, xx], 1)
    assert len(points) and (np.linalg.norm(points - negative, axis=1) >= np.linalg.norm(points - centre, axis=1)).all()
    widget.accept()

    widget.find_all(True)
    wait(widget)
    layer = widget._layer("detections")
    viewer.dims.set_point(0, float(np.round(layer.data[0, 0])) * VOXEL)  # the best detection's slice
    shot(viewer, tmp_path / "2-find-all.png")
    scores = layer.features["score"].to_numpy()
    assert len(layer.data) >= 3 and np.all(np.diff(scores) <= 0)
    assert dict(widget.pending_partial).keys() == {"TS_0", "TS_1"}  # both tomograms searched
    assert (tmp_path / "out" / "TS_1_classical_picks.star").exists()
    # the slider filters the points shown; nothing is recomputed
    before = len(widget.session.jobs)
    widget.similarity.set_value(float(np.median(scores)))
    assert layer.shown.sum() == (scores >= np.median(scores)).sum() < len(scores)
    widget.similarity.set_value(widget.similarity.low)
    assert layer.shown.all() and not widget.busy() and len(widget.session.jobs) <= before

    widget.export()
    wait(widget)
    star = tmp_path / "out" / "TS_0_classical_picks.star"
    assert read_picks(star).coords.shape[0] == len(scores) + len(widget.session.accepted) - sum(
        np.linalg.norm(layer.data[:, None] - np.array([c for c in map(_centre, widget.session.accepted)])[None],
                       axis=2).min(1) <= synth.diameters_A[1] / 2 / VOXEL)
    truth = write_picks(tmp_path / "truth.star", large, pixel_size=VOXEL)
    assert main(["evaluate", "picks", str(star), str(truth), "--radius", "5", "--out", str(tmp_path / "ev")]) == 0
    import pandas as pd

    metrics = pd.read_csv(tmp_path / "ev" / "picks_metrics.csv")
    assert float(metrics["recall"].iloc[0]) >= 0.75, metrics.to_dict("records")
    copick_json = tmp_path / "out" / "copick" / "ExperimentRuns" / "TS_0" / "Picks" / \
        "cryodask-classical_0_particle.json"
    from test_copick import copick_models

    picks = copick_models().CopickPicksFile.model_validate_json(copick_json.read_text())
    assert picks.run_name == "TS_0" and len(picks.points) == read_picks(star).coords.shape[0]
    labels = tmp_path / "out" / "TS_0.zarr" / "labels" / "classical_instances"
    from conftest import validate_ome_zarr

    validate_ome_zarr(labels)
    from cryodask.io.omezarr import open_image

    assert int(np.asarray(open_image(labels)[1][0][...]).max()) == len(widget.session.accepted)

    # membranes: the classical filter, its scores kept; the threshold slider re-cuts them
    widget.membranes()
    wait(widget)
    shot(viewer, tmp_path / "3-membranes.png")
    membranes = widget._layer("membranes")
    first = int(np.asarray(membranes.data).sum())
    truth = synth.membranes > 0
    cut = np.asarray(membranes.data)
    assert 2 * (cut & truth).sum() / (cut.sum() + truth.sum()) > 0.3
    widget.threshold.set_value(widget.threshold.high)
    assert int(np.asarray(widget._layer("membranes").data).sum()) < first and not widget.busy()


def _centre(instance):
    from cryodask.prompting.instances import centre

    return centre(instance)


def test_random_sam2_and_dinov2_plumbing(viewer, collection, cluster, tmp_path):
    """With SAM2 (hiera-t, random weights) and a random DINOv2: a click gives an instance in the
    volume near the click, find all gives scored points, export writes the cryosam files."""
    from conftest import make_cryosam_weights
    from cryodask.picking.params import pick_params

    weights = make_cryosam_weights(tmp_path / "weights")
    folder, tomograms = collection
    synth = tomograms["TS_0"]
    widget = dock(viewer)
    widget.weights.setText(str(weights))
    widget.cluster.setText(cluster.scheduler_address)
    widget.connect()  # CryoSAM from the weights folder: the SAM2 it holds, its DINOv2
    assert widget.session.params.config == "sam2.1_hiera_t"
    assert Path(widget.session.params.dinov2_checkpoint) == weights / "dinov2-large"
    # the random models were made for small inputs: use those (a trained model runs at its own)
    widget.session.params = pick_params("cryosam", weights=weights, config="sam2.1_hiera_t", image_size=128,
                                        feature_image_size=56, diameter=250, top_k=8)
    widget.out.setText(str(tmp_path / "out"))
    widget.open(folder / "in" / "TS_0.mrc")
    wait(widget)  # the files are read in a job
    assert widget.session.method == "cryosam"
    centre = synth.particles[0]
    widget.positive.add(centre)
    wait(widget, timeout=300)
    instance = widget.session.instance
    box, mask = instance
    assert mask.dtype == bool and mask.shape == tuple(b.stop - b.start for b in box)
    assert all(0 <= b.start <= b.stop <= n for b, n in zip(box, SHAPE))
    if mask.any():  # random weights need not segment anything; what they segment holds the click's slice
        assert any(b.start <= round(c) < b.stop for b, c in zip(box, centre))
        assert widget._layer("instance") is not None
    widget.accept()
    if not widget.session.accepted:  # random SAM2 gave nothing: accept the click itself as a 1-voxel object
        from cryodask.prompting.selfprompt import Instance

        c = np.round(centre).astype(int)
        widget.session.accepted.append(Instance(tuple(slice(v, v + 1) for v in c), np.ones((1, 1, 1), bool),
                                                tuple(centre)))
    widget.find_all()
    wait(widget, timeout=300)
    layer = widget._layer("detections")
    assert 1 <= len(layer.data) <= 8 and np.all((layer.data >= 0) & (layer.data < np.array(SHAPE)))
    widget.export()
    wait(widget, timeout=300)
    assert (tmp_path / "out" / "TS_0_cryosam_picks.star").exists()
    assert not [m for m in widget.messages if "error" in m.lower() or "Traceback" in m]


def test_cancel_cancels_the_futures_and_a_lost_scheduler_is_one_message(viewer, collection, tmp_path):
    import logging

    from distributed import LocalCluster

    folder, _ = collection
    widget = dock(viewer)
    widget.open(tmp_path / "nothing.mrc")  # read in a job: its error comes back as one line
    wait(widget)
    assert widget.messages[-1].startswith("open: ") and "nothing.mrc" in widget.messages[-1]
    widget.cluster.setText("slurm")
    widget.profile.setText(f"{tmp_path / 'none.yaml'}:gpu")
    widget._say_errors(widget.connect)
    assert "none.yaml" in widget.messages[-1] and "\n" not in widget.messages[-1] and widget.session.client is None
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, silence_logs=logging.CRITICAL,
                      dashboard_address=":0") as own:
        widget.cluster.setText(own.scheduler_address)
        widget.profile.setText("")
        widget.connect()
        widget.open(folder / "in" / "TS_0.mrc")
        wait(widget)  # the files are read in a job
        session = widget.session

        def slow(job):
            return session._wait(job, [session.client.submit(time.sleep, 60, pure=False)])

        widget.run(session._start("slow", slow), lambda _: None)
        time.sleep(0.5)
        widget.poll()
        assert widget.busy() and session.client.futures
        assert widget.progress.maximum() == 0 and widget.status.text().startswith("slow: ")  # busy, timed
        widget.cancel()
        longest = wait(widget, timeout=10)
        assert widget.messages[-1] == "slow: cancelled" and longest < 1.0
        assert not [k for k, s in session.client.futures.items() if s.status == "pending"]

        widget.run(session._start("slow", slow), lambda _: None)
        time.sleep(0.5)
    # the scheduler is gone (the cluster closed under the widget): one line, no hang
    clock = time.monotonic()
    wait(widget, timeout=60)
    lost = [m for m in widget.messages if m.startswith("lost the scheduler")]
    assert len(lost) == 1 and own.scheduler_address in lost[0], widget.messages
    assert time.monotonic() - clock < 60
    for _ in range(5):
        widget.poll()
    assert len([m for m in widget.messages if m.startswith("lost the scheduler")]) == 1
    # a new job says the same one line, without starting anything
    widget._say_errors(widget.find_all)
    assert widget.messages[-1] == lost[0] and not widget.busy()
    widget.session.close()  # the client stops trying to reconnect


def test_a_copick_project_made_by_copick_opens_run_by_run(viewer, collection, cluster, tmp_path,
                                                          copick_python):  # noqa: F811
    """copick's own API writes the project; the widget lists its runs and segments a click in one."""
    import os
    import subprocess

    from conftest import ROOT

    folder, tomograms = collection
    python = copick_python
    for name, synth in tomograms.items():
        np.save(tmp_path / f"{name}.npy", synth.volume)
    config = tmp_path / "project" / "config.json"
    done = subprocess.run([str(python), str(ROOT / "tests" / "copick_project.py"), str(config),
                           str(tmp_path / "project" / "overlay"), str(VOXEL),
                           *(f"{n}={tmp_path / n}.npy" for n in tomograms)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    widget = dock(viewer)
    widget.cluster.setText(cluster.scheduler_address)
    widget.connect()
    widget.open(config)
    wait(widget)  # the files are read in a job
    assert [widget.tomograms.itemText(i) for i in range(widget.tomograms.count())] == list(tomograms)
    widget.tomograms.setCurrentIndex(1)
    wait(widget)
    synth = tomograms["TS_1"]
    assert widget.session.item.name == "TS_1" and widget.session.volume.voxel_size == (VOXEL,) * 3
    np.testing.assert_allclose(np.asarray(widget.image.data[5]), synth.volume[5], atol=1e-5)
    centre = synth.particles[synth.kinds == 1][0]
    widget.positive.add(centre)
    wait(widget)
    mask = layer_mask(viewer, "instance")
    truth = ball(centre, synth.diameters_A[1] / 2 / VOXEL)
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.5


def test_a_real_bright_tomogram_opens_in_angstrom_with_its_polarity(viewer, data_dir, cluster):
    """A real crop (cylindra's microtubule, TIFF, bright density, 1.052 nm voxels): opened at its
    own voxel size, read as bright, and a click on the microtubule's wall gives an object."""
    widget = dock(viewer)
    widget.cluster.setText(cluster.scheduler_address)
    widget.connect()
    widget.open(data_dir / "tomograms" / "cylindra_13pf_MT.tif")
    wait(widget)  # the files are read in a job
    assert widget.session.polarity.polarity == "bright" and "bright density" in widget.messages[-1]
    np.testing.assert_allclose(widget.image.scale, [10.52] * 3, rtol=1e-3)
    widget.diameter.setValue(250.0)  # a microtubule: 25 nm across
    volume = np.asarray(widget.session.read(tuple(slice(0, n) for n in widget.session.volume.shape)))
    z, y = volume.shape[0] // 2, volume.shape[1] // 2
    x = int(np.argmin(volume[z, y]))  # the densest voxel across the middle: the microtubule's wall
    widget.positive.add([z, y, x])
    wait(widget)
    assert widget.session.instance is not None and np.asarray(widget.session.instance[1]).any(), widget.messages
