"""MRC/TIFF tomograms to chunked OME-Zarr, many at once, on a Dask cluster.

Each tomogram becomes ``<out>/<stem>.zarr``: a multiscale image (z, y, x in Å) whose level 0
equals the input. Its blocks go through the one block runner (:func:`~cryodask.engine.runner.run_blocks`),
one call per level: level 0 reads a chunk-aligned slab of the file and writes levels 0 and 1,
then each level ``l >= 2`` averages 2x2x2 voxels of level ``l-1``; so a worker holds a few
chunks, never a tomogram. Levels run one after another (a level no longer starts on the blocks
of the one below as they finish): the collection runner keeps several tomograms in flight, which
keeps the workers busy instead. Every block writes whole chunks and then a done-mark (level 0's
keeps the block's value sketch, for the contrast window); a rerun skips marked blocks and
finished tomograms, and a changed parameter starts that tomogram again.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .engine.blocks import Block, DoneMarks, plan_blocks
from .engine.cluster import current_client
from .engine.runner import Region, run_blocks
from .errors import CryodaskError, InputError, where
from .io.folders import check_output_dir
from .io.layouts import ConvertParams
from .io.omezarr import create_image, level_shapes, merge_window, sketch, write_omero
from .io.volumes import Volume, find_volumes, open_volume, stem as name_of
from .params import params_hash
from .report.stages import stage

STEP = "convert"
PYRAMID = "pyramid"  # the report's step name of the level >= 2 blocks


@dataclass
class TomogramResult:
    """What happened to one input: ``converted``, ``resumed``, ``skipped`` or ``failed``."""

    source: str
    store: str | None
    status: str
    message: str = ""
    blocks_written: int = 0
    blocks_skipped: int = 0
    nbytes: int = 0
    seconds: float = 0.0


@dataclass
class ConvertReport:
    results: list[TomogramResult] = field(default_factory=list)

    @property
    def failed(self) -> list[TomogramResult]:
        return [r for r in self.results if r.status == "failed"]


# ---------------------------------------------------------------- block kernels (the runner does the rest)

def downsample_mean(data: np.ndarray, out_shape, dtype) -> np.ndarray:
    """2x2x2 mean; an odd edge voxel is averaged with itself (edge replication).

    The eight terms are added in a fixed order, so a block gives bit-identical results to
    the whole array whatever the chunking.
    """
    pad = [(0, 2 * o - s) for o, s in zip(out_shape, data.shape)]
    if any(p for _, p in pad):
        data = np.pad(data, pad, mode="edge")
    data = data.astype(np.float32, copy=False)
    total = np.zeros(tuple(out_shape), dtype=np.float32)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                total += data[dz::2, dy::2, dx::2]
    total *= np.float32(0.125)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        total = np.clip(np.rint(total), info.min, info.max)
    return total.astype(dtype)


def _halved(region) -> tuple[slice, ...]:
    """A level-0 block's region one level down (an odd edge voxel keeps its own level-1 voxel)."""
    return tuple(slice(r.start // 2, -(-r.stop // 2)) for r in region)


def _source_kernel(region: Region, data, store: str, dtype: str, halve: bool):
    """Write a level-0 block as ``dtype``; with ``halve``, also its 2x-averaged level-1 block from
    the same data (the block spans two level-1 chunks per axis, so both writes are whole chunks).
    Hands back the block's value sketch: kept with its done-mark, the contrast window needs no
    level read again, even after a resume."""
    import zarr

    data = data.astype(dtype, copy=False)
    with stage("write", bytes_written=data.nbytes):
        zarr.open_array(f"{store}/0", mode="r+")[region.write] = data
    if halve:
        lower = _halved(region.write)
        half = downsample_mean(data, tuple(r.stop - r.start for r in lower), dtype)
        with stage("write", bytes_written=half.nbytes):
            zarr.open_array(f"{store}/1", mode="r+")[lower] = half
    return sketch(data)


@dataclass(frozen=True)
class _Parent:
    """Reads what a block of ``level`` averages: twice its region of the level below."""

    store: str
    level: int

    def __call__(self, region):
        import zarr

        parent = zarr.open_array(f"{self.store}/{self.level - 1}", mode="r")
        return parent[tuple(slice(2 * r.start, min(2 * r.stop, n)) for r, n in zip(region, parent.shape))]


def _level_kernel(region: Region, data, store: str, level: int) -> None:
    """Write a block of ``level >= 2``: the 2x2x2 mean of its parent region (read by :class:`_Parent`)."""
    import zarr

    target = zarr.open_array(f"{store}/{level}", mode="r+")
    data = downsample_mean(data, region.block.shape, target.dtype)
    with stage("write", bytes_written=data.nbytes):
        target[region.write] = data


def _write_window(job: _Job, sketches: list) -> None:
    """The ``omero`` contrast window from the level-0 blocks' sketches. Marks without a sketch
    (written by an older cryodask) leave the store without a window."""
    if any(s is None for s in sketches):
        return
    window = merge_window(sketches)
    if window is not None:
        write_omero(job.store, window, label=job.store.stem, z_size=job.source.shape[0])


# ---------------------------------------------------------------- planning (runs on the client)

@dataclass
class _Job:
    source: Volume
    store: Path
    marks: DoneMarks
    key: str
    params: ConvertParams
    status: str = "converted"


def _job_key(source: Volume, params: ConvertParams) -> str:
    stat = os.stat(source.path)
    return params_hash({**asdict(params), "source": os.path.abspath(source.path), "size": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns, "voxel_size": source.voxel_size,
                        # how the file is read and placed: a store from before unsigned mode 0 and origins is redone
                        "dtype": source.dtype, "translation": source.translation})


def _stored_state(store: Path) -> dict:
    import zarr

    try:
        return zarr.open_group(str(store), mode="r").attrs.get("cryodask", {}).get(STEP, {})
    except Exception:  # noqa: BLE001  (absent or unreadable: start again)
        return {}


def _prepare(job: _Job) -> None:
    """Create the store, or decide to skip or resume it (client side, before any task)."""
    state = _stored_state(job.store)
    if state.get("key") == job.key:
        job.status = "skipped" if state.get("complete") else "resumed"
        return
    job.marks.clear_step()
    if job.store.exists():
        shutil.rmtree(job.store)
    dtype = _dtype(job)
    meta = {"path": os.path.abspath(job.source.path), "format": job.source.format,
            "voxel_size": list(job.source.voxel_size), **job.source.metadata}
    create_image(job.store, job.source.shape, chunks=job.params.chunks, dtype=dtype, voxel_size=job.source.voxel_size,
                 levels=job.params.levels, ngff=job.params.ngff, layout=job.params.layout,
                 translation=job.source.translation,  # the MRC origin/nstart; raw values in source.position
                 attributes={"cryodask": {STEP: {"key": job.key, "complete": False, "params": asdict(job.params)},
                                          "source": meta}})


def plan_pyramid(shape, chunks, levels: int, itemsize: int, block_bytes: int) -> list[list[Block]]:
    """The blocks of every level.

    Level-0 blocks span two level-1 chunks along each axis and also write level 1 (entry 1
    lists their halved regions, under the same names), so level 0 is never read back to build
    level 1. Blocks of level 2 and up read 8x their size from the level below.
    """
    shapes = level_shapes(shape, levels)
    if levels == 1:
        return [plan_blocks(shapes[0], chunks, itemsize=itemsize, max_bytes=block_bytes)]
    c1 = tuple(min(c, s) for c, s in zip(chunks, shapes[1]))
    fused = plan_blocks(shapes[0], tuple(2 * c for c in c1), itemsize=itemsize, max_bytes=block_bytes)
    halved = [Block(b.index, _halved(b.region)) for b in fused]
    return [fused, halved] + [plan_blocks(s, chunks, itemsize=itemsize * 8, max_bytes=block_bytes) for s in shapes[2:]]


def _dtype(job: _Job) -> np.dtype:
    return np.dtype(job.params.dtype or job.source.dtype).newbyteorder("=")


def _convert_levels(client, job: _Job, block_bytes: int, priority: int) -> list:
    """One tomogram's blocks through the block runner, a level at a time (level 0 writes level 1
    too); returns the level-0 blocks' value sketches (a done block's from its mark)."""
    store, dtype = str(job.store), _dtype(job)
    plan = plan_pyramid(job.source.shape, job.params.chunks, job.params.levels, dtype.itemsize, block_bytes)
    stem = Path(job.source.path).stem  # task names: copick stores share a name, their sources do not
    sketches = []
    for level, blocks in enumerate(plan):
        if level == 1:
            continue  # written by the level-0 blocks
        common = {"step": str(level), "marks": job.marks, "stage": "preprocess", "label": f"{STEP} {job.store.stem}",
                  "name": f"{STEP}-{stem}-{level}", "priority": priority}
        if level == 0:
            sketches = run_blocks(client, _source_kernel, blocks, args=(store, dtype.str, len(plan) > 1),
                                  read=job.source, report=STEP, **common)
        else:  # the pyramid's own reads and writes: not the input's bytes
            run_blocks(client, _level_kernel, blocks, args=(store, level), read=_Parent(store, level),
                       report=PYRAMID, **common)
    return sketches


def _mark_complete(job: _Job) -> None:
    import zarr

    group = zarr.open_group(str(job.store), mode="r+")
    attrs = group.attrs.get("cryodask", {})
    attrs[STEP] = {**attrs.get(STEP, {}), "complete": True}
    group.attrs["cryodask"] = attrs


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CryodaskError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@dataclass
class ConvertPlan:
    """Validated inputs with their stores created (or found finished), before any cluster starts."""

    jobs: list[_Job]
    report: ConvertReport
    order: dict[str, int]

    @property
    def todo(self) -> list[_Job]:
        return [j for j in self.jobs if j.status in ("converted", "resumed")]


def plan_conversion(inputs, out, params: ConvertParams = ConvertParams(), *, voxel_size=None,
                    store_path=None) -> ConvertPlan:
    """Validate every input and prepare its store; bad inputs go to the report as failures.

    ``store_path(path, source)`` puts a store elsewhere than ``<out>/<stem>.zarr`` (a copick
    run's ``VoxelSpacing…/<type>.zarr``); the resume marks stay under ``out``."""
    out = check_output_dir(out).resolve()
    paths = find_volumes(inputs)
    if not paths:
        raise InputError(f"no tomogram found in {', '.join(map(str, inputs))}")
    report, jobs, stems = ConvertReport(), [], {}
    for path in paths:
        try:
            source = open_volume(path, voxel_size)
            stem = name_of(path)  # the one stem rule: TS_01.rec.mrc and TS_01.mrc are both TS_01
            if stem in stems:
                raise where(path, f"has the same name as {stems[stem]}; both would write {stem}.zarr")
            stems[stem] = Path(path)
            key = _job_key(source, params)
            store = Path(store_path(path, source)) if store_path else out / f"{stem}.zarr"
            store.parent.mkdir(parents=True, exist_ok=True)
            job = _Job(source, store, DoneMarks(out / ".cryodask" / stem, STEP, key), key, params)
            _prepare(job)
        except InputError as exc:
            report.results.append(TomogramResult(str(path), None, "failed", str(exc)))
            continue
        except OSError as exc:
            message = str(where(out / f"{stem}.zarr", _one_line(exc)))
            report.results.append(TomogramResult(str(path), None, "failed", message))
            continue
        jobs.append(job)
        if job.status == "skipped":
            report.results.append(TomogramResult(source.path, str(job.store), "skipped", "already converted"))
    return ConvertPlan(jobs, report, {str(p): i for i, p in enumerate(paths)})


def run_conversion(plan: ConvertPlan, client, *, block_bytes: int = 128 * 2**20, progress: bool = False,
                   in_flight: int | None = None) -> ConvertReport:
    """Run a plan's block tasks on ``client``, ``in_flight`` tomograms at a time; mark each
    tomogram complete when all its blocks are."""
    if plan.todo:
        _run(client, plan.todo, block_bytes, plan.report, progress, in_flight)
    plan.report.results.sort(key=lambda r: plan.order.get(r.source, len(plan.order)))
    return plan.report


def convert(inputs, out, params: ConvertParams = ConvertParams(), *, voxel_size=None, client=None,
            block_bytes: int = 128 * 2**20, progress: bool = False) -> ConvertReport:
    """Convert tomograms (MRC/REC/MAP/TIFF files, folders or globs) to OME-Zarr under ``out``.

    Inputs are validated first; a bad one is reported in the returned report and the others
    are still converted. ``voxel_size`` (Å) overrides the inputs' headers. ``client`` is a
    ``distributed.Client``; without one, the current client is used or a local cluster is started.

    Examples
    --------
    >>> report = convert(["tomo.mrc"], "zarr/", ConvertParams(chunks=(64, 256, 256), levels=3))  # doctest: +SKIP
    >>> [r.status for r in report.results]                                                      # doctest: +SKIP
    ['converted']
    """
    if not isinstance(params, ConvertParams):
        raise TypeError(f"params must be ConvertParams, got {type(params).__name__}")
    plan = plan_conversion(inputs, out, params, voxel_size=voxel_size)
    client = client or current_client()
    if client is None and plan.todo:
        from .engine.cluster import connect

        with connect("local") as local_client:
            return run_conversion(plan, local_client, block_bytes=block_bytes, progress=progress)
    return run_conversion(plan, client, block_bytes=block_bytes, progress=progress)


def _run(client, jobs: list[_Job], block_bytes: int, report: ConvertReport, progress: bool,
         in_flight: int | None = None) -> None:
    """Every tomogram through the collection runner, ``in_flight`` at a time (default: four per
    worker, at least 8): the scheduler holds the tasks of a few tomograms, not of ten thousand,
    and each is finished (and marked complete) as early as possible, so a killed run has lost little."""
    from .engine.collection import Item, run_collection

    window = in_flight or max(8, 4 * len(client.scheduler_info().get("workers", {})))

    def one(item: Item):
        i = int(item.name)
        job = jobs[i]
        names = _mark_names(job, block_bytes)
        started = time.perf_counter()
        skipped = sum(map(job.marks.done, names))
        result = TomogramResult(job.source.path, str(job.store), job.status, blocks_skipped=skipped,
                                nbytes=job.source.nbytes)
        try:
            sketches = _convert_levels(client, job, block_bytes, priority=-i)
        except Exception as error:  # noqa: BLE001  (the first failed block: this tomogram fails, the others go on)
            message = _one_line(error)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk
                message = f"cannot write {job.store} ({error.strerror})"
            result.status = "failed"
            result.message = message if message.startswith(job.source.path) else f"{job.source.path}: {message}"
            result.blocks_written = sum(map(job.marks.done, names)) - skipped
        else:
            result.blocks_written = len(names) - skipped
            _write_window(job, sketches)
            _mark_complete(job)
        result.seconds = time.perf_counter() - started
        return result

    collection = run_collection([Item(Path(job.source.path), str(i)) for i, job in enumerate(jobs)], one,
                                command="convert", client=client, window=window, echo=None, show_progress=progress)
    for outcome in collection.outcomes:  # a bug in one tomogram's bookkeeping is that tomogram's failure
        report.results.append(outcome.value if outcome.value is not None else
                              TomogramResult(str(outcome.item.path), "", "failed", message=outcome.message))


def _mark_names(job: _Job, block_bytes: int) -> list[str]:
    """The done-mark of every block task of a tomogram (level 1 is written by level 0's)."""
    plan = plan_pyramid(job.source.shape, job.params.chunks, job.params.levels, _dtype(job).itemsize, block_bytes)
    return [f"{level}/{b.name}" for level, blocks in enumerate(plan) if level != 1 for b in blocks]
