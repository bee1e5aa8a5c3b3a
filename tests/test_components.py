"""Exact connected components across chunks: identical to scipy on the whole array, for every
connectivity, chunking and filter; on a real cluster, out of core, resumable."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from conftest import write_raw_mrc
from cryodask.errors import InputError
from cryodask.postprocess.components import components, plan, structure
from cryodask.postprocess.pipeline import PostprocessParams, postprocess


def scipy_reference(mask, connectivity, min_slices=0, min_voxels=0):
    """ETSAM's post-processing on the whole array: label, find_objects z extent, sizes; then the
    kept components labelled again (raster order)."""
    labels, n = ndimage.label(mask, structure(connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [i + 1 for i, box in enumerate(ndimage.find_objects(labels))
            if box[0].stop - box[0].start >= min_slices and sizes[i + 1] >= min_voxels]
    kept = np.isin(labels, keep)
    return kept, ndimage.label(kept, structure(connectivity))[0]


shapes = st.tuples(*[st.integers(1, 14)] * 3)
chunkings = st.tuples(*[st.integers(1, 6)] * 3)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), shape=shapes, chunks=chunkings, connectivity=st.sampled_from([6, 18, 26]),
       min_slices=st.integers(0, 4), min_voxels=st.integers(0, 5))
def test_blockwise_labels_equal_scipy(data, shape, chunks, connectivity, min_slices, min_voxels):
    density = data.draw(st.floats(0.0, 1.0))
    mask = data.draw(arrays(np.bool_, shape, elements=st.booleans())) if density > 0.9 else \
        np.random.default_rng(data.draw(st.integers(0, 2**16))).random(shape) < density
    kept, ref = scipy_reference(mask, connectivity, min_slices, min_voxels)
    out, comps = components(mask, chunks, connectivity, min_slices=min_slices, min_voxels=min_voxels)
    np.testing.assert_array_equal(out, ref)
    assert comps.n_components == ndimage.label(mask, structure(connectivity))[1]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_a_component_winding_through_many_chunks(connectivity):
    """A helix of face-connected voxels crossing dozens of 2x2x2 chunks is one component."""
    mask = np.zeros((40, 24, 24), bool)
    t = np.linspace(0, 6 * np.pi, 4000)
    z, y, x = ((t / t[-1] * 39).round().astype(int), (11.5 + 10 * np.sin(t)).round().astype(int),
               (11.5 + 10 * np.cos(t)).round().astype(int))
    mask[z, y, x] = True
    mask = ndimage.binary_dilation(mask, structure(6))  # face-connected tube
    out, comps = components(mask, (2, 2, 2), connectivity)
    assert comps.n_components == 1 and out.max() == 1 and (out > 0).sum() == mask.sum()


@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full(fill):
    mask = np.full((9, 10, 11), fill)
    out, comps = components(mask, (4, 3, 5), 26, min_slices=9)
    assert comps.n_components == int(fill) and (out == int(fill)).all()


def test_diagonal_neighbours_across_block_corners():
    """Voxels touching only at a corner, each in a different block: one component at 26, two at 18 and 6."""
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    for connectivity, n in ((26, 1), (18, 2), (6, 2)):
        assert components(mask, (2, 2, 2), connectivity)[1].n_components == n


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(*[st.integers(2, 20)] * 3), chunks=chunkings, connectivity=st.sampled_from([6, 18, 26]),
       seed=st.integers(0, 1000))
def test_on_the_cluster_equals_scipy(tmp_path_factory, client, shape, chunks, connectivity, seed):
    tmp = tmp_path_factory.mktemp("cc")
    mask = (np.random.default_rng(seed).random(shape) < 0.4).astype(np.uint8)
    write_raw_mrc(tmp / "m.mrc", mask)
    kept, ref = scipy_reference(mask, connectivity, min_slices=2)
    result = postprocess(tmp / "m.mrc", tmp / "out.zarr",
                         PostprocessParams(connectivity=connectivity, min_slices=2, labels=True),
                         chunks=chunks, client=client)
    np.testing.assert_array_equal(zarr.open_array(str(tmp / "out.zarr" / "0"), mode="r")[:], kept)
    np.testing.assert_array_equal(zarr.open_array(str(tmp / "out.zarr" / "labels" / "components" / "0"), mode="r")[:],
                                  ref)
    assert result.n_kept == ref.max()


@pytest.fixture
def membrane_mask():
    """Shells and sheets plus small blobs: what a membrane segmentation looks like."""
    from cryodask.synth import synth_tomogram

    truth = synth_tomogram((48, 96, 96), seed=3).membranes.astype(bool)
    noise = ndimage.binary_dilation(np.random.default_rng(0).random(truth.shape) < 0.002, iterations=1)
    return truth | noise


def test_omezarr_labels_in_mrc_and_labels_out(tmp_path, client, membrane_mask):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from cryodask.io.omezarr import create_image, write_labels

    create_image(tmp_path / "tomo.zarr", membrane_mask.shape, chunks=(16, 32, 32), dtype="float32",
                 voxel_size=(10.0, 10.0, 10.0), levels=2)
    write_labels(tmp_path / "tomo.zarr", "membranes", membrane_mask.astype(np.uint32))
    kept, ref = scipy_reference(membrane_mask, 26, min_slices=10)
    result = postprocess(tmp_path / "tomo.zarr" / "labels" / "membranes", tmp_path / "post.mrc",
                         PostprocessParams(min_slices=10, labels=True), client=client)
    assert 1 <= result.n_kept < result.n_components
    with mrcfile.open(tmp_path / "post.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, kept.astype(np.uint8))
        assert mrc.voxel_size.x == pytest.approx(10.0)
    with mrcfile.open(tmp_path / "post_labels.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, ref)
    assert not (tmp_path / ".cryodask" / "post.mrc" / "output.zarr").exists()  # work store removed
    postprocess(tmp_path / "tomo.zarr" / "labels" / "membranes", tmp_path / "post.zarr",
                PostprocessParams(min_slices=10, labels=True), client=client)
    nodes = list(Reader(parse_url(str(tmp_path / "post.zarr")))())
    assert any(isinstance(spec, Label) for node in nodes for spec in node.specs)


def test_bridge_removal_follows_the_component_filter(tmp_path, client, membrane_mask):
    from cryodask.postprocess.bridges import remove_bridges

    write_raw_mrc(tmp_path / "m.mrc", membrane_mask.astype(np.uint8))
    kept, _ = scipy_reference(membrane_mask, 26, min_slices=10)
    postprocess(tmp_path / "m.mrc", tmp_path / "out.mrc",
                PostprocessParams(min_slices=10, remove_bridges=True, max_bridge_len=5),
                chunks=(16, 32, 32), client=client)
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, remove_bridges(kept.astype(np.uint8), max_bridge_len=5))


def test_rerun_skips_and_a_deleted_output_is_redone(tmp_path, client, membrane_mask):
    write_raw_mrc(tmp_path / "m.mrc", membrane_mask.astype(np.uint8))
    kept, _ = scipy_reference(membrane_mask, 26, min_slices=10)
    params = PostprocessParams(min_slices=10)
    args = dict(chunks=(16, 32, 32), client=client)
    assert postprocess(tmp_path / "m.mrc", tmp_path / "out.mrc", params, **args).status == "done"
    assert postprocess(tmp_path / "m.mrc", tmp_path / "out.mrc", params, **args).status == "skipped"
    (tmp_path / "out.mrc").unlink()
    assert postprocess(tmp_path / "m.mrc", tmp_path / "out.mrc", params, **args).status == "done"
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, kept.astype(np.uint8))
    changed = postprocess(tmp_path / "m.mrc", tmp_path / "out.mrc", PostprocessParams(min_slices=3), **args)
    assert changed.status == "done" and changed.n_kept > 0


def test_mask_larger_than_worker_memory(tmp_path):
    """A 268 MB mask through workers limited to 250 MB each."""
    from distributed import Client, LocalCluster

    shape = (256, 1024, 1024)
    with mrcfile.new_mmap(tmp_path / "big.mrc", shape=shape, mrc_mode=0) as mrc:
        for z in range(shape[0]):
            mrc.data[z] = 0
            mrc.data[z, (z * 3) % 1000: (z * 3) % 1000 + 20, :] = 1      # a sheet sliding in y: one component
            if z % 3 == 0:
                # one-slice posts: 22k components, all removed
                mrc.data[z, 1010:1020, ::4] = 1
        mrc.voxel_size = 10.0
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="250MB", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        result = postprocess(tmp_path / "big.mrc", tmp_path / "out.zarr", PostprocessParams(min_slices=2),
                             client=client)
    out = zarr.open_array(str(tmp_path / "out.zarr" / "0"), mode="r")
    assert result.n_kept == 1 and result.n_components == 1 + 86 * 256
    for z in (0, 100, 255):
        row = np.zeros(1024, np.uint8)
        row[(z * 3) % 1000: (z * 3) % 1000 + 20] = 1
        np.testing.assert_array_equal(out[z, :, 5], row)


@pytest.mark.parametrize("args,words", [
    (["missing.mrc", "--out", "o.mrc"], "no such file"),
    (["m.mrc", "--out", "o.tif"], "must end in .mrc or .zarr"),
    (["m.mrc", "--out", "o.mrc", "--connectivity", "8"], "--connectivity"),
    (["m.mrc", "--out", "o.mrc", "--min-slices", "-1"], "--min-slices"),
    (["m.mrc", "--out", "o.mrc", "--device", "tpu"], "--device"),
])
def test_cli_errors_before_any_cluster(tmp_path, capsys, monkeypatch, args, words):
    import cryodask.engine.cluster
    from cryodask.cli import main

    monkeypatch.setattr(cryodask.engine.cluster, "make_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    write_raw_mrc(tmp_path / "m.mrc", np.zeros((4, 4, 4), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert main(["postprocess", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_cli_end_to_end(tmp_path, capsys, client, membrane_mask):
    from cryodask.cli import main

    write_raw_mrc(tmp_path / "m.mrc", membrane_mask.astype(np.uint8))
    code = main(["postprocess", str(tmp_path / "m.mrc"), "--out", str(tmp_path / "o.mrc"), "--min-slices", "10",
                 "--labels", "--cluster", client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 0 and f"wrote {tmp_path / 'o_labels.mrc'}" in out
    kept, _ = scipy_reference(membrane_mask, 26, min_slices=10)
    with mrcfile.open(tmp_path / "o.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, kept.astype(np.uint8))
    with pytest.raises(InputError):
        postprocess(tmp_path / "m.mrc", tmp_path / "o.mrc", PostprocessParams(connectivity=4))


def test_gpu_tasks_ask_for_a_gpu_only_where_workers_have_one(client):
    from distributed import Client, LocalCluster

    from cryodask.engine.cluster import gpu_resources

    assert gpu_resources(client) is None and gpu_resources(client, "cpu") is None
    with LocalCluster(n_workers=1, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as gpu_client:
        assert gpu_resources(gpu_client) == {"GPU": 1}
        assert gpu_resources(gpu_client, "cpu") is None


def test_gpu_tasks_wait_for_a_gpu_worker_and_never_run_on_a_cpu_one(capfd):
    """--device cuda on a cluster whose GPU workers have not joined yet: the tasks are submitted
    with GPU=1, one line says they wait, and they run on the GPU worker once it joins (a real
    ``dask worker --resources GPU=1`` process), never on the CPU worker already there."""
    import subprocess
    import sys
    import time

    from distributed import Client, LocalCluster, get_worker

    from cryodask.engine.cluster import gpu_resources

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        resources = gpu_resources(client, "cuda")
        assert resources == {"GPU": 1}
        said = capfd.readouterr().err
        assert "waiting for a GPU worker: none of the 1 connected workers has the resource GPU=1" in said
        future = client.submit(lambda: get_worker().name, resources=resources, pure=False)
        time.sleep(1.0)
        assert future.status == "pending"  # the CPU worker does not take it
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                   "--resources", "GPU=1", "--nthreads", "1", "--name", "gpu-worker", "--no-nanny"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert future.result(timeout=60) == "gpu-worker"
            gpu_resources(client, "cuda")
            assert "waiting" not in capfd.readouterr().err  # said once per client
        finally:
            worker.terminate()
            worker.wait(30)


def test_killed_postprocess_resumes_to_the_same_result(tmp_path, membrane_mask):
    """SIGKILL the command during the write pass; the rerun writes only the missing blocks."""
    import os
    import signal
    import subprocess
    import sys
    import time

    write_raw_mrc(tmp_path / "m.mrc", membrane_mask.astype(np.uint8))
    args = [sys.executable, "-m", "cryodask", "postprocess", str(tmp_path / "m.mrc"), "--out", str(tmp_path / "o.mrc"),
            "--min-slices", "10", "--labels", "--chunks", "16,32,32", "--workers", "2"]
    total = len(plan(membrane_mask.shape, (16, 32, 96))[0])  # MRC to MRC: blocks of whole rows
    proc = subprocess.Popen(args, env={**os.environ, "CRYODASK_BLOCK_DELAY": "0.3"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marks = tmp_path / ".cryodask" / "o.mrc"
    deadline = time.time() + 90
    while time.time() < deadline and len(list(marks.glob("postprocess-*/write/*"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done, stable = -1, time.time()  # a worker that outlives its nanny by a moment may still mark a block:
    while time.time() - stable < 1.0 and time.time() < deadline + 10:  # count once the marks stop changing
        now = len(list(marks.glob("postprocess-*/write/*")))
        done, stable = (now, time.time()) if now != done else (done, stable)
        time.sleep(0.1)
    assert total == 9 and 3 <= done < total and not (tmp_path / "o.mrc").exists()
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"blocks written: {total - done}" in result.stdout
    kept, ref = scipy_reference(membrane_mask, 26, min_slices=10)
    with mrcfile.open(tmp_path / "o.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, kept.astype(np.uint8))
        assert mrc.header.dmax == 1 and mrc.header.dmean == pytest.approx(kept.mean())
    with mrcfile.open(tmp_path / "o_labels.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, ref)
