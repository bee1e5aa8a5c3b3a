"""2D micrographs (MRC, TIFF, JPEG/PNG) read as float32 images, and the lists of them.

A micrograph's ``name`` is its file stem: the key that coordinate files and RELION's
``rlnMicrographName`` are matched on. Row 0 of ``image`` is the file's first row, as
mrcfile, tifffile and PIL give it; any y flip of a coordinate convention is applied to
the coordinates (``cryodask.io.particles``), never to the image.
"""

from __future__ import annotations

import glob
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, where

MRC_SUFFIXES = {".mrc", ".mrcs"}
TIFF_SUFFIXES = {".tif", ".tiff"}
PICTURE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SUFFIXES = MRC_SUFFIXES | TIFF_SUFFIXES | PICTURE_SUFFIXES


@dataclass
class Micrograph:
    """One micrograph: ``image`` float32 (rows, cols); ``pixel_size`` in Å/px, None when the
    file does not say (JPEG/PNG, TIFF without ImageJ units, MRC with a zero sampling)."""

    name: str
    path: Path
    image: np.ndarray
    pixel_size: float | None


def micrograph_name(path) -> str:
    """The file stem (``MotionCorr/job002/a.mrc`` → ``a``): the key for coordinates."""
    return Path(path).stem


def _kind(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in MRC_SUFFIXES:
        return "mrc"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in PICTURE_SUFFIXES:
        return "picture"
    raise where(path, f"not a micrograph file type (use one of {', '.join(sorted(SUFFIXES))})")


def _one_section(path, shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise where(path, f"has shape {shape}; a micrograph is one 2D image (a stack or tomogram is not)")
    return shape


def micrograph_shape(path) -> tuple[int, int]:
    """(rows, cols) from the header alone: cheap enough to call on every file before a run."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise where(path, "no such file")
    if kind == "mrc":
        from . import mrc

        shape, _, _, _ = mrc.describe(path)  # header and a memory map: truncation, mode, axis order checked
        return _one_section(path, shape)
    if kind == "tiff":
        from .tiff import _open

        with _open(path) as tif:
            if not tif.series:
                raise where(path, "not a readable TIFF file (no image in it)")
            return _one_section(path, _drop_colour(tif.series[0].shape))
    with _picture(path) as picture:
        cols, rows = picture.size
    return rows, cols


def _drop_colour(shape) -> tuple[int, ...]:
    """An RGB(A) image's shape without its colour axis (it is read as grey)."""
    shape = tuple(shape)
    return shape[:-1] if len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4 else shape


def read_micrograph(path, pixel_size: float | None = None) -> Micrograph:
    """Read one micrograph as float32; ``pixel_size`` (Å/px) overrides the file's."""
    path = Path(path)
    kind = _kind(path)
    if pixel_size is not None and not pixel_size > 0:
        raise InputError(f"pixel size must be positive, not {pixel_size}")
    if not path.is_file():
        raise where(path, "no such file")
    if kind == "mrc":
        image, file_pixel_size = _read_mrc(path)
    elif kind == "tiff":
        image, file_pixel_size = _read_tiff(path)
    else:
        image, file_pixel_size = _read_picture(path), None
    image = np.ascontiguousarray(image, dtype=np.float32)
    bad = ~np.isfinite(image)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise where(path, f"contains NaN or Inf values ({int(bad.sum())} pixels, first at row {row}, column {col})")
    return Micrograph(micrograph_name(path), path, image, float(pixel_size) if pixel_size else file_pixel_size)


def _read_mrc(path) -> tuple[np.ndarray, float | None]:
    from . import mrc

    shape, _, voxel, _ = mrc.describe(path)  # validates: truncation, mode, axis order
    _one_section(path, shape)
    handle = mrc._open(path)
    try:
        image = np.array(handle.data, dtype=np.float32).reshape(shape[-2:])
    finally:
        handle.close()
    return image, (voxel[2] if voxel[2] > 0 and np.isfinite(voxel[2]) else None)


def _read_tiff(path) -> tuple[np.ndarray, float | None]:
    from . import tiff

    shape, _, voxel, _ = tiff.describe(path)
    with tiff._open(path) as tif:
        try:
            data = tif.series[0].asarray()
        except (ValueError, OSError, EOFError) as exc:
            raise where(path, f"not a readable TIFF file ({exc})") from None
    if data.ndim == 3 and data.shape != _drop_colour(data.shape):
        data = _grey(data)
    data = data.reshape(_one_section(path, data.shape))
    return data, (voxel[2] if voxel else None)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as PIL's convert("L") computes it."""
    rgb = rgb[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


@contextmanager
def _picture(path):
    """A JPEG/PNG opened by PIL (header only until read); any failure is one line."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a K3 super-resolution frame is not a bomb
        try:
            with Image.open(path) as picture:
                yield picture
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            raise where(path, f"not a readable image ({exc})") from None


def _read_picture(path) -> np.ndarray:
    with _picture(path) as picture:
        if picture.mode not in ("L", "I", "F", "I;16", "I;16B", "I;16L"):  # colour, palette, 1-bit
            picture = picture.convert("L")
        return np.asarray(picture)


def find_micrographs(inputs) -> list[Path]:
    """Micrograph files from paths, folders (their micrograph files, sorted), glob patterns,
    or STAR files listing ``rlnMicrographName``; in order, without repeats.

    Names must be unique: they are the keys coordinates are matched on."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        found.extend(_expand(item))
    first: dict[Path, Path] = {}
    for path in found:  # one entry per file, however it was spelled
        first.setdefault(path.resolve(), path)
    unique = list(first.values())
    seen: dict[str, Path] = {}
    for path in unique:
        other = seen.setdefault(micrograph_name(path), path)
        if other != path:
            raise where(path, f"has the same name as {other}; micrographs are matched to coordinates by file name")
    return unique


def _expand(item) -> list[Path]:
    text = str(item)
    path = Path(item)
    if any(c in text for c in "*?[") and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in SUFFIXES)
        if not matches:
            raise where(text, f"the pattern matches no micrograph file ({', '.join(sorted(SUFFIXES))})")
        return [m for m in matches if m.is_file()]
    if path.is_dir():
        matches = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not matches:
            raise where(path, f"the folder holds no micrograph file ({', '.join(sorted(SUFFIXES))})")
        return matches
    if not path.exists():
        raise where(path, "no such file or folder")
    if path.suffix.lower() == ".star":
        return _from_star(path)
    _kind(path)
    return [path]


def _from_star(path: Path) -> list[Path]:
    """The micrographs a STAR lists; relative names are looked up beside the STAR, then in
    the current folder (a RELION project root)."""
    import pandas as pd
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise where(path, "not a readable STAR file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    table = next((t for t in blocks.values() if isinstance(t, pd.DataFrame) and "rlnMicrographName" in t.columns), None)
    if table is None:
        raise where(path, "lists no micrographs (no rlnMicrographName column)")
    out = []
    for name in dict.fromkeys(str(n) for n in table["rlnMicrographName"]):
        candidates = [Path(name)] if Path(name).is_absolute() else [path.parent / name, Path(name)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise where(path, f"lists {name}, which is neither beside the STAR file nor in the current folder")
        _kind(found)
        out.append(found)
    if not out:
        raise where(path, "lists no micrographs (the table is empty)")
    return out


def bin_image(image, factor: int) -> np.ndarray:
    """Mean of each ``factor``×``factor`` block (float32); rows and columns that do not fill a
    block are cropped. Binning by mean keeps the image's scale, so thresholds still apply."""
    if int(factor) != factor or factor < 1:
        raise InputError(f"bin factor must be a whole number ≥ 1, not {factor}")
    factor = int(factor)
    image = np.asarray(image, dtype=np.float32)
    if factor == 1:
        return image
    rows, cols = image.shape[0] // factor, image.shape[1] // factor
    if rows == 0 or cols == 0:
        raise InputError(f"an image of {image.shape[0]}×{image.shape[1]} px is smaller than the bin factor {factor}")
    blocks = image[: rows * factor, : cols * factor].reshape(rows, factor, cols, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def resample(image: np.ndarray, scale) -> np.ndarray:
    """``image`` resampled by ``scale`` (output px per input px, per axis or one number), with
    a Gaussian low-pass first when shrinking (σ = (1/scale − 1)/2 output-pixel widths, no
    aliasing of the noise into the particle band). Pixel edges map onto pixel edges
    (``grid_mode``): input ``p`` lies at ``(p + 0.5)·scale − 0.5``."""
    from scipy.ndimage import gaussian_filter, zoom

    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (2,))
    image = np.asarray(image, dtype=np.float32)
    if np.allclose(scale, 1):
        return image
    sigma = np.where(scale < 1, (1 / scale - 1) / 2, 0)
    if np.any(sigma > 0):
        image = gaussian_filter(image, sigma, mode="mirror")
    shape = np.maximum(1, np.rint(np.array(image.shape) * scale)).astype(int)
    return zoom(image, shape / np.array(image.shape), order=1, mode="grid-mirror", grid_mode=True)


def sampling_scale(micrograph_pixel: float | None, model_pixel: float | None) -> float:
    """Model pixels per micrograph pixel: how much to zoom a micrograph so that it has the
    model's pixel size (1 when either is unknown)."""
    if not micrograph_pixel or not model_pixel:
        return 1.0
    scale = float(micrograph_pixel) / float(model_pixel)
    return 1.0 if abs(scale - 1) < 0.01 else scale
