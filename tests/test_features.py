"""DINOv2 tri-view features: real (tiny, random) transformers DINOv2 models, a real LocalCluster,
real MRC files and zarr stores, checked against CryoSAM's whole-volume algorithm."""

from __future__ import annotations

import dataclasses
import math
import shutil
import warnings

import numpy as np
import pytest
import zarr

from cryodask.errors import InputError
from cryodask.prompting.features import FeatureParams, extract_features, open_features, plan_tasks

from conftest import write_raw_mrc

SHAPE = (20, 40, 36)  # non-cubic: every view has its own slice count and aspect ratio
PARAMS = FeatureParams(image_size=56, slab=16, batch=3)  # 4x4 patches; several tasks per view
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
            image_size=56)


def with_checkpoint(checkpoint, params=PARAMS):
    """``params`` reading the DINOv2 folder ``checkpoint``."""
    return dataclasses.replace(params, checkpoint=str(checkpoint))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Randomly initialised DINOv2 folders, with and without registers, as save_pretrained writes them."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(root / "plain")
    registers = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **TINY))
    registers.save_pretrained(root / "registers")
    return {"plain": root / "plain", "registers": root / "registers"}


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*(np.linspace(0, 3, n) for n in SHAPE), indexing="ij")
    return (5 + 3 * np.sin(z * 2 + y) * np.cos(x * 3) + rng.normal(0, 1, SHAPE)).astype(np.float32)


@pytest.fixture
def tomo(tmp_path, volume):
    return write_raw_mrc(tmp_path / "tomo.mrc", volume, voxel_size=12.5)


def cryosam_reference(model_dir, volume, ratios, image_size):
    """CryoSAM on the whole volume (``dino_utils.extract_dino`` + ``utils.sample``): every slice of
    every view through DINOv2 (one view per forward pass here), then each grid point
    (i*r, j*r, k*r) looked up with grid_sample (bilinear, align_corners) in the three views,
    concatenated z | y | x."""
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    grid = image_size // 14
    mean, std = volume.mean(dtype=np.float64), volume.std(dtype=np.float64)
    maps = {}
    with torch.inference_mode():
        for axis, view in enumerate("zyx"):
            normed = np.moveaxis((volume - mean) / std, axis, 0)  # every slice of this view
            x = torch.as_tensor(np.repeat(normed[:, None], 3, axis=1), dtype=torch.float32)
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=True)
            tokens = model(pixel_values=x).last_hidden_state[:, -grid * grid:]
            maps[view] = tokens.reshape(len(x), grid, grid, -1)  # (N, L, L, C), CryoSAM's cache layout
        size = torch.as_tensor([n - 1 for n in volume.shape], dtype=torch.float32)
        out = {}
        for r in ratios:
            shape = [math.ceil(n / r) for n in volume.shape]
            zyx = torch.stack(torch.meshgrid(*(torch.arange(n) * r for n in shape), indexing="ij"), -1).reshape(-1, 3)
            normed = (2 * zyx / size - 1)[:, None, None]
            views = []
            for axis, (view, coords) in enumerate(zip("zyx", ([2, 1], [2, 0], [1, 0]))):
                feats = maps[view][zyx[:, axis]].permute(0, 3, 1, 2)
                views.append(F.grid_sample(feats, normed[..., coords], align_corners=True).flatten(1))
            out[r] = torch.cat(views, 1).reshape(*shape, -1).numpy()
    return out


# ------------------------------------------------------------------ the model wrapper

@pytest.mark.parametrize("kind", ["plain", "registers"])
def test_patch_features(models, kind):
    import torch
    import torch.nn.functional as F

    from cryodask.models.dinov2 import describe_dinov2, load_dinov2, patch_features

    model = load_dinov2(models[kind], "cpu")
    assert load_dinov2(models[kind], "cpu") is model  # once per process
    assert not model.training
    assert describe_dinov2(models[kind]).num_register_tokens == (4 if kind == "registers" else 0)
    slices = np.random.default_rng(0).normal(size=(3, 40, 36)).astype(np.float32)
    feats = patch_features(model, slices, image_size=56)
    assert feats.shape == (3, 4, 4, 32) and feats.dtype == np.float32
    one = torch.as_tensor(slices[1:2, None]).repeat(1, 3, 1, 1)  # CryoSAM: one slice at a time
    with torch.inference_mode():
        tokens = model(pixel_values=F.interpolate(one, size=56, mode="bilinear", align_corners=True)).last_hidden_state
    np.testing.assert_allclose(feats[1], tokens[0, -16:].reshape(4, 4, 32).numpy(), atol=1e-5)


# ------------------------------------------------------------------ the distributed step

def test_features_equal_cryosam_reference(client, models, tomo, volume, tmp_path):
    kind = "registers"  # CryoSAM's ViT-L/14 has registers; the plain model runs in the tests below
    out = extract_features(tomo, tmp_path / "features.zarr", with_checkpoint(models[kind]), client=client,
                           device="cpu")
    features = open_features(out)
    assert list(features) == [16, 8, 4]
    reference = cryosam_reference(models[kind], volume, PARAMS.ratios, PARAMS.image_size)
    for r, level in features.items():
        grid = tuple(math.ceil(n / r) for n in SHAPE)
        assert level.shape == (*grid, 96) and level.dtype == np.float32
        whole = level[:]
        assert whole.dtype == np.float32 and whole.shape == level.shape
        np.testing.assert_allclose(whole, reference[r], rtol=2e-3, atol=5e-3)
        np.testing.assert_array_equal(level[1:3, 0, 2:], whole[1:3, 0, 2:])
        np.testing.assert_array_equal(level[..., 32:64], whole[..., 32:64])
        np.testing.assert_array_equal(level[-1, 2, -3], whole[-1, 2, -3])
    for axis, view in enumerate("zyx"):  # one 4x4 patch map per plane, a plane every 4 voxels
        stored = zarr.open_array(str(out / "maps" / view), mode="r")
        assert stored.shape == (math.ceil(SHAPE[axis] / 4), 4, 4, 32) and stored.dtype == np.float16
        assert zarr.open_array(str(out / "gram" / view), mode="r").shape == (*stored.shape[:3], 5)
    attrs = zarr.open_group(str(out), mode="r").attrs["cryodask"]["features"]
    assert attrs["complete"] and attrs["ratios"] == [4, 8, 16] and attrs["layout"] == 2
    assert attrs["source"]["shape"] == list(SHAPE) and attrs["source"]["voxel_size"] == [12.5] * 3
    assert attrs["model"]["hidden_size"] == 32 and attrs["params"]["image_size"] == 56
    assert attrs["normalisation"]["mean"] == pytest.approx(volume.mean(dtype=np.float64), rel=1e-6)
    assert attrs["normalisation"]["std"] == pytest.approx(volume.std(dtype=np.float64), rel=1e-6)
    assert attrs["source"]["polarity"]["polarity"] == "dark"  # decided (or undecided: dark) by auto


def test_a_thin_axis_is_stored_at_its_grid_points(client, models, tmp_path):
    """Where the finest grid has fewer points than the model's patches along an in-plane axis (a
    thin tomogram's z in the y and x views), the maps are stored sampled there: smaller, and
    the features are still CryoSAM's."""
    shape = (10, 40, 36)  # z: 3 grid points at ratio 4, under 4 patches
    volume = (np.random.default_rng(3).normal(size=shape) + np.linspace(0, 2, 36)).astype(np.float32)
    out = extract_features(write_raw_mrc(tmp_path / "thin.mrc", volume, voxel_size=10.0), tmp_path / "thin.zarr",
                           with_checkpoint(models["plain"]), client=client, device="cpu")
    assert zarr.open_array(str(out / "maps" / "z"), mode="r").shape == (3, 4, 4, 32)
    assert zarr.open_array(str(out / "maps" / "y"), mode="r").shape == (10, 3, 4, 32)  # (y planes, z grid, x)
    assert zarr.open_array(str(out / "maps" / "x"), mode="r").shape == (9, 3, 4, 32)
    reference = cryosam_reference(models["plain"], volume, PARAMS.ratios, PARAMS.image_size)
    for r, level in open_features(out).items():
        np.testing.assert_allclose(level[:], reference[r], rtol=2e-3, atol=5e-3)


def test_matching_a_store_scores_from_the_projection_as_from_the_vectors(client, models, tomo, tmp_path):
    """``match`` over a store scores every point from the query's projection on the stored tokens
    and their Gram maps; the similarities are those of the sampled vectors (``dict(store)``)."""
    from cryodask.prompting.matching import MatchParams, match, similarity

    store = open_features(extract_features(tomo, tmp_path / "f.zarr", with_checkpoint(models["plain"]),
                                           client=client, device="cpu"))
    query = store[4][2, 3, 4]
    projection = store.project(query / np.linalg.norm(query))
    for r, level in store.items():
        exact = similarity(level, query, block=(2, 3, 5))
        np.testing.assert_allclose(projection.similarity(r, tuple(slice(0, n) for n in level.shape[:3])), exact,
                                   atol=2e-6)
    for params in (MatchParams(sim_threshold=0.2, top_k=0), MatchParams(matching="naive", top_k=5)):
        fast, vectors = match(store, query, params, block=(2, 4, 4)), match(dict(store), query, params,
                                                                            block=(2, 4, 4))
        np.testing.assert_array_equal(fast[["z", "y", "x"]].to_numpy(), vectors[["z", "y", "x"]].to_numpy())
        np.testing.assert_allclose(fast["score"], vectors["score"], atol=2e-6)
    best = match(store, query, MatchParams(matching="naive", top_k=1))
    assert best[["z", "y", "x"]].values.tolist() == [[8, 12, 16]] and best["score"][0] == pytest.approx(1, abs=1e-6)


def test_a_bright_tomogram_is_read_negated(client, models, tomo, volume, tmp_path):
    """--polarity bright: every slice is read negated, so the stored normalisation is the negated
    volume's, and the choice is kept with the store."""
    out = extract_features(tomo, tmp_path / "bright.zarr", with_checkpoint(models["plain"]), client=client,
                           device="cpu", polarity="bright")
    attrs = zarr.open_group(str(out), mode="r").attrs["cryodask"]["features"]
    assert attrs["source"]["polarity"] == {"polarity": "bright", "decided": "given"}
    assert attrs["normalisation"]["mean"] == pytest.approx(-volume.mean(dtype=np.float64), rel=1e-6)


def test_ome_zarr_input_and_pickled_levels(client, models, tomo, volume, tmp_path):
    import pickle

    from cryodask.io.omezarr import create_image

    image = tmp_path / "tomo.zarr"
    create_image(image, SHAPE, chunks=(8, 16, 16), dtype=np.float32, voxel_size=(12.5,) * 3, levels=1)
    zarr.open_array(str(image / "0"), mode="r+")[:] = volume
    a = open_features(extract_features(tomo, tmp_path / "a.zarr", with_checkpoint(models["plain"]),
                                       client=client, device="cpu"))
    b = open_features(extract_features(image, tmp_path / "b.zarr", with_checkpoint(models["plain"]),
                                       client=client, device="cpu"))
    level = pickle.loads(pickle.dumps(b[8]))
    np.testing.assert_array_equal(a[8][:], level[:])


def test_resume(client, models, tomo, tmp_path):
    out = tmp_path / "features.zarr"
    params = with_checkpoint(models["plain"])
    run = dict(client=client, device="cpu")
    extract_features(tomo, out, params, **run)
    marks = sorted(p for p in (tmp_path / ".cryodask" / out.name).rglob("*") if p.is_file())
    assert len(marks) == len(plan_tasks(SHAPE, PARAMS)) == 2 + 3 + 3
    times = {p: p.stat().st_mtime_ns for p in marks}
    expected = open_features(out)[4][:]

    extract_features(tomo, out, params, **run)  # everything is done-marked: no work
    assert {p: p.stat().st_mtime_ns for p in marks} == times

    # lose one slab (y/1: y in 16..31) and scribble over another (z/0); only y/1 is redone
    y_view, z_view = (zarr.open_array(str(out / "maps" / v), mode="r+") for v in "yz")
    y_view[:, 4:8] = 0
    z_view[0:4] = 0
    lost = next(p for p in marks if p.parent.name == "y" and p.name == "1")
    lost.unlink()
    extract_features(tomo, out, params, **run)
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in marks if p != lost} == {p: t for p, t in times.items() if p != lost}
    again = open_features(out)[4][:]
    np.testing.assert_array_equal(again[:, 4:8, :, 32:64], expected[:, 4:8, :, 32:64])
    assert not again[0:4, :, :, :32].any()  # z/0 was marked done, so it was not rewritten
    assert zarr.open_group(str(out), mode="r").attrs["cryodask"]["features"]["complete"]

    # another parameter: the store is rebuilt from scratch
    wider = FeatureParams(image_size=56, slab=32, batch=3)
    extract_features(tomo, out, with_checkpoint(models["plain"], wider), **run)
    np.testing.assert_allclose(open_features(out)[4][:], expected, atol=5e-3)


# ------------------------------------------------------------------ errors

def test_errors(client, models, tomo, volume, tmp_path, monkeypatch):
    from cryodask.models.dinov2 import load_dinov2

    out = tmp_path / "f.zarr"
    with pytest.raises(InputError, match="nowhere.*checkpoint not found"):
        extract_features(tomo, out, with_checkpoint(tmp_path / "nowhere"), client=client)
    monkeypatch.delenv("CRYODASK_WEIGHTS", raising=False)
    monkeypatch.setattr("cryodask.models.weights.CONFIG", tmp_path / "no-config.yaml")
    with pytest.raises(InputError, match="--checkpoint not given.*dinov2-with-registers-large"):
        extract_features(tomo, out, PARAMS, client=client)
    not_a_model = tmp_path / "bert"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="bert: not a DINOv2 model folder"):
        extract_features(tomo, out, with_checkpoint(not_a_model), client=client)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: not a DINOv2 model folder"):
        extract_features(tomo, out, with_checkpoint(tmp_path / "empty"), client=client)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["plain"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="corrupt: cannot load DINOv2 weights"):
        load_dinov2(corrupt, "cpu")
    mixed = tmp_path / "mixed"  # a registers config over weights without registers
    shutil.copytree(models["registers"], mixed)
    shutil.copy(models["plain"] / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(InputError, match="mixed: weights do not match"):
        load_dinov2(mixed, "cpu")
    with pytest.raises(InputError, match="^slab 10 must be a multiple of the smallest ratio 4"):
        FeatureParams(slab=10)
    with pytest.raises(InputError, match="^ratios must each be a multiple of the smallest"):
        FeatureParams(ratios=(4, 6))
    with pytest.raises(InputError, match="--image-size 50 is not a multiple"):
        extract_features(tomo, out, with_checkpoint(models["plain"], FeatureParams(image_size=50, slab=16)),
                         client=client)
    with pytest.raises(InputError, match="must end in .zarr"):
        extract_features(tomo, tmp_path / "f.mrc", with_checkpoint(models["plain"]), client=client)
    bad = volume.copy()
    bad[13, 5, 5] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's own NaN warning
        bad = write_raw_mrc(tmp_path / "bad.mrc", bad)
    with pytest.raises(InputError, match="bad.mrc: contains NaN"):
        extract_features(bad, out, with_checkpoint(models["plain"]), client=client, device="cpu")
    assert not out.exists()  # nothing written, nothing marked done
    with pytest.raises(InputError, match="not a cryodask features store"):
        open_features(tmp_path / "empty")


def test_a_store_of_the_old_layout_is_refused_then_rewritten(client, models, tomo, tmp_path):
    """A store written by cryodask before patch maps (per-ratio grids, no ``layout``) is refused
    by ``open_features`` with one line saying what to do; ``features`` rewrites it."""
    out = tmp_path / "old.zarr"
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    group.create_group("4").create_array("z", shape=(5, 10, 9, 32), dtype="float16")
    group.attrs["cryodask"] = {"features": {"key": "old", "complete": True, "ratios": [4, 8, 16]}}
    with pytest.raises(InputError, match="old.zarr: was written by an older cryodask.*rerun `cryodask features`"):
        open_features(out)
    extract_features(tomo, out, with_checkpoint(models["plain"]), client=client, device="cpu")
    assert open_features(out)[4].shape == (5, 10, 9, 96) and not (out / "4").exists()


def test_the_weights_folder_gives_cryosams_dinov2_with_registers_first(models, tmp_path):
    """CryoSAM's network is ViT-L/14 with registers: in a weights folder it is chosen over the
    plain one, which is used where it is the only one; with neither, the error names CryoSAM's;
    ``doctor`` says which is used."""
    import shutil

    from cryodask.doctor import check_weights
    from cryodask.errors import InputError
    from cryodask.models.dinov2 import describe_dinov2, resolve_dinov2

    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(InputError, match="dinov2-with-registers-large.*checkpoint not found"):
        resolve_dinov2(weights=folder)
    shutil.copytree(models["plain"], folder / "dinov2-large")
    assert resolve_dinov2(weights=folder) == folder / "dinov2-large"
    status = {c.name: (c.status, c.detail) for c in check_weights(folder)}
    assert status["dinov2-with-registers-large"] == ("warn", "missing: dinov2-large is used instead")
    shutil.copytree(models["registers"], folder / "dinov2-with-registers-large")
    chosen = resolve_dinov2(weights=folder)
    assert chosen == folder / "dinov2-with-registers-large"
    assert describe_dinov2(chosen).num_register_tokens == 4
    shutil.rmtree(folder / "dinov2-large")
    status = {c.name: (c.status, c.detail) for c in check_weights(folder)}
    assert status["dinov2-large"] == ("ok", "not needed: dinov2-with-registers-large is used (CryoSAM's)")
    assert status["dinov2-with-registers-large"] == ("ok", "found")
    assert resolve_dinov2(models["plain"], folder) == models["plain"]  # a folder given is used as it is
