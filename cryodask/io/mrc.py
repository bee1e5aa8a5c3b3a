"""MRC files (mrcfile): validation, lazy region reads, and streamed writes.

Files are opened permissively, because real files (old SerialEM, FEI) lack the map ID;
what actually stops a read — a truncated data block, an unknown mode — is a one-line error.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import where
from .folders import atomic_write


def _open(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except (ValueError, OSError, EOFError) as exc:
            raise where(path, _negative_sizes(path) or f"not a readable MRC file ({exc})") from None
    if mrc.data is None:
        mrc.close()
        raise where(path, _why_unreadable(path, caught))
    return mrc


def _why_unreadable(path, caught) -> str:
    negative = _negative_sizes(path)
    if negative:
        return negative
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            header = mrc.header.copy()
    dims = {name: int(header[name]) for name in ("nx", "ny", "nz")}
    try:
        dtype = mrcfile.utils.dtype_from_mode(header.mode)
    except ValueError:
        return f"not a readable MRC file (unsupported mode {int(header.mode)}; modes 0, 1, 2, 6 and 12 are read)"
    expected = 1024 + int(header.nsymbt) + dims["nx"] * dims["ny"] * dims["nz"] * dtype.itemsize
    size = os.path.getsize(path)
    if size < expected:
        return (f"truncated MRC file: header promises {expected} bytes (nx, ny, nz = {dims['nx']}, {dims['ny']}, "
                f"{dims['nz']}), the file has {size}")
    messages = [str(w.message) for w in caught]
    return "not a readable MRC file (" + (messages[-1] if messages else "invalid header") + ")"


def _negative_sizes(path) -> str | None:
    """The problem with a header whose dimensions or extended-header size are negative, if any."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1024)
    except OSError:
        return None
    if len(raw) < 1024:
        return None
    header = np.frombuffer(raw, mrcfile.dtypes.HEADER_DTYPE)[0]
    try:  # read as mrcfile would, which stops at a negative size before saying so
        order = mrcfile.utils.byte_order_from_machine_stamp(header["machst"])
    except ValueError:
        order = "<"
    header = np.frombuffer(raw, mrcfile.dtypes.HEADER_DTYPE.newbyteorder(order))[0]
    negative = [f"{name} = {int(header[name])}" for name in ("nx", "ny", "nz", "nsymbt") if int(header[name]) < 0]
    return f"invalid MRC header: {', '.join(negative)} (sizes cannot be negative)" if negative else None


def header_dict(header) -> dict:
    """The MRC header as JSON-able values (kept in the OME-Zarr attributes), field by field as
    mrcfile names them: numbers as numbers, ``cella``/``cellb``/``origin`` as [x, y, z], the text
    fields ``map``/``exttyp`` as text when they are printable (else ``{"hex": ...}``, as in old
    headers whose ``map`` holds an origin), the unused ``extra1``/``extra2`` bytes as hex."""
    raw = header.tobytes()
    out = {}
    for name in header.dtype.names:
        value = header[name]
        if name == "label":
            out[name] = [bytes(v).decode("ascii", "replace").strip()
                         for v in value[: max(0, min(int(header.nlabl), 10))]]
        elif value.dtype.names:  # records (x, y, z) before the byte fields: their dtype kind is "V" too
            out[name] = [float(value[f]) for f in value.dtype.names]
        elif value.dtype.kind in "SV":  # the field's own bytes: numpy drops trailing NULs of "S" values
            offset = header.dtype.fields[name][1]
            data = raw[offset:offset + header.dtype[name].itemsize]
            text = data.rstrip(b"\x00")
            if value.dtype.kind == "S" and all(32 <= c < 127 for c in text):
                out[name] = text.decode("ascii")
            else:
                out[name] = data.hex() if value.dtype.kind == "V" else {"hex": data.hex()}
        else:
            out[name] = value.tolist()
    return out


IMOD_STAMP = 1146047817  # "IMOD": IMOD's mark that imodFlags (bytes 156-159) is set


def unsigned_bytes(header) -> str | None:
    """Why the bytes of a mode-0 file are unsigned, or None when they are signed (or not bytes).

    MRC2014 says mode 0 is signed, but IMOD wrote unsigned bytes for years and SerialEM
    still does. As ChimeraX does, IMOD's flags decide where IMOD stamped the header (bit 0
    set: signed); otherwise the header's dmin/dmax decide (above 127: unsigned; below 0:
    signed); where they say nothing (both in 0..127, or unset), a pre-2000 header without
    ``MAP `` is unsigned (IMOD's and ChimeraX's rule) and a modern one signed.
    """
    if int(header.mode) != 0:
        return None
    extra = bytes(header.tobytes()[152:160])
    stamp, flags = np.frombuffer(extra, np.dtype("i4").newbyteorder(header.dtype["nx"].byteorder))
    if int(stamp) == IMOD_STAMP:
        return None if int(flags) & 1 else f"IMOD header flags {int(flags)} (bit 0 clear: unsigned bytes)"
    dmin, dmax = float(header.dmin), float(header.dmax)
    if np.isfinite(dmin) and np.isfinite(dmax) and 0 <= dmin <= dmax and 127 < dmax <= 255:
        return f"header dmin/dmax {dmin:g}..{dmax:g} is outside the signed byte range"
    if np.isfinite(dmin) and -128 <= dmin < 0:
        return None
    if bytes(header.tobytes()[208:212]) != b"MAP ":
        return "pre-MRC2000 header (no MAP): IMOD's unsigned bytes"
    return None


def position(header) -> dict:
    """The header's raw ``origin`` (x, y, z, Å) and ``nxstart, nystart, nzstart``, kept as they are
    so that every MRC cryodask writes from this tomogram gets them back exactly."""
    return {"origin": [float(header.origin[a]) for a in "xyz"],
            "nstart": [int(header[f"n{a}start"]) for a in "xyz"]}


def translation(pos: dict | None, voxel_size) -> tuple[float, float, float]:
    """The physical position (z, y, x, Å) of the centre of voxel (0, 0, 0): the NGFF
    ``translation`` of level 0.

    MRC2014 as ChimeraX reads it (mrcfile leaves both fields uninterpreted): the header origin
    when it is non-zero and finite, else ``nstart`` x voxel size, the older CCP4 convention; the
    origin wins where both are set. IMOD's own programs read the origin with the opposite sign
    (coordinate = index x pixel - origin); cryodask does not flip it, and since the raw fields
    go back into every MRC it writes, IMOD shows the outputs where it shows the input.
    """
    if not pos:
        return (0.0, 0.0, 0.0)
    origin = [float(v) for v in pos.get("origin", (0, 0, 0))]
    if any(origin) and all(np.isfinite(origin)):
        return (origin[2], origin[1], origin[0])
    nstart = [int(v) for v in pos.get("nstart", (0, 0, 0))]
    return tuple(float(n) * float(v) for n, v in zip(nstart[::-1], voxel_size))


def read_position(path) -> dict:
    """:func:`position` of an MRC file's header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            return position(mrc.header)


def set_position(header, pos: dict | None) -> None:
    """Write a :func:`position` (raw origin and nstart) into a header."""
    if pos:
        header.origin = tuple(float(v) for v in pos["origin"])
        header.nxstart, header.nystart, header.nzstart = (int(v) for v in pos["nstart"])


def describe(path):
    """Shape (z, y, x), dtype, voxel size (z, y, x) in Å or None, and header metadata
    (including ``data_offset``, where the voxels start, for :func:`read_region`, and the raw
    :func:`position`). Mode 0 is uint8 where :func:`unsigned_bytes` says so."""
    mrc = _open(path)
    try:
        axes = tuple(int(mrc.header[name]) for name in ("mapc", "mapr", "maps"))
        if axes != (1, 2, 3):  # mrcfile would give the data transposed, without a word
            problem = ("is not a permutation of 1, 2, 3" if sorted(axes) != [1, 2, 3] else
                       "is not supported (only 1, 2, 3: x fastest, then y, then z); the data would come out transposed")
            raise where(path, f"axis order mapc, mapr, maps = {', '.join(map(str, axes))} {problem}")
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero sampling mx/my/mz is a missing voxel size
            vs = mrc.voxel_size
        voxel = (float(vs.z), float(vs.y), float(vs.x))
        metadata = {"header": header_dict(mrc.header),
                    "extended_header_type": mrc.header.exttyp.tobytes().decode("ascii", "replace").strip(),
                    "data_offset": 1024 + int(mrc.header.nsymbt), "position": position(mrc.header)}
        dtype = mrc.data.dtype
        why = unsigned_bytes(mrc.header)
        if why:  # the same bytes, read as what they are
            dtype = np.dtype(np.uint8)
            metadata["unsigned_bytes"] = why
        return mrc.data.shape, dtype, voxel, metadata
    finally:
        mrc.close()


def read_region(path, region, *, shape=None, dtype=None, offset=None) -> np.ndarray:
    """Read one region of the voxel data.

    Given the layout (``shape``, file ``dtype``, data ``offset``) of a validated file, a 3D
    region is read with positional reads of its contiguous runs (one per z-slice when it
    spans whole rows): about 3x faster than copying out of a memory map, and no mapped pages
    count towards a worker's memory. Without the layout, the file is memory-mapped.
    """
    if shape is None or len(shape) != 3:
        mrc = _open(path)
        try:
            data = np.array(mrc.data[region])
            return data.view(np.uint8) if unsigned_bytes(mrc.header) else data
        finally:
            mrc.close()
    dtype = np.dtype(dtype)
    zs, ys, xs = (slice(*r.indices(n)[:2]) for r, n in zip(region, shape))
    full_rows = xs == slice(0, shape[2])
    out = np.empty((zs.stop - zs.start, ys.stop - ys.start, shape[2] if full_rows else xs.stop - xs.start), dtype)
    row_bytes = shape[2] * dtype.itemsize
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for i, z in enumerate(range(zs.start, zs.stop)):
            start = offset + (z * shape[1] + ys.start) * row_bytes
            if full_rows:
                _pread_into(fd, out[i], start, path)
            else:
                for j in range(out.shape[1]):
                    _pread_into(fd, out[i, j], start + j * row_bytes + xs.start * dtype.itemsize, path)
    return out


def _pread_into(fd, target: np.ndarray, offset: int, path) -> None:
    view = memoryview(target).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise where(path, "truncated MRC file: the data ended early")
        done += n


def mrc_dtype(dtype, max_value=None) -> np.dtype:
    """The MRC mode dtype that holds ``dtype`` exactly (labels are narrowed by their maximum;
    uint8 is mode 0 when its values fit, as masks are, since MRC has no unsigned 8-bit mode)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.dtype(np.int8) if max_value is not None and max_value <= 127 else np.dtype(np.uint16)
    if dtype in (np.int8, np.int16, np.uint16, np.float32, np.float16):
        return dtype
    if dtype == bool:
        return np.dtype(np.int8)
    if dtype.kind in "iu" and max_value is not None:
        for candidate in (np.int8, np.int16, np.uint16):
            if max_value <= np.iinfo(candidate).max:
                return np.dtype(candidate)
        if max_value < 2**24:
            return np.dtype(np.float32)
        raise ValueError(f"label values up to {max_value} do not fit an MRC mode")
    return np.dtype(np.float32)


def write_mrc(path, data, voxel_size, *, slab: int = 64, position: dict | None = None) -> Path:
    """Write a 2D/3D array (numpy, zarr or dask) to MRC, streaming ``slab`` z-slices at a time.

    ``voxel_size`` is Å (scalar or z, y, x); ``position`` the raw origin and nstart of the
    tomogram (:func:`position`). The file appears under its name only when complete.
    """
    path = Path(path)
    shape = tuple(int(s) for s in data.shape)
    max_value = None
    if np.dtype(data.dtype).kind in "iu" and (np.dtype(data.dtype).itemsize >= 4 or data.dtype == np.uint8):
        max_value = int(np.asarray(_max(data)))
    dtype = mrc_dtype(data.dtype, max_value)
    vs = (voxel_size,) * 3 if np.isscalar(voxel_size) else tuple(voxel_size)
    stats = []
    mode = mrcfile.utils.mode_from_dtype(dtype)
    # a full disk, an unreadable source: no half-written file stays behind
    with atomic_write(path) as partial, mrcfile.new_mmap(partial, shape=shape, mrc_mode=mode, overwrite=True) as mrc:
        _reserve(partial)
        for z0 in range(0, shape[0] if len(shape) == 3 else 1, slab):
            region = np.s_[z0:z0 + slab] if len(shape) == 3 else np.s_[:]
            block = np.asarray(data[region]).astype(dtype, copy=False)
            mrc.data[region] = block
            stats.append(region_stats(block))
        set_stats(mrc.header, stats)
        mrc.voxel_size = (vs[2], vs[1], vs[0])
        set_position(mrc.header, position)
    return path


def _reserve(path) -> None:
    """Allocate a new file's blocks before writing it through a memory map: on a full disk the
    map would kill the process with SIGBUS, where this fails with ENOSPC (an ``OSError``)."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise


def region_stats(block: np.ndarray) -> tuple[float, float, float, float, int]:
    """(min, max, sum, sum of squares, count) of one region, without a float64 copy of it:
    small integers go through a histogram, floats one slice at a time."""
    if block.size == 0:
        return (np.inf, -np.inf, 0.0, 0.0, 0)
    if block.dtype.kind in "iu" and block.dtype.itemsize <= 2:
        shift = -int(np.iinfo(block.dtype).min)
        counts = np.bincount((block.ravel().astype(np.int32) + shift), minlength=1)
        values = np.arange(len(counts), dtype=np.float64) - shift
        present = values[counts > 0]
        return (present.min(), present.max(), float(counts @ values), float(counts @ (values * values)), block.size)
    total = squares = 0.0
    for plane in block.reshape(-1, block.shape[-1]) if block.ndim < 3 else block:
        plane = plane.astype(np.float64)
        total += plane.sum()
        squares += float(np.vdot(plane, plane))
    return (float(block.min()), float(block.max()), total, squares, block.size)


def set_stats(header, stats) -> None:
    """Header dmin/dmax/dmean/rms from the :func:`region_stats` of all regions."""
    n = max(1, sum(s[4] for s in stats))
    mean = sum(s[2] for s in stats) / n
    header.dmin = min((s[0] for s in stats), default=0.0)
    header.dmax = max((s[1] for s in stats), default=0.0)
    header.dmean = mean
    header.rms = np.sqrt(max(sum(s[3] for s in stats) / n - mean * mean, 0.0))


def create_mrc(path, shape, dtype, voxel_size, position: dict | None = None) -> int:
    """An MRC file of the full size (sparse on disk) for tasks to fill region by region with
    :func:`write_region`; returns the offset of the data. ``position`` as for :func:`write_mrc`."""
    vs = (voxel_size,) * 3 if np.isscalar(voxel_size) else tuple(voxel_size)
    with mrcfile.new_mmap(path, shape=tuple(shape), mrc_mode=mrcfile.utils.mode_from_dtype(np.dtype(dtype)),
                          overwrite=True) as mrc:
        mrc.voxel_size = (vs[2], vs[1], vs[0])
        set_position(mrc.header, position)
        return 1024 + int(mrc.header.nsymbt)


def write_region(path, region, data: np.ndarray, *, shape, offset: int) -> None:
    """Write a 3D region into an MRC file made by :func:`create_mrc`, with positional writes of
    its contiguous runs: tasks of different regions can write the same file at once."""
    zs, ys, xs = (slice(*r.indices(n)[:2]) for r, n in zip(region, shape))
    data = np.ascontiguousarray(data)
    row, item = shape[2] * data.itemsize, data.itemsize
    full_rows = xs == slice(0, shape[2])
    with open(path, "r+b", buffering=0) as f:
        for i, z in enumerate(range(zs.start, zs.stop)):
            if full_rows:  # the rows of a slice are one run
                runs = [(offset + (z * shape[1] + ys.start) * row, data[i])]
            else:
                runs = [(offset + (z * shape[1] + y) * row + xs.start * item, data[i, j])
                        for j, y in enumerate(range(ys.start, ys.stop))]
            for start, chunk in runs:
                view = memoryview(chunk).cast("B")
                done = 0
                while done < len(view):
                    done += os.pwrite(f.fileno(), view[done:], start + done)


def finish_mrc(partial, path, stats) -> Path:
    """Set the header statistics of a file filled by :func:`write_region` and give it its name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.mmap(partial, mode="r+", permissive=True) as mrc:
            set_stats(mrc.header, stats)
    os.replace(partial, path)
    return Path(path)


def _max(data):
    import dask.array as da

    return (da.from_array(data, chunks=getattr(data, "chunks", "auto")).max().compute()
            if not isinstance(data, np.ndarray) else data.max())
