"""The reader: a cryodask OME-Zarr store as an image layer and one labels layer per label
image, and a picks file (STAR, CSV, copick JSON) as a points layer, all in Å, z, y, x.

napari places a layer by its ``scale`` and ``translate``; those come from the NGFF
coordinate transformations of level 0, so labels, image and picks overlay in world Å.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.omezarr import WINDOW_PERCENTILES  # convert's window, for stores written without one

# label images without their own colours get one of these each (RGBA 0..1)
PALETTE = [(1.0, 0.25, 0.25, 1.0), (0.25, 0.63, 1.0, 1.0), (1.0, 0.78, 0.0, 1.0), (0.3, 0.85, 0.4, 1.0),
           (0.8, 0.4, 1.0, 1.0), (0.0, 0.85, 0.85, 1.0)]
PICK_SUFFIXES = (".star", ".csv", ".json")


def get_reader(path):
    """npe2 reader hook: a function for a path cryodask can open, else ``None`` (napari then
    offers the path to other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if path.is_dir():
        return read_store if _is_image(path) else None
    if path.is_file() and path.suffix.lower() in PICK_SUFFIXES and _looks_like_picks(path):
        return read_picks_file
    return None


def _is_image(path: Path) -> bool:
    from ..io.omezarr import open_image

    try:
        open_image(path)
    except InputError:
        return False
    return True


def _looks_like_picks(path: Path) -> bool:
    """A cheap look, so napari's own CSV/JSON readers keep the files that are not picks."""
    try:
        if path.suffix.lower() == ".csv":
            with path.open(encoding="utf-8", errors="replace") as f:
                header = [c.strip().lower().removesuffix("-coordinate").removesuffix("_coordinate")
                          for c in f.readline().split(",")]
            return "x" in header and "y" in header
        if path.suffix.lower() == ".json":
            payload = json.loads(path.read_text())
            return isinstance(payload, dict) and "points" in payload
    except (OSError, ValueError):
        return False
    return True  # STAR: only cryodask claims it


def _attrs(group) -> dict:
    attrs = group.attrs.asdict()
    return attrs.get("ome", attrs)  # NGFF 0.5 nests everything under "ome"


def _placement(group, voxel_size) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(scale, translate)`` of level 0 in Å: its ``scale`` and ``translation`` transforms,
    then the multiscale-wide ones if any (NGFF applies them after the per-level ones)."""
    multiscale = _attrs(group)["multiscales"][0]
    scale, translate = np.asarray(voxel_size, dtype=float), np.zeros(len(voxel_size))
    for t in multiscale["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "translation":
            translate = np.asarray(t["translation"][-3:], dtype=float)
    for t in multiscale.get("coordinateTransformations", []) or []:
        if t.get("type") == "scale":
            factor = np.asarray(t["scale"][-3:], dtype=float)
            scale, translate = scale * factor, translate * factor
        elif t.get("type") == "translation":
            translate = translate + np.asarray(t["translation"][-3:], dtype=float)
    return tuple(scale.tolist()), tuple(translate.tolist())


def contrast_limits(group, arrays) -> tuple[float, float]:
    """The ``omero`` window's start/end, else robust percentiles of the coarsest level."""
    channels = (_attrs(group).get("omero") or {}).get("channels") or []
    window = channels[0].get("window", {}) if channels and isinstance(channels[0], dict) else {}
    try:
        start, end = float(window["start"]), float(window["end"])
        if np.isfinite([start, end]).all() and end > start:
            return start, end
    except (KeyError, TypeError, ValueError):
        pass
    values = np.asarray(arrays[-1][...], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    start, end = (float(v) for v in np.percentile(values, WINDOW_PERCENTILES))
    return (start, end) if end > start else (float(values.min()), float(values.min()) + 1.0)


def _label_names(group) -> list[str]:
    if "labels" not in group:
        return []
    labels = group["labels"]
    attrs = labels.attrs.asdict()
    return [str(n) for n in attrs.get("ome", attrs).get("labels", [])]


def _label_colormap(group, arrays, fallback):
    """A ``DirectLabelColormap`` from the ``image-label`` colours when they cover every label
    value (checked on the coarsest level); ``None`` (napari's per-id cycle) for instance labels."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = (_attrs(group).get("image-label") or {}).get("colors") or []
    table = {int(c["label-value"]): tuple(np.asarray(c["rgba"], dtype=float) / 255) for c in colors
             if isinstance(c, dict) and "label-value" in c and len(c.get("rgba", [])) == 4}
    present = set(np.unique(np.asarray(arrays[-1][...])).tolist()) - {0}
    if not table:
        table = {1: fallback} if present <= {1} else {}
    if not table or not present <= set(table):
        return None
    # a value only at finer levels (too small to survive the pyramid) takes the first colour
    return DirectLabelColormap(color_dict={None: next(iter(table.values())), 0: (0.0, 0.0, 0.0, 0.0), **table})


AXES = {"axis_labels": ("z", "y", "x"), "units": ("angstrom",) * 3}


def _labels_layer(path: Path, index: int) -> tuple:
    """One label image as a visible multiscale labels layer named by its short name."""
    import dask.array as da

    from ..io.omezarr import open_image

    group, arrays, voxel_size, _ = open_image(path)
    scale, translate = _placement(group, voxel_size)
    kwargs = {"name": path.name.removesuffix(".zarr"), "multiscale": True, "scale": scale, "translate": translate,
              "visible": True, "opacity": 0.6, "metadata": {"path": str(path)}, **AXES}
    colormap = _label_colormap(group, arrays, PALETTE[index % len(PALETTE)])
    if colormap is not None:
        kwargs["colormap"] = colormap
    return [da.from_zarr(a) for a in arrays], kwargs, "labels"


def read_store(path) -> list[tuple]:
    """An OME-Zarr image: one multiscale image layer, then one labels layer per label image
    under ``labels/``; a label image opened by itself is one labels layer."""
    import dask.array as da

    from ..io.omezarr import open_image

    path = Path(path)
    group, arrays, voxel_size, _ = open_image(path)
    if "image-label" in _attrs(group) or group.attrs.get("cryodask", {}).get("segmentation"):
        return [_labels_layer(path, 0)]  # a label image, or a segmentation in its own store (--layout portal)
    scale, translate = _placement(group, voxel_size)
    name = _attrs(group)["multiscales"][0].get("name") or path.stem
    layers = [([da.from_zarr(a) for a in arrays],
               {"name": name, "multiscale": True, "scale": scale, "translate": translate, "colormap": "gray",
                "contrast_limits": contrast_limits(group, arrays), "metadata": {"cryodask_store": str(path)}, **AXES},
               "image")]
    for i, label in enumerate(_label_names(group)):
        try:
            layers.append(_labels_layer(path / "labels" / label, i))
        except InputError as exc:
            warnings.warn(f"skipped label image {label}: {exc}", stacklevel=2)
    return layers


def _pixel_size(path: Path, picks) -> float | None:
    """The file's own pixel size, else that of cryodask's STAR written beside a CSV."""
    if picks.pixel_size:
        return picks.pixel_size
    twin = path.with_suffix(".star")
    if path.suffix.lower() == ".csv" and twin.is_file():
        from ..io.picks import read_picks

        try:
            return read_picks(twin).pixel_size
        except InputError:
            return None
    return None


def _tomogram_translate(path: Path, picks, pixel: float, ndim: int) -> tuple[float, ...] | None:
    """Picks count pixels from the tomogram's first voxel (STAR, CSV, copick alike), so they take
    the ``translate`` of that tomogram when the viewer shows it: the one cryodask image layer of
    the same voxel size, or the one whose name is the picks' tomogram (``rlnTomoName``, the
    copick run, ``<name>_<method>_picks``)."""
    import napari

    viewer = napari.current_viewer()
    if viewer is None:
        return None
    images = [layer for layer in viewer.layers if type(layer).__name__ == "Image" and "cryodask_store" in layer.metadata
              and layer.ndim == ndim and np.allclose(layer.scale, pixel, rtol=1e-3)]
    names = {path.parent.parent.name if path.parent.name == "Picks" else ""}
    if "rlnTomoName" in picks.table.columns:
        names |= {str(n) for n in picks.table["rlnTomoName"].unique()}
    named = [layer for layer in images if layer.name in names or path.stem.startswith(f"{layer.name}_")]
    chosen = named if named else images
    return tuple(float(t) for t in chosen[0].translate) if len(chosen) == 1 else None


def read_picks_file(path) -> list[tuple]:
    """Picks as points in Å (pixels × the file's pixel size), with numeric columns as features,
    over the tomogram they were picked in when the viewer shows it."""
    from ..io.picks import STAR_AXES, read_picks

    path = Path(path)
    picks = read_picks(path)
    pixel = _pixel_size(path, picks)
    if pixel is None:
        warnings.warn(f"{path}: no pixel size in the file; picks are placed in pixels", stacklevel=2)
        pixel = 1.0
    ndim = picks.coords.shape[1]
    coordinates = set("zyx") | set(STAR_AXES.values()) | {f"{c}Angst" for c in STAR_AXES.values()}
    numeric = picks.table.select_dtypes("number")
    features = numeric[[c for c in numeric.columns if c not in coordinates and not c.startswith("rlnCentered")]]
    features = features.reset_index(drop=True)
    if "score" not in features.columns and "rlnAutopickFigureOfMerit" in features.columns:
        features = features.assign(score=features["rlnAutopickFigureOfMerit"])
    translate = _tomogram_translate(path, picks, pixel, ndim)
    kwargs = {"name": path.stem, "scale": (float(pixel),) * ndim, "translate": translate or (0.0,) * ndim,
              "features": features, "size": 8,
              "face_color": "transparent", "border_color": "cyan", "border_width": 0.15,
              "axis_labels": ("z", "y", "x")[-ndim:],
              "units": ("angstrom",) * ndim, "metadata": {"path": str(path), "pixel_size": float(pixel)}}
    return [(picks.coords, kwargs, "points")]
