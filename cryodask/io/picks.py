"""Particle coordinates: RELION STAR (starfile), CSV and copick picks JSON, in and out.

Arrays inside cryodask are (z, y, x) in pixels; files keep their own convention: STAR has
``rlnCoordinateX/Y/Z`` in pixels (and an optics block with the pixel size), CSV has
``x, y[, z]`` columns in pixels, copick JSON has ``location`` x, y, z in Å.
RELION 5 tomography STAR files have ``rlnCenteredCoordinateX/Y/ZAngst`` instead (Å from the
tomogram centre); they are turned into tomogram pixels with the sizes in ``tomograms.star``, and
``write_relion5`` writes them (with a ``tomograms.star`` beside) the same way back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, where
from .folders import atomic_write
from .volumes import stem

STAR_AXES = {"x": "rlnCoordinateX", "y": "rlnCoordinateY", "z": "rlnCoordinateZ"}
CENTRED_AXES = {"x": "rlnCenteredCoordinateXAngst", "y": "rlnCenteredCoordinateYAngst",
                "z": "rlnCenteredCoordinateZAngst"}
PIXEL_SIZE_COLUMNS = ("rlnImagePixelSize", "rlnTomoTiltSeriesPixelSize", "rlnMicrographPixelSize",
                      "rlnDetectorPixelSize")
RELION5_VERSION = "# version 50001"  # RELION 5 writes it before every block
NAME_COLUMNS = ["rlnTomoName", "rlnOpticsGroupName", "rlnTomoReconstructedTomogram", "rlnTomoParticleName"]


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
        data = starfile.read(path, always_dict=True, parse_as_string=NAME_COLUMNS)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise where(path, "not a readable STAR file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tables = [t for t in data.values() if isinstance(t, pd.DataFrame)]
    particles = next((t for t in tables if STAR_AXES["x"] in t.columns), None)
    if particles is None:
        particles = next((t for t in tables if set(CENTRED_AXES.values()) <= set(t.columns)), None)
    if particles is None:
        raise where(path, "no table with rlnCoordinateX / rlnCoordinateY columns")
    optics = data.get("optics")
    return particles, optics if isinstance(optics, pd.DataFrame) else None


def read_picks(path, voxel_size: float | None = None, *, tomograms=None, tomo_name: str | None = None) -> Picks:
    """Read particle coordinates from a STAR, CSV or copick JSON file (pixels out).

    copick stores Å: they are divided by ``voxel_size`` (or the file's ``voxel_spacing``).
    RELION 5 centred coordinates (Å) become pixels of the reconstructed tomograms (of
    ``voxel_size`` when given), using the ``tomograms.star`` given as ``tomograms`` or found beside
    the file, through an ``*optimisation_set.star`` beside it, or in the folders above it up to the
    project root. A STAR file naming several tomograms (``rlnTomoName``) keeps the rows of
    ``tomo_name`` (a tomogram's stem: its rlnTomoName, or its rlnTomoReconstructedTomogram's)."""
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
        table.columns = [c.strip().lower().removesuffix("-coordinate").removesuffix("_coordinate")
                         for c in table.columns]
        names = [a for a in "zyx" if a in table.columns]
        if "x" not in names or "y" not in names:
            raise where(path, "needs columns x and y (and z for tomograms)")
    else:
        table, optics = _particles_table(path)
        if STAR_AXES["x"] not in table.columns:
            return _decentred(path, table, tomograms, voxel_size, tomo_name)
        table = _one_tomogram(path, table, tomo_name)
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


def _one_tomogram(path: Path, table: pd.DataFrame, tomo_name: str | None, tomos: pd.DataFrame | None = None,
                  found: Path | None = None) -> pd.DataFrame:
    """The rows of the tomogram ``tomo_name`` when the table names several tomograms; a name
    matches a row's rlnTomoName or the stem of its tomogram's rlnTomoReconstructedTomogram."""
    if tomo_name is None or "rlnTomoName" not in table.columns:
        return table
    names = table["rlnTomoName"].astype(str)
    if names.nunique() <= 1:
        return table
    aliases = {str(tomo_name)}
    if tomos is not None and "rlnTomoReconstructedTomogram" in tomos.columns:
        stems = tomos["rlnTomoReconstructedTomogram"].astype(str).map(stem)
        aliases |= set(stems.index[stems == str(tomo_name)])
    keep = names.isin(aliases)
    if not keep.any():
        listed = sorted(set(names))
        raise where(path, f"names {len(listed)} tomograms "
                          f"({', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''}) and none is {tomo_name}"
                          + (f" (nor reconstructed as {tomo_name}.* in {found})" if found else ""))
    return table[keep]


def _decentred(path: Path, table: pd.DataFrame, tomograms, voxel_size: float | None = None,
               tomo_name: str | None = None) -> Picks:
    """RELION 5 centred Å → pixels of each particle's reconstructed tomogram.

    RELION 5 (src/jaz/tomography/particle_set.cpp, ParticleSet::getParticleCoordDecenteredPixel)
    computes ``centred_Å / rlnTomoTiltSeriesPixelSize + tomo_centre``, with
    ``tomo_centre = rlnTomoSize{X,Y,Z} / 2.0`` (float division, TomogramSet::loadTomogram): the
    sizes are in unbinned tilt-series pixels, as copick's test_tomogram_centre_ignores_binning
    also reads them; the pixel size is the tomogram's from tomograms.star (subtomo.cpp passes
    ``tomogram.optics.pixelSize``), not the particles' optics group. A tomogram reconstructed at
    ``rlnTomoTomogramBinning`` B has pixels of B × the tilt-series pixel size, so its pixel =
    (centred_Å / ts_px + size / 2) / B.
    Subtomogram origin shifts (rlnOrigin*Angst) are not applied, as for RELION 4 files.
    With ``voxel_size`` the result is in pixels of that size instead (Å from the corner / voxel_size)."""
    import starfile

    found = Path(tomograms) if tomograms is not None else _find_tomograms_star(path)
    if found is None:
        raise where(path, "has RELION 5 centred coordinates in Å and no tomograms.star was found beside it, through "
                          "an optimisation_set.star, or in the folders above it; pass the tomograms.star (tomograms=)")
    if not found.is_file():
        raise where(found, "no such file")
    try:
        blocks = starfile.read(found, always_dict=True, parse_as_string=NAME_COLUMNS)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise where(found, "not a readable STAR file "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    needed = ["rlnTomoName", "rlnTomoTiltSeriesPixelSize", "rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]
    tomos = next((t for t in blocks.values() if isinstance(t, pd.DataFrame) and set(needed) <= set(t.columns)), None)
    if tomos is None:
        raise where(found, f"no table with {', '.join(needed)}: the tomogram sizes are needed to place RELION 5 "
                           f"centred coordinates (from {path})")
    tomos = (tomos.assign(rlnTomoName=tomos["rlnTomoName"].astype(str)).drop_duplicates("rlnTomoName")
             .set_index("rlnTomoName"))
    table = _one_tomogram(path, table, tomo_name, tomos, found)
    if "rlnTomoName" in table.columns:
        tomo_names = table["rlnTomoName"].astype(str)
    elif len(tomos) == 1:
        tomo_names = pd.Series([tomos.index[0]] * len(table), index=table.index)
    else:
        raise where(path, f"has no rlnTomoName column to tell which of the {len(tomos)} tomograms in {found} each "
                          "particle is in")
    missing = sorted(set(tomo_names) - set(tomos.index))
    if missing:
        raise where(path,
                    f"names tomogram {missing[0]}, which {found} does not list (it lists {', '.join(tomos.index[:3])}"
                          + (", ..." if len(tomos) > 3 else "") + ")")
    try:
        per_particle = tomos.loc[tomo_names.to_numpy()]
        ts_pixel = per_particle["rlnTomoTiltSeriesPixelSize"].to_numpy(dtype=np.float64)
        binning = (per_particle["rlnTomoTomogramBinning"].to_numpy(dtype=np.float64)
                   if "rlnTomoTomogramBinning" in per_particle.columns else np.ones(len(per_particle)))
        centred = table[[CENTRED_AXES[a] for a in "zyx"]].to_numpy(dtype=np.float64)
        sizes = per_particle[["rlnTomoSizeZ", "rlnTomoSizeY", "rlnTomoSizeX"]].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise where(path,
                    f"centred coordinates, or the pixel sizes and tomogram sizes in {found}, are not numbers") from None
    if not (ts_pixel > 0).all() or not (binning > 0).all():
        raise where(found, "rlnTomoTiltSeriesPixelSize and rlnTomoTomogramBinning must be positive")
    if not np.isfinite(centred).all():
        raise where(path, "coordinates contain NaN or Inf")
    if voxel_size is not None and not (np.isfinite(voxel_size) and voxel_size > 0):
        raise where(path, f"voxel size must be positive to place RELION 5 coordinates, got {voxel_size}")
    if voxel_size is None:
        coords = (centred / ts_pixel[:, None] + sizes / 2.0) / binning[:, None]
    else:
        coords = (centred / ts_pixel[:, None] + sizes / 2.0) * (ts_pixel / float(voxel_size))[:, None]
    table = table.assign(**{a: coords[:, i] for i, a in enumerate("zyx")})
    tomo_pixels = np.unique(ts_pixel * binning) if voxel_size is None else np.array([float(voxel_size)])
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
    sets = sorted(folder.glob("*optimisation_set.star"),
                  key=lambda p: not p.name.startswith(path.stem.removesuffix("_data")))
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
    if star:
        blocks = {"particles": table}
        if pixel_size is not None:
            column = "rlnTomoTiltSeriesPixelSize" if coords.shape[1] == 3 else "rlnMicrographPixelSize"
            optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                                   column: [float(pixel_size)], "rlnImagePixelSize": [float(pixel_size)]})
            table.insert(len(table.columns), "rlnOpticsGroup", 1)
            blocks = {"optics": optics, "particles": table}
    with atomic_write(path) as partial:
        if star:
            import starfile

            starfile.write(blocks, partial, overwrite=True)
        else:
            table.to_csv(partial, index=False)
    return path


def tomogram_row(name: str, shape, voxel_size: float, tilt_series_pixel_size: float | None = None,
                 tomogram=None, microscope: dict | None = None) -> dict:
    """The ``tomograms.star`` row RELION 5 keeps for a (z, y, x) tomogram of ``voxel_size`` Å.

    RELION counts sizes in tilt-series pixels and the tomogram's pixel is
    ``rlnTomoTomogramBinning`` × ``rlnTomoTiltSeriesPixelSize``: a tomogram binned from the tilt
    series is described by the tilt-series pixel size (default: the voxel size, binning 1)."""
    ts = float(voxel_size if tilt_series_pixel_size is None else tilt_series_pixel_size)
    if not (np.isfinite(ts) and ts > 0):
        raise InputError(f"--tilt-series-pixel-size must be a positive number of Å, got {tilt_series_pixel_size}")
    binning = float(voxel_size) / ts
    if binning < 1 - 1e-6:
        raise InputError(f"--tilt-series-pixel-size {ts:g} Å is larger than the tomogram's voxel size "
                         f"{float(voxel_size):g} Å: RELION's tomograms are binned from the tilt series, not finer")
    z, y, x = (int(round(n * binning)) for n in shape)
    row = {"rlnTomoName": str(name), **(microscope or {}), "rlnTomoTiltSeriesPixelSize": ts,
           "rlnTomoTomogramBinning": binning, "rlnTomoSizeX": x, "rlnTomoSizeY": y, "rlnTomoSizeZ": z}
    if tomogram is not None:
        row["rlnTomoReconstructedTomogram"] = str(tomogram)
    return row


def centred_angstrom(coords, row: dict) -> np.ndarray:
    """(N, 3) z, y, x tomogram pixels → RELION 5 centred Å, x, y, z: the exact inverse of
    ``_decentred`` (``(pixel × binning − size / 2) × tilt-series pixel``)."""
    ts, binning = row["rlnTomoTiltSeriesPixelSize"], row["rlnTomoTomogramBinning"]
    sizes = np.array([row["rlnTomoSizeX"], row["rlnTomoSizeY"], row["rlnTomoSizeZ"]], dtype=np.float64)
    xyz = np.asarray(coords, dtype=np.float64).reshape(-1, 3)[:, ::-1]
    return (xyz * binning - sizes / 2.0) * ts


def _write_relion(path: Path, blocks: dict, float_format: str = "%.6f") -> None:
    """STAR text as RELION 5 writes it: ``# version 50001`` before every data block (starfile
    formats the blocks; its own header line is left out); written whole, then moved in place."""
    from starfile.writer import StarWriter

    text = "".join(f"\n{RELION5_VERSION}\n\n"
                   + "\n".join(StarWriter({name: block}, float_format=float_format).data_block_generator())
                   for name, block in blocks.items())
    with atomic_write(path) as partial:
        partial.write_text(text)


_TOMOGRAMS_STAR = threading.Lock()  # tomograms picked at once into one folder share its tomograms.star


def write_tomograms_star(path, rows: list[dict]) -> Path:
    """``tomograms.star`` (``data_global``) holding ``rows``; rows of an existing file with other
    rlnTomoName values are kept, so tomograms picked into one folder share one file."""
    with _TOMOGRAMS_STAR:
        return _merge_tomograms_star(Path(path), rows)


def merge_particle_stars(paths, out) -> Path:
    """One RELION 5 particle STAR for a collection: every tomogram's particles, and one optics
    group per tomogram (numbered in order), as RELION's own multi-tomogram files have."""
    import starfile

    optics, particles = [], []
    for group, path in enumerate(paths, start=1):
        blocks = starfile.read(path, always_dict=True, parse_as_string=NAME_COLUMNS)
        optics.append(blocks["optics"].assign(rlnOpticsGroup=group))
        particles.append(blocks["particles"].assign(rlnOpticsGroup=group))
    _write_relion(Path(out), {"optics": pd.concat(optics, ignore_index=True),
                              "particles": pd.concat(particles, ignore_index=True)})
    return Path(out)


def _merge_tomograms_star(path: Path, rows: list[dict]) -> Path:
    table = pd.DataFrame(rows)
    if path.is_file():
        import starfile

        try:
            old = next((t for t in starfile.read(path, always_dict=True, parse_as_string=NAME_COLUMNS).values()
                        if isinstance(t, pd.DataFrame) and "rlnTomoName" in t.columns), None)
        except Exception as exc:  # starfile raises many kinds on malformed text
            raise where(path, "not a readable STAR file "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); move it away to "
                              "write picks here") from None
        if old is None:
            raise where(path, "has no table with rlnTomoName; move it away to write picks here")
        old = old[~old["rlnTomoName"].astype(str).isin(table["rlnTomoName"])]
        table = pd.concat([old, table], ignore_index=True)
        if "rlnTomoTomogramBinning" in table.columns:  # RELION's default where a row has none
            table["rlnTomoTomogramBinning"] = table["rlnTomoTomogramBinning"].fillna(1.0)
        table = table.dropna(axis=1)  # a column that not every tomogram has cannot be written
    table = table.sort_values("rlnTomoName", kind="stable", ignore_index=True)  # the same file whatever the order
    _write_relion(path, {"global": table}, float_format="%.12g")  # binning = voxel / tilt-series pixel, unrounded
    return path


def write_relion5(path, coords, row: dict, columns: dict | None = None, tomograms=None) -> Path:
    """(N, 3) z, y, x pixels of the tomogram described by ``row`` (``tomogram_row``) as a RELION 5
    particle STAR: ``rlnTomoName``, centred Å coordinates, an optics group named after the
    tomogram; ``row`` is merged into ``tomograms`` (default: ``tomograms.star`` beside it)."""
    path = Path(path)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    xyz = centred_angstrom(coords, row)
    name = row["rlnTomoName"]
    table = pd.DataFrame({"rlnTomoName": [name] * len(coords),
                          **{CENTRED_AXES[a]: xyz[:, i] for i, a in enumerate("xyz")},
                          "rlnOpticsGroup": np.ones(len(coords), dtype=int),
                          "rlnTomoParticleName": [f"{name}/{i + 1}" for i in range(len(coords))]})
    for column, values in (columns or {}).items():
        table[column] = values
    microscope = [c for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast") if c in row]
    optics = pd.DataFrame({**{c: [row[c]] for c in microscope},
                           "rlnTomoTiltSeriesPixelSize": [row["rlnTomoTiltSeriesPixelSize"]],
                           "rlnOpticsGroup": [1], "rlnOpticsGroupName": [name]})
    write_tomograms_star(path.parent / "tomograms.star" if tomograms is None else tomograms, [row])
    _write_relion(path, {"optics": optics, "particles": table})
    return path


@dataclass
class StarStyle:
    """How tomogram picks go to STAR: ``relion5`` (centred Å, optics group, ``tomograms.star``
    beside) or ``relion4`` (``rlnCoordinateX/Y/Z`` pixels, optics with the voxel size). The
    microscope values fill RELION's optics group (RELION's import defaults); ``tomogram`` is
    written as rlnTomoReconstructedTomogram."""

    version: str = "relion5"
    tilt_series_pixel_size: float | None = None
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    tomogram: str | None = None

    def __post_init__(self):
        if self.version not in ("relion5", "relion4"):
            raise InputError(f"--star must be relion5 or relion4, got {self.version!r}")
        for option, value, low in (("--voltage", self.voltage, 0), ("--cs", self.cs, None),
                                   ("--amplitude-contrast", self.amplitude_contrast, None)):
            if not np.isfinite(value) or (low is not None and value <= low) or value < 0:
                raise InputError(f"{option} must be {'positive' if low is not None else 'zero or more'}, got {value}")
        if self.amplitude_contrast >= 1:
            raise InputError(f"--amplitude-contrast is a fraction below 1, got {self.amplitude_contrast}")

    def row(self, name: str, shape, voxel_size: float) -> dict:
        microscope = {"rlnVoltage": float(self.voltage), "rlnSphericalAberration": float(self.cs),
                      "rlnAmplitudeContrast": float(self.amplitude_contrast)}
        return tomogram_row(name, shape, voxel_size, self.tilt_series_pixel_size, self.tomogram, microscope)


def write_tomogram_picks(path, coords, name: str, shape, voxel_size: float, columns: dict | None = None,
                         style: StarStyle | None = None) -> Path:
    """(N, 3) z, y, x pixels of the tomogram ``name`` (shape, voxel size) as STAR in ``style``."""
    style = StarStyle() if style is None else style
    if style.version == "relion4":  # as cryodask wrote them before RELION 5: tomogram pixels, binning 1
        return write_picks(path, coords,
                           {"rlnTomoName": [str(name)] * len(np.reshape(coords, (-1, 3))), **(columns or {})},
                           pixel_size=voxel_size)
    return write_relion5(path, coords, style.row(name, shape, voxel_size), columns)
