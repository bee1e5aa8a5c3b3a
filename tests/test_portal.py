"""The NGFF ``omero`` contrast window and ``--layout portal`` (the CryoET Data Portal's layout).

Every store written here is checked with ome-zarr-models (the reference validator of the NGFF
spec), the Portal layout from the zarr metadata files themselves, and the window against
numpy's percentiles of the data.
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import zarr

from conftest import make_cryosam_weights, validate_ome_zarr as validate, write_raw_mrc
from cryodask.cli import main
from cryodask.convert import ConvertParams, convert
from cryodask.io.omezarr import open_image, write_labels

PORTAL_COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}


def zarr_v2_metadata(store, level) -> dict:
    return json.loads((store / str(level) / ".zarray").read_text())


def assert_portal_arrays(store, dtype: str, levels: int = 3):
    """What the Portal's ingestion writes (ome-zarr-py's write_multiscale on zarr 2, 256^3 chunks)."""
    attrs = json.loads((store / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4" and len(attrs["multiscales"][0]["datasets"]) == levels
    assert json.loads((store / ".zgroup").read_text())["zarr_format"] == 2
    for level in range(levels):
        meta = zarr_v2_metadata(store, level)
        assert meta["zarr_format"] == 2 and meta["dimension_separator"] == "/"
        assert meta["chunks"] == [256, 256, 256], (level, meta["chunks"])  # at every level, even smaller ones
        assert meta["compressor"] == PORTAL_COMPRESSOR
        assert meta["dtype"] == dtype


def assert_window(window: dict, data: np.ndarray):
    """min/max are the data's range; start/end its 0.5 and 99.5 percentiles (to 0.1 % of rank)."""
    assert window["min"] == pytest.approx(float(data.min()), abs=0) and window["max"] == float(data.max())
    for key, p in (("start", 0.5), ("end", 99.5)):
        lo, hi = np.percentile(data, [p - 0.1, p + 0.1])
        assert lo <= window[key] <= hi, (key, window[key], np.percentile(data, p))
    assert window["start"] == pytest.approx(np.percentile(data, 0.5), rel=0.02)
    assert window["end"] == pytest.approx(np.percentile(data, 99.5), rel=0.02)


def tomogram(shape=(40, 96, 80), dtype=np.float32, seed=0) -> np.ndarray:
    """Noise over a bright sphere and a dark slab: a skewed histogram, unlike blocks."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    data = rng.normal(size=shape) * 3 + 40 * ((z - 20) ** 2 + (y - 40) ** 2 + (x - 30) ** 2 < 15**2) - 25 * (x < 12)
    return data.astype(dtype)


# ------------------------------------------------------------------ the contrast window

@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_convert_writes_an_omero_window_of_the_data(tmp_path, client, ngff):
    from ome_zarr_models.common.omero import Omero

    data = tomogram()
    write_raw_mrc(tmp_path / "t.mrc", data, voxel_size=7.0)
    report = convert([tmp_path / "t.mrc"], tmp_path / "out", ConvertParams(chunks=(8, 32, 32), levels=3, ngff=ngff),
                     client=client)
    assert [r.status for r in report.results] == ["converted"] and report.results[0].blocks_written > 4
    store = tmp_path / "out" / "t.zarr"
    image = validate(store)
    attrs = zarr.open_group(str(store), mode="r").attrs.asdict()
    omero = attrs["omero"] if ngff == "0.4" else attrs["ome"]["omero"]
    if ngff == "0.4":
        assert image.attributes.omero is not None and "omero" not in attrs.get("ome", {})
    else:
        assert "omero" not in attrs  # 0.5 keeps every OME key under "ome"
    Omero.model_validate(omero)  # the model ome-zarr-models has for the block (0.4's Image uses it)
    (channel,) = omero["channels"]
    assert channel["active"] is True and channel["label"] == "t" and channel["color"] == "FFFFFF"
    assert_window(channel["window"], data)
    assert omero["rdefs"]["defaultZ"] == 20


def test_window_of_an_integer_tomogram_and_of_one_block(tmp_path, client):
    """An int16 tomogram in one block (under 2**18 voxels the sketch holds its exact quantiles) and in many."""
    data = (tomogram(shape=(32, 96, 80), seed=4) * 20).astype(np.int16)
    write_raw_mrc(tmp_path / "t.mrc", data)
    for chunks, folder in (((64, 128, 128), "one"), ((8, 16, 16), "many")):
        convert([tmp_path / "t.mrc"], tmp_path / folder, ConvertParams(chunks=chunks, levels=2), client=client)
        window = zarr.open_group(str(tmp_path / folder / "t.zarr"), mode="r").attrs["omero"]["channels"][0]["window"]
        assert_window(window, data)
    one = zarr.open_group(str(tmp_path / "one" / "t.zarr"), mode="r").attrs["omero"]["channels"][0]["window"]
    assert (one["start"] == pytest.approx(np.percentile(data, 0.5))
            and one["end"] == pytest.approx(np.percentile(data, 99.5)))


def test_merge_window_bounds_and_empty_blocks():
    from cryodask.io.omezarr import merge_window, sketch

    rng = np.random.default_rng(2)
    blocks = [rng.normal(loc=i, size=(4, 50, 50)).astype(np.float32) for i in range(6)]
    blocks.append(np.full((2, 2, 2), np.nan, np.float32))  # nothing finite: weighs nothing
    with_inf = blocks[0].copy()
    with_inf[0, 0, 0] = np.inf
    blocks[0] = with_inf
    window = merge_window([sketch(b) for b in blocks])
    finite = np.concatenate([b[np.isfinite(b)] for b in blocks])
    assert_window(window, finite)
    assert merge_window([sketch(np.full((3, 3, 3), np.nan))]) is None


# ------------------------------------------------------------------ --layout portal

def test_convert_layout_portal_is_the_portals_layout(tmp_path, client, capsys):
    data = tomogram(shape=(40, 300, 90), dtype=np.int16, seed=1)
    write_raw_mrc(tmp_path / "t.mrc", data, voxel_size=(5.0, 5.0, 6.0))
    out = tmp_path / "portal"
    code = main(["convert", str(tmp_path / "t.mrc"), "--out", str(out), "--layout", "portal", "--chunks", "8,32,32",
                 "--cluster", client.scheduler.address])
    assert code == 0, capsys.readouterr()
    store = out / "t.zarr"
    validate(store)
    assert_portal_arrays(store, "<f4")  # float32, whatever the input's type and --chunks
    _, arrays, vs, _ = open_image(store)
    assert vs == (6.0, 5.0, 5.0) and [a.shape for a in arrays] == [(40, 300, 90), (20, 150, 45), (10, 75, 23)]
    np.testing.assert_array_equal(arrays[0][...], data.astype(np.float32))
    assert_window(zarr.open_group(str(store), mode="r").attrs["omero"]["channels"][0]["window"], data)
    # the default layout is as before: the chunks asked for, clipped to each level
    convert([tmp_path / "t.mrc"], tmp_path / "default", ConvertParams(chunks=(8, 32, 32)), client=client)
    assert zarr_v2_metadata(tmp_path / "default" / "t.zarr", 2)["chunks"] == [8, 32, 23]
    assert zarr_v2_metadata(tmp_path / "default" / "t.zarr", 0)["dtype"] == "<i2"


def test_layout_errors_are_one_line(tmp_path, client, capsys):
    write_raw_mrc(tmp_path / "t.mrc", tomogram(shape=(8, 16, 16)))
    for extra, match in ((["--layout", "portal", "--ngff", "0.5"], "--layout portal is NGFF 0.4"),
                         (["--layout", "flat"], "--layout must be one of default, portal")):
        code = main(["convert", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code != 0 and match in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    code = main(["postprocess", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "m.mrc"), "--layout", "portal"])
    err = capsys.readouterr().err
    assert code != 0 and "must end in .zarr" in err and len(err.strip().splitlines()) == 1, err


def test_default_label_images_validate(tmp_path, client):
    data = tomogram(shape=(24, 40, 40))
    write_raw_mrc(tmp_path / "t.mrc", data)
    convert([tmp_path / "t.mrc"], tmp_path / "out", ConvertParams(chunks=(8, 16, 16)), client=client)
    store = tmp_path / "out" / "t.zarr"
    write_labels(store, "bright", (data > 20).astype(np.uint8))
    write_labels(store, "dark", (data < -20).astype(np.uint8), colors={1: [0, 0, 255, 255]})
    validate(store)


def _max_pool(a: np.ndarray) -> np.ndarray:
    a = np.pad(a, [(0, n % 2) for n in a.shape])
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).max(axis=(1, 3, 5))


def assert_mask_store(path, like, expected: np.ndarray, dtype="|i1"):
    """A Portal segmentation store: valid, the Portal's arrays, the tomogram's levels and scales."""
    validate(path)
    assert_portal_arrays(path, dtype)
    _, levels, vs, _ = open_image(path)
    _, image, image_vs, _ = open_image(like)
    assert vs == image_vs and [a.shape for a in levels] == [a.shape for a in image]
    np.testing.assert_array_equal(levels[0][...], expected)
    for lower, upper in zip(levels[1:], levels):
        np.testing.assert_array_equal(lower[...], _max_pool(upper[...]))  # the Portal's (mean > 0)


def test_membranes_layout_portal_writes_masks_as_their_own_stores(tmp_path, client, capsys, monkeypatch):
    from cryodask.synth.tomogram import synth_tomogram, write_tomogram

    monkeypatch.delenv("CRYODASK_WEIGHTS", raising=False)
    paths = write_tomogram(tmp_path / "tomo.mrc", synth_tomogram((48, 96, 96), voxel_size=10.0, seed=3, snr=0.1))
    out = tmp_path / "out"
    code = main(["membranes", str(paths["tomogram"]), "--out", str(out), "--post-process", "--layout", "portal",
                 "--cluster", client.scheduler.address])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    store = out / "tomo.zarr"
    validate(store)
    assert_portal_arrays(store, "<f4")
    assert not (store / "labels").exists(), "the Portal keeps masks out of the tomogram"
    for kind in ("mask", "post_processed_mask"):
        path = out / f"tomo_classical_predicted_{kind}.zarr"
        assert f"wrote {path}" in stdout
        with mrcfile.open(out / f"tomo_classical_predicted_{kind}.mrc") as mrc:
            exported = np.asarray(mrc.data)
        assert exported.any() and set(np.unique(exported)) <= {0, 1}
        assert_mask_store(path, store, exported.astype(np.int8))


def test_postprocess_layout_portal_and_its_component_labels(tmp_path, client):
    from cryodask.postprocess.pipeline import PostprocessParams, postprocess
    from cryodask.synth import synth_tomogram

    mask = synth_tomogram((40, 72, 64), seed=3).membranes.astype(np.uint8)
    write_raw_mrc(tmp_path / "m.mrc", mask, voxel_size=8.0)
    options = dict(chunks=(16, 32, 32), client=client)
    params = PostprocessParams(min_slices=10, labels=True)
    portal_params = PostprocessParams(min_slices=10, labels=True, layout="portal")
    default = postprocess(tmp_path / "m.mrc", tmp_path / "default.zarr", params, **options)
    portal = postprocess(tmp_path / "m.mrc", tmp_path / "portal.zarr", portal_params, **options)
    assert portal.n_kept == default.n_kept >= 1
    assert portal.files == [tmp_path / "portal.zarr", tmp_path / "portal_components.zarr"]
    _, kept, _, _ = open_image(tmp_path / "default.zarr")
    expected = kept[0][...]
    write_raw_mrc(tmp_path / "like.mrc", mask.astype(np.float32), voxel_size=8.0)  # the levels the Portal writes
    convert([tmp_path / "like.mrc"], tmp_path / "like", ConvertParams(layout="portal"), client=client)
    assert_mask_store(tmp_path / "portal.zarr", tmp_path / "like" / "like.zarr", expected.astype(np.int8))
    components = tmp_path / "portal_components.zarr"
    validate(components)
    assert_portal_arrays(components, "<u4")
    _, labels, _, _ = open_image(components)
    _, default_labels, _, _ = open_image(tmp_path / "default.zarr" / "labels" / "components")
    np.testing.assert_array_equal(labels[0][...], default_labels[0][...])
    np.testing.assert_array_equal(labels[1][...], labels[0][::2, ::2, ::2])  # ids are never blended
    assert postprocess(tmp_path / "m.mrc", tmp_path / "portal.zarr", portal_params, **options).status == "skipped"


def test_cryosam_labels_in_the_portal_layout(tmp_path, client):
    pytest.importorskip("torch")
    pytest.importorskip("sam2")

    from cryodask.io.picks import write_picks
    from cryodask.io.volumes import open_volume
    from cryodask.picking.pipeline import pick, pick_params
    from cryodask.synth import synth_tomogram

    weights = make_cryosam_weights(tmp_path / "weights")
    tomo = synth_tomogram((16, 48, 40), voxel_size=10.0, seed=1, snr=1.0)
    write_raw_mrc(tmp_path / "t.mrc", tomo.volume, voxel_size=10.0)
    write_picks(tmp_path / "prompt.star", tomo.particles[:1])
    params = pick_params(method="cryosam", weights=weights, config="sam2.1_hiera_t", image_size=128,
                         feature_image_size=56, diameter=250, top_k=4)
    result = pick(open_volume(tmp_path / "t.mrc", chunks=(8, 24, 24)), tmp_path / "out", params,
                  prompts_file=tmp_path / "prompt.star", client=client, layout="portal")
    store = tmp_path / "out" / "t.zarr"
    instances, semantic = tmp_path / "out" / "t_cryosam_instances.zarr", tmp_path / "out" / "t_cryosam_semantic.zarr"
    assert {instances, semantic} <= set(result.files) and not (store / "labels").exists()
    validate(store)
    assert_portal_arrays(store, "<f4")
    validate(instances)
    assert_portal_arrays(instances, "<u4")
    labels = open_image(instances)[1][0][...]
    assert set(np.unique(labels)) <= set(range(len(result.picks) + 1))
    assert_mask_store(semantic, store, (labels > 0).astype(np.int8))


