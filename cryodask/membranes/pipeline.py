"""``cryodask membranes``: segment the membranes of a collection of tomograms on a cluster.

Per tomogram: MRC input is converted to OME-Zarr first (an OME-Zarr from ``convert`` is used in
place); one reduction pass gives the global statistics; then either ETSAM's two SAM2 stages
run as one task per column (all z, one y/x tile) on the workers that hold the models, or the
classical sheet filter runs block by block. The logits (or sheet score) are thresholded into
``labels/<stem-free name>`` of the tomogram's OME-Zarr and exported to MRC with ETSAM's file
names, and optionally post-processed with the exact distributed component filter.

Tomograms run in parallel: every column task of the collection is submitted at once and each
tomogram is finished as soon as its own columns are. A finished tomogram records a complete
mark keyed by the parameters, so a rerun skips it; an interrupted one resumes per stage.
"""

from __future__ import annotations

import errno
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.blocks import DoneMarks
from ..errors import CryodaskError, InputError, where
from ..io.layouts import CHUNKS
from ..io.volumes import ZarrReader, stem
from ..params import params_hash
from .etsam import TiledLogits, tiles, two_stage_column
from .params import ClassicalParams, EtsamParams, MembraneParams, membrane_params

__all__ = ["MembraneParams", "membrane_params", "segment", "check_models", "find_inputs"]
STEP = "membranes"


@dataclass
class MembraneResult:
    """What happened to one tomogram: ``done``, ``skipped`` (already done) or ``failed``."""

    source: str
    status: str
    store: str | None = None
    files: list = field(default_factory=list)
    message: str = ""
    seconds: dict = field(default_factory=dict)
    mask_fraction: float | None = None
    polarity: str = ""  # how the contrast was read: "polarity bright (auto: ...)"


@dataclass
class MembraneReport:
    method: str
    results: list[MembraneResult] = field(default_factory=list)

    @property
    def failed(self) -> list[MembraneResult]:
        return [r for r in self.results if r.status == "failed"]


def check_models(params: MembraneParams) -> None:
    """ETSAM's SAM2 config and checkpoints, checked on the client before any cluster starts (the
    checkpoints memory-mapped: cheap), so a wrong file is one line, not a failure on every worker."""
    if not isinstance(params.method, EtsamParams):
        return
    from ..models.sam2 import check_checkpoint, config_path

    config_path(params.method.config)
    for path in (params.method.stage1_checkpoint, params.method.stage2_checkpoint):
        if path is not None:
            check_checkpoint(params.method.config, path)


def find_inputs(inputs, voxel_size=None) -> tuple[list, list[MembraneResult]]:
    """(valid inputs as ("zarr"|"volume", path), failures): every input checked before any cluster."""
    from ..io.omezarr import open_image
    from ..io.volumes import find_volumes, is_zarr, open_volume

    everything = find_volumes(inputs, stores=True)
    zarrs = [p for p in everything if is_zarr(p)]
    others = [p for p in everything if not is_zarr(p)]
    found, failed = [], []
    for path in zarrs:
        try:
            _, arrays, _, _ = open_image(path)
            if arrays[0].ndim != 3:
                raise where(path, f"not a 3D image (shape {arrays[0].shape})")
            found.append(("zarr", path))
        except InputError as exc:
            failed.append(MembraneResult(str(path), "failed", message=str(exc)))
    for path in others:
        try:
            open_volume(path, voxel_size)
            found.append(("volume", Path(path)))
        except InputError as exc:
            failed.append(MembraneResult(str(path), "failed", message=str(exc)))
    if not found and not failed:
        raise InputError(f"no tomogram found in {', '.join(map(str, inputs))}")
    stems: dict[str, Path] = {}
    for _, path in found:
        if stem(path) in stems:
            raise where(path, f"has the same name as {stems[stem(path)]}; their outputs would collide")
        stems[stem(path)] = path
    return found, failed


# ------------------------------------------------------------------ global statistics

def _extremes(level0_path: str, client) -> tuple[float, float]:
    """Global min and max in one pass; a NaN or Inf anywhere is an input error."""
    import dask.array as da

    data = da.from_zarr(level0_path)
    lo, hi, finite = da.nanmin(data), da.nanmax(data), da.isfinite(data).all()
    lo, hi, finite = (client.compute([lo, hi, finite], sync=True) if client is not None
                      else da.compute(lo, hi, finite))
    if not finite:
        raise InputError("contains NaN or Inf values")
    return float(lo), float(hi)


def _mean_std(level0_path: str, client) -> tuple[float, float]:
    import dask.array as da

    data = da.from_zarr(level0_path)
    if data.dtype.kind == "f":  # checked first: NaN/Inf would pass as a "constant volume", with warnings
        finite = da.isfinite(data).all()
        if not (client.compute(finite, sync=True) if client is not None else finite.compute()):
            raise InputError("contains NaN or Inf values")
    data = data.astype(np.float64)
    mean, std = da.mean(data), da.std(data)
    mean, std = client.compute([mean, std], sync=True) if client is not None else da.compute(mean, std)
    return float(mean), float(std)


# ------------------------------------------------------------------ the public function

def segment(inputs, out, params: MembraneParams = MembraneParams(), *, voxel_size=None, chunks=CHUNKS,
            levels: int = 3, client=None, batch: int | None = None, device: str = "auto", progress: bool = False,
            echo=None) -> MembraneReport:
    """Segment membranes in tomograms (MRC files, folders, globs, or OME-Zarr images).

    Parameters
    ----------
    params : :class:`MembraneParams`: the method (``ClassicalParams`` or ``EtsamParams``) and the
        outputs; :func:`membrane_params` builds them from flat options (``method="auto"``: ETSAM
        when its weights are found).
    voxel_size : Å, overrides the inputs' headers.
    chunks, levels : the OME-Zarr that MRC inputs are converted into.
    batch : slices per encoder call (default: what half the free GPU memory holds on CUDA, 1 on CPU);
        device : "auto", "cpu" or "cuda".
    echo : called with each line of a tomogram's summary as soon as it is finished.

    Returns
    -------
    MembraneReport with one ``MembraneResult`` (status, files) per tomogram.

    Examples
    --------
    >>> report = segment(["tomo.mrc"], "out/", MembraneParams(ClassicalParams(), post_process=True))  # doctest: +SKIP
    >>> report.results[0].files                                                                     # doctest: +SKIP
    """
    from ..io.folders import check_output_dir

    if not isinstance(params, MembraneParams):
        raise TypeError(f"params must be MembraneParams, got {type(params).__name__}")
    if device not in ("auto", "cpu", "cuda"):
        raise validate_device(device)
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    check_models(params)
    out = check_output_dir(out).resolve()
    found, failed = find_inputs(inputs, voxel_size)
    report = MembraneReport(params.method_name, list(failed))
    if not found:
        return report
    if client is None:
        from ..engine.cluster import current_client

        client = current_client()
    if client is None:
        from ..engine.cluster import connect

        with connect("local") as local:
            return _run(found, out, params, voxel_size, chunks, levels, batch, device, local, progress, report, echo)
    return _run(found, out, params, voxel_size, chunks, levels, batch, device, client, progress, report, echo)


def validate_device(device) -> InputError:
    return InputError(f"--device must be auto, cpu or cuda, got {device!r}")


@dataclass
class _Tomogram:
    source: Path
    store: Path
    stem: str
    key: str
    marks: DoneMarks
    shape: tuple = ()
    voxel_size: tuple = ()  # of the grid the method runs on: the input's, or the working grid's
    polarity: object = None  # cryodask.polarity.Polarity
    level0: str = ""  # the array the method reads: the store's level 0, or its working-grid copy
    input_grid: tuple | None = None  # (shape, voxel size) to map outputs back to, with a working grid
    started: float = 0.0


def _complete_mark(out: Path, stem: str, key: str) -> Path:
    return out / ".cryodask" / stem / f"{STEP}-{key}.complete"


def _store(kind: str, source: Path, out: Path, voxel_size, chunks, levels, client, layout="default") -> Path:
    """The tomogram's OME-Zarr: itself, or its conversion under ``out`` (resumed if begun)."""
    if kind == "zarr":
        return source
    from ..convert import ConvertParams, convert

    result = convert([source], out, ConvertParams(chunks, levels, layout=layout), voxel_size=voxel_size,
                     client=client).results[0]
    if result.status == "failed":
        raise InputError(result.message)
    return Path(result.store)


def _run(found, out: Path, params: MembraneParams, voxel_size, chunks, levels, batch, device, client, progress,
         report: MembraneReport, echo=None) -> MembraneReport:
    """Every tomogram through the collection runner: each converts (if MRC), computes its own
    statistics, runs its tasks and writes its outputs as soon as they are done, a few at a time."""
    from ..engine.collection import Item, Outcome, run_collection

    params_key = params_hash(params.key())
    kinds = {Path(path): kind for kind, path in found}

    def one(item: Item) -> Outcome:
        result = _one(kinds[item.path], item.path, out, params, params_key, voxel_size, chunks, levels, batch,
                      device, client)
        status = "failed" if result.status == "failed" else result.status
        return Outcome(item, status, result.message, value=result, lines=result_lines(result, params.method_name))

    items = [Item(Path(path), stem(path)) for _, path in found]
    collection = run_collection(items, one, command="membranes", client=client, echo=echo,
                                show_progress=progress)
    for outcome in collection.outcomes:
        report.results.append(outcome.value if outcome.value is not None else
                              MembraneResult(str(outcome.item.path), "failed", message=outcome.message))
    return report


def result_lines(result: MembraneResult, method: str) -> list[str]:
    """What a command prints for one tomogram."""
    if result.status == "failed":
        return [f"error: {result.message}"]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    fraction = f", membrane {100 * result.mask_fraction:.2f} %" if result.mask_fraction is not None else ""
    lines = [f"{result.source}: {result.status} ({method}{fraction}{', ' + seconds if seconds else ''})"]
    lines += [f"  {result.polarity}"] if result.polarity else []
    return lines + [f"  wrote {path}" for path in result.files]


def _one(kind, source: Path, out: Path, params: MembraneParams, params_key, voxel_size, chunks, levels, batch,
         device, client) -> MembraneResult:
    """One tomogram: its store, polarity and key; skipped if complete, else its tasks, then its params."""
    from ..io.omezarr import open_image
    from ..io.volumes import source_identity

    method = params.method_name
    store = _store(kind, source, out, voxel_size, chunks, levels, client, params.layout)
    name = stem(source)
    _, arrays, vs, _ = open_image(store)
    try:
        contrast = _polarity(params.polarity, store, arrays, vs)
    except CryodaskError as exc:
        return MembraneResult(str(source), "failed", str(store), message=f"{source}: {exc}")
    # the tomogram's identity too: a reconverted or replaced image is new work, not done work
    key = params_hash({"params": params_key, "image": source_identity(ZarrReader(str(store / "0"))),
                       "polarity": contrast.polarity})
    job = _Tomogram(source, store, name, key, DoneMarks(out / ".cryodask" / name, f"{STEP}-{method}", key))
    job.shape, job.voxel_size, job.polarity = tuple(arrays[0].shape), vs, contrast
    job.level0 = str(store / arrays[0].path.split("/")[-1])
    if _complete_mark(out, name, key).exists():
        return MembraneResult(str(source), "skipped", str(store), message="already done",
                              polarity=contrast.describe())
    job.started = time.perf_counter()
    try:
        if params.working_voxel_size is not None:
            _working(job, params.working_voxel_size, tuple(arrays[0].chunks), client)
        _segment(job, params.method, batch, device, client)
    except CryodaskError as exc:
        return MembraneResult(str(source), "failed", str(store), message=f"{source}: {exc}")
    try:
        return _finish(job, out, params, client)
    except (CryodaskError, OSError) as exc:  # e.g. the disk filled while exporting: not marked complete,
        for kind in ("mask", "logits", "post_processed_mask"):  # and no output of it left to look done
            (out / f"{name}_{method}_predicted_{kind}.mrc").unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: free its scratch
            shutil.rmtree(job.marks.folder, ignore_errors=True)
        message = (str(exc) if isinstance(exc, CryodaskError)
                   else f"cannot write its outputs in {out} ({exc.strerror or exc})")
        return MembraneResult(str(source), "failed", str(store), message=f"{source}: {message}")


def _polarity(choice: str, store: Path, arrays, voxel_size):
    """The tomogram's polarity; ``auto`` reads the finest pyramid level small enough to bin in memory."""
    from ..polarity import MAX_VOXELS, resolve_polarity

    level = next((i for i, a in enumerate(arrays) if math.prod(a.shape) <= MAX_VOXELS), len(arrays) - 1)
    factor = tuple(a / b for a, b in zip(arrays[0].shape, arrays[level].shape))
    reader = ZarrReader(str(store / arrays[level].path.split("/")[-1]), "float32")
    return resolve_polarity(choice, reader, arrays[level].shape, tuple(v * f for v, f in zip(voxel_size, factor)))


def _working(job: _Tomogram, working, chunks, client) -> None:
    """Resample the tomogram onto the working grid (once: done-marked) and point the job at it."""
    import dask.array as da

    from ..io.resample import to_working, working_grid

    shape, factor = working_grid(job.shape, job.voxel_size, working)
    path = str(job.marks.folder / "working.zarr")
    if not job.marks.done("working"):
        job.marks.folder.mkdir(parents=True, exist_ok=True)
        resampled = to_working(da.from_zarr(job.level0), job.voxel_size, working, chunks)
        stored = da.to_zarr(resampled, path, overwrite=True, compute=False)
        client.compute(stored, sync=True) if client is not None else stored.compute()
        job.marks.mark("working")
    job.input_grid = (job.shape, job.voxel_size)
    job.shape, job.voxel_size, job.level0 = shape, tuple(v * f for v, f in zip(job.voxel_size, factor)), path


def _segment(job: _Tomogram, params: ClassicalParams | EtsamParams, batch, device, client) -> None:
    """The method over the tomogram, through the one block runner: ETSAM one task per column
    (all z, one y/x tile; each stage done-marked inside it), the classical filter block by block."""
    from ..engine.blocks import Block
    from ..engine.runner import run_blocks
    from ..polarity import dark_reader

    level0 = job.level0
    reader = dark_reader(ZarrReader(level0, "float32"), job.polarity)  # dense matter dark from here on
    sign = 1.0 if job.polarity.dark else -1.0
    if isinstance(params, EtsamParams):
        from ..engine.cluster import gpu_resources
        from ..io.normalize import from_extremes

        lo, hi = sorted(sign * v for v in _extremes(level0, client))
        norm = from_extremes(params.normalize, lo, hi, name=str(job.source))
        columns = [Block((i,), (slice(0, job.shape[0]), ys, xs))
                   for i, (ys, xs) in enumerate(tiles(job.shape[1], job.shape[2], params.tile, params.split))]
        run_blocks(client, _column, columns, step="etsam", key=job.key, name=f"etsam-{job.stem}", report="etsam",
                   label=job.stem,
                   args=(reader, norm, params, str(job.marks.folder / "logits"), job.marks, device, batch),
                   resources=gpu_resources(client, device), fault=False)
        return
    from .classical import classical_segment

    mean, std = _mean_std(level0, client)
    if not std > 0:
        raise InputError("constant volume: the sheet filter is undefined")
    work = job.marks.folder / "classical"
    work.mkdir(parents=True, exist_ok=True)
    classical_segment(reader, job.shape, job.voxel_size, (64, 128, 128), params, f"{work}/score.zarr",
                      f"{work}/mask.zarr", client=client, mean=sign * mean, std=std, marks=job.marks)


def _column(region, reader, norm, params, folder, marks, device, batch) -> str:
    """ETSAM's two stages on one column (its stages marked done inside, so a rerun resumes a column)."""
    zs, ys, xs = region.write
    return two_stage_column(reader, norm, zs.stop, ys, xs, params, folder, marks, device=device, batch=batch)


def _finish(job: _Tomogram, out: Path, params: MembraneParams, client) -> MembraneResult:
    """Threshold into labels, export with ETSAM's names, post-process; then mark complete."""
    import dask.array as da
    import zarr

    from ..engine.cluster import on_worker
    from ..export import export
    from ..io.mrc import write_mrc
    from ..io.omezarr import open_image, write_segmentation
    from ..io.volumes import open_volume, source_position
    from ..postprocess.pipeline import PostprocessParams, postprocess
    from ..viz import membranes_preview

    clock = time.perf_counter()
    method = params.method_name
    result = MembraneResult(str(job.source), "done", str(job.store), polarity=job.polarity.describe())
    result.seconds[method] = clock - job.started
    split = isinstance(params.method, EtsamParams) and params.method.split
    prefix = f"{job.stem}_{method}_predicted" + ("_split_processing" if split else "")  # ETSAM's file names
    chunks = open_image(job.store)[1][0].chunks
    if isinstance(params.method, EtsamParams):
        logits = TiledLogits(str(job.marks.folder / "logits"), job.shape, params.method.tile, params.method.split)
        mask = da.from_array(logits, chunks=chunks, asarray=True) > np.float32(params.logit_threshold)
    else:
        logits = zarr.open_array(str(job.marks.folder / "classical" / "score.zarr"), mode="r")
        mask = da.from_zarr(str(job.marks.folder / "classical" / "mask.zarr")) > 0
    if job.input_grid is not None:  # from the working grid back onto the tomogram's
        from ..io.resample import from_working

        shape, vs = job.input_grid
        working = job.voxel_size
        logits = from_working(da.from_array(logits, chunks=mask.chunks, asarray=True), shape, vs, working, chunks,
                              order=1)
        mask = from_working(mask.astype(np.uint8), shape, vs, working, chunks, order=0) > 0
    colors = {1: [64, 160, 255, 255]}
    where_to = dict(layout=params.layout, out=out, stem=job.stem, colors=colors)
    name = f"{method}_predicted_mask"
    mask_path = out / f"{job.stem}_{name}.zarr" if params.layout == "portal" else job.store / "labels" / name
    if not job.marks.done("outputs/labels"):  # written once: a rewrite would restart the post-processing
        write_segmentation(job.store, name, mask.astype(np.uint8), **where_to,
                           properties=[{"label-value": 1, "class": f"membrane ({method})",
                                        "cryodask-polarity": job.polarity.metadata()}])
        job.marks.mark("outputs/labels")
    result.mask_fraction = float(da.from_zarr(str(mask_path / "0")).mean().compute())
    result.files.append(on_worker(client, export, mask_path, out / f"{prefix}_mask.mrc"))  # not through the client
    if params.layout == "portal":
        result.files.append(mask_path)
    if params.store_logits:
        result.files.append(write_mrc(out / f"{prefix}_logits.mrc", logits,
                                      job.input_grid[1] if job.input_grid else job.voxel_size, slab=16,
                                      position=source_position(job.store)))  # the tomogram's origin/nstart
    thin, bridges = params.post_steps()
    if thin or bridges:  # ETSAM's order: thin noise first, then bridges
        post = postprocess(mask_path, out / f"{prefix}_post_processed_mask.mrc",
                           PostprocessParams(min_slices=params.min_slices if thin else 0, remove_bridges=bridges,
                                             max_bridge_len=params.max_bridge_len, max_spur_len=params.max_spur_len),
                           client=client)
        post_path = write_segmentation(job.store, f"{method}_predicted_post_processed_mask",
                                       open_volume(post.out).to_dask(chunks).astype(np.uint8),
                                       **{**where_to, "colors": {1: [80, 220, 120, 255]}},  # apart from the raw mask
                                       properties=[{"label-value": 1, "class": f"membrane ({method}, post-processed)"}])
        result.files.append(post.out)
        if params.layout == "portal":
            result.files.append(post_path)
    # last, so a run whose outputs could not be written leaves no preview of them; an absolute path
    # in place of the label name: the preview opens the Portal's separate mask store
    preview = (job.store, name if params.layout != "portal" else str(mask_path),
               out / f"{job.stem}_{method}_preview.png")
    result.files.append(on_worker(client, membranes_preview, *preview, name=job.stem, method=method,
                                  fraction=result.mask_fraction))  # about a CPU-second

    result.seconds["outputs"] = time.perf_counter() - clock
    mark = _complete_mark(out, job.stem, job.key)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.touch()
    shutil.rmtree(job.marks.folder, ignore_errors=True)  # the logits are in the outputs now
    return result
