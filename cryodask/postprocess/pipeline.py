"""``cryodask postprocess``: ETSAM's mask post-processing over a whole tomogram on a cluster.

Component filter (``min_slices``: z extent of the bounding box, ETSAM's rule; ``min_voxels``)
with exact cross-chunk connected components (``components.py``), then optionally ETSAM's
per-slice bridge removal on whole z-slabs. Input: an MRC mask or an OME-Zarr image or label
image; output by suffix: ``.mrc`` (plus ``<stem>_labels.mrc`` with ``labels=True``) or an
OME-Zarr image (plus ``labels/components``). Memory per task is one block.

Resumable like every step: the write pass marks each block after writing it, and a finished
output records its parameter hash, so a rerun skips it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..blocks import Block, DoneMarks, plan_blocks
from ..errors import InputError, where
from ..params import params_hash
from .components import boundaries, check_connectivity, label_block, label_pass, merge, plan, equivalence_pass

STEP = "postprocess"


@dataclass(frozen=True)
class PostprocessParams:
    """Everything that changes the output (its hash keys the done-marks)."""

    connectivity: int = 26
    min_slices: int = 0
    min_voxels: int = 0
    remove_bridges: bool = False
    max_bridge_len: int = 5
    labels: bool = False

    def __post_init__(self):
        check_connectivity(self.connectivity)
        for name in ("min_slices", "min_voxels", "max_bridge_len"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


@dataclass
class PostprocessResult:
    out: Path
    n_components: int = 0
    n_kept: int = 0
    voxels_kept: int = 0
    seconds: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    status: str = "done"


# ------------------------------------------------------------------ reading the mask on workers

@dataclass(frozen=True)
class ZarrReader:
    """Reads regions of a zarr array (level 0 of an OME-Zarr image) on any worker."""

    path: str

    def __call__(self, region):
        import zarr

        return zarr.open_array(self.path, mode="r")[region]


@dataclass(frozen=True)
class VolumeReader:
    source: object

    def __call__(self, region):
        return self.source.read(region)


def open_mask(path, voxel_size=None, chunks=(64, 256, 256)):
    """A picklable region reader, the shape, the voxel size (z, y, x) and the chunks of a mask."""
    path = Path(path)
    if voxel_size is not None and np.isscalar(voxel_size):
        voxel_size = (float(voxel_size),) * 3
    if path.is_dir():
        from ..io.omezarr import open_image

        _, arrays, vs, _ = open_image(path)
        level0 = arrays[0]
        if level0.ndim != 3:
            raise where(path, f"not a 3D image (shape {level0.shape})")
        return ZarrReader(str(path / level0.path.split("/")[-1])), tuple(level0.shape), \
            tuple(voxel_size or vs), tuple(level0.chunks)
    from ..io.volumes import open_volume

    source = open_volume(path, voxel_size)
    return VolumeReader(source), source.shape, source.voxel_size, tuple(chunks)


# ------------------------------------------------------------------ tasks

def _label_task(read, block, grid, shape, connectivity, device):
    return label_pass(read, block, grid, shape, connectivity, device)


def _stats_only(labelled):
    from dataclasses import replace

    return replace(labelled, faces={})


def _pairs_task(axis, lows, highs, shape, connectivity):
    return equivalence_pass([(b, r.faces[axis, "hi"]) for b, r in lows], [(b, r.faces[axis, "lo"]) for b, r in highs],
                            axis, shape, connectivity)


def _write_task(read, block: Block, table: np.ndarray, connectivity: int, device: str, mask_path: str,
                labels_path: str | None, marks: DoneMarks) -> int:
    import zarr

    labels, _ = label_block(read(block.region), connectivity, device)
    final = table[labels]
    zarr.open_array(mask_path, mode="r+")[block.region] = (final > 0).astype(np.uint8)
    if labels_path:
        target = zarr.open_array(labels_path, mode="r+")
        target[block.region] = final.astype(target.dtype)
    marks.mark(f"write/{block.name}")
    return int(np.count_nonzero(final))


def _bridges_task(source_path: str, target_path: str, block: Block, max_bridge_len: int, marks: DoneMarks) -> int:
    import zarr

    from .bridges import remove_bridges

    data = zarr.open_array(source_path, mode="r")[block.region]
    cleaned = remove_bridges(data, max_bridge_len=max_bridge_len).astype(np.uint8)
    zarr.open_array(target_path, mode="r+")[block.region] = cleaned
    marks.mark(f"bridges/{block.name}")
    return int(np.count_nonzero(cleaned))


# ------------------------------------------------------------------ the step

def postprocess(mask, out, *, connectivity: int = 26, min_slices: int = 0, min_voxels: int = 0,
                remove_bridges: bool = False, max_bridge_len: int = 5, labels: bool = False,
                chunks=(64, 256, 256), voxel_size=None, client=None, device: str = "cpu") -> PostprocessResult:
    """Filter the connected components of a mask (and remove bridges), block by block.

    Equal to ``scipy.ndimage.label`` + ``find_objects`` filtering on the whole array.

    Parameters
    ----------
    mask : MRC file, OME-Zarr image, or ``x.zarr/labels/<name>`` (level 0 is used); nonzero = foreground
    out : ``.mrc`` or ``.zarr`` path
    connectivity : 6, 18 or 26
    min_slices : keep a component only if its bounding box spans at least this many z-slices
    min_voxels : keep a component only if it has at least this many voxels
    remove_bridges, max_bridge_len : ETSAM's per-slice removal of short skeleton bridges
    labels : also write the kept components' labels (1..n in raster order of their first voxel)
    chunks : block shape for MRC input (OME-Zarr input uses its own chunks)
    device : "cpu" (cc3d) or "gpu" (CuPy on the workers)

    Examples
    --------
    >>> postprocess("tomo_mask.mrc", "tomo_post.mrc", min_slices=10)  # doctest: +SKIP
    """
    params = PostprocessParams(connectivity, min_slices, min_voxels, remove_bridges, max_bridge_len, labels)
    if device not in ("cpu", "gpu"):
        raise InputError(f"--device must be cpu or gpu, got {device}")
    out = Path(out)
    if out.suffix.lower() not in (".mrc", ".zarr"):
        raise where(out, "output must end in .mrc or .zarr")
    read, shape, vs, block_chunks = open_mask(mask, voxel_size, chunks)
    from ..convert import _default_client, check_output_dir

    check_output_dir(out.parent)
    key = params_hash({**asdict(params), "mask": str(Path(mask).resolve()), "chunks": block_chunks, "voxel_size": vs})
    work = out.parent / ".cryodask" / out.name
    marks = DoneMarks(work, STEP, key)
    result = PostprocessResult(out)
    if _finished(out, key):
        result.status = "skipped"
        return result
    client = client or _default_client()
    if client is None:
        from ..cluster import connect

        with connect("local") as local_client:
            return _run(read, shape, vs, block_chunks, params, out, work, marks, key, local_client, device, result)
    return _run(read, shape, vs, block_chunks, params, out, work, marks, key, client, device, result)


def _finished(out: Path, key: str) -> bool:
    if out.suffix.lower() == ".mrc":
        return out.exists() and (out.parent / ".cryodask" / out.name / f"{STEP}-{key}.complete").exists()
    import zarr

    try:
        return zarr.open_group(str(out), mode="r").attrs.get("cryodask", {}).get(STEP, {}) == {"key": key, "complete": True}
    except Exception:  # noqa: BLE001  (absent or unreadable: do it)
        return False


def _prepare_store(store: Path, shape, chunks, vs, params: PostprocessParams, key: str) -> bool:
    """Create the output image (and labels) arrays, or keep them when resuming with the same
    key; returns True when the store was created afresh."""
    import zarr

    from ..io.omezarr import create_image, create_labels

    try:
        state = zarr.open_group(str(store), mode="r").attrs.get("cryodask", {}).get(STEP, {})
    except Exception:  # noqa: BLE001
        state = {}
    if state.get("key") == key:
        return False
    if store.exists():
        shutil.rmtree(store)
    create_image(store, shape, chunks=chunks, dtype=np.uint8, voxel_size=vs, levels=1, ngff="0.4",
                 attributes={"cryodask": {STEP: {"key": key, "complete": False, "params": asdict(params)}}})
    if params.remove_bridges:
        zarr.open_group(str(store), mode="r+").create_array("filtered", shape=shape, chunks=chunks, dtype=np.uint8,
                                                            fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})
    if params.labels:
        create_labels(store, "components", np.uint32, properties=None)
    return True


def gpu_resources(client, device: str) -> dict | None:
    """``{"GPU": 1}`` for GPU tasks when workers advertise GPUs (dask-cuda, jobqueue with
    ``--resources GPU=1``), so they never land on a CPU-only worker of a mixed cluster."""
    if device != "gpu":
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers) else None


def _run(read, shape, vs, chunks, params, out: Path, work: Path, marks: DoneMarks, key: str, client, device, result):
    from distributed import wait

    clock = time.perf_counter()
    resources = gpu_resources(client, device)
    store = out if out.suffix.lower() == ".zarr" else work / "output.zarr"
    if _prepare_store(store, shape, chunks, vs, params, key):
        marks.clear_step()  # marks of an earlier store describe blocks that are gone
    blocks, grid = plan(shape, chunks)
    labelled = {b.name: client.submit(_label_task, read, b, grid, shape, params.connectivity, device,
                                      key=f"cc-label-{key[:8]}-{b.name}", retries=1, resources=resources) for b in blocks}
    stats = {name: client.submit(_stats_only, f, key=f"cc-stats-{key[:8]}-{name}") for name, f in labelled.items()}
    pair_futures = [client.submit(_pairs_task, axis, [(b, labelled[b.name]) for b in lows], [(b, labelled[b.name]) for b in highs],
                                  shape, params.connectivity, key=f"cc-pairs-{key[:8]}-{axis}-{i}", retries=1)
                    for i, (axis, lows, highs) in enumerate(boundaries(blocks, shape))]
    block_stats = dict(zip(stats, client.gather(list(stats.values()))))
    pairs = client.gather(pair_futures)
    client.cancel(list(labelled.values()) + list(stats.values()) + pair_futures)
    result.seconds["label + equivalences"] = time.perf_counter() - clock

    clock = time.perf_counter()
    comps = merge(list(block_stats.values()), pairs, min_slices=params.min_slices, min_voxels=params.min_voxels)
    result.n_components, result.n_kept = comps.n_components, comps.n_kept
    if params.labels and comps.n_kept >= 2**32:
        raise InputError(f"{comps.n_kept} components do not fit uint32 labels")
    result.seconds["union-find + filter"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mask_path = str(store / ("filtered" if params.remove_bridges else "0"))
    labels_path = str(store / "labels" / "components" / "0") if params.labels else None
    writes = []
    for b in blocks:
        if marks.done(f"write/{b.name}"):
            continue
        table = np.concatenate([[0], comps.table(block_stats[b.name].ids)]).astype(np.uint64)
        writes.append(client.submit(_write_task, read, b, table, params.connectivity, device, mask_path, labels_path,
                                    marks, key=f"cc-write-{key[:8]}-{b.name}", retries=1, resources=resources))
    wait(writes)
    _raise_first_error(writes)
    result.voxels_kept = sum(f.result() for f in writes)
    if params.remove_bridges:
        slabs = plan_blocks(shape, (chunks[0], shape[1], shape[2]))
        bridges = [client.submit(_bridges_task, mask_path, str(store / "0"), s, params.max_bridge_len, marks,
                                 key=f"cc-bridges-{key[:8]}-{s.name}", retries=1)
                   for s in slabs if not marks.done(f"bridges/{s.name}")]
        wait(bridges)
        _raise_first_error(bridges)
    result.seconds["relabel + write"] = time.perf_counter() - clock

    clock = time.perf_counter()
    result.files = _finish(store, out, vs, params, key, work)
    result.seconds["finish"] = time.perf_counter() - clock
    return result


def _raise_first_error(futures) -> None:
    for f in futures:
        if f.status != "finished":
            exc = f.exception() if f.status == "error" else InputError(f"block task {f.status}")
            raise exc


def _finish(store: Path, out: Path, vs, params, key: str, work: Path) -> list[Path]:
    """Mark the OME-Zarr complete, or stream it to MRC files and drop the work store."""
    import zarr

    if out.suffix.lower() == ".zarr":
        group = zarr.open_group(str(store), mode="r+")
        attrs = group.attrs.get("cryodask", {})
        attrs[STEP] = {"key": key, "complete": True}
        group.attrs["cryodask"] = attrs
        return [out]
    from ..io.mrc import write_mrc

    files = [write_mrc(out, zarr.open_array(str(store / "0"), mode="r"), vs)]
    if params.labels:
        files.append(write_mrc(out.with_name(out.stem + "_labels.mrc"),
                               zarr.open_array(str(store / "labels" / "components" / "0"), mode="r"), vs))
    (work / f"{STEP}-{key}.complete").touch()
    shutil.rmtree(store)
    return files
