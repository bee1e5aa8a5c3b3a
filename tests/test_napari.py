"""The napari plugin in a real napari viewer on a headless X server (Xvfb): a converted
synthetic tomogram with label images and its picks open as the right layers, in Å."""

from __future__ import annotations

import os
import subprocess

import mrcfile
import numpy as np
import pytest
import zarr

napari = pytest.importorskip("napari", reason="the napari extra is not installed")

from cryodask.convert import ConvertParams, convert  # noqa: E402
from cryodask.io.copick import copick_name, write_copick  # noqa: E402
from cryodask.io.omezarr import create_image, open_image, write_labels  # noqa: E402
from cryodask.io.picks import write_picks  # noqa: E402
from cryodask.synth.tomogram import synth_tomogram  # noqa: E402

VOXEL = 10.0
ORIGIN = (1230.0, 4560.0, 7890.0)  # Å, x, y, z as an MRC header has it
MEMBRANE_RGBA = [64, 160, 255, 255]
SHEET_RGBA = [255, 200, 0, 255]


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory, client):
    """A synthetic tomogram (with an MRC origin) converted by cryodask, two label images
    written by the library, and its particles as STAR, CSV and copick JSON."""
    folder = tmp_path_factory.mktemp("napari")
    synth = synth_tomogram((32, 128, 128), voxel_size=VOXEL, seed=3, n_particles=16)
    with mrcfile.new(folder / "tomo.mrc") as mrc:
        mrc.set_data(synth.volume.astype(np.float32))
        mrc.voxel_size = VOXEL
        mrc.header.origin = ORIGIN
    report = convert([folder / "tomo.mrc"], folder / "zarr", ConvertParams(chunks=(16, 48, 48), levels=3),
                     client=client)
    assert not report.failed, [r.message for r in report.failed]
    store = folder / "zarr" / "tomo.zarr"
    write_labels(store, "membranes", synth.membranes.astype(np.uint8), colors={1: MEMBRANE_RGBA})
    instances = np.zeros(synth.membranes.shape, np.uint32)
    for i, (z, y, x) in enumerate(np.round(synth.particles).astype(int)):
        instances[max(z - 1, 0):z + 2, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = i + 1
    write_labels(store, "particles", instances)  # many ids, one listed colour: napari's per-id cycle
    scores = np.linspace(0.5, 1.0, len(synth.particles))
    star = write_picks(folder / "tomo_log_picks.star", synth.particles, {"rlnAutopickFigureOfMerit": scores},
                       pixel_size=VOXEL)
    csv = write_picks(folder / "tomo_log_picks.csv", synth.particles, {"score": scores})
    picks_dir = folder / "copick" / "ExperimentRuns" / "tomo" / "Picks"
    picks_dir.mkdir(parents=True)
    copick = write_copick(picks_dir / copick_name("cryodask-log", "0", "particle"), synth.particles, VOXEL,
                          scores=scores, user_id="cryodask-log", run_name="tomo")
    return {"store": store, "synth": synth, "scores": scores, "star": star, "csv": csv, "copick": copick}


def _ngff(path):
    """Level 0's scale and translation and the omero window, as ome-zarr (not cryodask) reads them."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(path)))()))
    transforms = node.metadata["coordinateTransformations"][0]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    translation = next((t["translation"] for t in transforms if t["type"] == "translation"), [0.0, 0.0, 0.0])
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    omero = attrs.get("ome", attrs).get("omero")
    return scale, translation, omero


def _check_store_layers(layers, store, synth):
    from napari.utils.colormaps import CyclicLabelColormap, DirectLabelColormap

    assert [(layer.name, type(layer).__name__, layer.visible) for layer in layers] == [
        ("tomo", "Image", True), ("membranes", "Labels", True), ("particles", "Labels", True)]
    image, membranes, particles = layers
    scale, translation, omero = _ngff(store)
    assert scale == [VOXEL] * 3
    for layer in layers:
        assert layer.multiscale and len(layer.data) == 3
        np.testing.assert_allclose(layer.scale, scale)
        np.testing.assert_allclose(layer.translate, translation)
        assert [str(u) for u in layer.units] == ["angstrom"] * 3
    np.testing.assert_array_equal(np.asarray(image.data[0]), synth.volume)
    if omero is not None:  # convert writes the window napari should show
        window = omero["channels"][0]["window"]
        assert image.contrast_limits == pytest.approx([window["start"], window["end"]])
    else:
        coarsest = np.asarray(open_image(store)[1][-1][...], dtype=np.float64)
        assert image.contrast_limits == pytest.approx(list(np.percentile(coarsest, (0.5, 99.5))))
    assert synth.volume.min() < image.contrast_limits[0] < image.contrast_limits[1] < synth.volume.max()
    assert isinstance(membranes.colormap, DirectLabelColormap)
    np.testing.assert_allclose(membranes.colormap.map(1), np.array(MEMBRANE_RGBA) / 255, atol=1e-3)
    assert membranes.colormap.map(0)[3] == 0
    assert isinstance(particles.colormap, CyclicLabelColormap)
    assert int(np.asarray(particles.data[0]).max()) == len(synth.particles)


def test_store_opens_with_the_plugin_as_image_and_visible_labels(viewer, tomogram, settings):
    from npe2 import PluginManager

    scale, translation, _ = _ngff(tomogram["store"])
    assert translation == pytest.approx(ORIGIN[::-1])  # convert carries the MRC origin (x, y, z) as z, y, x
    PluginManager.instance().deactivate("cryodask")  # activation runs once per process
    layers = viewer.open(tomogram["store"], plugin="cryodask")
    _check_store_layers(layers, tomogram["store"], tomogram["synth"])
    assert settings.plugins.extension2reader["*.zarr/"] == "cryodask"  # first use: remembered, as the dialog does


def test_plain_open_needs_the_preference_and_then_uses_cryodask(viewer, tomogram, settings, monkeypatch):
    """napari offers a folder to every reader that accepts folders (its builtins and cryodask)
    and asks which, unless its reader preferences name one: ``prefer`` writes them.
    ``plugin=None`` is what ``napari tomo.zarr`` passes (``Viewer.open`` defaults to builtins)."""
    from napari.errors import MultipleReaderError

    from cryodask.napari import PATTERNS, prefer

    with pytest.raises(MultipleReaderError):
        viewer.open(tomogram["store"], plugin=None)
    settings.plugins.extension2reader = {"*.csv": "napari"}  # a choice the user made stays
    assert prefer() == {p: "cryodask" for p in PATTERNS}
    assert settings.plugins.extension2reader == {"*.csv": "napari", **{p: "cryodask" for p in PATTERNS}}
    assert prefer() == {}
    layers = viewer.open(tomogram["store"], plugin=None)
    _check_store_layers(layers, tomogram["store"], tomogram["synth"])
    assert {layer.source.reader_plugin for layer in layers} == {"cryodask"}
    # the Qt path `napari tomo.zarr` takes: no reader dialog pops up (it would block: fail instead)
    import napari._qt.qt_viewer

    def dialog(*args, **kwargs):
        raise AssertionError("napari asked which reader to use")

    monkeypatch.setattr(napari._qt.qt_viewer, "handle_gui_reading", dialog)
    viewer.layers.clear()
    viewer.window._qt_viewer._qt_open([str(tomogram["store"])], stack=False)
    assert [layer.name for layer in viewer.layers] == ["tomo", "membranes", "particles"]


def test_ngff_05_store_with_translation_and_no_window(viewer, tmp_path):
    """A zarr v3 store from the library (no omero block), given a translation the way other
    tools write one: contrast limits come from the coarsest level's percentiles."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 40, 40)).astype(np.float32)
    data[:, :4] = 50.0  # a bright edge: min/max limits would wash the image out
    store = tmp_path / "v3.zarr"
    group = create_image(store, data.shape, chunks=(10, 20, 20), dtype=np.float32, voxel_size=(4.0, 2.0, 2.0),
                         levels=2, ngff="0.5")
    group["0"][...] = data
    group["1"][...] = data[::2, ::2, ::2]
    ome = group.attrs["ome"]
    for i, dataset in enumerate(ome["multiscales"][0]["datasets"]):
        dataset["coordinateTransformations"] = [dataset["coordinateTransformations"][0],
                                                {"type": "translation", "translation": [100.0 + i, 20.0, 30.0]}]
    group.attrs["ome"] = ome
    mask = np.zeros(data.shape, np.uint8)
    mask[5:10, 10:20, 10:20] = 1
    write_labels(store, "mask", mask)
    layers = viewer.open(store, plugin="cryodask")
    assert [(layer.name, type(layer).__name__, layer.visible) for layer in layers] == [
        ("v3", "Image", True), ("mask", "Labels", True)]
    np.testing.assert_allclose(layers[0].scale, [4.0, 2.0, 2.0])
    np.testing.assert_allclose(layers[0].translate, [100.0, 20.0, 30.0])
    expected = np.percentile(data[::2, ::2, ::2].astype(np.float64), (0.5, 99.5))
    assert layers[0].contrast_limits == pytest.approx(list(expected))
    assert layers[0].contrast_limits[1] == 50.0 or layers[0].contrast_limits[1] < 10
    np.testing.assert_array_equal(np.asarray(layers[1].data[0]), mask)
    np.testing.assert_allclose(layers[1].translate, [100.0, 20.0, 30.0])  # create_labels copies the image's
    viewer.layers.clear()
    (alone,) = viewer.open(store / "labels" / "mask", plugin="cryodask")  # a label image by itself
    assert (alone.name, type(alone).__name__) == ("mask", "Labels")
    np.testing.assert_allclose(alone.scale, [4.0, 2.0, 2.0])


def test_portal_mask_store_opens_as_labels(viewer, tmp_path):
    """``--layout portal`` writes each mask as its own plain OME-Zarr image, as the Portal ships
    them; its ``cryodask.segmentation`` attribute makes the plugin open it as labels, placed on the
    tomogram."""
    from cryodask.io.omezarr import write_mask_store

    data = np.random.default_rng(1).normal(size=(16, 32, 32)).astype(np.float32)
    image = tmp_path / "t.zarr"
    group = create_image(image, data.shape, chunks=(8, 16, 16), dtype=np.float32, voxel_size=(10.0,) * 3, levels=2,
                         translation=(7890.0, 4560.0, 1230.0))
    group["0"][...] = data
    mask = np.zeros(data.shape, np.uint8)
    mask[4:8, 8:20, 8:20] = 1
    write_mask_store(tmp_path / "t_membranes.zarr", mask, image)
    (layer,) = viewer.open(tmp_path / "t_membranes.zarr", plugin="cryodask")
    assert (layer.name, type(layer).__name__, layer.visible) == ("t_membranes", "Labels", True)
    np.testing.assert_allclose(layer.translate, [7890.0, 4560.0, 1230.0])
    np.testing.assert_array_equal(np.asarray(layer.data[0]), mask)


@pytest.mark.parametrize("kind", ["star", "csv", "copick"])
def test_picks_open_as_points_in_angstrom_on_their_tomogram(viewer, tomogram, kind, settings):
    """Alone, picks sit at pixels × voxel size; opened over their tomogram they take its
    translation (the MRC origin) and land on the particles' labels."""
    from cryodask.napari import prefer

    prefer()  # the CSV and JSON patterns: napari's builtins claim those suffixes too
    synth = tomogram["synth"]
    (alone,) = viewer.open(tomogram[kind], plugin=None)
    assert type(alone).__name__ == "Points" and alone.visible and alone.source.reader_plugin == "cryodask"
    np.testing.assert_allclose(alone.scale, [VOXEL] * 3)
    np.testing.assert_allclose([alone.data_to_world(p) for p in alone.data], synth.particles * VOXEL, atol=1e-6)
    np.testing.assert_allclose(alone.features["score"], tomogram["scores"], rtol=1e-5)  # STAR keeps 6 digits
    viewer.layers.clear()
    image, _, particles = viewer.open(tomogram["store"], plugin="cryodask")
    (points,) = viewer.open(tomogram[kind], plugin=None)
    _, translation, _ = _ngff(tomogram["store"])
    world = np.array([points.data_to_world(p) for p in points.data])
    np.testing.assert_allclose(world, synth.particles * VOXEL + translation, atol=1e-6)
    voxels = np.round([particles.world_to_data(w) for w in world]).astype(int)
    ids = np.asarray(particles.data[0])[tuple(voxels.T)]
    np.testing.assert_array_equal(ids, np.arange(1, len(synth.particles) + 1))


def test_not_ours_is_left_to_other_readers(tmp_path):
    from cryodask.napari.reader import get_reader

    (tmp_path / "plain").mkdir()
    zarr.open_group(str(tmp_path / "raw.zarr"), mode="w").create_array("a", shape=(4,), dtype="u1")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "other.json").write_text('{"layers": []}')
    for path in ["plain", "raw.zarr", "table.csv", "other.json", "missing.star"]:
        assert get_reader(str(tmp_path / path)) is None, path


def test_screenshot_shows_labels_over_a_windowed_tomogram(viewer, tomogram, tmp_path):
    viewer.open(tomogram["store"], plugin="cryodask")
    viewer.open(tomogram["star"], plugin="cryodask")
    z = int(np.argmax(tomogram["synth"].membranes.sum(axis=(1, 2))))
    viewer.dims.set_point(0, viewer.layers["tomo"].data_to_world((z, 0, 0))[0])
    viewer.reset_view()
    shot = viewer.screenshot(str(tmp_path / "napari.png"), canvas_only=True)[..., :3].astype(int)
    out = os.environ.get("CRYODASK_NAPARI_SCREENSHOT")
    if out:
        viewer.screenshot(out, canvas_only=True)
    grey = (shot.max(axis=2) - shot.min(axis=2)) < 8
    blue = (shot[..., 2] - shot[..., 0] > 60)  # the membranes' colour over the grey tomogram
    assert grey.mean() > 0.05 and blue.mean() > 0.002
    tomogram_pixels = shot[grey & (shot.sum(axis=2) > 0)].mean(axis=1)
    assert tomogram_pixels.std() > 20 and (tomogram_pixels >= 250).mean() < 0.2  # windowed, not saturated


def test_prefer_command_writes_napari_settings(tmp_path):
    """``python -m cryodask.napari``, as a user runs it once after installing the extra."""
    import sys

    import yaml

    config = tmp_path / "napari" / "settings.yaml"
    run = subprocess.run([sys.executable, "-m", "cryodask.napari"], env={**os.environ, "NAPARI_CONFIG": str(config)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(config.read_text())["plugins"]["extension2reader"]["*.zarr/"] == "cryodask"


def test_a_broken_picks_file_is_a_one_line_error(tmp_path):
    from conftest import one_line_error
    from cryodask.napari.reader import get_reader

    bad = tmp_path / "bad_picks.star"
    bad.write_text("data_particles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\nabc def\n")
    one_line_error(lambda: get_reader(str(bad))(str(bad)), bad, "not numbers")
