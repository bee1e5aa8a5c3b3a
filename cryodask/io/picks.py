"""Particle coordinates: RELION STAR (starfile), CSV and copick picks JSON, in and out.

Arrays inside cryodask are (z, y, x) in pixels; files keep their own convention: STAR has
``rlnCoordinateX/Y/Z`` in pixels (and an optics block with the pixel size), CSV has
``x, y[, z]`` columns in pixels, copick JSON has ``location`` x, y, z in Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import where

STAR_AXES = {"x": "rlnCoordinateX", "y": "rlnCoordinateY", "z": "rlnCoordinateZ"}
PIXEL_SIZE_COLUMNS = ("rlnImagePixelSize", "rlnTomoTiltSeriesPixelSize", "rlnMicrographPixelSize", "rlnDetectorPixelSize")


@dataclass
class Picks:
    """Coordinates (N, ndim) in (z, y, x) or (y, x) pixel order, the table they came from,
    and the pixel size in Å when the file states one."""

    coords: np.ndarray
    table: pd.DataFrame
    pixel_size: float | None = None


def _particles_table(path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    import starfile

    try:
        data = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise where(path, f"not a readable STAR file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tables = [t for t in data.values() if isinstance(t, pd.DataFrame)]
    particles = next((t for t in tables if STAR_AXES["x"] in t.columns), None)
    if particles is None and any("rlnCenteredCoordinateXAngst" in t.columns for t in tables):
        raise where(path, "has RELION 5 centred coordinates in Å; pixel coordinates (rlnCoordinateX/Y/Z) are needed")
    if particles is None:
        raise where(path, "no table with rlnCoordinateX / rlnCoordinateY columns")
    optics = data.get("optics")
    return particles, optics if isinstance(optics, pd.DataFrame) else None


def read_picks(path, voxel_size: float | None = None) -> Picks:
    """Read particle coordinates from a STAR, CSV or copick JSON file (pixels out).

    copick stores Å: they are divided by ``voxel_size`` (or the file's ``voxel_spacing``)."""
    path = Path(path)
    if not path.is_file():
        raise where(path, "no such file")
    if path.suffix.lower() == ".json":
        from .copick import read_copick

        return read_copick(path, voxel_size)
    if path.suffix.lower() == ".csv":
        try:
            table = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise where(path, f"not a readable CSV file ({exc})") from None
        # plain x,y,z or CryoPPP's "X-Coordinate,Y-Coordinate,Diameter"
        table.columns = [c.strip().lower().removesuffix("-coordinate").removesuffix("_coordinate") for c in table.columns]
        names = [a for a in "zyx" if a in table.columns]
        if "x" not in names or "y" not in names:
            raise where(path, "needs columns x and y (and z for tomograms)")
    else:
        table, optics = _particles_table(path)
        names = [a for a in "zyx" if STAR_AXES[a] in table.columns]
        table = table.rename(columns={STAR_AXES[a]: a for a in names}).assign(**{a: table[STAR_AXES[a]] for a in names})
    try:
        coords = table[names].to_numpy(dtype=np.float64)
    except ValueError:
        raise where(path, "coordinates are not numbers") from None
    if not np.isfinite(coords).all():
        raise where(path, "coordinates contain NaN or Inf")
    pixel_size = None
    sources = [table] + ([optics] if path.suffix.lower() != ".csv" and optics is not None else [])
    for frame in sources:
        column = next((c for c in PIXEL_SIZE_COLUMNS if c in frame.columns), None)
        if column is not None:
            pixel_size = float(frame[column].iloc[0])
            break
    return Picks(coords, table, pixel_size)


def write_picks(path, coords, columns: dict | None = None, pixel_size: float | None = None) -> Path:
    """Write (N, 3) z,y,x or (N, 2) y,x pixel coordinates to STAR or CSV, with extra columns.

    With ``pixel_size`` (Å) a STAR file gets RELION's optics block and ``rlnOpticsGroup``."""
    path = Path(path)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, np.shape(coords)[-1] if np.ndim(coords) == 2 else 3)
    axes = "zyx"[3 - coords.shape[1]:]
    star = path.suffix.lower() != ".csv"
    table = pd.DataFrame({(STAR_AXES[a] if star else a): coords[:, i] for i, a in enumerate(axes)})
    table = table[[STAR_AXES[a] if star else a for a in "xyz" if a in axes]]
    for name, values in (columns or {}).items():
        table[name] = values
    partial = path.with_name(path.name + ".partial")
    if star:
        import starfile

        blocks = {"particles": table}
        if pixel_size is not None:
            column = "rlnTomoTiltSeriesPixelSize" if coords.shape[1] == 3 else "rlnMicrographPixelSize"
            optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                                   column: [float(pixel_size)], "rlnImagePixelSize": [float(pixel_size)]})
            table.insert(len(table.columns), "rlnOpticsGroup", 1)
            blocks = {"optics": optics, "particles": table}
        starfile.write(blocks, partial, overwrite=True)
    else:
        table.to_csv(partial, index=False)
    partial.replace(path)
    return path
