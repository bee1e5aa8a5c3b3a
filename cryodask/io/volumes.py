"""A volume on disk that workers read region by region, whatever its format.

``open_volume`` validates the file once, on the client, before any cluster starts; the
``VolumeSource`` it returns is small and picklable, and each task re-opens the file to read
only its own region, so no worker ever holds a whole tomogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import where

MRC_SUFFIXES = {".mrc", ".rec", ".map", ".st", ".ali", ".mrcs"}
TIFF_SUFFIXES = {".tif", ".tiff"}
SUFFIXES = MRC_SUFFIXES | TIFF_SUFFIXES


@dataclass(frozen=True)
class VolumeSource:
    """A validated 3D volume file: shape (z, y, x), dtype, voxel size in Å (z, y, x)."""

    path: str
    format: str
    shape: tuple[int, int, int]
    dtype: str
    voxel_size: tuple[float, float, float]
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def translation(self) -> tuple[float, float, float]:
        """Where the centre of voxel (0, 0, 0) lies (z, y, x, Å): the MRC origin or nstart
        (:func:`cryodask.io.mrc.translation`); zeros for TIFF."""
        from .mrc import translation

        return translation(self.metadata.get("position"), self.voxel_size)

    def read(self, region) -> np.ndarray:
        """Read one region (any basic numpy index) as a native-byte-order array, checking it
        for NaN/Inf. The bounding box is read; steps and integer indices apply after."""
        from . import mrc, tiff

        region, after = _bounding_box(region, self.shape)
        if any(r.stop == r.start for r in region):
            return np.empty(tuple(r.stop - r.start for r in region), np.dtype(self.dtype))[after]
        if self.format == "mrc":
            data = mrc.read_region(self.path, region, shape=self.shape, dtype=self.metadata["file_dtype"],
                                   offset=self.metadata["data_offset"])
        else:
            data = tiff.read_region(self.path, region)
        data = np.ascontiguousarray(data, dtype=np.dtype(self.dtype))
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            z = region[0].start + int(np.argwhere(~np.isfinite(data))[0][0])
            raise where(self.path, f"contains NaN or Inf values (first at z={z})")
        return data[after]


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


def open_volume(path, voxel_size: float | tuple[float, float, float] | None = None) -> VolumeSource:
    """Validate a tomogram file and describe it; ``voxel_size`` (Å) overrides the header.

    Raises ``InputError`` naming the file for anything that would stop a conversion:
    unreadable, truncated, not 3D, unsupported type, or a missing voxel size.
    """
    from . import mrc, tiff

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise where(path, "no such file" if not path.exists() else "not a regular file")
    if suffix in MRC_SUFFIXES:
        shape, dtype, header_voxel, metadata = mrc.describe(path)
        fmt = "mrc"
    elif suffix in TIFF_SUFFIXES:
        shape, dtype, header_voxel, metadata = tiff.describe(path)
        fmt = "tiff"
    else:
        raise where(path, f"unsupported format {suffix or '(no suffix)'}; expected one of {', '.join(sorted(SUFFIXES))}")
    if len(shape) != 3 or min(shape) < 1:
        raise where(path, f"not a 3D volume (shape {tuple(shape)})")
    metadata = {**metadata, "file_dtype": np.dtype(dtype).str}
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype.kind not in "iuf" or dtype.itemsize > 4 and dtype.kind != "f":
        raise where(path, f"unsupported data type {dtype}")
    if voxel_size is not None:
        vs = (voxel_size,) * 3 if np.isscalar(voxel_size) else tuple(voxel_size)
        if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
            raise where(path, f"--voxel-size must be positive, got {voxel_size}")
    else:
        vs = header_voxel
        if vs is None or not all(np.isfinite(v) and v > 0 for v in vs):
            given = vs is not None and any(np.isfinite(v) and v != 0 for v in vs)
            raise where(path, (f"voxel size {tuple(float(v) for v in vs)} Å in the header is not positive"
                               if given else "voxel size is missing or 0 in the header") + "; pass --voxel-size (Å)")
    return VolumeSource(str(path), fmt, tuple(int(s) for s in shape), dtype.str,
                        tuple(round(float(v), 4) for v in vs), metadata)


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
    """Reads regions of a zarr array (e.g. level 0 of an OME-Zarr image) on any worker;
    ``dtype`` converts them (None keeps the stored type)."""

    path: str
    dtype: str | None = None

    def __call__(self, region):
        import zarr

        data = zarr.open_array(self.path, mode="r")[region]
        return data if self.dtype is None else np.asarray(data, dtype=self.dtype)


@dataclass(frozen=True)
class VolumeReader:
    """Reads regions of an MRC/TIFF volume (``VolumeSource``) on any worker."""

    source: VolumeSource
    dtype: str | None = None

    def __call__(self, region):
        data = self.source.read(region)
        return data if self.dtype is None else np.asarray(data, dtype=self.dtype)


def source_identity(read) -> list[int]:
    """Size and modification time (ns) of what a reader reads: the MRC/TIFF file, or the metadata
    of the zarr array (written anew with every new array, as ``write_labels`` does). Part of a
    done-mark key, so a new input under the same name is never taken for a finished one."""
    import os

    if isinstance(read, VolumeReader):
        stat = os.stat(read.source.path)
    else:
        stat = next(os.stat(p) for p in (Path(read.path) / ".zarray", Path(read.path) / "zarr.json") if p.exists())
    return [stat.st_size, stat.st_mtime_ns]


def open_reader(path, voxel_size=None, chunks=(64, 256, 256), dtype: str | None = None):
    """A picklable ``read(region)``, the shape, the voxel size (z, y, x) and the block chunks of a
    volume: an MRC/TIFF file, an OME-Zarr image or ``x.zarr/labels/<name>`` (level 0)."""
    path = Path(path)
    if voxel_size is not None and np.isscalar(voxel_size):
        voxel_size = (float(voxel_size),) * 3
    if path.is_dir():
        from .omezarr import open_image

        _, arrays, vs, _ = open_image(path)
        level0 = arrays[0]
        if level0.ndim != 3:
            raise where(path, f"not a 3D image (shape {level0.shape})")
        return ZarrReader(str(path / level0.path.split("/")[-1]), dtype), tuple(level0.shape), \
            tuple(voxel_size or vs), tuple(level0.chunks)
    source = open_volume(path, voxel_size)
    return VolumeReader(source, dtype), source.shape, source.voxel_size, tuple(chunks)
