"""Shared fixtures: one real ``distributed.LocalCluster`` for the session, and test files."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from hypothesis import settings

# property tests check results, not speed: a loaded 2-core CI machine must not fail them on time
settings.register_profile("cryodask", deadline=None)
settings.load_profile("cryodask")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GB",
                      silence_logs=logging.CRITICAL, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(cluster):
    from distributed import Client

    with Client(cluster) as client:
        yield client


@pytest.fixture
def data_dir():
    if not DATA.exists():
        pytest.skip(f"real data not found at {DATA}")
    return DATA


def import_copick(module: str):
    """A copick module, imported without the root logging handler its import installs (each copick
    module's ``get_logger`` calls ``logging.basicConfig(force=True)`` with a RichHandler at INFO,
    which would print every later test's distributed logs, rich-formatted, to stdout)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return pytest.importorskip(module)
    finally:
        root.handlers[:], root.level = handlers, level


def make_cryosam_weights(folder):
    """CryoSAM's checkpoints from random models, as a weights folder holds them: SAM2 hiera-t at a
    128 px input (``sam2.1_hiera_tiny.pt``) and a 2-layer DINOv2 (``dinov2-large``)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from transformers import Dinov2Config, Dinov2Model

    from cryodask.models.sam2 import build_predictor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save({"model": build_predictor("sam2.1_hiera_t", image_size=128).state_dict()},
               folder / "sam2.1_hiera_tiny.pt")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(folder / "dinov2-large")
    return folder


def write_raw_mrc(path, data, voxel_size=10.0):
    """An MRC file written by mrcfile itself (not by cryodask), as other tools would."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
        mrc.voxel_size = voxel_size
    return Path(path)


def one_line_error(call, path, match):
    """``call()`` raises an InputError of one line, naming ``path`` first and matching ``match``."""
    from cryodask.errors import InputError

    with pytest.raises(InputError, match=match) as info:
        call()
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message


def cli_error(capsys, argv) -> str:
    """``cryodask argv`` exits 2 with one ``error: ...`` line on stderr; returns that line."""
    from cryodask.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def validate_ome_zarr(store):
    """``store`` through ome-zarr-models' own models (raises if it is not valid OME-Zarr): the image,
    and each label image its ``labels/`` group lists. NGFF 0.4 or 0.5, from the metadata."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    if "ome" in group.attrs:
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.image_label import ImageLabel
        from ome_zarr_models.v05.labels import Labels
    else:
        from ome_zarr_models.v04.image import Image
        from ome_zarr_models.v04.image_label import ImageLabel
        from ome_zarr_models.v04.labels import Labels
    image = Image.from_zarr(group)
    if "labels" in group:
        listed = Labels.from_zarr(group["labels"]).attributes
        for name in getattr(listed, "ome", listed).labels:
            ImageLabel.from_zarr(group["labels"][name])
    return image


def written_images(root) -> list[Path]:
    """The OME-Zarr images (groups with ``multiscales``) under ``root``; label images are reached
    through their image, and nothing inside a store is searched again."""
    found = []
    for folder, subfolders, files in os.walk(root):
        meta = next((Path(folder) / n for n in (".zattrs", "zarr.json") if n in files), None)
        if meta is None:
            continue
        try:
            attrs = json.loads(meta.read_text())
        except (OSError, ValueError):
            attrs = {}
        attrs = attrs.get("attributes", attrs)  # zarr v3 keeps them under "attributes"
        if "multiscales" in attrs.get("ome", attrs) and "image-label" not in attrs.get("ome", attrs):
            found.append(Path(folder))
        subfolders[:] = []  # a store's arrays and labels are not searched again
    return found


@pytest.fixture(autouse=True)
def _stores_are_valid_ome_zarr(request):
    """Every OME-Zarr image a test leaves in its ``tmp_path`` is valid for ome-zarr-models: the
    tomograms, label images and Portal mask stores that users open in napari and other viewers.
    Tests that write broken stores on purpose are marked ``malformed_stores``."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or request.node.get_closest_marker("malformed_stores"):
        return
    for store in written_images(tmp):
        try:
            validate_ome_zarr(store)
        except Exception as exc:  # noqa: BLE001  (pydantic's and zarr's errors alike)
            pytest.fail(f"{store} is not valid OME-Zarr for ome-zarr-models: {str(exc).splitlines()[0]}")


# ------------------------------------------------------------------ a real napari viewer (tests/test_napari*.py)

@pytest.fixture(scope="session")
def display():
    """An X display: the one given, else a private Xvfb (OpenGL through Mesa). The server lives
    as long as this process (Qt exits with an error if its display goes first)."""
    if os.environ.get("DISPLAY"):
        return os.environ["DISPLAY"]
    if shutil.which("Xvfb") is None:
        pytest.skip("no DISPLAY and no Xvfb (apt-get install xvfb; .ci/run does)")
    libc = ctypes.CDLL(None, use_errno=True)
    read, write = os.pipe()
    subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                     pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     preexec_fn=lambda: libc.prctl(1, signal.SIGTERM))  # PR_SET_PDEATHSIG: ends with pytest
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    return os.environ["DISPLAY"]


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """napari settings in a file of this test's own, never the user's."""
    pytest.importorskip("napari", reason="the napari extra is not installed")
    import napari.settings

    monkeypatch.setattr(napari.settings, "_SETTINGS", None)
    return napari.settings.get_settings(tmp_path / "napari" / "settings.yaml")


@pytest.fixture
def viewer(display, settings):
    import napari
    from napari.plugins import _initialize_plugins

    _initialize_plugins()
    v = napari.Viewer(show=True)
    yield v
    v.close()


