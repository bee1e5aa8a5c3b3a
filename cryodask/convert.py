"""MRC/TIFF tomograms to chunked OME-Zarr, many at once, on a Dask cluster.

Each tomogram becomes ``<out>/<stem>.zarr``: a multiscale image (z, y, x in Å) whose level 0
equals the input. The work is a graph of block tasks — level 0 reads a chunk-aligned slab of
the file, level ``l`` averages 2x2x2 voxels of the level ``l-1`` blocks it depends on — so a
worker holds a few chunks, never a tomogram, and pyramid levels start as soon as their parent
blocks are written. Every block writes whole chunks and then a done-mark; a rerun skips marked
blocks and finished tomograms, and a changed parameter starts that tomogram again.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .engine.blocks import Block, DoneMarks, fault_injection_delay, plan_blocks
from .engine.cluster import current_client
from .io.folders import check_output_dir
from .errors import CryodaskError, InputError, where
from .io.omezarr import NGFF, PORTAL_CHUNKS, check_layout, create_image, level_shapes, merge_window, sketch, write_omero
from .io.volumes import VolumeSource, find_volumes, open_volume
from .params import params_hash
from .report.stages import stage

STEP = "convert"
PYRAMID = "pyramid"  # the report's step name of the level >= 2 blocks


@dataclass(frozen=True)
class ConvertParams:
    """Everything that changes the converted store (its hash keys the done-marks)."""

    chunks: tuple[int, int, int] = (64, 256, 256)
    levels: int = 3
    ngff: str = "0.4"
    dtype: str | None = None
    layout: str = "default"

    def __post_init__(self):
        if len(self.chunks) != 3 or min(self.chunks) < 1:
            raise InputError(f"--chunks must be three positive integers, got {self.chunks}")
        if self.levels < 1:
            raise InputError(f"--levels must be at least 1, got {self.levels}")
        if self.ngff not in NGFF:
            raise InputError(f"--ngff must be one of {', '.join(NGFF)}, got {self.ngff}")
        if self.dtype not in (None, "float32"):
            raise InputError(f"--dtype must be float32 or left out (keep the input's), got {self.dtype}")
        check_layout(self.layout, self.ngff)
        if self.layout == "portal":  # the Portal's chunks and type, whatever --chunks and --dtype say
            object.__setattr__(self, "chunks", PORTAL_CHUNKS)
            object.__setattr__(self, "dtype", "float32")


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


# ---------------------------------------------------------------- block tasks (run on workers)

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


def _write_source_block(source: VolumeSource, store: str, block: Block, dtype: str, marks: DoneMarks,
                        level1: Block | None = None):
    """Write a level-0 block; with ``level1``, also its 2x-averaged level-1 block from the same
    data (the block spans two level-1 chunks per axis, so both writes are whole chunks)."""
    import zarr

    name = f"{Path(store).stem} 0/{block.name}"
    fault_injection_delay(f"{STEP} {name}")
    with stage("read", block=name, step=STEP) as s:
        data = source.read(block.region)
        s.bytes_read = data.nbytes
    with stage("preprocess", block=name, step=STEP):
        data = data.astype(dtype, copy=False)
    with stage("write", block=name, step=STEP, bytes_written=data.nbytes):
        zarr.open_array(f"{store}/0", mode="r+")[block.region] = data
    if level1 is not None:
        with stage("preprocess", block=name, step=STEP):
            half = downsample_mean(data, level1.shape, dtype)
        with stage("write", block=name, step=STEP, bytes_written=half.nbytes):
            zarr.open_array(f"{store}/1", mode="r+")[level1.region] = half
    marks.mark(f"0/{block.name}", sketch(data))  # the block's value sketch, for the contrast window
    return data.nbytes


def _write_window(job: "_Job", block_bytes: int) -> None:
    """The ``omero`` contrast window from the level-0 blocks' sketches (no level is read again).
    Marks without a sketch (written by an older cryodask) leave the store without a window."""
    dtype = _dtype(job)
    sketches = []
    for block in plan_pyramid(job.source.shape, job.params.chunks, job.params.levels, dtype.itemsize, block_bytes)[0]:
        try:
            sketches.append(job.marks.payload(f"0/{block.name}"))
        except (OSError, ValueError, EOFError):
            return
    window = merge_window(sketches)
    if window is not None:
        write_omero(job.store, window, label=job.store.stem, z_size=job.source.shape[0])


def _write_level_block(store: str, level: int, block: Block, marks: DoneMarks, *deps):
    import zarr

    name = f"{Path(store).stem} {level}/{block.name}"
    fault_injection_delay(f"{STEP} {name}")
    parent = zarr.open_array(f"{store}/{level - 1}", mode="r")
    target = zarr.open_array(f"{store}/{level}", mode="r+")
    region = tuple(slice(2 * s.start, min(2 * s.stop, n)) for s, n in zip(block.region, parent.shape))
    with stage("read", block=name, step=PYRAMID) as s:  # the pyramid's own reads: not the input's bytes
        data = parent[region]
        s.bytes_read = data.nbytes
    with stage("preprocess", block=name, step=PYRAMID):
        data = downsample_mean(data, block.shape, target.dtype)
    with stage("write", block=name, step=PYRAMID, bytes_written=data.nbytes):
        target[block.region] = data
    marks.mark(f"{level}/{block.name}")
    return 0


# ---------------------------------------------------------------- planning (runs on the client)

@dataclass
class _Job:
    source: VolumeSource
    store: Path
    marks: DoneMarks
    key: str
    params: ConvertParams
    status: str = "converted"


def _job_key(source: VolumeSource, params: ConvertParams) -> str:
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
    create_image(job.store, job.source.shape, chunks=job.params.chunks, dtype=dtype,
                 voxel_size=job.source.voxel_size, levels=job.params.levels, ngff=job.params.ngff, layout=job.params.layout,
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
    halved = [Block(b.index, tuple(slice(r.start // 2, -(-r.stop // 2)) for r in b.region)) for b in fused]
    return [fused, halved] + [plan_blocks(s, chunks, itemsize=itemsize * 8, max_bytes=block_bytes) for s in shapes[2:]]


def _overlapping(blocks: list[Block], region) -> list[Block]:
    return [b for b in blocks if all(r.start < s.stop and s.start < r.stop for r, s in zip(b.region, region))]


def _dtype(job: _Job) -> np.dtype:
    return np.dtype(job.params.dtype or job.source.dtype).newbyteorder("=")


def _submit(client, job: _Job, block_bytes: int, priority: int, run: str) -> list:
    """Submit the block graph of one tomogram; return its futures (done blocks are left out).

    A block of level ``l >= 2`` depends on exactly the level ``l-1`` blocks it reads, so the
    pyramid proceeds as soon as its inputs are written.
    """
    store, dtype = str(job.store), _dtype(job)
    plan = plan_pyramid(job.source.shape, job.params.chunks, job.params.levels, dtype.itemsize, block_bytes)
    futures, previous = [], {}
    for level, blocks in enumerate(plan):
        if level == 1:
            continue  # written by the level-0 tasks; ``previous`` already maps its names
        current = {}
        for i, block in enumerate(blocks):
            name = f"{level}/{block.name}"
            if job.marks.done(name):
                current[block.name] = None
                continue
            key = f"convert-{Path(job.source.path).stem}-{run}-{level}-{block.name}"  # copick stores share a name
            if level == 0:
                level1 = plan[1][i] if len(plan) > 1 else None
                fut = client.submit(_write_source_block, job.source, store, block, dtype.str, job.marks, level1,
                                    key=key, priority=priority, retries=1)
            else:
                parent_region = tuple(slice(2 * s.start, 2 * s.stop) for s in block.region)
                deps = [previous[b.name] for b in _overlapping(plan[level - 1], parent_region) if previous[b.name] is not None]
                fut = client.submit(_write_level_block, store, level, block, job.marks, *deps,
                                    key=key, priority=priority, retries=1)
            current[block.name] = fut
            futures.append(fut)
        previous = current
    return futures


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


def plan_conversion(inputs, out, *, chunks=(64, 256, 256), levels: int = 3, ngff: str = "0.4",
                    dtype: str | None = None, voxel_size=None, store_path=None, layout: str = "default") -> ConvertPlan:
    """Validate every input and prepare its store; bad inputs go to the report as failures.

    ``store_path(path, source)`` puts a store elsewhere than ``<out>/<stem>.zarr`` (a copick
    run's ``VoxelSpacing…/<type>.zarr``); the resume marks stay under ``out``."""
    params = ConvertParams(tuple(int(c) for c in chunks), int(levels), str(ngff), dtype, str(layout))
    out = check_output_dir(out).resolve()
    paths = find_volumes(inputs)
    if not paths:
        raise InputError(f"no tomogram found in {', '.join(map(str, inputs))}")
    report, jobs, stems = ConvertReport(), [], {}
    for path in paths:
        try:
            source = open_volume(path, voxel_size)
            stem = Path(path).stem
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
            report.results.append(TomogramResult(str(path), None, "failed", str(where(out / f"{stem}.zarr", _one_line(exc)))))
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


def convert(inputs, out, *, chunks=(64, 256, 256), levels: int = 3, ngff: str = "0.4", dtype: str | None = None,
            voxel_size=None, client=None, block_bytes: int = 128 * 2**20, progress: bool = False,
            layout: str = "default") -> ConvertReport:
    """Convert tomograms (MRC/REC/MAP/TIFF files, folders or globs) to OME-Zarr under ``out``.

    Inputs are validated first; a bad one is reported in the returned report and the others
    are still converted. ``client`` is a ``distributed.Client``; without one, the current
    client is used or a local cluster is started.

    Examples
    --------
    >>> report = convert(["tomo.mrc"], "zarr/", chunks=(64, 256, 256), levels=3)  # doctest: +SKIP
    >>> [r.status for r in report.results]                                        # doctest: +SKIP
    ['converted']
    """
    plan = plan_conversion(inputs, out, chunks=chunks, levels=levels, ngff=ngff, dtype=dtype, voxel_size=voxel_size,
                           layout=layout)
    client = client or current_client()
    if client is None and plan.todo:
        from .engine.cluster import connect

        with connect("local") as local_client:
            return run_conversion(plan, local_client, block_bytes=block_bytes, progress=progress)
    return run_conversion(plan, client, block_bytes=block_bytes, progress=progress)


def _run(client, jobs: list[_Job], block_bytes: int, report: ConvertReport, progress: bool,
         in_flight: int | None = None) -> None:
    """Keep ``in_flight`` tomograms submitted (default: four per worker, at least 8).

    A window rather than everything at once: the scheduler holds the tasks of a few
    tomograms, not of ten thousand, and each tomogram is finished (and marked complete)
    as early as possible, so a killed run has lost little.
    """
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]  # a fresh key per run: never collide with a cancelled run's tasks
    window = in_flight or max(8, 4 * len(client.scheduler_info().get("workers", {})))
    totals = [_count_blocks(job, block_bytes) for job in jobs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t - job.marks.count() for t, job in zip(totals, jobs)), unit="block", desc="convert")
    queue = iter(range(len(jobs)))
    started, futures, pending, owner = {}, {}, {}, {}
    stream = as_completed()

    def submit_next() -> bool:
        """Submit the next tomogram that has blocks to do; finish those that have none."""
        while (i := next(queue, None)) is not None:
            started[i] = time.perf_counter()
            futures[i] = _submit(client, jobs[i], block_bytes, priority=-i, run=run)
            pending[i] = len(futures[i])
            for f in futures[i]:
                owner[f.key] = i
                stream.add(f)
            if futures[i]:
                return True
            finish(i)
        return False

    def finish(i: int) -> None:
        job, done = jobs[i], futures.pop(i)
        errors = [f.exception() if f.status == "error" else CryodaskError(f"block task {f.status}")
                  for f in done if f.status != "finished"]
        result = TomogramResult(job.source.path, str(job.store), job.status,
                                blocks_written=sum(f.status == "finished" for f in done),
                                blocks_skipped=totals[i] - len(done), nbytes=job.source.nbytes,
                                seconds=time.perf_counter() - started[i])
        if errors:
            error = next((e for e in errors if isinstance(e, CryodaskError)), errors[0])
            message = _one_line(error)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk
                message = f"cannot write {job.store} ({error.strerror})"
            result.status = "failed"
            result.message = message if message.startswith(job.source.path) else f"{job.source.path}: {message}"
        else:
            _write_window(job, block_bytes)
            _mark_complete(job)
        report.results.append(result)
        client.cancel(done)

    for _ in range(window):
        if not submit_next():
            break
    for future in stream:
        i = owner.pop(future.key)
        pending[i] -= 1
        if bar is not None:
            bar.update(1)
        if not pending[i]:
            finish(i)
            submit_next()
    if bar is not None:
        bar.close()


def _count_blocks(job: _Job, block_bytes: int) -> int:
    plan = plan_pyramid(job.source.shape, job.params.chunks, job.params.levels, _dtype(job).itemsize, block_bytes)
    return sum(len(blocks) for level, blocks in enumerate(plan) if level != 1)
