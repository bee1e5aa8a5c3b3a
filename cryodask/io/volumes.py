"""A volume on disk that workers read region by region, whatever its format.

``open_volume`` validates the input once, on the client, before any cluster starts; the
``Volume`` it returns is small and picklable, and each task re-opens the file (or zarr array)
to read only its own region, so no worker ever holds a whole tomogram. Every step takes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import where
from ..validate import voxel_size as parse_voxel_size
from .layouts import CHUNKS

MRC_SUFFIXES = {".mrc", ".rec", ".map", ".st", ".ali", ".mrcs"}
TIFF_SUFFIXES = {".tif", ".tiff"}
SUFFIXES = MRC_SUFFIXES | TIFF_SUFFIXES
FILE_CHUNKS = CHUNKS  # the blocks of an MRC/TIFF file, which has no chunks of its own


def stem(path) -> str:
    """The one name rule for outputs: the file or store name up to its first dot (ETSAM's rule;
    ``TS_01.rec``, ``TS_01.zarr`` and ``TS_01.ome.zarr`` all give ``TS_01``); a label image
    ``TS_01.zarr/labels/mask`` gives ``TS_01_mask``."""
    path = Path(str(path).rstrip("/"))
    if path.parent.name == "labels" and path.parent.parent.suffix.lower() == ".zarr":
        return f"{stem(path.parent.parent)}_{path.name.split('.')[0]}"
    return path.name.split(".")[0]


@dataclass(frozen=True)
class Volume:
    """A validated 3D volume: an MRC/TIFF file or a zarr array (level 0 of an OME-Zarr image).

    path : what was opened (the file, the image folder or the array); format : ``mrc``,
    ``tiff`` or ``zarr``; shape (z, y, x); dtype : what :meth:`read` returns; voxel_size : Å
    (z, y, x); chunks : the blocks steps read (a zarr array's own chunks); array : the zarr array
    read (None for a file). A ``Volume`` is itself a ``read(region)`` callable and array-like
    (``volume[region]``), so it goes wherever a reader or ``dask.array.from_array`` wants one.
    """

    path: str
    format: str
    shape: tuple[int, int, int]
    dtype: str
    voxel_size: tuple[float, float, float]
    chunks: tuple[int, int, int] = FILE_CHUNKS
    array: str | None = None
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def translation(self) -> tuple[float, float, float]:
        """Where the centre of voxel (0, 0, 0) lies (z, y, x, Å): the MRC origin or nstart
        (:func:`cryodask.io.mrc.translation`), the NGFF translation of an image; zeros for TIFF."""
        if self.format == "zarr":
            from .omezarr import image_translation

            return image_translation(self.path) if self.array and Path(self.array).parent == Path(self.path) \
                else (0.0, 0.0, 0.0)
        from .mrc import translation

        return translation(self.metadata.get("position"), self.voxel_size)

    def astype(self, dtype) -> Volume:
        """The same volume read as ``dtype`` (None: as stored)."""
        return replace(self, dtype=np.dtype(dtype or self.metadata["stored_dtype"]).str)

    def read(self, region) -> np.ndarray:
        """Read one region (any basic numpy index) as a native-byte-order array of ``dtype``,
        checking it for NaN/Inf. The bounding box is read; steps and integer indices apply after."""
        from . import mrc, tiff

        region, after = _bounding_box(region, self.shape)
        if any(r.stop == r.start for r in region):
            return np.empty(tuple(r.stop - r.start for r in region), np.dtype(self.dtype))[after]
        if self.format == "mrc":
            data = mrc.read_region(self.path, region, shape=self.shape, dtype=self.metadata["file_dtype"],
                                   offset=self.metadata["data_offset"])
        elif self.format == "tiff":
            data = tiff.read_region(self.path, region)
        else:
            import zarr

            data = zarr.open_array(self.array, mode="r")[region]
        data = np.ascontiguousarray(data, dtype=np.dtype(self.dtype))
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            z = region[0].start + int(np.argwhere(~np.isfinite(data))[0][0])
            raise where(self.path, f"contains NaN or Inf values (first at z={z})")
        return data[after]

    __call__ = read
    __getitem__ = read

    def to_dask(self, chunks=None):
        """The volume as a lazy dask array (``chunks``: the volume's own by default); each chunk
        is one :meth:`read` on whichever worker computes it."""
        import dask.array as da
        from dask.base import tokenize

        return da.from_array(self, chunks=chunks or self.chunks, name=f"read-{tokenize(self, chunks)}",
                             asarray=False, meta=np.empty((0,) * self.ndim, np.dtype(self.dtype)))


def _bounding_box(region, shape) -> tuple[tuple[slice, ...], tuple]:
    """Split a basic index into a step-1 box of slices and the index to apply to the box."""
    region = region if isinstance(region, tuple) else (region,)
    if any(r is Ellipsis for r in region):
        i = region.index(Ellipsis)
        region = region[:i] + (slice(None),) * (len(shape) - len(region) + 1) + region[i + 1:]
    region = region + (slice(None),) * (len(shape) - len(region))
    box, after = [], []
    for r, n in zip(region, shape):
        if isinstance(r, slice):
            start, stop, step = r.indices(n)
            if step < 0:
                raise IndexError("negative steps are not supported when reading volumes")
            stop = max(start, stop)
            box.append(slice(start, stop))
            after.append(slice(None, None, step))
        else:
            i = int(r) + n if int(r) < 0 else int(r)
            if not 0 <= i < n:
                raise IndexError(f"index {r} is out of bounds for an axis of size {n}")
            box.append(slice(i, i + 1))
            after.append(0)
    return tuple(box), tuple(after)


def open_volume(path, voxel_size: float | tuple[float, float, float] | None = None, *, chunks=None,
                dtype=None) -> Volume:
    """Validate a tomogram and describe it: an MRC/TIFF file, an OME-Zarr image (level 0;
    ``x.zarr`` or ``x.zarr/labels/<name>``) or one zarr array of it (``x.zarr/1``).

    voxel_size : Å, one number or (z, y, x); overrides the header or the NGFF scale.
    chunks : the blocks of an MRC/TIFF file (default ``FILE_CHUNKS``); a zarr array keeps its own.
    dtype : what ``read`` returns (None: the stored type, in native byte order).

    Raises ``InputError`` naming the input for anything that would stop a step: unreadable,
    truncated, not 3D, unsupported type, or a missing voxel size.
    """
    if isinstance(path, Volume):  # already open: the keywords given change it, the rest stays
        volume = path
        voxel_size = parse_voxel_size(voxel_size)
        volume = replace(volume, voxel_size=tuple(voxel_size)) if voxel_size else volume
        volume = replace(volume, chunks=tuple(int(c) for c in chunks)) if chunks and volume.format != "zarr" \
            else volume
        return volume.astype(dtype) if dtype else volume
    voxel_size = parse_voxel_size(voxel_size)
    path = Path(path)
    if path.is_dir():
        return _open_zarr(path, voxel_size, dtype)
    from . import mrc, tiff

    suffix = path.suffix.lower()
    if not path.is_file():
        raise where(path, "no such file" if not path.exists() else "not a regular file")
    if suffix in MRC_SUFFIXES:
        shape, stored, header_voxel, metadata = mrc.describe(path)
        fmt = "mrc"
    elif suffix in TIFF_SUFFIXES:
        shape, stored, header_voxel, metadata = tiff.describe(path)
        fmt = "tiff"
    else:
        raise where(path,
                    f"unsupported format {suffix or '(no suffix)'}; expected one of {', '.join(sorted(SUFFIXES))}")
    if len(shape) != 3 or min(shape) < 1:
        raise where(path, f"not a 3D volume (shape {tuple(shape)})")
    stored = np.dtype(stored)
    metadata = {**metadata, "file_dtype": stored.str}
    stored = stored.newbyteorder("=")
    if stored.kind not in "iuf" or stored.itemsize > 4 and stored.kind != "f":
        raise where(path, f"unsupported data type {stored}")
    vs = voxel_size or _header_voxel_size(path, header_voxel)
    return Volume(str(path), fmt, tuple(int(s) for s in shape), np.dtype(dtype or stored).str,
                  tuple(round(float(v), 4) for v in vs), tuple(int(c) for c in (chunks or FILE_CHUNKS)), None,
                  {**metadata, "stored_dtype": stored.str})


def _header_voxel_size(path, vs) -> tuple[float, ...]:
    if vs is None or not all(np.isfinite(v) and v > 0 for v in vs):
        given = vs is not None and any(np.isfinite(v) and v != 0 for v in vs)
        raise where(path, (f"voxel size {tuple(float(v) for v in vs)} Å in the header is not positive"
                           if given else "voxel size is missing or 0 in the header") + "; pass --voxel-size (Å)")
    return vs


def _open_zarr(path: Path, voxel_size, dtype) -> Volume:
    """Level 0 of an OME-Zarr image, or one array of it (its scale from the image's metadata)."""
    from .omezarr import open_image

    if (path / ".zarray").exists() or _is_v3_array(path):
        import zarr

        try:
            array = zarr.open_array(str(path), mode="r")
        except Exception as exc:  # noqa: BLE001  (whatever zarr says, one line naming the array)
            raise where(path, f"not a readable zarr array ({str(exc).splitlines()[0]})") from None
        array_path, header_voxel = path, _level_voxel_size(path)
    else:
        _, arrays, header_voxel, _ = open_image(path)
        array = arrays[0]
        array_path = path / array.path.split("/")[-1]
    if array.ndim != 3 or min(array.shape) < 1:
        raise where(path, f"not a 3D image (shape {tuple(array.shape)})")
    stored = np.dtype(array.dtype).newbyteorder("=")
    vs = voxel_size or _header_voxel_size(path, header_voxel)
    return Volume(str(path), "zarr", tuple(int(s) for s in array.shape), np.dtype(dtype or stored).str,
                  tuple(float(v) for v in vs), tuple(int(c) for c in array.chunks), str(array_path),
                  {"stored_dtype": stored.str})


def _is_v3_array(path: Path) -> bool:
    import json

    meta = path / "zarr.json"
    return meta.exists() and json.loads(meta.read_text()).get("node_type") == "array"


def _level_voxel_size(array_path: Path) -> tuple[float, ...] | None:
    """The NGFF scale of one level of an image, from its parent's multiscales; None if it has none."""
    from .omezarr import open_image

    try:
        group = open_image(array_path.parent)[0]
        attrs = group.attrs.asdict()
        for d in attrs.get("ome", attrs)["multiscales"][0]["datasets"]:
            if str(d["path"]) == array_path.name:
                return tuple(float(v) for v in next(t["scale"] for t in d["coordinateTransformations"]
                                                    if t["type"] == "scale")[-3:])
    except Exception:  # noqa: BLE001  (no image around the array: no voxel size but the caller's)
        return None
    return None


def source_position(path) -> dict | None:
    """The raw MRC origin and nstart (:func:`cryodask.io.mrc.position`) for the MRC files made from
    ``path``: an MRC file, an OME-Zarr image or ``x.zarr/labels/<name>``.

    A store from ``convert`` keeps its source's raw values (``cryodask.source.position``): they
    are given while they still match the level-0 translation. A store with only a translation
    gives it as the origin (x, y, z) with nstart 0; None when there is nothing to place.
    """
    from . import mrc

    path = Path(path)
    if path.is_file():
        return mrc.read_position(path) if path.suffix.lower() in MRC_SUFFIXES else None
    from .omezarr import image_translation, open_image

    translation = image_translation(path)
    root = path.parent.parent if path.parent.name == "labels" else path
    try:
        raw = open_image(root)[0].attrs.get("cryodask", {}).get("source", {}).get("position")
    except Exception:  # noqa: BLE001  (labels whose image is not an OME-Zarr: the translation is all there is)
        raw = None
    if raw and np.allclose(mrc.translation(raw, open_image(path)[2]), translation, rtol=0, atol=1e-3):
        return raw
    if any(translation):
        return {"origin": [translation[2], translation[1], translation[0]], "nstart": [0, 0, 0]}
    return None


def is_zarr(path) -> bool:
    """A zarr group or array on disk (v2 or v3 metadata)."""
    path = Path(path)
    return path.is_dir() and any((path / n).exists() for n in (".zattrs", "zarr.json", ".zgroup", ".zarray"))


def find_volumes(inputs, *, stores: bool = False) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of volume files.

    With ``stores``, OME-Zarr stores count as volumes too (a folder of ``.zarr`` stores, or a
    glob matching them), for commands that read either, and a copick config JSON stands for its
    runs' tomograms (``io.copick.expand_config``)."""
    import glob

    def wanted(p: Path) -> bool:
        return (stores and is_zarr(p)) or (p.is_file() and p.suffix.lower() in SUFFIXES)

    found: list[Path] = []
    for item in inputs:
        item = str(item)
        if stores and item.lower().endswith(".json"):
            from .copick import expand_config, is_config

            if is_config(item):  # a copick project: its runs' tomograms
                found += expand_config(item)
                continue
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise where(item, "the pattern matches no file")
            found += [Path(m) for m in matches if wanted(Path(m))]
        elif Path(item).is_dir() and not (stores and is_zarr(item)):
            found += sorted(p for p in Path(item).iterdir() if wanted(p))
        else:
            found.append(Path(item))
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------ region readers for workers

@dataclass(frozen=True)
class ZarrReader:
    """Reads regions of a zarr array whose metadata a step already knows (e.g. level 0 of a
    store it wrote) on any worker; ``dtype`` converts them (None keeps the stored type)."""

    path: str
    dtype: str | None = None

    def __call__(self, region):
        import zarr

        data = zarr.open_array(self.path, mode="r")[region]
        return data if self.dtype is None else np.asarray(data, dtype=self.dtype)


def source_identity(read) -> list[int]:
    """Size and modification time (ns) of what a reader reads: the MRC/TIFF file, or the metadata
    of the zarr array (written anew with every new array, as ``write_labels`` does). Part of a
    done-mark key, so a new input under the same name is never taken for a finished one."""
    import os

    if isinstance(read, Volume) and read.array is None:
        stat = os.stat(read.path)
    else:
        array = Path(read.array if isinstance(read, Volume) else read.path)
        stat = next(os.stat(p) for p in (array / ".zarray", array / "zarr.json") if p.exists())
    return [stat.st_size, stat.st_mtime_ns]
