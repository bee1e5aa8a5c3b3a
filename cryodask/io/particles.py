"""Particle centres on 2D micrographs: RELION STAR, EMAN .box, .coords and CSV, in and out.

Inside cryodask the centres of one micrograph are an (N, 2) float array of (row, col)
= (y, x) pixels, row 0 being the file's first row. Files keep their own conventions:

- STAR (RELION 3.0: one table; 3.1+: optics + particles): ``rlnCoordinateX`` = col,
  ``rlnCoordinateY`` = row, grouped by ``rlnMicrographName`` (matched on its file stem);
  a STAR without that column holds the picks of the micrograph its own name says.
- EMAN ``.box``: ``x y width height [flag]`` per line, (x, y) the box corner, so the centre is
  corner + size/2.
- ``.coords`` (IMOD, TomoTwin, napari-boxmanager): ``x y [z]`` per line, no header.
- CSV: ``x, y`` columns (any case; CryoPPP's ``X-Coordinate, Y-Coordinate`` too).

Per-micrograph files are matched to micrographs by file stem: the micrograph's name, or
its name followed by ``_`` and a word (``_autopick``, ``_manualpick``, ``_pos``, ...).
``flip_y`` is for files whose y counts from the other edge (CryoPPP STAR, autopick-bc
.box): row = height − y.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, where
from .folders import atomic_write
from .micrographs import SUFFIXES as MICROGRAPH_SUFFIXES

IMAGE_SUFFIXES = MICROGRAPH_SUFFIXES | {".spi", ".eer", ".map", ".rec", ".st"}  # what rlnMicrographName may end in
COORDINATE_SUFFIXES = (".star", ".box", ".coords", ".csv")
SUFFIX_WORD = re.compile(r"_[A-Za-z][A-Za-z0-9-]*(_[A-Za-z0-9-]+)*$")


class Particles(dict):
    """{micrograph name: (N, 2) centres}, and what the source held for micrographs not given
    (``skipped``: one line each), so a command can say what it left out."""

    skipped: list[str]
    matched: set[str]  # names a coordinate file gave (maybe with no rows): the others have no truth


def read_particles(source, names, *, shapes: dict[str, tuple[int, int]] | None = None,
                   flip_y: bool = False) -> Particles:
    """Centres (N, 2) (row, col) per micrograph name, every name present (maybe empty), each in
    the row order of its file.

    ``source``: a STAR listing many micrographs, one per-micrograph .star/.box/.coords/.csv
    file, a folder or glob of such files. Coordinates of micrographs not given are skipped (a
    folder of boxes for the whole collection serves a run on part of it); a source none of
    whose coordinates match a given micrograph is an error. With ``shapes`` ({name: (rows,
    cols)}) centres outside their image are an error; ``flip_y`` needs them."""
    names = [_as_name(n) for n in ([names] if isinstance(names, (str, os.PathLike)) else names)]
    if not names:
        raise InputError("no micrographs to read coordinates for")
    shapes = {_as_name(k): tuple(int(s) for s in v) for k, v in (shapes or {}).items()}
    files = _coordinate_files(source)
    found: dict[str, tuple[np.ndarray, Path]] = {}
    skipped: list[tuple[Path, str]] = []
    for path in files:
        matched, unknown = _read_file(path, names)
        skipped += [(path, u) for u in unknown]
        for name, (y, x) in matched.items():
            if name in found:
                raise where(path, f"has coordinates for micrograph {name}, which {found[name][1]} has too")
            found[name] = (np.stack([y, x], axis=1).astype(np.float64), path)
    if not found and skipped:
        raise _nothing_matches(source, files, skipped, names)
    out = Particles()
    out.skipped = [f"{path}: {unknown}" for path, unknown in skipped]
    out.matched = set(found)
    for name in names:
        coords, path = found.get(name, (np.empty((0, 2)), None))
        if path is not None and flip_y:
            if name not in shapes:
                raise where(path, f"flip_y needs the image height of micrograph {name}")
            coords[:, 0] = shapes[name][0] - coords[:, 0]
        if path is not None and name in shapes:
            _check_inside(path, name, coords, shapes[name], flip_y)
        out[name] = coords
    if not any(len(c) for c in out.values()):
        raise where(source, f"holds no coordinates for the {len(names)} micrograph(s) given ({_few(names)})")
    return out


def _as_name(name) -> str:
    """A micrograph name: a path's last part without an image suffix (``MotionCorr/job002/a.mrc``
    → ``a``). Other dots stay (``ts01.mrc_15.00Apx``): the name is what precedes the file type."""
    text = os.fspath(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = text.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES else text


def note_skipped(particles: Particles, what: str = "coordinates") -> None:
    """One line on stderr when a source held coordinates of micrographs that were not given."""
    import sys

    skipped = getattr(particles, "skipped", [])
    if skipped:
        print(f"note: {what} of {len(skipped)} micrograph(s) not given were skipped ({_few(skipped, 2)})",
              file=sys.stderr)


def _nothing_matches(source, files, skipped, names) -> InputError:
    path, unknown = skipped[0]
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    if len(files) > 1:
        return where(source, f"each of its {len(files)} coordinate files matches no micrograph given: {path.name} "
                             f"names {unknown}{more}; the micrographs are {_few(names)}")
    if path.suffix.lower() == ".star" and unknown != path.stem:
        return where(path, f"lists micrograph {unknown}{more}, none of which is among the micrographs given "
                           f"({_few(names)})")
    return where(path, f"matches no micrograph by name (known: {_few(names)})")


def _few(names, n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_inside(path, name, coords, shape, flip_y) -> None:
    rows, cols = shape
    outside = (coords[:, 0] < 0) | (coords[:, 0] > rows) | (coords[:, 1] < 0) | (coords[:, 1] > cols)
    if outside.any():
        row, col = coords[np.argmax(outside)]
        hint = "" if flip_y else "; if y counts from the bottom of the image, read with flip_y"
        raise where(path, f"{int(outside.sum())} of {len(coords)} centres of micrograph {name} lie outside its "
                          f"{rows}×{cols} px image (first at row {row:g}, column {col:g}): wrong micrograph, or "
                          f"coordinates of a binned/unbinned copy{hint}")


def _coordinate_files(source) -> list[Path]:
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in COORDINATE_SUFFIXES and p.is_file())
        if not files:
            raise where(path, f"the folder holds no coordinate file ({', '.join(COORDINATE_SUFFIXES)})")
        return files
    if any(c in text for c in "*?[") and not path.exists():
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in COORDINATE_SUFFIXES)
        if not files:
            raise where(text, f"the pattern matches no coordinate file ({', '.join(COORDINATE_SUFFIXES)})")
        return files
    if not path.is_file():
        raise where(path, "no such file or folder")
    if path.suffix.lower() not in COORDINATE_SUFFIXES:
        raise where(path, f"not a coordinate file type (use one of {', '.join(COORDINATE_SUFFIXES)})")
    return [path]


def match_name(stem: str, names) -> str | None:
    """The micrograph a coordinate file belongs to: its stem is the name, or the name + ``_word``;
    of several, the longest name wins (``a_b_pos`` is ``a_b``'s, not ``a``'s)."""
    names = set(names)
    if stem in names:
        return stem
    candidates = [n for n in names if stem.startswith(n + "_") and SUFFIX_WORD.fullmatch(stem[len(n):])]
    return max(candidates, key=len) if candidates else None


def _read_file(path: Path, names) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """({micrograph name: (y, x)} as written in one file (no flip), the names it holds that are
    not among ``names``)."""
    table = None
    if path.suffix.lower() == ".star":
        table = _star_table(path)
        if "rlnCoordinateX" not in table.columns:
            return _listed(path, table, names)
        if "rlnMicrographName" in table.columns:
            return _grouped(path, table, names)
    name = match_name(path.stem, names)
    if name is None:
        return {}, [path.stem]
    return {name: _read_yx(path, table)}, []


def _read_yx(path: Path, table: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the one micrograph a file holds."""
    suffix = path.suffix.lower()
    if suffix == ".star":
        return _star_yx(path, _star_table(path) if table is None else table)
    if suffix == ".box":
        centres, _ = read_box(path)
        return centres[:, 0], centres[:, 1]
    if suffix == ".coords":
        return _read_coords(path)
    return _read_csv(path)


def _star_table(path) -> pd.DataFrame:
    """The coordinate table of a STAR file or, failing that, its list of per-micrograph
    coordinate files (RELION's autopick.star / manualpick.star: rlnMicrographCoordinates)."""
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise where(path, "not a readable STAR file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tables = sorted((t for t in blocks.values() if isinstance(t, pd.DataFrame)),
                    key=lambda t: t is not blocks.get("particles"))
    table = next((t for t in tables if "rlnCoordinateX" in t.columns and "rlnCoordinateY" in t.columns), None)
    if table is None:
        table = next((t for t in tables if {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(t.columns)), None)
    if table is None:
        raise where(path, "no table with rlnCoordinateX and rlnCoordinateY columns "
                          "(nor rlnMicrographName with rlnMicrographCoordinates)")
    return table


def _listed(path, table, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The coordinate files a RELION listing names, each for its micrograph; relative paths
    are looked up beside the listing, then in the current folder (the project root)."""
    known = set(names)
    out, unknown = {}, []
    for micrograph, listed in zip(table["rlnMicrographName"], table["rlnMicrographCoordinates"]):
        if _as_name(str(micrograph)) not in known:
            unknown.append(_as_name(str(micrograph)))
            continue
        listed = Path(str(listed))
        candidates = [listed] if listed.is_absolute() else [path.parent / listed, listed]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise where(path, f"lists {listed}, which is neither beside it nor in the current folder")
        if found.suffix.lower() not in COORDINATE_SUFFIXES:
            raise where(found, f"not a coordinate file type (use one of {', '.join(COORDINATE_SUFFIXES)})")
        y, x = _read_yx(found)
        name = _as_name(str(micrograph))
        previous = out.get(name, (np.empty(0), np.empty(0)))
        out[name] = (np.concatenate([previous[0], y]), np.concatenate([previous[1], x]))
    return out, list(dict.fromkeys(unknown))


def _star_yx(path, table) -> tuple[np.ndarray, np.ndarray]:
    try:
        yx = table[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise where(path, "rlnCoordinateX / rlnCoordinateY are not numbers") from None
    return _finite(path, yx)


def _finite(path, yx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not np.isfinite(yx).all():
        raise where(path, "coordinates contain NaN or Inf")
    return yx[:, 0], yx[:, 1]


def _grouped(path, table, names) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Rows grouped by micrograph stem, each group in file row order (callers line scores up with it)."""
    y, x = _star_yx(path, table)
    listed, inverse = np.unique(table["rlnMicrographName"].astype(str).to_numpy(), return_inverse=True)
    stems, stem_of_listed = np.unique([_as_name(n) for n in listed], return_inverse=True)  # once per micrograph
    row_stem = stem_of_listed[inverse.reshape(-1)]
    order = np.argsort(row_stem, kind="stable")
    bounds = np.cumsum(np.bincount(row_stem, minlength=len(stems)))[:-1]
    known = set(names)
    groups = {str(stem): (y[rows], x[rows]) for stem, rows in zip(stems, np.split(order, bounds))}
    return ({s: g for s, g in groups.items() if s in known}, [s for s in groups if s not in known])


def _numbers(path, min_columns: int, max_columns: int, what: str) -> np.ndarray:
    """The numeric rows of a whitespace table (blank lines and # comments skipped)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError:
        raise where(path, f"not a {what} file (not text)") from None
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if not min_columns <= len(fields) <= max_columns:
            expected = f"{min_columns}" if min_columns == max_columns else f"{min_columns} to {max_columns}"
            raise where(path, f"line {number} has {len(fields)} columns; a {what} line has {expected}")
        try:
            rows.append([float(f) for f in fields][:min_columns])
        except ValueError:
            raise where(path, f"line {number} is not numbers: {line.strip()[:60]!r}") from None
    values = np.array(rows, dtype=np.float64).reshape(-1, min_columns)
    if not np.isfinite(values).all():
        raise where(path, "coordinates contain NaN or Inf")
    return values


def read_box(path) -> tuple[np.ndarray, np.ndarray]:
    """EMAN .box: centres (N, 2) (y, x) as written (corner + size/2, no flip) and box sizes (N,)."""
    values = _numbers(path, 4, 5, "EMAN .box")
    if (values[:, 2:4] <= 0).any():
        raise where(path, "box width and height must be positive")
    centres = np.stack([values[:, 1] + values[:, 3] / 2, values[:, 0] + values[:, 2] / 2], axis=1)
    return centres, values[:, 2].copy()


def _read_coords(path) -> tuple[np.ndarray, np.ndarray]:
    values = _numbers(path, 2, 3, ".coords")
    return values[:, 1], values[:, 0]


def _read_csv(path) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise where(path, f"not a readable CSV file ({str(exc).strip().splitlines()[0]})") from None
    table.columns = [str(c).strip().lower().removesuffix("-coordinate").removesuffix("_coordinate")
                     for c in table.columns]
    if "x" not in table.columns or "y" not in table.columns:
        raise where(path, "needs columns x and y")
    try:
        yx = table[["y", "x"]].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise where(path, "x / y are not numbers") from None
    return _finite(path, yx)


def _centres(coords) -> np.ndarray:
    return np.asarray(coords, dtype=np.float64).reshape(-1, 2)


def write_particles_star(path, coords: dict[str, np.ndarray], *, scores: dict[str, np.ndarray] | None = None,
                         pixel_size: float | None = None, shapes=None, flip_y: bool = False) -> Path:
    """RELION particles STAR of (row, col) centres per micrograph name: ``rlnMicrographName``,
    ``rlnCoordinateX`` (col), ``rlnCoordinateY`` (row; height − row with ``flip_y``), and
    ``rlnAutopickFigureOfMerit`` given ``scores``. With ``pixel_size`` it is RELION 3.1+
    (optics block); without, a RELION 3.0 single table. Written atomically."""
    import starfile

    shapes = {_as_name(k): v for k, v in (shapes or {}).items()}
    names = [str(name) for name in coords]
    centres = [_centres(c) for c in coords.values()]
    rows = []
    for name, c in zip(names, centres):
        if flip_y and _as_name(name) not in shapes:
            raise InputError(f"flip_y needs the image height of micrograph {name}")
        rows.append(shapes[_as_name(name)][0] - c[:, 0] if flip_y else c[:, 0])
    table = pd.DataFrame({"rlnMicrographName": np.repeat(np.array(names, dtype=object), [len(c) for c in centres]),
                          "rlnCoordinateX": np.concatenate([c[:, 1] for c in centres] or [np.empty(0)]),
                          "rlnCoordinateY": np.concatenate(rows or [np.empty(0)])})
    if scores is not None:
        values = [np.asarray(scores[name], dtype=np.float64).reshape(-1) for name in coords]
        for name, v, c in zip(names, values, centres):
            if len(v) != len(c):
                raise ValueError(f"{name}: {len(v)} scores for {len(c)} centres")
        table["rlnAutopickFigureOfMerit"] = np.concatenate(values or [np.empty(0)])
    if pixel_size is not None:
        table["rlnOpticsGroup"] = 1
        optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                               "rlnMicrographPixelSize": [float(pixel_size)]})
        blocks = {"optics": optics, "particles": table}
    else:
        blocks = {"": table}
    with atomic_write(path) as partial:
        starfile.write(blocks, partial, overwrite=True)
    return Path(path)


def _number(value) -> str:
    """Shortest exact text of a float, without a trailing ``.0`` (``1346``, ``12.25``)."""
    return np.format_float_positional(value, trim="-")


def write_box(path, centres, box_size) -> Path:
    """EMAN .box of (row, col) centres: ``x y size size`` with (x, y) = centre − size/2, in the
    file's own y (flip before writing for a bottom-origin y)."""
    centres = _centres(centres)
    sizes = np.broadcast_to(np.asarray(box_size, dtype=np.float64), (len(centres),))
    lines = ["\t".join(map(_number, (c - s / 2, r - s / 2, s, s))) + "\n" for (r, c), s in zip(centres, sizes)]
    with atomic_write(path) as partial:
        partial.write_text("".join(lines))
    return Path(path)


def write_coords(path, centres) -> Path:
    """``.coords``: ``x y`` per line, no header (IMOD / napari-boxmanager style)."""
    lines = [f"{_number(c)} {_number(r)}\n" for r, c in _centres(centres)]
    with atomic_write(path) as partial:
        partial.write_text("".join(lines))
    return Path(path)


def write_csv(path, centres) -> Path:
    """CSV with ``x,y`` columns (col, row) in pixels."""
    centres = _centres(centres)
    table = pd.DataFrame({"x": centres[:, 1], "y": centres[:, 0]})
    with atomic_write(path) as partial:
        table.to_csv(partial, index=False)
    return Path(path)
