"""Micrograph files (real FEI MRC, EMPIAR-10017 JPEG, TIFF/PNG written here) in, and the lists of them."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import tifffile
from PIL import Image

from cryodask.errors import InputError
from cryodask.io.micrographs import bin_image, find_micrographs, micrograph_name, micrograph_shape, read_micrograph
from conftest import one_line_error, write_raw_mrc

FALCON = "Falcon_2012_06_12-14_33_35_0"


def test_real_fei_mrc_with_extended_header(data_dir):
    path = data_dir / "mrc" / "fei-extended.mrc"
    micrograph = read_micrograph(path)
    assert micrograph.name == "fei-extended" and micrograph.path == path
    assert micrograph.image.shape == (3838, 3710) == micrograph_shape(path)
    assert micrograph.image.dtype == np.float32 and np.isfinite(micrograph.image).all()
    assert micrograph.pixel_size == pytest.approx(0.854, abs=1e-3)
    with mrcfile.mmap(path, permissive=True) as mrc:  # the uint16 values, unchanged, in file order
        np.testing.assert_array_equal(micrograph.image[:3, :5], mrc.data[:3, :5].astype(np.float32))
    assert read_micrograph(path, pixel_size=1.5).pixel_size == 1.5


def test_real_jpeg_is_grey_float_without_pixel_size(data_dir):
    path = data_dir / "empiar10017" / "micrographs" / f"{FALCON}.jpg"
    micrograph = read_micrograph(path)
    assert micrograph.name == FALCON == micrograph_name(path)
    assert micrograph.image.shape == (4096, 4096) == micrograph_shape(path)
    assert micrograph.image.dtype == np.float32 and micrograph.pixel_size is None
    assert 0 <= micrograph.image.min() < micrograph.image.max() <= 255
    assert read_micrograph(path, pixel_size=1.77).pixel_size == 1.77


def test_tiff_and_png_written_here(tmp_path):
    image = np.random.default_rng(0).integers(0, 60000, (37, 53)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image, imagej=True, resolution=(1 / 0.25, 1 / 0.25), metadata={"unit": "nm"})
    tiff = read_micrograph(tmp_path / "a.tif")
    np.testing.assert_array_equal(tiff.image, image.astype(np.float32))
    assert tiff.pixel_size == pytest.approx(2.5) and micrograph_shape(tmp_path / "a.tif") == (37, 53)
    tifffile.imwrite(tmp_path / "plain.tiff", image[None])  # one page of a stack, no units
    assert read_micrograph(tmp_path / "plain.tiff").pixel_size is None
    assert micrograph_shape(tmp_path / "plain.tiff") == (37, 53)

    grey = (image // 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_micrograph(tmp_path / "g.png").image, grey)
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    Image.fromarray(colour).save(tmp_path / "c.png")
    expected = np.asarray(Image.fromarray(colour).convert("L"), np.float32)  # PIL's own luma
    np.testing.assert_array_equal(read_micrograph(tmp_path / "c.png").image, expected)
    tifffile.imwrite(tmp_path / "c.tif", colour)
    np.testing.assert_allclose(read_micrograph(tmp_path / "c.tif").image, expected, atol=1)
    assert micrograph_shape(tmp_path / "c.png") == micrograph_shape(tmp_path / "c.tif") == (37, 53)


def test_one_section_mrc_and_refused_stack(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    write_raw_mrc(tmp_path / "one.mrc", data, voxel_size=3.0)
    micrograph = read_micrograph(tmp_path / "one.mrc")
    np.testing.assert_array_equal(micrograph.image, data[0])
    assert micrograph.pixel_size == 3.0 and micrograph_shape(tmp_path / "one.mrc") == (3, 4)
    write_raw_mrc(tmp_path / "stack.mrcs", np.zeros((3, 4, 5), np.float32))
    one_line_error(lambda: read_micrograph(tmp_path / "stack.mrcs"), tmp_path / "stack.mrcs", "one 2D image")
    one_line_error(lambda: micrograph_shape(tmp_path / "stack.mrcs"), tmp_path / "stack.mrcs", "one 2D image")
    with mrcfile.new(tmp_path / "nosize.mrc") as mrc:  # a zero sampling: no pixel size, not 0 Å
        mrc.set_data(np.zeros((4, 4), np.float32))
        mrc.voxel_size = 0
    assert read_micrograph(tmp_path / "nosize.mrc").pixel_size is None


@pytest.mark.filterwarnings("ignore:Data array contains NaN")  # written on purpose
def test_bad_micrograph_files_are_one_line_errors(tmp_path, data_dir):
    write_raw_mrc(tmp_path / "t.mrc", np.ones((64, 64), np.float32))
    raw = (tmp_path / "t.mrc").read_bytes()
    (tmp_path / "t.mrc").write_bytes(raw[: len(raw) - 1000])
    one_line_error(lambda: read_micrograph(tmp_path / "t.mrc"), tmp_path / "t.mrc", "truncated")
    one_line_error(lambda: micrograph_shape(tmp_path / "t.mrc"), tmp_path / "t.mrc", "truncated")

    data = np.ones((8, 9), np.float32)
    data[5, 7] = np.nan
    write_raw_mrc(tmp_path / "nan.mrc", data)
    message = one_line_error(lambda: read_micrograph(tmp_path / "nan.mrc"), tmp_path / "nan.mrc", "NaN or Inf")
    assert "row 5, column 7" in message

    jpeg = (data_dir / "empiar10017" / "micrographs" / f"{FALCON}.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[:20000])
    one_line_error(lambda: read_micrograph(tmp_path / "cut.jpg"), tmp_path / "cut.jpg", "not a readable image")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    one_line_error(lambda: micrograph_shape(tmp_path / "junk.png"), tmp_path / "junk.png", "not a readable image")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    one_line_error(lambda: read_micrograph(tmp_path / "junk.tif"), tmp_path / "junk.tif", "not a readable TIFF")
    one_line_error(lambda: read_micrograph(tmp_path / "m.dm4"), tmp_path / "m.dm4", "not a micrograph file type")
    one_line_error(lambda: read_micrograph(tmp_path / "gone.mrc"), tmp_path / "gone.mrc", "no such file")


def test_find_micrographs_from_folders_globs_and_star(tmp_path, monkeypatch):
    folder = tmp_path / "Movies"
    folder.mkdir()
    for name in ("b.mrc", "a.JPG", "c.tiff", "d.png", "e.mrcs", "notes.txt", "picks.star"):
        (folder / name).write_bytes(b"")
    expected = [folder / n for n in ("a.JPG", "b.mrc", "c.tiff", "d.png", "e.mrcs")]
    assert find_micrographs(folder) == expected
    assert find_micrographs(str(folder / "*.mrc*")) == [folder / "b.mrc", folder / "e.mrcs"]
    assert (find_micrographs([folder / "b.mrc", folder, folder / "b.mrc"])
            == [folder / "b.mrc", *expected[:1], *expected[2:]])

    # RELION: names relative to the project root (the current folder) or beside the STAR
    project = tmp_path / "project"
    (project / "Select" / "job005").mkdir(parents=True)
    (project / "Select" / "job005" / "local.mrc").write_bytes(b"")
    star = project / "Select" / "job005" / "micrographs.star"
    names = [str(folder / "b.mrc"), "Select/job005/local.mrc", "local.mrc"]
    starfile.write({"micrographs": pd.DataFrame({"rlnMicrographName": names})}, star)
    monkeypatch.chdir(project)
    found = find_micrographs(star)
    assert [p.name for p in found] == ["b.mrc", "local.mrc"] and all(p.is_file() for p in found)

    starfile.write({"micrographs": pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/missing.mrc"]})},
                   tmp_path / "bad.star")
    one_line_error(lambda: find_micrographs(tmp_path / "bad.star"), tmp_path / "bad.star", "missing.mrc")
    starfile.write({"particles": pd.DataFrame({"rlnCoordinateX": [1.0]})}, tmp_path / "nolist.star")
    one_line_error(lambda: find_micrographs(tmp_path / "nolist.star"), tmp_path / "nolist.star", "rlnMicrographName")
    one_line_error(lambda: find_micrographs(str(tmp_path / "*.mrc")), tmp_path / "*.mrc", "matches no micrograph")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: find_micrographs(tmp_path / "empty"), tmp_path / "empty", "holds no micrograph")
    one_line_error(lambda: find_micrographs(tmp_path / "nothing.mrc"), tmp_path / "nothing.mrc", "no such file")
    one_line_error(lambda: find_micrographs(folder / "notes.txt"), folder / "notes.txt", "not a micrograph file type")
    (tmp_path / "b.png").write_bytes(b"")
    one_line_error(lambda: find_micrographs([folder, tmp_path / "b.png"]), tmp_path / "b.png", "same name")


def test_bin_image_is_a_block_mean():
    image = np.arange(7 * 9, dtype=np.float64).reshape(7, 9)
    binned = bin_image(image, 2)
    assert binned.shape == (3, 4) and binned.dtype == np.float32
    assert binned[1, 2] == pytest.approx(image[2:4, 4:6].mean())
    np.testing.assert_allclose(bin_image(image, 3), image[:6, :9].reshape(2, 3, 3, 3).mean(axis=(1, 3)))
    np.testing.assert_array_equal(bin_image(image, 1), image.astype(np.float32))
    for factor in (0, 1.5, 10):
        with pytest.raises(InputError):
            bin_image(image, factor)
