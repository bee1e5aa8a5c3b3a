"""Formats: OME-Zarr labels, STAR/CSV coordinates (real RELION files), MRC writing, blocks."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from cryodask.engine.blocks import DoneMarks, plan_blocks
from cryodask.errors import InputError
from cryodask.io.mrc import mrc_dtype, write_mrc
from cryodask.io.omezarr import create_image, open_image, write_labels
from cryodask.io.picks import read_picks, write_picks


@settings(deadline=None)  # up to 64 000 one-voxel blocks: slow on a loaded 2-core CI machine, not wrong
@given(shape=st.tuples(*[st.integers(0, 40)] * 3), chunks=st.tuples(*[st.integers(1, 12)] * 3),
       max_bytes=st.sampled_from([None, 1, 64, 10**6]))
def test_blocks_tile_the_array_exactly_on_chunk_boundaries(shape, chunks, max_bytes):
    blocks = plan_blocks(shape, chunks, itemsize=4, max_bytes=max_bytes)
    cover = np.zeros(shape, np.int32)
    for block in blocks:
        cover[block.region] += 1
        for s, c, n in zip(block.region, chunks, shape):
            assert s.start % min(c, n or 1) == 0 and (s.stop == n or s.stop % min(c, n) == 0)
    assert (cover == 1).all()
    assert len({b.name for b in blocks}) == len(blocks)


def test_done_marks_are_keyed_by_parameters(tmp_path):
    marks = DoneMarks(tmp_path, "convert", "aaa")
    marks.mark("0/1.2.3")
    assert marks.done("0/1.2.3") and not marks.done("0/1.2.4") and marks.count() == 1
    assert not DoneMarks(tmp_path, "convert", "bbb").done("0/1.2.3")
    DoneMarks(tmp_path, "convert", "bbb").clear_step()
    assert not marks.done("0/1.2.3")


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_labels_are_a_multiscale_napari_reads(tmp_path, ngff):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    store = tmp_path / "t.zarr"
    create_image(store, (9, 20, 30), chunks=(4, 8, 8), dtype="float32", voxel_size=(5.0, 5.0, 5.0), levels=3, ngff=ngff)
    labels = np.zeros((9, 20, 30), np.uint32)
    labels[2:7, 3:15, 4:25] = 1
    labels[0, 0, 0] = 7
    write_labels(store, "membranes", labels, colors={1: [255, 0, 0, 255]})
    write_labels(store, "particles", labels * 2)
    _, arrays, vs, _ = open_image(store / "labels" / "membranes")
    assert len(arrays) == 3 and vs == (5.0, 5.0, 5.0)
    np.testing.assert_array_equal(arrays[0][:], labels)
    np.testing.assert_array_equal(arrays[1][:], labels[::2, ::2, ::2])  # nearest: ids never blend
    assert arrays[2].shape == (3, 5, 8)
    root = zarr.open_group(str(store / "labels"), mode="r").attrs.asdict()
    assert (root["ome"] if ngff == "0.5" else root)["labels"] == ["membranes", "particles"]
    meta = zarr.open_group(str(store / "labels" / "membranes"), mode="r").attrs.asdict()
    image_label = (meta["ome"] if ngff == "0.5" else meta)["image-label"]
    assert image_label["source"] == {"image": "../../"}
    assert image_label["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}]
    nodes = list(Reader(parse_url(str(store)))())
    assert sum(any(isinstance(spec, Label) for spec in node.specs) for node in nodes) == 2


def test_labels_must_match_the_image(tmp_path):
    create_image(tmp_path / "t.zarr", (4, 4, 4), chunks=(2, 2, 2), dtype="uint8", voxel_size=(1, 1, 1), levels=1)
    with pytest.raises(ValueError, match="differs"):
        write_labels(tmp_path / "t.zarr", "x", np.zeros((4, 4, 5), np.uint32))
    with pytest.raises(InputError, match="not an OME-Zarr"):
        open_image(tmp_path / "missing.zarr")


@pytest.mark.parametrize("suffix", [".star", ".csv"])
def test_picks_round_trip(tmp_path, suffix):
    coords = np.random.default_rng(0).uniform(0, 100, size=(25, 3))
    write_picks(tmp_path / f"p{suffix}", coords, {"rlnClassNumber": np.arange(25) % 2 + 1})
    picks = read_picks(tmp_path / f"p{suffix}")
    np.testing.assert_allclose(picks.coords, coords, atol=1e-5)  # STAR keeps 6 decimals
    assert list(picks.table["rlnClassNumber" if suffix == ".star" else "rlnclassnumber"][:3]) == [1, 2, 1]
    write_picks(tmp_path / f"q{suffix}", coords[:, 1:])
    assert read_picks(tmp_path / f"q{suffix}").coords.shape == (25, 2)


def test_real_star_and_cryoppp_files(data_dir, tmp_path):
    one_loop = read_picks(data_dir / "star" / "starfile" / "one_loop.star")
    assert one_loop.coords.shape == (16, 3) and one_loop.pixel_size == 5.0
    star = read_picks(data_dir / "empiar10017" / "cryoppp" / "Falcon_2012_06_12-14_33_35_0.star")
    csv = read_picks(data_dir / "empiar10017" / "cryoppp" / "Falcon_2012_06_12-14_33_35_0.csv")
    assert star.coords.shape == (629, 2)
    np.testing.assert_allclose(np.sort(csv.coords, axis=0), np.sort(star.coords, axis=0))
    alone = tmp_path / "particles.star"  # RELION 5 centred Å, with no tomograms.star to place them
    alone.write_bytes((data_dir / "star" / "relion-tomo-cylindra" / "Picks" / "job_picks" / "particles.star")
                      .read_bytes())
    with pytest.raises(InputError, match="RELION 5 centred"):
        read_picks(alone)
    with pytest.raises(InputError, match="no table with rlnCoordinateX"):
        read_picks(data_dir / "star" / "starfile" / "postprocess.star")


@pytest.mark.parametrize("text", ["data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 abc\n",
                                  "\x00\x01\x02 binary",
                                  "data_particles\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 nan\n"])
def test_unreadable_star_is_one_clear_error(tmp_path, text):
    (tmp_path / "bad.star").write_text(text)
    with pytest.raises(InputError) as info:
        read_picks(tmp_path / "bad.star")
    assert str(info.value).startswith(str(tmp_path / "bad.star")) and "\n" not in str(info.value)


def test_write_mrc_modes_header_and_atomicity(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint32)
    labels[1, 2, 3] = 40000
    write_mrc(tmp_path / "l.mrc", labels, (2.0, 3.0, 4.0))
    with mrcfile.open(tmp_path / "l.mrc") as mrc:
        assert mrc.data.dtype == np.uint16 and mrc.data[1, 2, 3] == 40000
        assert (mrc.voxel_size.z, mrc.voxel_size.y, mrc.voxel_size.x) == (2.0, 3.0, 4.0)
        assert mrc.header.dmax == 40000 and mrc.header.dmin == 0
    assert not list(tmp_path.glob("*.partial"))
    assert mrc_dtype(np.uint32, 100) == np.int8 and mrc_dtype(np.uint64, 2**20) == np.float32
    with pytest.raises(ValueError, match="do not fit"):
        mrc_dtype(np.uint64, 2**30)
    write_mrc(tmp_path / "m.mrc", np.arange(12, dtype=np.float32).reshape(3, 4), 1.5)
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        assert mrc.data.shape == (3, 4) and mrc.header.dmean == pytest.approx(5.5)


@st.composite
def basic_index(draw, shape):
    index = []
    for n in shape:
        if draw(st.booleans()):
            index.append(draw(st.integers(-n, n - 1)))
        else:
            index.append(slice(draw(st.none() | st.integers(-n - 2, n + 2)),
                               draw(st.none() | st.integers(-n - 2, n + 2)), draw(st.none() | st.integers(1, 3))))
    return tuple(index)


SHAPE = (7, 9, 11)


@given(index=basic_index(SHAPE))
def test_volume_reads_equal_numpy_indexing(index):
    import tempfile
    from pathlib import Path

    import tifffile

    from conftest import write_raw_mrc
    from cryodask.io.volumes import open_volume

    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        write_raw_mrc(Path(tmp) / "v.mrc", data)
        tifffile.imwrite(Path(tmp) / "v.tif", data, imagej=True)
        for name in ("v.mrc", "v.tif"):
            np.testing.assert_array_equal(open_volume(Path(tmp) / name, voxel_size=1.0).read(index), data[index])
