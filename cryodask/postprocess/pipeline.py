"""``cryodask postprocess``: ETSAM's mask post-processing over a whole tomogram on a cluster.

Component filter (``min_slices``: z extent of the bounding box, ETSAM's rule; ``min_voxels``)
with exact cross-chunk connected components (``components.py``), then optionally ETSAM's
per-slice bridge removal on whole z-slabs. Input: an MRC mask or an OME-Zarr image or label
image; output by suffix: ``.mrc`` (plus ``<stem>_labels.mrc`` with ``labels=True``) or an
OME-Zarr image (plus ``labels/components``). Memory per task is one block.

Resumable like every step: the label and write passes mark each block after writing it (the
label pass keeps each block's local labels, statistics and faces), and a finished output
records its parameter hash (which covers the mask file's size and mtime), so a rerun skips it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..engine.blocks import Block, DoneMarks, plan_blocks
from ..engine.cluster import gpu_resources
from ..engine.runner import run_blocks
from ..errors import InputError, where
from ..io.volumes import open_volume, source_identity, source_position
from ..params import params_hash
from ..report.stages import RecordedRead, stage
from ..io.layouts import CHUNKS
from .params import PostprocessParams
from .components import (
    BlockLabels,
    block_table,
    boundaries,
    equivalence_pass,
    label_pass,
    merge,
    plan,
)

STEP = "postprocess"
MRC_DATA_OFFSET = 1024  # create_mrc writes no extended header


@dataclass
class PostprocessResult:
    out: Path
    n_components: int = 0
    n_kept: int = 0
    voxels_kept: int = 0
    blocks_written: int = 0
    seconds: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    status: str = "done"


# ------------------------------------------------------------------ where blocks are written

@dataclass(frozen=True)
class ZarrTarget:
    """Whole chunks of a zarr array."""

    path: str

    def __call__(self, region) -> np.ndarray:
        import zarr

        return zarr.open_array(self.path, mode="r")[region]

    def write(self, region, data) -> None:
        import zarr

        target = zarr.open_array(self.path, mode="r+")
        target[region] = data.astype(target.dtype, copy=False)


@dataclass(frozen=True)
class MrcTarget:
    """Rows of an MRC file being filled (``<out>.partial`` until every block is written)."""

    path: str
    shape: tuple
    dtype: str
    offset: int

    def write(self, region, data) -> None:
        from ..io.mrc import write_region

        write_region(self.path, region, data.astype(self.dtype, copy=False), shape=self.shape, offset=self.offset)


# ------------------------------------------------------------------ tasks

def save_block_labels(folder: str, block: Block, labels: np.ndarray, n: int) -> None:
    """A block's local labels as one zstd file (uint16 when they fit): mostly zeros, they
    shrink ~100x and encode in milliseconds, where a zarr array write cost 20x longer."""
    import numcodecs

    dtype = np.uint16 if n < 2**16 else np.uint32
    path = Path(folder) / f"{block.name}.{np.dtype(dtype).str[1:]}.zst"
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(numcodecs.Zstd(level=1).encode(np.ascontiguousarray(labels, dtype=dtype)))
    partial.replace(path)


def load_block_labels(folder: str, block: Block) -> np.ndarray:
    import numcodecs

    path = next(Path(folder).glob(f"{block.name}.*.zst"))
    dtype = np.dtype(path.suffixes[-2][1:])
    return np.frombuffer(numcodecs.Zstd().decode(path.read_bytes()), dtype=dtype).reshape(block.shape)


def _faces_path(folder: str, name: str) -> Path:
    return Path(folder) / f"{name}.faces.pkl"


def _label_kernel(region, read, grid, shape, connectivity, device, labels_folder):
    """Label one block; its local labels and its boundary planes are kept in ``labels_folder``
    (read back by the write and pairs passes), its statistics in its done-mark."""
    import pickle

    from ..io.folders import atomic_write

    labelled, labels = label_pass(RecordedRead(read), region.block, grid, shape, connectivity, device)
    with stage("write") as s:
        save_block_labels(labels_folder, region.block, labels, len(labelled.ids))
        with atomic_write(_faces_path(labels_folder, region.name)) as partial:
            s.bytes_written = labels.nbytes + partial.write_bytes(pickle.dumps(labelled.faces, pickle.HIGHEST_PROTOCOL))
    return replace(labelled, faces={})  # the client gets the statistics only


def _label_keep(labelled: BlockLabels) -> dict:
    return {name: getattr(labelled, name) for name in ("ids", "count", "zmin", "zmax", "first")}


def _label_restore(saved: dict) -> BlockLabels:
    return BlockLabels(**saved, faces={})


@dataclass(frozen=True)
class _Boundary:
    """The blocks on either side of one plane between blocks (the pairs pass's unit of work)."""

    name: str
    axis: int
    lows: tuple
    highs: tuple


def _pairs_kernel(region, labels_folder, shape, connectivity):
    import pickle

    boundary: _Boundary = region.block

    def faces(blocks, side):
        return [(b, pickle.loads(_faces_path(labels_folder, b.name).read_bytes())[boundary.axis, side]) for b in blocks]

    with stage("read"):
        lows, highs = faces(boundary.lows, "hi"), faces(boundary.highs, "lo")
    return equivalence_pass(lows, highs, boundary.axis, shape, connectivity)


def _write_kernel(region, labels_folder: str, tables: dict, mask_target, labels_target) -> dict:
    """Map one block's local labels through its table; write the mask (and labels). Returns the
    block's own statistics, kept with its done-mark: the header and the summary need no reread."""
    from ..io.mrc import region_stats

    with stage("read") as s:
        local = load_block_labels(labels_folder, region.block)
        s.bytes_read = local.nbytes
    table = tables[region.name]
    mask = (table > 0).astype(np.uint8)[local]
    with stage("write", bytes_written=mask.nbytes):
        mask_target.write(region.write, mask)
    stats = {"mask": mask_stats(mask)}
    if labels_target is not None:
        final = table.astype(np.uint32)[local]
        with stage("write", bytes_written=final.nbytes):
            labels_target.write(region.write, final)
        stats["labels"] = region_stats(final)
    return stats


def _stats_keep(stats: dict) -> dict:
    return {name: np.asarray(value, dtype=np.float64) for name, value in stats.items()}


def _stats_restore(saved: dict) -> dict:
    return {name: (*(float(v) for v in value[:4]), int(value[4])) for name, value in saved.items()}


def mask_stats(mask: np.ndarray) -> tuple[float, float, float, float, int]:
    """:func:`cryodask.io.mrc.region_stats` of a 0/1 mask, from its count of ones alone."""
    ones = int(np.count_nonzero(mask))
    if not mask.size:
        return (np.inf, -np.inf, 0.0, 0.0, 0)
    return (0.0 if ones < mask.size else 1.0, 1.0 if ones else 0.0, float(ones), float(ones), mask.size)


def _bridges_kernel(region, data, target, max_bridge_len: int, max_spur_len: int = 0) -> dict:
    from .bridges import remove_bridges

    cleaned = remove_bridges(data, max_bridge_len=max_bridge_len, max_spur_len=max_spur_len).astype(np.uint8)
    with stage("write", bytes_written=cleaned.nbytes):
        target.write(region.write, cleaned)
    return {"mask": mask_stats(cleaned)}


# ------------------------------------------------------------------ the step

def postprocess(mask, out, params: PostprocessParams = PostprocessParams(), *, voxel_size=None,
                chunks=CHUNKS, client=None, device: str = "cpu") -> PostprocessResult:
    """Filter the connected components of a mask (and remove bridges), block by block.

    Equal to ``scipy.ndimage.label`` + ``find_objects`` filtering on the whole array.

    Parameters
    ----------
    mask : MRC file, OME-Zarr image, ``x.zarr/labels/<name>`` (level 0 is used) or a ``Volume``;
        nonzero = foreground
    out : ``.mrc`` or ``.zarr`` path
    params : :class:`PostprocessParams` (connectivity, the filters, bridges, labels, layout)
    voxel_size : Å, overrides the mask's
    chunks : block shape for MRC input (OME-Zarr input uses its own chunks)
    device : "cpu" (cc3d) or "cuda" (CuPy on the workers)

    Examples
    --------
    >>> postprocess("tomo_mask.mrc", "tomo_post.mrc", PostprocessParams(min_slices=10))  # doctest: +SKIP
    """
    if not isinstance(params, PostprocessParams):
        raise TypeError(f"params must be PostprocessParams, got {type(params).__name__}")
    layout = params.layout
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device}")
    out = Path(out)
    if out.suffix.lower() not in (".mrc", ".zarr"):
        raise where(out, "output must end in .mrc or .zarr")
    if layout == "portal" and out.suffix.lower() != ".zarr":
        raise where(out, "--layout portal writes an OME-Zarr: the output must end in .zarr")
    read = open_volume(mask, voxel_size, chunks=chunks)
    shape, vs, block_chunks = read.shape, read.voxel_size, read.chunks
    if layout == "portal":  # blocks of whole 256^3 chunks: no two tasks write one chunk
        from ..io.layouts import PORTAL_CHUNKS

        block_chunks = PORTAL_CHUNKS
    from ..engine.cluster import current_client
    from ..io.folders import check_output_dir

    check_output_dir(out.parent)
    key = params_hash({**asdict(params), "mask": str(Path(read.path).resolve()), "source": source_identity(read),
                       "chunks": block_chunks, "voxel_size": vs})
    marks = DoneMarks(out.parent / ".cryodask" / out.name, STEP, key)
    result = PostprocessResult(out)
    if _finished(out, key):
        result.status = "skipped"
        return result
    client = client or current_client()
    try:
        if client is None:
            from ..engine.cluster import connect

            with connect("local") as local_client:
                return _run(read, shape, vs, block_chunks, params, out, marks, key, local_client, device, result)
        return _run(read, shape, vs, block_chunks, params, out, marks, key, client, device, result)
    except OSError as exc:  # a full disk, on the client or on a worker; nothing is marked complete
        raise where(exc.filename or out, exc.strerror or str(exc)) from None


def _finished(out: Path, key: str) -> bool:
    if out.suffix.lower() == ".mrc":
        return out.exists() and (out.parent / ".cryodask" / out.name / f"{STEP}-{key}.complete").exists()
    import zarr

    try:
        return (zarr.open_group(str(out), mode="r").attrs.get("cryodask", {}).get(STEP, {})
                == {"key": key, "complete": True})
    except Exception:  # noqa: BLE001  (absent or unreadable: do it)
        return False


def _labels_out(out: Path) -> Path:
    return out.with_name(out.stem + "_labels.mrc")


def _components_out(out: Path) -> Path:
    """The component labels of a ``--layout portal`` output: their own OME-Zarr beside it."""
    return out.with_name(out.stem + "_components.zarr")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _prepare(out: Path, shape, chunks, vs, params: PostprocessParams, key: str, marks: DoneMarks, n_kept: int,
             position: dict | None = None):
    """The targets the write pass fills: (mask target, labels target or None, final mask
    target, work path of the pre-bridge mask). Created afresh unless resuming this key; MRC
    outputs get the tomogram's raw origin/nstart (``position``), OME-Zarr its translation."""
    import zarr

    from ..io.mrc import create_mrc, mrc_dtype, translation
    from ..io.omezarr import create_image, create_labels

    mrc = out.suffix.lower() == ".mrc"
    outputs = [out] + ([_labels_out(out)] if params.labels and mrc else [])
    if mrc:
        made = all(_partial(p).exists() for p in outputs)
    else:
        made = out.exists() and zarr.open_group(str(out), mode="r").attrs.get("cryodask", {}).get(STEP, {}).get(
            "key") == key
    resume = made and any(marks.folder.glob("write/*"))
    if not resume:
        for name in ("write", "bridges"):
            shutil.rmtree(marks.folder / name, ignore_errors=True)
    if mrc:
        dtypes = [np.dtype(np.int8), mrc_dtype(np.uint32, n_kept)]
        for path, dtype in zip(outputs, dtypes):
            if not resume:
                create_mrc(_partial(path), shape, dtype, vs, position)
        targets = [MrcTarget(str(_partial(p)), tuple(shape), d.str, MRC_DATA_OFFSET) for p, d in zip(outputs, dtypes)]
    elif params.layout == "portal":  # the mask and its labels, each its own OME-Zarr of the Portal's levels
        from ..io.layouts import PORTAL_LEVELS
        from ..io.omezarr import create_mask_store

        stores = [out] + ([_components_out(out)] if params.labels else [])
        if not resume:
            for path in stores:
                if path.exists():
                    shutil.rmtree(path)
            source = {"source": {"position": position} if position else {}}
            for path, dtype in zip(stores, (np.int8, np.uint32)):
                create_mask_store(path, shape, dtype, voxel_size=vs, levels=PORTAL_LEVELS,
                                  translation=translation(position, vs), binary=path == out,
                                  attributes={"cryodask": {STEP: {"key": key, "complete": False,
                                                                  "params": asdict(params)},
                                                           **source} if path == out else source})
        targets = [ZarrTarget(str(path / "0")) for path in stores]
    else:
        if not resume:
            if out.exists():
                shutil.rmtree(out)
            create_image(out, shape, chunks=chunks, dtype=np.uint8, voxel_size=vs, levels=1, ngff="0.4",
                         translation=translation(position, vs),
                         attributes={"cryodask": {STEP: {"key": key, "complete": False, "params": asdict(params)},
                                                  "source": {"position": position} if position else {}}})
            if params.labels:
                create_labels(out, "components", np.uint32)
        targets = [ZarrTarget(str(out / "0"))] + ([ZarrTarget(str(out / "labels" / "components" / "0"))]
                                                  if params.labels else [])
    filtered = str(marks.folder / "filtered.zarr")
    if params.remove_bridges and not (resume and Path(filtered).exists()):
        zarr.create_array(filtered, shape=shape, chunks=chunks, dtype=np.uint8, fill_value=0, overwrite=True)
    mask_target = ZarrTarget(filtered) if params.remove_bridges else targets[0]
    return mask_target, (targets[1] if params.labels else None), targets[0], filtered


def _block_shape(read, out: Path, shape, chunks) -> tuple[int, ...]:
    """Between two MRC files, blocks of whole rows (thinner in z to stay in budget): reads
    and writes are then one run per slice. Otherwise the chunks, merged along x by ``plan``."""
    from .components import BLOCK_BYTES

    if read.format == "mrc" and out.suffix.lower() == ".mrc":
        rows = chunks[1] * shape[2]
        return (max(1, min(chunks[0], BLOCK_BYTES // 4 // max(rows, 1))), chunks[1], shape[2])
    return tuple(chunks)


def _run(read, shape, vs, chunks, params, out: Path, marks: DoneMarks, key: str, client, device, result):
    clock = time.perf_counter()
    resources = gpu_resources(client, device) if device == "cuda" else None
    if not marks.folder.exists():
        marks.clear_step()  # other parameters' work is of no use now
    marks.folder.mkdir(parents=True, exist_ok=True)
    labels_path = marks.folder / "local_labels"
    labels_path.mkdir(exist_ok=True)
    labels_path = str(labels_path)
    blocks, grid = plan(shape, _block_shape(read, out, shape, chunks))
    common = {"marks": marks, "label": STEP, "stage": "post-process", "keep": _stats_keep, "restore": _stats_restore,
              "key": key}
    block_stats = run_blocks(client, _label_kernel, blocks, step="label", name="cc-label", report="label",
                             args=(read, grid, shape, params.connectivity, device, labels_path),
                             resources=resources, **{**common, "keep": _label_keep, "restore": _label_restore})
    sides = [_Boundary(f"{axis}.{i}", axis, tuple(lows), tuple(highs))
             for i, (axis, lows, highs) in enumerate(boundaries(blocks, shape))]
    pairs = run_blocks(client, _pairs_kernel, sides, step="pairs", name="cc-pairs", report="pairs", key=key,
                       fault=False, args=(labels_path, shape, params.connectivity))
    result.seconds["label + equivalences"] = time.perf_counter() - clock

    clock = time.perf_counter()
    comps = merge(block_stats, pairs, min_slices=params.min_slices, min_voxels=params.min_voxels)
    result.n_components, result.n_kept = comps.n_components, comps.n_kept
    if params.labels and comps.n_kept >= 2**32:
        raise InputError(f"{comps.n_kept} components do not fit uint32 labels")
    result.seconds["union-find + filter"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mask_target, labels_target, final_mask, filtered = _prepare(out, shape, chunks, vs, params, key, marks,
                                                                comps.n_kept, _position(read))
    result.blocks_written = sum(not marks.done(f"write/{b.name}") for b in blocks)
    tables = {b.name: block_table(comps, s) for b, s in zip(blocks, block_stats)}
    written = run_blocks(client, _write_kernel, blocks, step="write", name="cc-write", report="relabel",
                         args=(labels_path, tables, mask_target, labels_target), **common)
    mask_stats = [s["mask"] for s in written]  # every block's, this run's and the marked ones'
    label_stats = [s["labels"] for s in written if "labels" in s]
    if params.remove_bridges:
        slabs = plan_blocks(shape, (chunks[0], shape[1], shape[2]))
        cleaned = run_blocks(client, _bridges_kernel, slabs, step="bridges", name="cc-bridges", report="bridges",
                             args=(final_mask, params.max_bridge_len, params.max_spur_len), read=ZarrTarget(filtered),
                             **common)
        mask_stats = [s["mask"] for s in cleaned]
    result.voxels_kept = int(sum(s[2] for s in mask_stats))  # the mask is 0/1: its sum counts voxels
    result.seconds["relabel + write"] = time.perf_counter() - clock

    clock = time.perf_counter()
    result.files = _finish(out, params, key, marks, mask_stats, label_stats)
    result.seconds["finish"] = time.perf_counter() - clock
    return result


def _position(read) -> dict | None:
    """The origin/nstart of the tomogram a mask came from: its MRC header, or its OME-Zarr's."""
    return source_position(Path(read.array).parent if read.array else read.path)


def _finish(out: Path, params, key: str, marks: DoneMarks, mask_stats, label_stats) -> list[Path]:
    """Mark the OME-Zarr complete, or give the MRC files their names; drop the work files."""
    import zarr

    if out.suffix.lower() == ".zarr":
        files = [out]
        if params.layout == "portal":  # lower levels from the finished level 0
            from ..io.omezarr import fill_levels

            fill_levels(out, binary=True)
            if params.labels:
                fill_levels(_components_out(out), binary=False)
                files.append(_components_out(out))
        group = zarr.open_group(str(out), mode="r+")
        attrs = group.attrs.get("cryodask", {})
        attrs[STEP] = {"key": key, "complete": True}
        group.attrs["cryodask"] = attrs
    else:
        files = [_finish_mrc(out, mask_stats)]
        if params.labels:
            files.append(_finish_mrc(_labels_out(out), label_stats))
        (marks.root / f"{STEP}-{key}.complete").touch()
    shutil.rmtree(marks.folder, ignore_errors=True)
    return files


def _finish_mrc(path: Path, stats) -> Path:
    """Header statistics from the blocks' own (the marked blocks' kept with their marks, so a
    resumed run never reads the file back); then the file gets its name."""
    from ..io.mrc import finish_mrc

    return finish_mrc(_partial(path), path, stats)
