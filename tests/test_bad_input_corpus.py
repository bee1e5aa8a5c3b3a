"""A corpus of malformed inputs, generated here, for every command: each one is a single
``error:`` line naming the offending file or option, exit code 2, no traceback, and nothing
of it marked done (docs/architecture.md, rule 8: one-line errors, validated before a cluster starts).

MRC headers are written byte by byte (mrcfile's header dtype filled by hand), so the headers
are exactly as broken as a faulty writer would leave them. Errors that can be found before a
cluster starts are checked with ``make_cluster`` patched to fail; the rest (NaN in the data, a
full disk) run on the session cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zarr
from mrcfile.dtypes import HEADER_DTYPE

from cryodask.cli import main
from cryodask.io.omezarr import create_image
from cryodask.io.picks import write_picks

pytestmark = pytest.mark.malformed_stores  # broken stores are the point here: no validity check

GOOD = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
MODES = {np.dtype(np.int8): 0, np.dtype(np.int16): 1, np.dtype(np.float32): 2, np.dtype(np.complex64): 4,
         np.dtype(np.uint16): 6, np.dtype(np.float16): 12}


# ------------------------------------------------------------------ generated inputs

def raw_mrc(path, data=GOOD, *, shape=None, mode=None, voxel=10.0, axes=(1, 2, 3), sampling=None, size=None,
            **fields) -> Path:
    """An MRC file made by hand: a 1024-byte header (numpy structured array) and the data.

    ``shape`` (z, y, x) and ``mode`` override what the data says; ``axes`` is mapc, mapr, maps;
    ``sampling`` is mx, my, mz (default the shape); ``size`` truncates the data to that many bytes;
    ``fields`` set any other header field."""
    data = np.asarray(data)
    nz, ny, nx = shape or (data.shape if data.ndim == 3 else (1, *data.shape))
    header = np.zeros((), HEADER_DTYPE)
    header["nx"], header["ny"], header["nz"] = nx, ny, nz
    header["mode"] = MODES[data.dtype] if mode is None else mode
    header["mx"], header["my"], header["mz"] = sampling or (nx, ny, nz)
    header["cella"] = tuple(float(voxel) * n for n in (header["mx"], header["my"], header["mz"]))
    header["cellb"] = (90.0, 90.0, 90.0)
    header["mapc"], header["mapr"], header["maps"] = axes
    header["map"] = b"MAP "
    header["machst"] = [0x44, 0x44, 0, 0]
    header["nversion"] = 20141
    for name, value in fields.items():
        header[name] = value
    body = data.astype(data.dtype.newbyteorder("<")).tobytes()
    path = Path(path)
    path.write_bytes(header.tobytes() + (body if size is None else body[:size]))
    return path


def ome_zarr(path, data=GOOD, *, levels=2, voxel=10.0) -> Path:
    """A two-level OME-Zarr image (NGFF 0.4, as ``convert`` writes it), built without a cluster."""
    create_image(path, data.shape, chunks=(4, 8, 8), dtype=data.dtype, voxel_size=(voxel,) * 3, levels=levels)
    for level in range(levels):
        zarr.open_array(str(Path(path) / str(level)), mode="r+")[...] = data[::2**level, ::2**level, ::2**level]
    return Path(path)


def out_dir(t: Path) -> Path:
    (t / "out").mkdir(exist_ok=True)
    return t / "out"


def star(path, text: str) -> Path:
    Path(path).write_text(text)
    return Path(path)


STAR_3D = "data_particles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n"


def tmpfs(folder: Path, size: str = "512k") -> Path:
    """A small tmpfs at ``folder`` (root only): a disk that fills up."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs to fill up")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({result.stderr.strip() or 'mount failed'}; needs root)")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Small random models saved under the published names: hiera-t SAM2 weights (as ETSAM's two
    checkpoints and as sam2.1_hiera_tiny.pt) and a tiny DINOv2 transformers folder."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from transformers import Dinov2Config, Dinov2Model

    from cryodask.models.sam2 import build_predictor

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = {"model": build_predictor("sam2.1_hiera_t", image_size=128).state_dict()}
    for name in ("etsam_stage1_v1.pt", "etsam_stage2_v1.pt", "sam2.1_hiera_tiny.pt"):
        torch.save(state, folder / name)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(folder / "dinov2-large")
    return folder


# ------------------------------------------------------------------ the cases

@dataclass
class Case:
    command: list                  # the command and its arguments, without --cluster
    words: list                    # what the error line must contain (the offending file or option first)
    out: Path | None = None        # output folder or file whose bad part must not be marked done
    stem: str | None = None        # the bad input's name in the outputs
    cluster: bool = False          # found while computing: runs on the session cluster
    errors: int = 1                # error lines (one per bad input of a batch)
    check: Callable | None = None  # more checks (the good inputs of a batch were processed)


CASES: dict[str, Callable] = {}


def case(name, *needs):
    def register(build):
        CASES[name] = (build, needs)
        return build
    return register


# convert: MRC headers

@case("convert-mrc-mode-3")
def _(t):
    bad = raw_mrc(t / "mode3.mrc", GOOD.astype(np.int16), mode=3)
    return Case(["convert", bad, "--out", t / "out"], ["mode3.mrc", "unsupported mode 3"], t / "out", "mode3")


@case("convert-mrc-mode-101")
def _(t):
    bad = raw_mrc(t / "mode101.mrc", GOOD.astype(np.int8), mode=101)
    return Case(["convert", bad, "--out", t / "out"], ["mode101.mrc", "mode 101"], t / "out", "mode101")


@case("convert-mrc-negative-nz")
def _(t):
    bad = raw_mrc(t / "negz.mrc", shape=(-8, 16, 16))
    return Case(["convert", bad, "--out", t / "out"], ["negz.mrc", "nz", "-8"], t / "out", "negz")


@case("convert-mrc-negative-nx")
def _(t):
    bad = raw_mrc(t / "negx.mrc", shape=(8, 16, -16))
    return Case(["convert", bad, "--out", t / "out"], ["negx.mrc", "nx", "-16"], t / "out", "negx")


@case("convert-mrc-huge-dimensions-tiny-file")
def _(t):
    bad = raw_mrc(t / "huge.mrc", shape=(2**31 - 1,) * 3, size=4096)
    return Case(["convert", bad, "--out", t / "out"], ["huge.mrc", "truncated"], t / "out", "huge")


@case("convert-mrc-axis-map-not-a-permutation")
def _(t):
    bad = raw_mrc(t / "axes113.mrc", axes=(1, 1, 3))
    return Case(["convert", bad, "--out", t / "out"], ["axes113.mrc", "mapc, mapr, maps", "1, 1, 3"],
                t / "out", "axes113")


@case("convert-mrc-axis-map-zyx-order")
def _(t):
    bad = raw_mrc(t / "axes321.mrc", axes=(3, 2, 1))
    return Case(["convert", bad, "--out", t / "out"], ["axes321.mrc", "3, 2, 1"], t / "out", "axes321")


@case("convert-mrc-negative-extended-header-size")
def _(t):
    bad = raw_mrc(t / "ext.mrc", nsymbt=-5)
    return Case(["convert", bad, "--out", t / "out"], ["ext.mrc", "nsymbt = -5"], t / "out", "ext")


@case("convert-mrc-extended-header-past-the-end")
def _(t):
    bad = raw_mrc(t / "ext.mrc", nsymbt=2**30)
    return Case(["convert", bad, "--out", t / "out"], ["ext.mrc", "truncated"], t / "out", "ext")


@case("convert-mrc-truncated-data")
def _(t):
    bad = raw_mrc(t / "short.mrc", size=GOOD.nbytes - 100)
    return Case(["convert", bad, "--out", t / "out"], ["short.mrc", "truncated"], t / "out", "short")


@case("convert-mrc-voxel-size-0")
def _(t):
    bad = raw_mrc(t / "novoxel.mrc", voxel=0.0)
    return Case(["convert", bad, "--out", t / "out"], ["novoxel.mrc", "voxel size"], t / "out", "novoxel")


@case("convert-mrc-sampling-0-voxel-size-nan")
def _(t):
    bad = raw_mrc(t / "mz0.mrc", sampling=(16, 16, 0))  # cella / mz = 0 / 0
    return Case(["convert", bad, "--out", t / "out"], ["mz0.mrc", "voxel size"], t / "out", "mz0")


@case("convert-mrc-2d")
def _(t):
    bad = raw_mrc(t / "flat.mrc", GOOD[0])
    return Case(["convert", bad, "--out", t / "out"], ["flat.mrc", "not a 3D volume"], t / "out", "flat")


@case("convert-mrc-complex-mode-4")
def _(t):
    bad = raw_mrc(t / "complex.mrc", GOOD.astype(np.complex64))
    return Case(["convert", bad, "--out", t / "out"], ["complex.mrc", "complex64"], t / "out", "complex")


@case("convert-tiff-garbage")
def _(t):
    (t / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    return Case(["convert", t / "junk.tif", "--out", t / "out"], ["junk.tif", "not a readable TIFF"], t / "out", "junk")


@case("convert-mrc-nan-in-data")
def _(t):
    data = GOOD.copy()
    data[6, 3, 3] = np.nan
    bad = raw_mrc(t / "nan.mrc", data)
    return Case(["convert", bad, "--out", t / "out", "--chunks", "4,8,8", "--levels", "2"],
                ["nan.mrc", "NaN or Inf", "z=6"], t / "out", "nan", cluster=True)


@case("convert-batch-two-bad-one-good")
def _(t):
    (t / "in").mkdir()
    raw_mrc(t / "in" / "good.mrc")
    raw_mrc(t / "in" / "axes.mrc", axes=(2, 1, 3))
    raw_mrc(t / "in" / "mode.mrc", mode=101)

    def check(out, err):
        assert any(line.startswith("error:") and "axes.mrc" in line for line in err.splitlines())
        np.testing.assert_array_equal(zarr.open_array(str(t / "out" / "good.zarr" / "0"), mode="r")[...], GOOD)
        assert "1 of 3 tomograms ready" in out
    return Case(["convert", t / "in", "--out", t / "out", "--chunks", "4,8,8", "--levels", "2"],
                ["mode.mrc", "mode 101"], t / "out", "mode", cluster=True, errors=2, check=check)


@case("convert-full-disk")
def _(t):
    data = np.random.default_rng(1).normal(size=(32, 64, 64)).astype(np.float32)  # 512 KiB, incompressible
    source = raw_mrc(t / "big.mrc", data)
    out = tmpfs(t / "full")  # the store is created, its blocks do not fit: it must not be marked complete
    return Case(["convert", source, "--out", out, "--chunks", "8,32,32", "--levels", "2"],
                ["big.mrc", "cannot write", "big.zarr", "No space left on device"], out, "big", cluster=True)


# membranes (classical and ETSAM)

@case("membranes-zarr-garbage-zattrs")
def _(t):
    store = ome_zarr(t / "garbage.zarr")
    (store / ".zattrs").write_text("{multiscales: [")
    return Case(["membranes", store, "--out", t / "out", "--method", "classical"],
                ["garbage.zarr", "not an OME-Zarr image"], t / "out", "garbage")


@case("membranes-zarr-no-multiscales")
def _(t):
    store = ome_zarr(t / "plain.zarr")
    (store / ".zattrs").write_text("{}")
    return Case(["membranes", store, "--out", t / "out", "--method", "classical"],
                ["plain.zarr", "multiscales"], t / "out", "plain")


@case("membranes-zarr-level-array-missing")
def _(t):
    store = ome_zarr(t / "holes.zarr")
    shutil.rmtree(store / "1")
    return Case(["membranes", store, "--out", t / "out", "--method", "classical"],
                ["holes.zarr", "missing array"], t / "out", "holes")


@case("membranes-zarr-zarray-2d-shape")
def _(t):
    store = ome_zarr(t / "flat.zarr")
    meta = json.loads((store / "0" / ".zarray").read_text())
    meta.update(shape=[16, 16], chunks=[8, 8])
    (store / "0" / ".zarray").write_text(json.dumps(meta))
    return Case(["membranes", store, "--out", t / "out", "--method", "classical"],
                ["flat.zarr", "not a 3D image"], t / "out", "flat")


@case("membranes-zarr-zarray-garbage-dtype")
def _(t):
    store = ome_zarr(t / "dtype.zarr")
    meta = json.loads((store / "0" / ".zarray").read_text())
    meta["dtype"] = "<x9"
    (store / "0" / ".zarray").write_text(json.dumps(meta))
    return Case(["membranes", store, "--out", t / "out", "--method", "classical"],
                ["dtype.zarr", "not a readable zarr array"], t / "out", "dtype")


@case("membranes-classical-zarr-nan")
def _(t):
    data = GOOD.copy()
    data[2, 2, 2] = np.inf
    store = ome_zarr(t / "inf.zarr", data)
    return Case(["membranes", store, "--out", t / "out", "--method", "classical"],
                ["inf.zarr", "NaN or Inf"], t / "out", "inf", cluster=True)


@case("membranes-classical-batch-bad-and-good")
def _(t):
    (t / "in").mkdir()
    raw_mrc(t / "in" / "good.mrc", np.random.default_rng(2).normal(size=(8, 24, 24)).astype(np.float32))
    raw_mrc(t / "in" / "neg.mrc", shape=(8, -16, 16))

    def check(out, err):
        assert (t / "out" / "good_classical_predicted_mask.mrc").is_file(), out + err
    return Case(["membranes", t / "in", "--out", t / "out", "--method", "classical", "--chunks", "8,16,16"],
                ["neg.mrc", "ny", "-16"], t / "out", "neg", cluster=True, check=check)


@case("membranes-etsam-wrong-architecture", "weights")
def _(t, weights):
    tomo = raw_mrc(t / "t.mrc")
    return Case(["membranes", tomo, "--out", t / "out", "--method", "etsam", "--weights", weights,
                 "--model-config", "sam2.1_hiera_s", "--image-size", "128"],
                ["etsam_stage1_v1.pt", "does not match config sam2.1_hiera_s"], t / "out", "t")


@case("membranes-etsam-garbage-checkpoint", "weights")
def _(t, weights):
    tomo = raw_mrc(t / "t.mrc")
    (t / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 64)
    return Case(["membranes", tomo, "--out", t / "out", "--stage1-checkpoint", t / "garbage.pt",
                 "--stage2-checkpoint", weights / "etsam_stage2_v1.pt", "--model-config", "sam2.1_hiera_t",
                 "--image-size", "128"],
                ["garbage.pt", "not a readable PyTorch checkpoint"], t / "out", "t")


@case("membranes-etsam-truncated-checkpoint", "weights")
def _(t, weights):
    tomo = raw_mrc(t / "t.mrc")
    raw = (weights / "etsam_stage2_v1.pt").read_bytes()
    (t / "half.pt").write_bytes(raw[: len(raw) // 2])
    return Case(["membranes", tomo, "--out", t / "out", "--stage1-checkpoint", weights / "etsam_stage1_v1.pt",
                 "--stage2-checkpoint", t / "half.pt", "--model-config", "sam2.1_hiera_t", "--image-size", "128"],
                ["half.pt", "not a readable PyTorch checkpoint"], t / "out", "t")


@case("membranes-etsam-only-input-bad", "weights")
def _(t, weights):
    tomo = raw_mrc(t / "axes.mrc", axes=(3, 1, 2))
    return Case(["membranes", tomo, "--out", t / "out", "--weights", weights, "--model-config", "sam2.1_hiera_t",
                 "--image-size", "128"], ["axes.mrc", "3, 1, 2"], t / "out", "axes")


# postprocess

@case("postprocess-mrc-mode-101")
def _(t):
    bad = raw_mrc(t / "mask.mrc", (GOOD > 0).astype(np.int8), mode=101)
    return Case(["postprocess", bad, "--out", t / "out" / "post.mrc"], ["mask.mrc", "mode 101"], t / "out", "post")


@case("postprocess-mrc-negative-nz")
def _(t):
    bad = raw_mrc(t / "mask.mrc", (GOOD > 0).astype(np.int8), shape=(-8, 16, 16))
    return Case(["postprocess", bad, "--out", t / "out" / "post.mrc"], ["mask.mrc", "nz"], t / "out", "post")


@case("postprocess-labels-level-missing")
def _(t):
    from cryodask.io.omezarr import write_labels

    store = ome_zarr(t / "t.zarr")
    write_labels(store, "membranes", (GOOD > 0).astype(np.uint8))
    shutil.rmtree(store / "labels" / "membranes" / "0")
    return Case(["postprocess", store / "labels" / "membranes", "--out", t / "out" / "post.mrc"],
                ["membranes", "missing array"], t / "out", "post")


@case("postprocess-mrc-nan-mask")
def _(t):
    data = (GOOD > 0).astype(np.float32)
    data[5, 1, 1] = np.nan
    bad = raw_mrc(t / "mask.mrc", data)
    (t / "out").mkdir()
    return Case(["postprocess", bad, "--out", t / "out" / "post.mrc", "--chunks", "4,8,8"],
                ["mask.mrc", "NaN or Inf"], t / "out", "post", cluster=True)


# export

@case("export-zarr-garbage-zattrs")
def _(t):
    store = ome_zarr(t / "t.zarr")
    (store / ".zattrs").write_bytes(b"\x89PNG garbage")
    return Case(["export", store, "--out", out_dir(t) / "t.mrc"], ["t.zarr", "not an OME-Zarr image"], t / "out", "t")


@case("export-zarr-no-multiscales")
def _(t):
    store = ome_zarr(t / "t.zarr")
    (store / ".zattrs").write_text(json.dumps({"multiscales": []}))
    return Case(["export", store, "--out", out_dir(t) / "t.mrc"], ["t.zarr", "multiscales"], t / "out", "t")


@case("export-zarr-multiscales-malformed")
def _(t):
    store = ome_zarr(t / "t.zarr")
    (store / ".zattrs").write_text(json.dumps({"multiscales": [{"datasets": [{"path": "0"}]}]}))
    return Case(["export", store, "--out", out_dir(t) / "t.mrc"], ["t.zarr", "malformed OME-NGFF multiscales"],
                t / "out", "t")


@case("export-zarr-zarray-wrong-dtype")
def _(t):
    store = ome_zarr(t / "t.zarr")
    meta = json.loads((store / "0" / ".zarray").read_text())
    meta["dtype"] = "<f8"
    (store / "0" / ".zarray").write_text(json.dumps(meta))
    return Case(["export", store, "--out", out_dir(t) / "t.mrc"], ["t.zarr", "cannot export level 0"], t / "out", "t")


@case("export-full-disk")
def _(t):
    data = np.random.default_rng(1).normal(size=(32, 64, 64)).astype(np.float32)
    store = ome_zarr(t / "big.zarr", data)
    out = tmpfs(t / "full")
    return Case(["export", store, "--out", out / "big.mrc"], ["big.mrc", "cannot write", "No space left on device"],
                out, "big")


@case("postprocess-full-disk")
def _(t):
    mask = np.random.default_rng(3).random((32, 64, 128)) > 0.5  # 256 KiB of int8, 512 KiB with the labels
    bad = raw_mrc(t / "mask.mrc", mask.astype(np.int8))
    out = tmpfs(t / "full", "256k")
    return Case(["postprocess", bad, "--out", out / "post.mrc", "--labels", "--chunks", "16,32,64"],
                ["post.mrc", "No space left on device"], out, "post", cluster=True)


@case("membranes-classical-full-disk")
def _(t):
    data = np.random.default_rng(1).normal(size=(32, 64, 64)).astype(np.float32)
    source = raw_mrc(t / "big.mrc", data)
    out = tmpfs(t / "full")
    return Case(["membranes", source, "--out", out, "--method", "classical", "--chunks", "8,32,32"],
                ["big.mrc", "cannot write", "big.zarr", "No space left on device"], out, "big", cluster=True)


@case("membranes-classical-disk-fills-while-exporting")
def _(t):
    store = ome_zarr(t / "big.zarr", np.random.default_rng(1).normal(size=(32, 64, 64)).astype(np.float32))
    out = tmpfs(t / "full", "900k")  # room for the sheet score and the mask, not for the logits too
    return Case(["membranes", store, "--out", out, "--method", "classical", "--store-logits"],
                ["big.zarr", "cannot write its outputs", "No space left on device"], out, "big", cluster=True)


# evaluate membranes

@case("evaluate-membranes-2d-prediction")
def _(t):
    mask = (GOOD > 0).astype(np.int8)
    pred, truth = raw_mrc(t / "pred.mrc", mask[0]), raw_mrc(t / "truth.mrc", mask)
    return Case(["evaluate", "membranes", pred, truth, "--out", t / "out"], ["pred.mrc", "not a 3D volume"],
                t / "out", "membranes")


@case("evaluate-membranes-truth-axis-order")
def _(t):
    mask = (GOOD > 0).astype(np.int8)
    pred, truth = raw_mrc(t / "pred.mrc", mask), raw_mrc(t / "truth.mrc", mask, axes=(2, 1, 3))
    return Case(["evaluate", "membranes", pred, truth, "--out", t / "out"], ["truth.mrc", "2, 1, 3"],
                t / "out", "membranes")


@case("evaluate-membranes-shape-mismatch")
def _(t):
    mask = (GOOD > 0).astype(np.int8)
    pred, truth = raw_mrc(t / "pred.mrc", mask), raw_mrc(t / "truth.mrc", mask[:, :8].copy())
    return Case(["evaluate", "membranes", pred, truth, "--out", t / "out"], ["truth.mrc", "differs"],
                t / "out", "membranes")


@case("evaluate-membranes-truncated-logits")
def _(t):
    mask = (GOOD > 0).astype(np.int8)
    pred, truth = raw_mrc(t / "pred.mrc", mask), raw_mrc(t / "truth.mrc", mask)
    logits = raw_mrc(t / "logits.mrc", GOOD, size=1000)
    return Case(["evaluate", "membranes", pred, truth, "--logits", logits, "--out", t / "out"],
                ["logits.mrc", "truncated"], t / "out", "membranes")


@case("evaluate-membranes-nan-logits")
def _(t):
    mask = (GOOD > 0).astype(np.int8)
    logits = GOOD.copy()
    logits[7, 0, 0] = np.nan
    pred, truth = raw_mrc(t / "pred.mrc", mask), raw_mrc(t / "truth.mrc", mask)
    return Case(["evaluate", "membranes", pred, truth, "--logits", raw_mrc(t / "logits.mrc", logits), "--out",
                 t / "out"],
                ["logits.mrc", "NaN or Inf"], t / "out", "membranes", cluster=True)


# evaluate picks: STAR, CSV, copick

def _picks_case(t, name, text, words):
    pred = star(t / name, text)
    truth = write_picks(t / "truth.star", np.array([[1.0, 2.0, 3.0]]))
    return Case(["evaluate", "picks", pred, truth, "--radius", "5", "--out", t / "out"], [name, *words], t / "out",
                "picks")


@case("evaluate-picks-star-garbage")
def _(t):
    return _picks_case(t, "garbage.star", "\x00\x01 this is not STAR \xff\n_loop\n", ["no table with rlnCoordinateX"])


@case("evaluate-picks-star-no-coordinate-columns")
def _(t):
    return _picks_case(t, "nocoords.star", "data_particles\n\nloop_\n_rlnAngleRot #1\n_rlnClassNumber #2\n10 1\n20 2\n",
                       ["rlnCoordinateX"])


@case("evaluate-picks-star-non-numeric-coordinates")
def _(t):
    return _picks_case(t, "words.star", STAR_3D + "1 2 3\nten eleven twelve\n", ["not numbers"])


@case("evaluate-picks-star-nan-coordinates")
def _(t):
    return _picks_case(t, "nan.star", STAR_3D + "1 2 3\nnan 4 5\n", ["NaN"])


@case("evaluate-picks-star-empty-file")
def _(t):
    return _picks_case(t, "empty.star", "", ["empty.star"])


@case("evaluate-picks-csv-no-y-column")
def _(t):
    return _picks_case(t, "picks.csv", "x,z\n1,2\n", ["columns x and y"])


@case("evaluate-picks-copick-garbage-json")
def _(t):
    return _picks_case(t, "picks.json", "{\"points\": [", ["not a readable JSON file"])


@case("evaluate-picks-copick-not-picks")
def _(t):
    return _picks_case(t, "run.json", json.dumps({"points": [{"x": 1, "y": 2}]}), ["location"])


@case("evaluate-picks-2d-against-3d")
def _(t):
    pred = write_picks(t / "pred2d.star", np.array([[2.0, 3.0]]))
    truth = write_picks(t / "truth.star", np.array([[1.0, 2.0, 3.0]]))
    return Case(["evaluate", "picks", pred, truth, "--radius", "5", "--out", t / "out"], ["truth.star", "2D"],
                t / "out", "picks")


# pick (LoG and CryoSAM)

@case("pick-log-2d-mrc")
def _(t):
    bad = raw_mrc(t / "slice.mrc", GOOD[0])
    return Case(["pick", bad, "--out", t / "out", "--diameter", "50"], ["slice.mrc", "not a 3D volume"], t / "out",
                "slice")


@case("pick-log-huge-dimensions")
def _(t):
    bad = raw_mrc(t / "huge.mrc", shape=(64, 2**31 - 1, 64), size=100)
    return Case(["pick", bad, "--out", t / "out", "--diameter", "50"], ["huge.mrc", "truncated"], t / "out", "huge")


@case("pick-log-voxel-size-negative")
def _(t):
    bad = raw_mrc(t / "vneg.mrc", voxel=-4.0)
    return Case(["pick", bad, "--out", t / "out", "--diameter", "50"], ["vneg.mrc", "not positive", "--voxel-size"],
                t / "out", "vneg")


@case("pick-log-zarr-no-multiscales")
def _(t):
    store = ome_zarr(t / "t.zarr")
    (store / ".zattrs").write_text(json.dumps({"omero": {}}))
    return Case(["pick", store, "--out", t / "out", "--diameter", "50"], ["t.zarr", "multiscales"], t / "out", "t")


@case("pick-log-nan-in-data")
def _(t):
    data = GOOD.copy()
    data[4, 8, 8] = -np.inf
    bad = raw_mrc(t / "inf.mrc", data)
    return Case(["pick", bad, "--out", t / "out", "--diameter", "50", "--chunks", "4,16,16"],
                ["inf.mrc", "NaN or Inf"], t / "out", "inf", cluster=True)


def _cryosam(t, weights, *extra, tomo=None):
    tomo = tomo or raw_mrc(t / "t.mrc")
    return ["pick", tomo, "--out", t / "out", "--method", "cryosam", "--weights", weights,
            "--model-config", "sam2.1_hiera_t", "--image-size", "128", "--feature-image-size", "56", *extra]


@case("pick-cryosam-prompt-file-outside-volume", "weights")
def _(t, weights):
    prompts = write_picks(t / "clicks.star", np.array([[2.0, 3.0, 4.0], [2.0, 3.0, 40.0]]))  # x = 40 > 15
    return Case(_cryosam(t, weights, "--prompts", prompts), ["clicks.star", "outside the volume"], t / "out", "t")


@case("pick-cryosam-prompt-option-outside-volume", "weights")
def _(t, weights):
    return Case(_cryosam(t, weights, "--prompt", "-1,3,3"), ["--prompt", "outside the volume"], t / "out", "t")


@case("pick-cryosam-prompts-copick-garbage", "weights")
def _(t, weights):
    (t / "clicks.json").write_text("not json at all")
    return Case(_cryosam(t, weights, "--prompts", t / "clicks.json"), ["clicks.json", "not a readable JSON"],
                t / "out", "t")


@case("pick-cryosam-wrong-architecture", "weights")
def _(t, weights):
    extra = ["--prompt", "3,3,3", "--sam-checkpoint", weights / "sam2.1_hiera_tiny.pt", "--model-config",
             "sam2.1_hiera_s"]
    return Case(_cryosam(t, weights, *extra), ["sam2.1_hiera_tiny.pt", "does not match config sam2.1_hiera_s"],
                t / "out", "t")


@case("pick-cryosam-garbage-sam-checkpoint", "weights")
def _(t, weights):
    (t / "sam.pt").write_text("garbage")
    return Case(_cryosam(t, weights, "--prompt", "3,3,3", "--sam-checkpoint", t / "sam.pt"),
                ["sam.pt", "not a readable PyTorch checkpoint"], t / "out", "t")


@case("pick-cryosam-dinov2-not-a-dinov2-folder", "weights")
def _(t, weights):
    (t / "bert").mkdir()
    (t / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (t / "bert" / "model.safetensors").write_bytes(b"")
    return Case(_cryosam(t, weights, "--prompt", "3,3,3", "--dinov2-checkpoint", t / "bert"),
                ["bert", "not a DINOv2 model folder"], t / "out", "t")


# features

@case("features-dinov2-garbage-config", "weights")
def _(t, weights):
    (t / "dino").mkdir()
    (t / "dino" / "config.json").write_text("{hidden_size: 32")
    return Case(["features", raw_mrc(t / "t.mrc"), "--out", t / "out", "--checkpoint", t / "dino"],
                ["config.json", "unreadable model config"], t / "out", "t")


@case("features-dinov2-folder-is-a-file", "weights")
def _(t, weights):
    (t / "dinov2.bin").write_bytes(b"\x00" * 10)
    return Case(["features", raw_mrc(t / "t.mrc"), "--out", t / "out", "--checkpoint", t / "dinov2.bin"],
                ["dinov2.bin", "not a DINOv2 model folder"], t / "out", "t")


@case("features-dinov2-no-weight-file", "weights")
def _(t, weights):
    shutil.copytree(weights / "dinov2-large", t / "dino")
    (t / "dino" / "model.safetensors").unlink()
    return Case(["features", raw_mrc(t / "t.mrc"), "--out", t / "out", "--checkpoint", t / "dino"],
                ["dino", "no weight file"], t / "out", "t")


@case("features-mrc-axis-order", "weights")
def _(t, weights):
    bad = raw_mrc(t / "t.mrc", axes=(1, 3, 2))
    return Case(["features", bad, "--out", t / "out", "--checkpoint", weights / "dinov2-large"],
                ["t.mrc", "1, 3, 2"], t / "out", "t")


@case("features-mrc-nan-in-data", "weights")
def _(t, weights):
    data = GOOD.copy()
    data[1, 1, 1] = np.nan
    return Case(["features", raw_mrc(t / "t.mrc", data), "--out", t / "out", "--checkpoint",
                 weights / "dinov2-large", "--image-size", "56"], ["t.mrc", "NaN or Inf"], t / "out", "t", cluster=True)


# ------------------------------------------------------------------ the checks

def run(capsys, args):
    """Run the CLI in this process; warnings count as stderr lines, as they would in a shell."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)  # a shell hides only these
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_nothing_done(out: Path | None, stem: str | None):
    """No complete mark, no final output named after the bad input (a ``.partial`` may stay),
    and a store made for it, if any, not marked complete."""
    if out is None or stem is None or not out.exists():
        return
    for path in out.rglob("*"):
        assert not (path.name.endswith(".complete") and stem in path.as_posix()), path
    for path in out.iterdir():
        if not path.name.startswith(stem) or path.name.endswith(".partial"):
            continue
        assert path.suffix == ".zarr", f"{path} was written for a bad input"
        steps = zarr.open_group(str(path), mode="r").attrs.asdict().get("cryodask", {})
        assert not [name for name, state in steps.items() if isinstance(state, dict) and state.get("complete")], path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, capsys, monkeypatch, request):
    build, needs = CASES[name]
    c = build(tmp_path, *(request.getfixturevalue(n) for n in needs))
    args = list(c.command)
    if c.cluster:
        args += ["--cluster", request.getfixturevalue("client").scheduler.address]
    else:
        import cryodask.engine.cluster

        monkeypatch.setattr(cryodask.engine.cluster, "make_cluster",
                            lambda *a, **k: pytest.fail("a cluster was started"))
    code, out, err = run(capsys, args)
    assert "Traceback" not in out + err
    assert not [line for line in err.splitlines() if "Warning" in line], err
    lines = error_lines(err)
    assert code == 2, (code, out, err)
    assert len(lines) == c.errors, err
    line = next((line for line in lines if str(c.words[0]) in line), None)
    assert line is not None, err
    for words in c.words[1:]:
        assert str(words) in line, line
    if c.check is not None:
        c.check(out, err)
    assert_nothing_done(c.out, c.stem)


def test_corpus_is_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.fixture(autouse=True)
def _unmount(tmp_path):
    yield
    full = tmp_path / "full"
    if full.is_mount():
        subprocess.run(["umount", "--lazy", str(full)], check=False)  # lazy: a worker may still hold a file


def test_console_script_prints_one_line_for_a_broken_header(tmp_path):
    """The real entry point, in its own process: no warning or traceback reaches the terminal."""
    raw_mrc(tmp_path / "mz0.mrc", sampling=(16, 16, 0))
    raw_mrc(tmp_path / "neg.mrc", shape=(8, -16, 16))
    result = subprocess.run([sys.executable, "-m", "cryodask", "convert", str(tmp_path / "mz0.mrc"),
                             str(tmp_path / "neg.mrc"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0] == "2 failed:" and len(lines) == 3, result.stderr
    assert "mz0.mrc" in lines[1] and "neg.mrc" in lines[2], result.stderr
