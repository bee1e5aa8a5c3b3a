"""OME-Zarr images and labels laid out the way the CryoET Data Portal and napari expect.

Axes z, y, x in angstrom; one ``scale`` transform per level; a 2x pyramid along all three
axes. NGFF 0.4 is zarr v2 with ``/`` chunk keys (the portal's format); 0.5 is zarr v3 with
``dimension_names``. Label images live in ``labels/<name>`` with the same number of levels
as the image and ``image-label`` metadata.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

from ..errors import where

NGFF = ("0.4", "0.5")
AXES = [{"name": n, "type": "space", "unit": "angstrom"} for n in "zyx"]


def ngff_format(version: str):
    from ome_zarr.format import FormatV04, FormatV05

    if version not in NGFF:
        raise ValueError(f"--ngff must be one of {', '.join(NGFF)}, got {version}")
    return FormatV04() if version == "0.4" else FormatV05()


def level_shapes(shape, levels: int) -> list[tuple[int, ...]]:
    """Shape of each pyramid level: each halves every axis, rounding up."""
    return [tuple(math.ceil(s / 2**level) for s in shape) for level in range(levels)]


def _datasets(voxel_size, levels: int) -> list[dict]:
    return [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [float(v) * 2**level for v in voxel_size]}]}
            for level in range(levels)]


def _create_arrays(group, shapes, chunks, dtype, version: str, *, fill_value=0) -> None:
    extra = {"dimension_names": ("z", "y", "x")} if version == "0.5" else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    for level, shape in enumerate(shapes):
        group.create_array(str(level), shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                           dtype=dtype, fill_value=fill_value, overwrite=True, **extra)


def create_image(path, shape, *, chunks, dtype, voxel_size, levels: int = 3, ngff: str = "0.4",
                 name: str | None = None, attributes: dict | None = None) -> zarr.Group:
    """Create an empty multiscale image (every level allocated, no chunk written yet)."""
    from ome_zarr.writer import write_multiscales_metadata
    fmt = ngff_format(ngff)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    _create_arrays(group, level_shapes(shape, levels), chunks, dtype, ngff)
    write_multiscales_metadata(group, _datasets(voxel_size, levels), fmt=fmt, axes=AXES, name=name or Path(path).stem)
    if attributes:
        group.attrs.update(attributes)
    return group


def open_image(path, mode: str = "r"):
    """Open an OME-Zarr image: ``(group, [level arrays], voxel size of level 0 (z, y, x), ngff)``."""
    try:
        group = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError) as exc:
        raise where(path, f"not an OME-Zarr image ({exc})") from None
    attrs = group.attrs.asdict()
    ngff = "0.5" if "ome" in attrs else "0.4"
    multiscales = (attrs.get("ome", attrs)).get("multiscales")
    if not multiscales:
        raise where(path, "no OME-NGFF multiscales metadata")
    try:
        datasets = multiscales[0]["datasets"]
        names = [str(d["path"]) for d in datasets]
        scale = next(t["scale"] for t in datasets[0]["coordinateTransformations"] if t["type"] == "scale")
        voxel_size = tuple(float(v) for v in scale[-3:])
    except (KeyError, IndexError, TypeError, ValueError, StopIteration) as exc:
        raise where(path, f"malformed OME-NGFF multiscales metadata ({type(exc).__name__}: {exc})") from None
    arrays = []
    for name in names:
        try:
            array = group[name]
        except KeyError as exc:
            raise where(path, f"multiscales metadata names a missing array {exc}") from None
        except (ValueError, TypeError) as exc:  # a .zarray / zarr.json that zarr cannot read
            raise where(path, f"level {name} is not a readable zarr array ({str(exc).splitlines()[0]})") from None
        if not isinstance(array, zarr.Array):
            raise where(path, f"level {name} is not a zarr array")
        arrays.append(array)
    return group, arrays, voxel_size, ngff


def create_labels(image_path, name: str, dtype, *, colors: dict[int, list[int]] | None = None,
                  properties: list[dict] | None = None) -> zarr.Group:
    """Create an empty label image ``<image>/labels/<name>`` with one level per image level,
    the image's chunks, ``image-label`` metadata and the ``labels`` listing."""
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    group, arrays, voxel_size, ngff = open_image(image_path, mode="r+")
    fmt = ngff_format(ngff)
    root = group.require_group("labels")
    listing = root.attrs.get("ome", {}).get("labels", []) if ngff == "0.5" else root.attrs.get("labels", [])
    label_group = root.create_group(name, overwrite=True)
    _create_arrays(label_group, [a.shape for a in arrays], arrays[0].chunks, dtype, ngff)
    write_multiscales_metadata(label_group, _datasets(voxel_size, len(arrays)), fmt=fmt, axes=AXES, name=name)
    colors = colors or {1: [255, 64, 64, 255]}
    write_label_metadata(root, name, colors=[{"label-value": k, "rgba": v} for k, v in colors.items()],
                         properties=properties, fmt=fmt, source={"image": "../../"})
    names = [*[n for n in listing if n != name], name]
    if ngff == "0.5":
        root.attrs["ome"] = {"version": "0.5", "labels": names}
    else:
        root.attrs["labels"] = names
    return label_group


def write_labels(image_path, name: str, labels, *, colors: dict[int, list[int]] | None = None,
                 properties: list[dict] | None = None) -> zarr.Group:
    """Write an integer label volume into ``<image>/labels/<name>``, one level per image level.

    Lower levels take every second voxel (nearest), so label ids are never blended. The
    volume is written chunk by chunk from a numpy or dask array.
    """
    import dask.array as da

    labels = da.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.dtype.kind == "b" or labels.dtype.itemsize < 4:
        labels = labels.astype(np.uint32)
    _, arrays, _, _ = open_image(image_path)
    if tuple(labels.shape) != tuple(arrays[0].shape):
        raise ValueError(f"labels shape {labels.shape} differs from the image {arrays[0].shape}")
    label_group = create_labels(image_path, name, labels.dtype, colors=colors, properties=properties)
    for level in range(len(arrays)):
        target = label_group[str(level)]
        step = 2**level
        da.store(labels[::step, ::step, ::step].rechunk(target.chunks), target, lock=False)
    return label_group
