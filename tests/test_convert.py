"""MRC/TIFF → OME-Zarr on a real LocalCluster: exactness, pyramid, metadata, resume, memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_raw_mrc
from cryodask.convert import ConvertParams, convert, downsample_mean, plan_pyramid
from cryodask.io.omezarr import open_image


def reference_pyramid(data, levels):
    """The whole-array pyramid, computed without blocks."""
    out = [data]
    for _ in range(1, levels):
        prev = out[-1]
        out.append(downsample_mean(prev, tuple((s + 1) // 2 for s in prev.shape), data.dtype))
    return out


def assert_store_equals(store, data, voxel_size, levels):
    _, arrays, vs, _ = open_image(store)
    assert len(arrays) == levels
    assert vs == pytest.approx(voxel_size)
    for level, (array, ref) in enumerate(zip(arrays, reference_pyramid(data, levels))):
        assert array.dtype == ref.dtype
        np.testing.assert_array_equal(array[:], ref, err_msg=f"level {level}")


def test_downsample_is_mean_with_edge_replication():
    data = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = downsample_mean(data, (2, 2, 2), np.float32)
    assert out[0, 0, 0] == pytest.approx(data[:2, :2, :2].mean())
    assert out[1, 1, 1] == data[2, 2, 2]  # odd edge: the voxel averaged with itself
    ints = downsample_mean(np.array([[[1, 2]]], dtype=np.int8), (1, 1, 1), np.int8)
    assert ints.dtype == np.int8 and ints[0, 0, 0] == 2  # 1.5 rounds half to even


@pytest.mark.parametrize("dtype", ["float32", "int8", "int16", "uint16", "float16"])
def test_round_trip_exact_for_every_mrc_mode(tmp_path, client, dtype):
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(19, 40, 33)) * 50).astype(dtype)
    write_raw_mrc(tmp_path / "t.mrc", data, voxel_size=(5.0, 5.0, 6.0))  # x, y, z in mrcfile
    report = convert([tmp_path / "t.mrc"], tmp_path / "out", ConvertParams(chunks=(8, 16, 16), levels=3), client=client)
    assert [r.status for r in report.results] == ["converted"]
    assert_store_equals(tmp_path / "out" / "t.zarr", data, (6.0, 5.0, 5.0), 3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(*[st.integers(1, 23)] * 3), chunks=st.tuples(*[st.integers(1, 9)] * 3),
       levels=st.integers(1, 4), block_bytes=st.sampled_from([1, 500, 10**6]))
def test_chunked_conversion_equals_whole_array(tmp_path_factory, client, shape, chunks, levels, block_bytes):
    tmp = tmp_path_factory.mktemp("prop")
    data = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    write_raw_mrc(tmp / "v.mrc", data, voxel_size=3.0)
    report = convert([tmp / "v.mrc"], tmp / "out", ConvertParams(chunks=chunks, levels=levels), client=client,
                     block_bytes=block_bytes)
    assert report.results[0].status == "converted", report.results[0].message
    assert_store_equals(tmp / "out" / "v.zarr", data, (3.0, 3.0, 3.0), levels)
    _, arrays, _, _ = open_image(tmp / "out" / "v.zarr")
    assert arrays[0].chunks == tuple(min(c, s) for c, s in zip(chunks, shape))


@pytest.mark.parametrize("ngff,zarr_format", [("0.4", 2), ("0.5", 3)])
def test_ngff_metadata_is_what_napari_and_the_portal_read(tmp_path, client, ngff, zarr_format):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = np.random.default_rng(0).normal(size=(30, 40, 50)).astype(np.float32)
    write_raw_mrc(tmp_path / "tomo.mrc", data, voxel_size=8.0)
    convert([tmp_path / "tomo.mrc"], tmp_path / "out", ConvertParams(chunks=(16, 16, 16), levels=3, ngff=ngff),
            client=client)
    store = tmp_path / "out" / "tomo.zarr"
    group = zarr.open_group(str(store), mode="r")
    assert group.metadata.zarr_format == zarr_format
    attrs = group.attrs.asdict()
    multiscales = (attrs["ome"] if ngff == "0.5" else attrs)["multiscales"][0]
    assert [a["name"] for a in multiscales["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in multiscales["axes"]} == {"angstrom"}
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscales["datasets"]]
    assert scales == [[8.0] * 3, [16.0] * 3, [32.0] * 3]
    source = attrs["cryodask"]["source"]
    assert source["path"].endswith("tomo.mrc") and source["header"]["nx"] == 50
    node = next(iter(Reader(parse_url(str(store)))()))
    assert [tuple(d.shape) for d in node.data] == [(30, 40, 50), (15, 20, 25), (8, 10, 13)]
    if ngff == "0.5":
        assert group["0"].metadata.dimension_names == ("z", "y", "x")


def test_tiff_stack_and_dtype_option(tmp_path, client):
    data = np.random.default_rng(2).integers(0, 4000, size=(12, 30, 20)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", data, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"unit": "nm", "spacing": 0.5})
    report = convert([tmp_path / "stack.tif"], tmp_path / "out", ConvertParams(chunks=(4, 16, 16), levels=2),
                     client=client)
    assert report.results[0].status == "converted", report.results[0].message
    assert_store_equals(tmp_path / "out" / "stack.zarr", data, (5.0, 5.0, 5.0), 2)
    convert([tmp_path / "stack.tif"], tmp_path / "f32", ConvertParams(chunks=(4, 16, 16), levels=2, dtype="float32"),
            client=client)
    _, arrays, _, _ = open_image(tmp_path / "f32" / "stack.zarr")
    assert arrays[0].dtype == np.float32
    np.testing.assert_array_equal(arrays[0][:], data.astype(np.float32))


def test_real_mrc_files_convert_exactly(tmp_path, client, data_dir):
    for name in ("serialem-int8-3d.mrc", "EMD-3197.map"):
        path = data_dir / "mrc" / name
        with mrcfile.mmap(path, permissive=True) as mrc:
            # the SerialEM crop's mode-0 bytes are unsigned (header range 141..163): stored as uint8
            data = np.array(mrc.data).view(np.uint8) if name.startswith("serialem") else np.array(mrc.data)
            vs = tuple(float(mrc.voxel_size[a]) for a in "zyx")
        report = convert([path], tmp_path, ConvertParams(chunks=(16, 32, 32), levels=2), client=client)
        assert report.results[0].status == "converted", report.results[0].message
        assert_store_equals(tmp_path / f"{path.stem}.zarr", data, tuple(round(v, 4) for v in vs), 2)


def test_rerun_skips_and_changed_parameter_redoes(tmp_path, client):
    data = np.random.default_rng(3).normal(size=(20, 20, 20)).astype(np.float32)
    write_raw_mrc(tmp_path / "a.mrc", data)
    params = ConvertParams(chunks=(8, 8, 8), levels=2)
    first = convert([tmp_path / "a.mrc"], tmp_path / "out", params, client=client).results[0]
    again = convert([tmp_path / "a.mrc"], tmp_path / "out", params, client=client).results[0]
    assert (first.status, again.status) == ("converted", "skipped")
    changed = convert([tmp_path / "a.mrc"], tmp_path / "out", ConvertParams(chunks=(4, 8, 8), levels=3),
                      client=client).results[0]
    assert changed.status == "converted" and changed.blocks_skipped == 0
    assert_store_equals(tmp_path / "out" / "a.zarr", data, (10.0, 10.0, 10.0), 3)
    assert open_image(tmp_path / "out" / "a.zarr")[1][0].chunks == (4, 8, 8)


def test_bad_tomogram_fails_alone_and_is_not_marked_complete(tmp_path, client):
    good = np.ones((10, 10, 10), np.float32)
    bad = good.copy()
    bad[7, 3, 3] = np.nan
    write_raw_mrc(tmp_path / "good.mrc", good)
    write_raw_mrc(tmp_path / "nan.mrc", bad)
    report = convert([tmp_path], tmp_path / "out", ConvertParams(chunks=(4, 8, 8), levels=2), client=client)
    status = {os.path.basename(r.source): r for r in report.results}
    assert status["good.mrc"].status == "converted"
    assert status["nan.mrc"].status == "failed"
    assert ("nan.mrc" in status["nan.mrc"].message and "NaN or Inf" in status["nan.mrc"].message
            and "z=7" in status["nan.mrc"].message)
    attrs = zarr.open_group(str(tmp_path / "out" / "nan.zarr"), mode="r").attrs["cryodask"]["convert"]
    assert attrs["complete"] is False
    again = convert([tmp_path / "nan.mrc"], tmp_path / "out", ConvertParams(chunks=(4, 8, 8), levels=2), client=client)
    assert again.results[0].status == "failed"  # never skipped as if done


def test_tomogram_larger_than_worker_memory(tmp_path):
    """A 336 MB tomogram through workers limited to 250 MB each (about 120 MB of it is the
    interpreter and libraries): the nanny would kill a worker that held the volume."""
    from distributed import Client, LocalCluster

    shape = (80, 1024, 1024)
    with mrcfile.new_mmap(tmp_path / "big.mrc", shape=shape, mrc_mode=2) as mrc:
        for z in range(shape[0]):
            mrc.data[z] = np.float32(z) + np.arange(shape[2], dtype=np.float32)[None, :]
        mrc.voxel_size = 10.0
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="250MB", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        report = convert([tmp_path / "big.mrc"], tmp_path / "out", ConvertParams(chunks=(16, 256, 256), levels=2),
                         client=client, block_bytes=8 * 2**20)
        rss = client.run(lambda dask_worker: dask_worker.monitor.get_process_memory())
    assert report.results[0].status == "converted", report.results[0].message
    assert max(rss.values()) < 250e6
    _, arrays, _, _ = open_image(tmp_path / "out" / "big.zarr")
    for z in (0, 37, 79):
        np.testing.assert_array_equal(arrays[0][z, 500], np.float32(z) + np.arange(shape[2], dtype=np.float32))


def test_killed_conversion_resumes_to_identical_result(tmp_path):
    """SIGKILL the command mid-run; the rerun keeps finished chunks (same mtime) and the final
    store equals an uninterrupted conversion."""
    data = np.random.default_rng(4).normal(size=(96, 256, 256)).astype(np.float32)
    write_raw_mrc(tmp_path / "t.mrc", data)
    args = [sys.executable, "-m", "cryodask", "convert", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "out"),
            "--chunks", "8,64,64", "--levels", "3", "--workers", "2"]
    env = {**os.environ, "CRYODASK_BLOCK_DELAY": "0.3"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marks = tmp_path / "out" / ".cryodask" / "t"
    deadline = time.time() + 60
    while time.time() < deadline and sum(1 for p in marks.rglob("*") if p.is_file()) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.relative_to(marks) for p in marks.rglob("*") if p.is_file()}
    assert 5 <= len(done) < 12, "the kill must land mid-run (15 blocks in all)"
    store = tmp_path / "out" / "t.zarr"
    assert zarr.open_group(str(store), mode="r").attrs["cryodask"]["convert"]["complete"] is False
    chunk_files = {p: p.stat().st_mtime_ns for p in (store / "0").rglob("*")
                   if p.is_file() and not p.name.startswith(".")}
    time.sleep(0.02)
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report_line = next(line for line in result.stdout.splitlines() if "t.mrc" in line)
    assert "resumed" in report_line
    blocks = {b.name: b for b in plan_pyramid((96, 256, 256), (8, 64, 64), 3, 4, 128 * 2**20)[0]}
    finished = [blocks[d.parts[2]] for d in done if d.parts[1] == "0"]
    finished_chunks = {store / "0" / str(z // 8) / str(y // 64) / str(x // 64)
                       for b in finished for z in range(b.region[0].start, b.region[0].stop, 8)
                       for y in range(b.region[1].start, b.region[1].stop, 64)
                       for x in range(b.region[2].start, b.region[2].stop, 64)}
    assert finished_chunks and finished_chunks <= set(chunk_files)
    assert all(p.stat().st_mtime_ns == chunk_files[p] for p in finished_chunks), "finished chunks were rewritten"
    assert_store_equals(store, data, (10.0, 10.0, 10.0), 3)
    assert zarr.open_group(str(store), mode="r").attrs["cryodask"]["convert"]["complete"] is True


def test_collection_larger_than_the_window(tmp_path, client):
    """Ten tomograms, two in flight at a time, one of them bad and one already done."""
    from cryodask.convert import plan_conversion, run_conversion

    rng = np.random.default_rng(6)
    volumes = {f"t{i}": rng.normal(size=(5 + i, 12, 9)).astype(np.float32) for i in range(10)}
    volumes["t4"][2, 2, 2] = np.nan
    for name, data in volumes.items():
        write_raw_mrc(tmp_path / f"{name}.mrc", data)
    convert([tmp_path / "t7.mrc"], tmp_path / "out", ConvertParams(chunks=(4, 8, 8), levels=2), client=client)
    plan = plan_conversion([tmp_path / "*.mrc"], tmp_path / "out", ConvertParams(chunks=(4, 8, 8), levels=2))
    report = run_conversion(plan, client, in_flight=2)
    assert [os.path.basename(r.source) for r in report.results] == [f"t{i}.mrc" for i in range(10)]
    assert [r.status for r in report.results] == (["converted"] * 4 + ["failed"] + ["converted"] * 2 + ["skipped"]
                                                   + ["converted"] * 2)
    for name, data in volumes.items():
        if name != "t4":
            assert_store_equals(tmp_path / "out" / f"{name}.zarr", data, (10.0, 10.0, 10.0), 2)
