"""One Volume for every format, and one validation rule for every parameter class."""

from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from conftest import cli_error, one_line_error, write_raw_mrc

from cryodask import validate
from cryodask.errors import InputError
from cryodask.io.omezarr import create_image
from cryodask.io.volumes import Volume, open_volume, source_identity, stem
from cryodask.validate import FieldError, cli_message


def zarr_image(path, data, voxel_size=(12.0, 12.0, 12.0)):
    """A two-level OME-Zarr image written with cryodask's own writer (level 1 every 2nd voxel)."""
    group = create_image(path, data.shape, chunks=(4, 8, 8), dtype=data.dtype, voxel_size=voxel_size, levels=2)
    group["0"][...] = data
    group["1"][...] = data[::2, ::2, ::2]
    return path


@pytest.fixture
def volumes(tmp_path):
    """The same data as an MRC, a TIFF, an OME-Zarr image and level 1 of it."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(10, 16, 24)).astype(np.float32)
    write_raw_mrc(tmp_path / "v.mrc", data, voxel_size=12.0)
    tifffile.imwrite(tmp_path / "v.tif", data, imagej=True, resolution=(1 / 1.2, 1 / 1.2),
                     metadata={"spacing": 1.2, "unit": "nm"})
    zarr_image(tmp_path / "v.zarr", data)
    return data, tmp_path


def test_every_format_opens_to_one_volume(volumes, client):
    data, folder = volumes
    for name, fmt in [("v.mrc", "mrc"), ("v.tif", "tiff"), ("v.zarr", "zarr")]:
        volume = open_volume(folder / name)
        assert isinstance(volume, Volume) and volume.format == fmt, name
        assert volume.shape == data.shape and volume.voxel_size == pytest.approx((12.0,) * 3), name
        assert np.dtype(volume.dtype) == np.float32
        region = (slice(2, 7), slice(None, None, 3), 5)
        np.testing.assert_array_equal(volume.read(region), data[region])
        assert pickle.loads(pickle.dumps(volume)) == volume
        # read on a worker process, as every step does, and as a lazy dask array
        np.testing.assert_array_equal(client.submit(volume.read, (slice(0, 4),)).result(), data[:4])
        np.testing.assert_array_equal(volume.to_dask((3, -1, -1)).compute(scheduler="sync"), data)
    assert open_volume(folder / "v.zarr").chunks == (4, 8, 8)  # a zarr array's own chunks
    assert open_volume(folder / "v.mrc", chunks=(5, 16, 24)).chunks == (5, 16, 24)
    level1 = open_volume(folder / "v.zarr" / "1")  # one array of a store: its level's scale
    assert level1.shape == (5, 8, 12) and level1.voxel_size == (24.0, 24.0, 24.0)
    np.testing.assert_array_equal(level1[:], data[::2, ::2, ::2])


def test_voxel_size_dtype_and_identity(volumes):
    _, folder = volumes
    assert open_volume(folder / "v.mrc", 7).voxel_size == (7.0, 7.0, 7.0)
    assert open_volume(folder / "v.zarr", (5, 6, 7)).voxel_size == (5.0, 6.0, 7.0)
    as_int = open_volume(folder / "v.mrc", dtype="int16")
    assert as_int.read((0,)).dtype == np.int16 and as_int.astype(None).dtype == np.dtype(np.float32).str
    with mrcfile.open(folder / "v.mrc") as mrc:  # the reader users check with agrees
        np.testing.assert_array_equal(open_volume(folder / "v.mrc")[:], mrc.data)
    size = source_identity(open_volume(folder / "v.zarr"))[0]
    assert size == (folder / "v.zarr" / "0" / ".zarray").stat().st_size
    assert source_identity(open_volume(folder / "v.mrc"))[0] == (folder / "v.mrc").stat().st_size


def test_bad_volumes_and_voxel_sizes_are_one_line_errors(volumes, tmp_path):
    data, folder = volumes
    for bad in (0, -1, (1, 2), float("nan"), "ten", True):
        with pytest.raises(FieldError, match="^voxel_size must be a positive number of Å") as info:
            open_volume(folder / "v.mrc", bad)
        assert cli_message(info.value).startswith("--voxel-size must be")
    write_raw_mrc(tmp_path / "novoxel.mrc", data, voxel_size=0.0)
    one_line_error(lambda: open_volume(tmp_path / "novoxel.mrc"), tmp_path / "novoxel.mrc", "pass --voxel-size")
    assert open_volume(tmp_path / "novoxel.mrc", 3.5).voxel_size == (3.5, 3.5, 3.5)
    one_line_error(lambda: open_volume(tmp_path / "nothing.mrc"), tmp_path / "nothing.mrc", "no such file")
    one_line_error(lambda: open_volume(folder), folder, "not an OME-Zarr")
    bare = tmp_path / "bare.zarr"  # an array outside any OME-Zarr image: no scale to read
    zarr.open_array(str(bare), mode="w", shape=(2, 4, 4), chunks=(1, 4, 4), dtype="uint8", zarr_format=2)
    one_line_error(lambda: open_volume(bare), bare, "voxel size is missing or 0 in the header; pass --voxel-size")
    assert open_volume(bare, 4).shape == (2, 4, 4)
    flat = zarr_image(tmp_path / "flat.zarr", np.zeros((1, 4, 4), np.uint8))
    one_line_error(lambda: open_volume(flat / "0" / ".zarray"), flat / "0" / ".zarray", "unsupported format")


def test_one_stem_rule():
    assert [stem(p) for p in ("a/TS_01.mrc", "TS_01.rec", "b/TS_01.zarr/", "TS_01.ome.zarr", "x.zarr/labels/m")] == \
        ["TS_01", "TS_01", "TS_01", "TS_01", "x_m"]  # a label image: its store and its name


# ---------------------------------------------------------------- the validation helper

def test_validate_returns_canonical_values_and_names_the_field():
    assert validate.number("low", 3) == 3.0 and isinstance(validate.number("low", np.int64(3)), float)
    assert validate.positive("diameter", None, none=True) is None
    assert validate.count("top_k", np.int32(0), 0) == 0
    assert validate.shape("chunks", [4, 8, 8]) == (4, 8, 8)
    assert validate.point("point", (1, 2.5, 3)) == (1.0, 2.5, 3.0)
    assert validate.voxel_size(7) == (7.0, 7.0, 7.0) and validate.voxel_size(None) is None
    assert validate.boolean("dark", np.bool_(False)) is False
    cases = [
        (lambda: validate.positive("diameter", -3), "diameter must be a positive number, got -3"),
        (lambda: validate.number("iou_threshold", 1.5, low=0, high=1),
         "iou_threshold must be a number >= 0 and <= 1, got 1.5"),
        (lambda: validate.number("low", "3"), "low must be a number, got '3'"),
        (lambda: validate.number("low", True), "low must be a number, got True"),
        (lambda: validate.count("max_picks", 2.0, 1, none=True),
         "max_picks must be a whole number >= 1 or None, got 2.0"),
        (lambda: validate.count("nms_window", 4, 1, odd=True), "nms_window must be an odd whole number >= 1, got 4"),
        (lambda: validate.choice("matching", "fast", ("hierarchical", "naive")),
         "matching must be one of hierarchical, naive, got 'fast'"),
        (lambda: validate.shape("chunks", (4, 0, 8)), "chunks must be 3 whole numbers >= 1, got (4, 0, 8)"),
        (lambda: validate.point("point", (1, 2)), "point must be 3 finite numbers, got (1, 2)"),
        (lambda: validate.boolean("dark", "yes"), "dark must be true or false, got 'yes'"),
    ]
    for call, message in cases:
        with pytest.raises(FieldError) as info:
            call()
        assert str(info.value) == message
        assert isinstance(info.value, InputError) and "\n" not in message
    assert cli_message(FieldError("min_slices", "must be >= 0")) == "--min-slices must be >= 0"
    assert cli_message(InputError("x.mrc: no such file")) == "x.mrc: no such file"


def test_the_cli_names_flags(tmp_path, capsys):
    write_raw_mrc(tmp_path / "t.mrc", np.zeros((4, 4, 4), np.float32))
    line = cli_error(capsys, ["convert", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "o"), "--levels", "0"])
    assert line == "error: --levels must be a whole number >= 1, got 0"
