"""Particle coordinates: RELION STAR (starfile), CSV and copick picks JSON, in and out.

Arrays inside cryodask are (z, y, x) in pixels; files keep their own convention: STAR has
``rlnCoordinateX/Y/Z`` in pixels (and an optics block with the pixel size), CSV has
``x, y[, z]`` columns in pixels, copick JSON has ``location`` x, y, z in Å.
RELION 5 tomography STAR files have ``rlnCenteredCoordinateX/Y/ZAngst`` instead (Å from the
tomogram centre); they are turned into tomogram pixels with the sizes in ``tomograms.star``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import where

STAR_AXES = {"x": "rlnCoordinateX", "y": "rlnCoordinateY", "z": "rlnCoordinateZ"}
CENTRED_AXES = {"x": "rlnCenteredCoordinateXAngst", "y": "rlnCenteredCoordinateYAngst", "z": "rlnCenteredCoordinateZAngst"}
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
    if particles is None:
        particles = next((t for t in tables if set(CENTRED_AXES.values()) <= set(t.columns)), None)
    if particles is None:
        raise where(path, "no table with rlnCoordinateX / rlnCoordinateY columns")
    optics = data.get("optics")
    return particles, optics if isinstance(optics, pd.DataFrame) else None


def read_picks(path, voxel_size: float | None = None, *, tomograms=None) -> Picks:
    """Read particle coordinates from a STAR, CSV or copick JSON file (pixels out).

    copick stores Å: they are divided by ``voxel_size`` (or the file's ``voxel_spacing``).
    RELION 5 centred coordinates (Å) become pixels of the reconstructed tomograms, using the
    ``tomograms.star`` given as ``tomograms`` or found beside the file, through an
    ``*optimisation_set.star`` beside it, or in the folders above it up to the project root."""
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
        if STAR_AXES["x"] not in table.columns:
            return _decentred(path, table, tomograms)
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


def _decentred(path: Path, table: pd.DataFrame, tomograms) -> Picks:
    """RELION 5 centred Å → pixels of each particle's reconstructed tomogram.

    RELION 5 (src/jaz/tomography/particle_set.cpp, ParticleSet::getParticleCoordDecenteredPixel)
    computes ``centred_Å / rlnTomoTiltSeriesPixelSize + tomo_centre``, with
    ``tomo_centre = rlnTomoSize{X,Y,Z} / 2.0`` (float division, TomogramSet::loadTomogram): the
    sizes are in unbinned tilt-series pixels, as copick's test_tomogram_centre_ignores_binning
    also reads them; the pixel size is the tomogram's from tomograms.star (subtomo.cpp passes
    ``tomogram.optics.pixelSize``), not the particles' optics group. A tomogram reconstructed at ``rlnTomoTomogramBinning`` B has pixels of
    B × the tilt-series pixel size, so its pixel = (centred_Å / ts_px + size / 2) / B.
    Subtomogram origin shifts (rlnOrigin*Angst) are not applied, as for RELION 4 files."""
    import starfile

    found = Path(tomograms) if tomograms is not None else _find_tomograms_star(path)
    if found is None:
        raise where(path, "has RELION 5 centred coordinates in Å and no tomograms.star was found beside it, through "
                          "an optimisation_set.star, or in the folders above it; pass the tomograms.star (tomograms=)")
    if not found.is_file():
        raise where(found, "no such file")
    try:
        blocks = starfile.read(found, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise where(found, f"not a readable STAR file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    needed = ["rlnTomoName", "rlnTomoTiltSeriesPixelSize", "rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]
    tomos = next((t for t in blocks.values() if isinstance(t, pd.DataFrame) and set(needed) <= set(t.columns)), None)
    if tomos is None:
        raise where(found, f"no table with {', '.join(needed)}: the tomogram sizes are needed to place RELION 5 "
                           f"centred coordinates (from {path})")
    tomos = tomos.assign(rlnTomoName=tomos["rlnTomoName"].astype(str)).drop_duplicates("rlnTomoName").set_index("rlnTomoName")
    if "rlnTomoName" in table.columns:
        tomo_names = table["rlnTomoName"].astype(str)
    elif len(tomos) == 1:
        tomo_names = pd.Series([tomos.index[0]] * len(table), index=table.index)
    else:
        raise where(path, f"has no rlnTomoName column to tell which of the {len(tomos)} tomograms in {found} each particle is in")
    missing = sorted(set(tomo_names) - set(tomos.index))
    if missing:
        raise where(path, f"names tomogram {missing[0]}, which {found} does not list (it lists {', '.join(tomos.index[:3])}"
                          + (", ..." if len(tomos) > 3 else "") + ")")
    try:
        per_particle = tomos.loc[tomo_names.to_numpy()]
        ts_pixel = per_particle["rlnTomoTiltSeriesPixelSize"].to_numpy(dtype=np.float64)
        binning = (per_particle["rlnTomoTomogramBinning"].to_numpy(dtype=np.float64)
                   if "rlnTomoTomogramBinning" in per_particle.columns else np.ones(len(per_particle)))
        centred = table[[CENTRED_AXES[a] for a in "zyx"]].to_numpy(dtype=np.float64)
        sizes = per_particle[["rlnTomoSizeZ", "rlnTomoSizeY", "rlnTomoSizeX"]].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise where(path, f"centred coordinates, or the pixel sizes and tomogram sizes in {found}, are not numbers") from None
    if not (ts_pixel > 0).all() or not (binning > 0).all():
        raise where(found, "rlnTomoTiltSeriesPixelSize and rlnTomoTomogramBinning must be positive")
    if not np.isfinite(centred).all():
        raise where(path, "coordinates contain NaN or Inf")
    coords = (centred / ts_pixel[:, None] + sizes / 2.0) / binning[:, None]
    table = table.assign(**{a: coords[:, i] for i, a in enumerate("zyx")})
    tomo_pixels = np.unique(ts_pixel * binning)
    return Picks(coords, table, float(tomo_pixels[0]) if len(tomo_pixels) == 1 else None)


def _find_tomograms_star(path: Path) -> Path | None:
    """The tomograms.star of a RELION 5 particles file: beside it; named by an
    ``*optimisation_set.star`` beside it (its paths are relative to the project root); or in a
    folder above it, up to the project root (the folder with ``default_pipeline.star``, else
    three levels up: Job/jobNNN/file)."""
    import starfile

    folder = path.resolve().parent
    above = [folder, *folder.parents]
    roots = next((above[: i + 1] for i, f in enumerate(above) if (f / "default_pipeline.star").is_file()), above[:4])
    if (folder / "tomograms.star").is_file():
        return folder / "tomograms.star"
    sets = sorted(folder.glob("*optimisation_set.star"), key=lambda p: not p.name.startswith(path.stem.removesuffix("_data")))
    for optimisation_set in sets:
        try:
            blocks = starfile.read(optimisation_set, always_dict=True)
        except Exception:  # an unreadable neighbour is not this file's problem; keep looking
            continue
        for block in blocks.values():
            if isinstance(block, pd.DataFrame):  # written as a one-row loop
                block = block.iloc[0].to_dict() if len(block) else {}
            named = block.get("rlnTomoTomogramsFile")
            if named:
                for root in [*roots, Path.cwd()]:
                    if (root / str(named)).is_file():
                        return root / str(named)
    return next((f / "tomograms.star" for f in roots[1:] if (f / "tomograms.star").is_file()), None)


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
