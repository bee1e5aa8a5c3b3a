"""The one block runner (``cryodask.engine.runner``): its task shell, its first-error rule, the
lazy dask-array form of the kernels, and a postprocess resumed after a kill (issue 13, items 1 and 9)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_raw_mrc

from cryodask.engine import progress
from cryodask.engine.blocks import DoneMarks, plan_blocks
from cryodask.engine.runner import run_blocks
from cryodask.errors import InputError

REAL = "tomograms/cylindra_14pf_MT.tif"  # 44x136x84 uint8, real cryo-ET noise, 10.52 Å/voxel
VOXEL = 10.52


@pytest.fixture
def real_volume(data_dir) -> np.ndarray:
    import tifffile

    return tifffile.imread(data_dir / REAL).astype(np.float32)


# ------------------------------------------------------------------ the task shell

def _sum_kernel(region, data, offset):
    return float(data[region.inner].sum()) + offset


def _fails(region, data):
    if region.name == "1.0.0":
        raise ValueError("broken block")
    if region.name == "0.1.0":
        raise InputError("bad input: fix it")
    return 0


def test_blocks_run_once_marked_blocks_give_back_their_result_and_the_halo_is_clipped(tmp_path, client, monkeypatch):
    """The second run finds every block marked: no kernel runs (the fault-injection log stays
    empty), yet every result comes back; the halo never reaches past the volume."""
    volume = np.arange(8 * 12 * 10, dtype=np.float32).reshape(8, 12, 10)
    blocks = plan_blocks(volume.shape, (4, 6, 10))
    reads = []

    def read(region):
        reads.append(region)
        return volume[region]

    log = tmp_path / "blocks.log"
    monkeypatch.setenv("CRYODASK_BLOCK_LOG", str(log))
    marks = DoneMarks(tmp_path, "sum", "k")
    first = run_blocks(None, _sum_kernel, blocks, step="sum", args=(0.5,), marks=marks, shape=volume.shape,
                       halo=(2, 2, 2), read=read, label="test")
    assert first == [float(volume[b.region].sum()) + 0.5 for b in blocks]
    assert sorted(log.read_text().splitlines()) == sorted(f"test sum/{b.name}" for b in blocks)
    assert reads[0] == (slice(0, 6), slice(0, 8), slice(0, 10))  # grown by 2, clipped at 0 and at x = 10
    log.unlink()
    again = run_blocks(client, _sum_kernel, blocks, step="sum", args=(0.5,), marks=marks, shape=volume.shape,
                       halo=(2, 2, 2), read=read, restore=float)
    assert again == first and not log.exists()


def test_the_first_error_names_its_block_and_an_input_error_stays_itself(client):
    volume = np.zeros((8, 12, 10), np.float32)
    blocks = plan_blocks(volume.shape, (4, 6, 10))
    from cryodask.picking.log import ArrayReader

    for where in (None, client):  # in this process and on the cluster alike
        with pytest.raises(ValueError) as caught:
            run_blocks(where, _fails, [b for b in blocks if b.name != "0.1.0"], step="demo", read=ArrayReader(volume))
        assert "in block 1.0.0 of demo" in caught.value.__notes__
        with pytest.raises(InputError) as caught:
            run_blocks(where, _fails, [b for b in blocks if b.name != "1.0.0"], step="demo", read=ArrayReader(volume))
        assert str(caught.value) == "bad input: fix it" and not getattr(caught.value, "__notes__", None)


def test_progress_counts_every_block_planned_and_done(client):
    import io

    volume = np.ones((8, 12, 10), np.float32)
    blocks = plan_blocks(volume.shape, (4, 6, 5))
    from cryodask.picking.log import ArrayReader

    with progress.Progress("test", 1, stream=io.StringIO()) as shown:
        run_blocks(client, _sum_kernel, blocks, step="sum", args=(0.0,), read=ArrayReader(volume))
        run_blocks(None, _sum_kernel, blocks[:3], step="sum", args=(0.0,), read=ArrayReader(volume))
    assert shown.blocks_total == len(blocks) + 3 and shown.blocks_done == len(blocks) + 3


# ------------------------------------------------------------------ lazy kernels == the runner

def _response_kernel(region, data, voxel_size, params, mean, std):
    from cryodask.picking.log import log_response

    return log_response(data, voxel_size, params, mean=mean, std=std)[region.inner]


def test_lazy_sheet_score_equals_what_classical_segment_writes_on_a_real_tomogram(tmp_path, client, real_volume):
    import dask.array as da
    import zarr

    from cryodask.membranes.classical import ClassicalParams, classical_segment, membrane_score, sheet_score
    from cryodask.picking.log import ArrayReader

    params = ClassicalParams(dark=False)  # density is bright in these crops
    chunks = (16, 48, 48)
    mean, std = float(real_volume.mean()), float(real_volume.std())
    classical_segment(ArrayReader(real_volume), real_volume.shape, VOXEL, chunks, params, tmp_path / "score.zarr",
                      tmp_path / "mask.zarr", client=client, mean=mean, std=std)
    written = zarr.open_array(str(tmp_path / "score.zarr"), mode="r")[...]
    lazy = sheet_score(da.from_array(real_volume, chunks=chunks), VOXEL, params, mean=mean, std=std)
    assert isinstance(lazy, da.Array) and lazy.chunks == da.from_array(real_volume, chunks=chunks).chunks
    np.testing.assert_array_equal(lazy.compute(), written)
    whole = membrane_score(real_volume, VOXEL, params, mean=mean, std=std)
    np.testing.assert_allclose(written, whole, rtol=0, atol=1e-5 * float(np.abs(whole).max()))
    assert float(np.abs(whole).max()) > 0.05  # the filter saw structure, not a flat volume
    # without the statistics the lazy form normalises with the array's own
    np.testing.assert_allclose(sheet_score(real_volume, VOXEL, params).compute(), whole, atol=1e-4)


def test_lazy_log_response_equals_the_runner_on_a_real_tomogram(client, real_volume):
    import dask.array as da

    from cryodask.picking.log import (
        ArrayReader,
        Geometry,
        LogParams,
        laplacian_of_gaussian,
        log_response,
        response_halo,
    )

    params = LogParams(diameter=250, dark=False)
    chunks = (16, 48, 48)
    mean, std = float(real_volume.mean()), float(real_volume.std())
    blocks = plan_blocks(real_volume.shape, chunks)
    parts = run_blocks(client, _response_kernel, blocks, step="response", args=(VOXEL, params, mean, std),
                       shape=real_volume.shape, halo=response_halo(Geometry.of(params, VOXEL)),
                       read=ArrayReader(real_volume))
    blockwise = np.empty(real_volume.shape, np.float32)
    for block, part in zip(blocks, parts):
        blockwise[block.region] = part
    lazy = laplacian_of_gaussian(da.from_array(real_volume, chunks=chunks), VOXEL, params, mean=mean, std=std)
    np.testing.assert_array_equal(lazy.compute(), blockwise)
    whole = log_response(real_volume, VOXEL, params, mean=mean, std=std)
    np.testing.assert_allclose(blockwise, whole, rtol=0, atol=1e-5 * float(np.abs(whole).max()))
    assert float(np.abs(whole).max()) > 0.1


# ------------------------------------------------------------------ postprocess resumed after a kill

def test_postprocess_resumed_after_a_kill_counts_the_whole_output_and_reads_none_of_it_back(tmp_path, client,
                                                                                           monkeypatch):
    """Killed (SIGKILL of the CLI's whole process group) after every block is labelled and some
    are written, then resumed in this process: the same summary as an undisturbed run, the same
    files, valid MRC headers whose statistics are the data's, and the client never computes
    statistics from the output (issue 13 item 9: it read the .partial files back, 4 GB)."""
    import mrcfile
    from test_reliability import cryodask as command
    from test_reliability import kill_at, marks

    import cryodask.io.mrc
    from cryodask.postprocess.components import plan
    from cryodask.postprocess.pipeline import PostprocessParams, postprocess
    from cryodask.synth import synth_tomogram

    mask = synth_tomogram((48, 96, 96), seed=3).membranes.astype(np.uint8)
    source = write_raw_mrc(tmp_path / "m.mrc", mask)
    params = PostprocessParams(min_slices=10, labels=True)
    options = {"chunks": (16, 32, 32)}
    (tmp_path / "ref").mkdir()
    reference = postprocess(source, tmp_path / "ref" / "o.mrc", params, client=client, **options)
    out = tmp_path / "run"
    out.mkdir()
    n = len(plan(mask.shape, (16, 32, 96))[0])  # MRC to MRC: blocks of whole rows
    kill_at(command("postprocess", source, "--out", out / "o.mrc", "--min-slices", "10", "--labels",
                     "--chunks", "16,32,32"), delay=0.3, log=tmp_path / "killed.log",
            count=lambda: len(marks(out, "postprocess")), target=n + 2)
    written = {name for _, name in marks(out, "postprocess") if name.startswith("write/")}
    assert 2 <= len(written) < n and not (out / "o.mrc").exists()

    def no_reading_back(*args, **kwargs):
        raise AssertionError("the client computed statistics from an output")

    monkeypatch.setattr(cryodask.io.mrc, "region_stats", no_reading_back)
    resumed = postprocess(source, out / "o.mrc", params, client=client, **options)
    assert resumed.blocks_written == n - len(written)
    def summary(r):
        return r.n_components, r.n_kept, r.voxels_kept

    assert summary(resumed) == summary(reference) and reference.voxels_kept > 0
    for name in ("o.mrc", "o_labels.mrc"):
        with open(os.devnull, "w") as quiet:
            assert mrcfile.validate(str(out / name), print_file=quiet)
        with mrcfile.open(out / name) as ours, mrcfile.open(tmp_path / "ref" / name) as theirs:
            np.testing.assert_array_equal(ours.data, theirs.data)
            data = ours.data.astype(np.float64)
            h = ours.header
            assert (float(h.dmin), float(h.dmax)) == (data.min(), data.max())
            assert math.isclose(float(h.dmean), data.mean(), rel_tol=1e-6)
            assert math.isclose(float(h.rms), data.std(), rel_tol=1e-5)
            for field in ("dmin", "dmax", "dmean", "rms"):
                assert float(h[field]) == float(theirs.header[field])
    assert Path(out / "o.mrc").stat().st_size == Path(tmp_path / "ref" / "o.mrc").stat().st_size
