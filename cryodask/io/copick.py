"""copick projects as a sink and a source: picks, segmentations, tomograms and the config JSON.

copick (and the CryoET Data Portal tools built on it) keep particle locations in Å with one
identity transform per point; cryodask works in pixels, so the voxel size converts both ways.
The layout is copick 1.31's filesystem (overlay) layout, read from its ``impl/filesystem.py``::

    <overlay_root>/ExperimentRuns/<run>/VoxelSpacing<vs:.3f>/<type>.zarr        tomogram
    <overlay_root>/ExperimentRuns/<run>/Segmentations/<vs:.3f>_<user>_<session>_<name>[-multilabel].zarr
    <overlay_root>/ExperimentRuns/<run>/Picks/<user>_<session>_<object>.json

copick splits those names at ``_``, so user, session and object names never contain one. Each
cryodask tool is its own copick user (``cryodask-log``, ``cryodask-cryosam``,
``cryodask-membranes``, ``cryodask-postprocess``) writing session ``0``; the user id in a file's
name and inside it are the same, so ``run.get_picks(user_id=...)`` finds it and copick's
``store()`` rewrites that file rather than adding one. Stores are OME-NGFF 0.4 (zarr v2), the
only format copick 1.x (zarr < 3) reads.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, where
from .layouts import CHUNKS
from .folders import atomic_write
from .volumes import stem as stem_of

IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
SESSION = "0"  # copick's session of tool output (people pick in sessions 1, 2, ...)
COPICK_VERSION = "1.31.0"  # the copick whose layout this follows (written as the config's version)
DEFAULT_TYPE = "wbp"  # copick's default tomogram type (``copick add tomogram --tomo-type``)
MEMBRANE = "membrane"  # the pickable object of membrane segmentations
_INVALID = re.compile(r'[<>:"/\\|?*\x00-\x1F\x7F\s_]')  # copick.util.escape.sanitize_name's set


def copick_part(text) -> str:
    """A user, session or object name as copick's ``sanitize_name`` makes it (``_`` → ``-``)."""
    name = _INVALID.sub("-", str(text)).strip("-")
    if not name:
        raise InputError(f"{text!r} cannot be a copick name (empty once copick's forbidden characters are removed)")
    return name


def user_id(tool: str) -> str:
    """The copick user of one cryodask tool: ``cryodask-<tool>`` (log, cryosam, membranes, postprocess)."""
    return copick_part(f"cryodask-{tool}")


def copick_name(user: str, session: str, object_name: str) -> str:
    """copick's picks file name; its parts may not contain underscores."""
    return "_".join(copick_part(p) for p in (user, session, object_name)) + ".json"


def write_copick(path, coords_zyx, voxel_size: float, *, scores=None, object_name: str = "particle",
                 user_id: str = "cryodask", session_id: str = SESSION, run_name: str = "") -> Path:
    """Write (N, 3) z, y, x pixel coordinates as a copick picks JSON (locations in Å).

    The file must be named after the user, session and object it holds, or copick lists it
    under another user and its ``store()`` writes a second file."""
    user, session, obj = copick_part(user_id), copick_part(session_id), copick_part(object_name)
    path = Path(path)
    if path.name != copick_name(user, session, obj):
        raise ValueError(f"{path.name} does not name user {user}, session {session} and object {obj}")
    coords = np.asarray(coords_zyx, dtype=np.float64).reshape(-1, 3)
    scores = np.ones(len(coords)) if scores is None else np.asarray(scores, dtype=np.float64)
    points = [{"location": {"x": float(x * voxel_size), "y": float(y * voxel_size), "z": float(z * voxel_size)},
               "transformation_": IDENTITY, "instance_id": 0, "score": float(score)}
              for (z, y, x), score in zip(coords, scores)]
    payload = {"pickable_object_name": obj, "user_id": user, "session_id": session,
               "run_name": run_name, "voxel_spacing": float(voxel_size), "unit": "angstrom",
               "trust_orientation": False, "points": points}
    with atomic_write(path) as partial:
        partial.write_text(json.dumps(payload, indent=1))
    return path


def write_run_picks(run_folder, coords_zyx, voxel_size: float, *, tool: str, object_name: str,
                    scores=None) -> Path:
    """``<run_folder>/Picks/cryodask-<tool>_0_<object>.json``, the run named by the folder."""
    run_folder = Path(run_folder)
    user, obj = user_id(tool), copick_part(object_name)
    folder = run_folder / "Picks"
    folder.mkdir(parents=True, exist_ok=True)
    return write_copick(folder / copick_name(user, SESSION, obj), coords_zyx, voxel_size, scores=scores,
                        object_name=obj, user_id=user, session_id=SESSION, run_name=run_folder.name)


def read_copick(path, voxel_size: float | None = None):
    """A copick picks JSON as ``Picks`` in pixels (``voxel_size`` Å, else the file's ``voxel_spacing``)."""
    from .picks import Picks

    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        points = payload["points"] or []
        coords = np.array([[p["location"]["z"], p["location"]["y"], p["location"]["x"]] for p in points],
                          dtype=np.float64).reshape(-1, 3)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise where(path, "not a readable JSON file") from None
    except (KeyError, TypeError, ValueError):
        raise where(path, "not a copick picks file (points[].location.x/y/z expected)") from None
    size = voxel_size or payload.get("voxel_spacing")
    if not size or not np.isfinite(size) or size <= 0:
        raise where(path, "copick locations are in Å: the voxel size is needed to convert them to pixels")
    if not np.isfinite(coords).all():
        raise where(path, "coordinates contain NaN or Inf")
    pixels = coords / float(size)
    table = pd.DataFrame({"z": pixels[:, 0], "y": pixels[:, 1], "x": pixels[:, 2],
                          "score": [p.get("score", np.nan) for p in points]})
    return Picks(pixels, table, float(size))


# ------------------------------------------------------------------ projects


def _local(url, config: Path, key: str) -> Path:
    """A copick root URL as a local folder (``local://``, ``file://`` or a plain path)."""
    if not isinstance(url, str) or not url:
        raise where(config, f"{key} must be a folder URL, got {url!r}")
    for prefix in ("local://", "file://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
            break
    else:
        if "://" in url:
            raise where(config,
                        f"{key} {url!r} is not on this filesystem; cryodask reads and writes local copick projects")
    return Path(url)


def spacing(voxel_size, source="") -> float:
    """copick's one voxel spacing (Å) from a z, y, x voxel size: copick volumes are isotropic."""
    sizes = np.atleast_1d(np.asarray(voxel_size, dtype=np.float64))
    if not np.allclose(sizes, sizes[-1], rtol=0, atol=5e-4):
        raise where(source or "voxel size", f"copick needs one voxel size on every axis, got {tuple(sizes)} Å")
    return round(float(sizes[-1]), 3)


@dataclass(frozen=True)
class Project:
    """A copick filesystem project: its config file and its overlay (written) and static roots."""

    config: Path
    overlay: Path
    static: Path | None = None

    def run(self, name: str) -> Path:
        return self.overlay / "ExperimentRuns" / name

    def tomogram(self, run: str, voxel_size, tomo_type: str = DEFAULT_TYPE) -> Path:
        return self.run(run) / f"VoxelSpacing{spacing(voxel_size):.3f}" / f"{copick_part(tomo_type)}.zarr"

    def segmentation(self, run: str, voxel_size, tool: str, name: str, *, multilabel: bool = False) -> Path:
        """``Segmentations/<vs>_<user>_0_<name>[-multilabel].zarr`` (copick's segmentation_store_name)."""
        stem = f"{spacing(voxel_size):.3f}_{user_id(tool)}_{SESSION}_{copick_part(name)}"
        return self.run(run) / "Segmentations" / (stem + ("-multilabel" if multilabel else "") + ".zarr")

    def read(self) -> dict:
        return read_config(self.config)


def read_config(config) -> dict:
    config = Path(config)
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        raise where(config, "no such copick config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise where(config, f"not a readable copick config ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("pickable_objects", []), list):
        raise where(config, "not a copick config (a JSON object with pickable_objects expected)")
    kind = data.get("config_type", "filesystem")
    if kind != "filesystem":
        raise where(config, f"config_type {kind!r}: cryodask reads and writes filesystem copick projects only")
    return data


def is_config(path) -> bool:
    """A JSON file that reads as a copick config (an input that expands to the project's tomograms)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "pickable_objects" in data and ("overlay_root" in data or "static_root" in data)


@contextmanager
def _config_lock(config: Path):
    """Several cryodask commands may add objects to one config at once: one at a time (flock on its folder)."""
    import fcntl

    fd = os.open(config.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_config(config: Path, data: dict) -> None:
    with atomic_write(config) as partial:
        partial.write_text(json.dumps(data, indent=4))


def open_project(config, *, create: bool = False) -> Project:
    """A copick project from its config; ``create`` writes a new config (overlay root: its folder) if missing."""
    config = Path(config).absolute()
    if create and not config.exists():
        if config.suffix.lower() != ".json":
            raise where(config, "a copick config is a .json file")
        try:
            config.parent.mkdir(parents=True, exist_ok=True)
            with _config_lock(config.parent):
                if not config.exists():  # as copick.ops.open.new_config writes it
                    _write_config(config, {"config_type": "filesystem", "name": config.parent.name,
                                           "description": "written by cryodask", "version": COPICK_VERSION,
                                           "pickable_objects": [], "overlay_root": f"local://{config.parent}",
                                           "overlay_fs_args": {"auto_mkdir": True}})
        except OSError as exc:
            raise where(config, f"cannot create the copick config ({exc.strerror or exc})") from None
    data = read_config(config)
    if "overlay_root" not in data:
        raise where(config, "has no overlay_root, where copick projects take new data")
    overlay = _local(data["overlay_root"], config, "overlay_root")
    static = _local(data["static_root"], config, "static_root") if data.get("static_root") else None
    return Project(config, overlay.absolute(), static.absolute() if static else None)


def check_writable(project: Project) -> Project:
    """Prove the overlay root writable before any cluster starts."""
    from .folders import check_output_dir

    check_output_dir(project.overlay / "ExperimentRuns")
    return project


def add_objects(project: Project, objects: list[dict]) -> dict[str, int]:
    """Add pickable objects (``name``, ``is_particle``, optional ``radius`` Å) the config lacks.

    Existing objects are left as they are; new ones get the next free ``label`` (what a
    multilabel segmentation stores). Returns every object's label by name."""
    palette = [(255, 160, 0, 255), (64, 160, 255, 255), (255, 64, 64, 255), (64, 200, 100, 255), (200, 100, 255, 255)]
    with _config_lock(project.config):
        data = read_config(project.config)
        listed = data.setdefault("pickable_objects", [])
        names = {o.get("name") for o in listed}
        used = {int(o["label"]) for o in listed if isinstance(o.get("label"), int)}
        for obj in objects:
            name = copick_part(obj["name"])
            if name in names:
                continue
            label = next(i for i in range(1, len(used) + 2) if i not in used)
            used.add(label)
            names.add(name)
            entry = {"name": name, "is_particle": bool(obj.get("is_particle", True)), "label": label,
                     "color": list(palette[(label - 1) % len(palette)])}
            if obj.get("radius"):
                entry["radius"] = float(obj["radius"])
            listed.append(entry)
        _write_config(project.config, data)
    return {o["name"]: o.get("label", 1) for o in listed}


# ------------------------------------------------------------------ writing into a project


def store_into(project: Project, tomo_type: str = DEFAULT_TYPE):
    """``store_path`` for ``convert.plan_conversion``: each input converted straight into its run."""

    def store_path(path, source) -> Path:
        return project.tomogram(stem_of(path), spacing(source.voxel_size, path), tomo_type)

    return store_path


def write_segmentation(project: Project, run: str, mask, voxel_size, *, tool: str, name: str,
                       multilabel: bool = False, chunks=None, levels: int = 1, translation=None) -> Path:
    """A label volume (numpy, dask or a zarr array path) as a copick segmentation: an OME-NGFF 0.4
    image under ``Segmentations/``; binary masks as 0/1, multilabel ones as the objects' labels.
    ``translation`` (z, y, x, Å): the tomogram's, so the mask overlays it where viewers use it."""
    import dask.array as da

    from .omezarr import create_image

    labels = da.from_zarr(str(mask)) if isinstance(mask, (str, Path)) else da.asarray(mask)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"segmentations hold integer labels, got {labels.dtype}")
    labels = labels if multilabel else (labels > 0).astype(np.uint8)
    vs = spacing(voxel_size)
    path = project.segmentation(run, vs, tool, name, multilabel=multilabel)
    chunks = tuple(chunks or labels.chunksize)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = create_image(path, labels.shape, chunks=chunks, dtype=labels.dtype, voxel_size=(vs,) * 3,
                         levels=levels, ngff="0.4", name=stem_of(path), translation=translation, averaged=False)
    for level in range(levels):
        target = group[str(level)]
        step = 2**level  # every second voxel: label values are never blended
        da.store(labels[::step, ::step, ::step].rechunk(target.chunks), target, lock=False)
    return path


def write_picks_into(project: Project, run: str, picks: pd.DataFrame, voxel_size, *, tool: str,
                     object_name: str, radius: float | None = None) -> Path:
    """Picks (z, y, x pixels, score) into ``<run>/Picks/`` with their pickable object in the config."""
    add_objects(project, [{"name": object_name, "is_particle": True, "radius": radius}])
    coords = picks[["z", "y", "x"]].to_numpy(dtype=np.float64)
    return write_run_picks(project.run(run), coords, spacing(voxel_size), tool=tool, object_name=object_name,
                           scores=picks["score"].to_numpy(dtype=np.float64) if "score" in picks else None)


def convert_into(project: Project, inputs, *, tomo_type: str = DEFAULT_TYPE, chunks=CHUNKS,
                 levels: int = 3, voxel_size=None, work=None, client=None) -> dict[str, Path]:
    """Convert MRC/TIFF tomograms straight into their runs (``VoxelSpacing<vs>/<type>.zarr``);
    resume marks stay in ``work``. Returns the store of each input by its path."""
    from ..convert import ConvertParams, plan_conversion, run_conversion

    plan = plan_conversion(inputs, work or project.overlay / ".cryodask", ConvertParams(chunks, levels, "0.4"),
                           voxel_size=voxel_size, store_path=store_into(project, tomo_type))
    report = run_conversion(plan, client)
    if report.failed:
        raise InputError(report.failed[0].message)
    return {r.source: Path(r.store) for r in report.results}


def tomograms_into(project: Project, paths, *, tomo_type: str = DEFAULT_TYPE, chunks=CHUNKS, levels: int = 3,
                   voxel_size=None, work, client=None) -> dict[Path, Path]:
    """MRC/TIFF inputs converted into the project, each given back as ``<work>/.cryodask/copick/<run>.zarr``
    (``run_link``), so the command reads, names and labels the project's store."""
    if not paths:
        return {}
    stores = convert_into(project, [str(p) for p in paths], tomo_type=tomo_type, chunks=chunks, levels=levels,
                          voxel_size=voxel_size, work=work, client=client)
    stores = {Path(k).absolute(): v for k, v in stores.items()}
    return {Path(p): run_link(stores[Path(p).absolute()], Path(work) / ".cryodask" / "copick", stem_of(p))
            for p in paths}


def segmentation_from_labels(project: Project, store, run: str, labels: str, *, tool: str, name: str) -> Path:
    """The label image ``<store>/labels/<labels>`` of a cryodask OME-Zarr as the run's binary segmentation."""
    from .omezarr import image_translation, open_image

    path = Path(store) / "labels" / labels
    _, arrays, vs, _ = open_image(path)
    add_objects(project, [{"name": name, "is_particle": False}])
    return write_segmentation(project, run, path / "0", vs, tool=tool, name=name, chunks=arrays[0].chunks,
                              levels=len(arrays), translation=image_translation(path))


def segmentation_from_file(project: Project, run: str, path, *, tool: str, name: str, voxel_size=None,
                           chunks=CHUNKS) -> Path:
    """A mask file (MRC/TIFF, OME-Zarr image or ``x.zarr/labels/<name>``) as the run's binary segmentation,
    read block by block."""
    from .mrc import translation
    from .volumes import open_volume, source_position

    mask = open_volume(path, voxel_size, chunks=chunks)
    vs, block = mask.voxel_size, mask.chunks
    add_objects(project, [{"name": name, "is_particle": False}])
    lazy = mask.to_dask(None if mask.format == "zarr" else (block[0], -1, -1))  # a file in slabs of whole planes
    return write_segmentation(project, run, lazy, vs, tool=tool, name=name,
                              chunks=block, levels=1, translation=translation(source_position(path), vs))


def mask_run(path) -> str:
    """The copick run of a mask: the run it lies in, the image of ``x.zarr/labels/<name>``, else its name."""
    path = Path(path)
    if run_of(path):
        return run_of(path)
    if path.parent.name == "labels":
        path = path.parent.parent
    return stem_of(path)


def write_membranes(project: Project, source, store, method: str) -> Path | None:
    """A membranes result as the run's ``membrane`` segmentation of user ``cryodask-membranes``
    (the post-processed mask when there is one: one segmentation per user, session and object)."""
    names = [f"{method}_predicted_post_processed_mask", f"{method}_predicted_mask"]
    labels = next((n for n in names if (Path(store) / "labels" / n).exists()), None)
    if labels is None:
        return None
    run = run_of(source) or stem_of(source)
    return segmentation_from_labels(project, store, run, labels, tool="membranes", name=MEMBRANE)


def run_link(store, folder, run: str) -> Path:
    """``<folder>/<run>.zarr`` → ``store``: cryodask names its outputs after the input's file name,
    and every copick tomogram is called ``<type>.zarr``, so a run is read through a link named after it."""
    link = Path(folder) / f"{run}.zarr"
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(store).absolute()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return link
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise where(link, "exists and is not a link to a copick tomogram")
    link.symlink_to(target, target_is_directory=True)
    return link


def run_of(path) -> str | None:
    """The copick run a path lies in (``…/ExperimentRuns/<run>/…``), if any."""
    parts = Path(path).absolute().parts
    return parts[parts.index("ExperimentRuns") + 1] if "ExperimentRuns" in parts[:-1] else None


# ------------------------------------------------------------------ reading a project


def project_tomograms(config, *, tomo_type: str | None = None,
                      voxel_spacing: float | None = None) -> list[tuple[str, float, str, Path]]:
    """(run, voxel spacing, type, store) of every tomogram of the project (overlay and static),
    those of ``tomo_type`` / ``voxel_spacing`` only when given."""
    project = open_project(config)
    found = {}
    for root in [r for r in (project.static, project.overlay) if r is not None]:
        runs = root / "ExperimentRuns"
        for store in sorted(runs.glob("*/VoxelSpacing*/*.zarr")) if runs.is_dir() else []:
            try:
                vs = float(store.parent.name[len("VoxelSpacing"):])
            except ValueError:
                continue
            kind = store.name[:-len(".zarr")]
            if kind.endswith("_features") or not store.is_dir():
                continue
            if (tomo_type is None or kind == tomo_type) and (voxel_spacing is None or abs(vs - voxel_spacing) < 5e-4):
                found[(store.parent.parent.name, vs, kind)] = store  # the overlay's copy wins, as in copick
    return [(run, vs, kind, store) for (run, vs, kind), store in sorted(found.items())]


def expand_config(config, *, tomo_type: str | None = None, voxel_spacing: float | None = None) -> list[Path]:
    """A copick config given as input: its tomograms, one per run, each as a link named after its run
    (``run_link``) in ``<overlay_root>/.cryodask/inputs/``, a folder copick does not list.

    A run with several types or spacings needs ``tomo_type`` / ``voxel_spacing`` to pick one."""
    config = Path(config)
    tomograms = project_tomograms(config, tomo_type=tomo_type, voxel_spacing=voxel_spacing)
    if not tomograms:
        given = [f"{k} {v}" for k, v in (("type", tomo_type), ("voxel spacing", voxel_spacing)) if v is not None]
        chosen = " of " + ", ".join(given) if given else ""
        raise where(config, f"the copick project has no tomogram{chosen}")
    runs: dict[str, list] = {}
    for run, vs, kind, store in tomograms:
        runs.setdefault(run, []).append((vs, kind, store))
    for run, choices in runs.items():
        if len(choices) > 1:
            listed = ", ".join(f"{kind} at {vs:.3f} Å" for vs, kind, _ in choices)
            raise where(config,
                        f"run {run} has several tomograms ({listed}); choose one with --copick-type / --copick-spacing")
    subfolder = open_project(config).overlay / ".cryodask" / "inputs" / f"{tomo_type or 'any'}-{voxel_spacing or 'any'}"
    return [run_link(choices[0][2], subfolder, run) for run, choices in runs.items()]


def expand_inputs(inputs, *, tomo_type: str | None = None, voxel_spacing: float | None = None) -> list[str]:
    """Command-line inputs with every copick config replaced by its runs' tomograms."""
    expanded = []
    for item in inputs:
        if is_config(item):
            expanded += [str(p) for p in expand_config(item, tomo_type=tomo_type, voxel_spacing=voxel_spacing)]
        else:
            expanded.append(str(item))
    return expanded
