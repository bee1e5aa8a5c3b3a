"""OME-Zarr images and labels laid out the way the CryoET Data Portal and napari expect.

Axes z, y, x in angstrom; one ``scale`` transform per level; a 2x pyramid along all three
axes. NGFF 0.4 is zarr v2 with ``/`` chunk keys (the portal's format); 0.5 is zarr v3 with
``dimension_names``. Label images live in ``labels/<name>`` with the same number of levels
as the image and ``image-label`` metadata. ``layout="portal"`` matches what the Portal's ingestion
writes (NGFF 0.4, 256^3 chunks at every level, Blosc lz4), with each segmentation its own
OME-Zarr rather than a label image. ``convert`` adds an ``omero`` contrast window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

from ..errors import where
from .layouts import NGFF, PORTAL_CHUNKS, check_layout

AXES = [{"name": n, "type": "space", "unit": "angstrom"} for n in "zyx"]
WINDOW_PERCENTILES = (0.5, 99.5)
SKETCH_POINTS = 1001  # quantiles kept per block: a merged percentile is within 0.1 % of rank


def portal_compressor():
    from numcodecs import Blosc

    return Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)


def ngff_format(version: str):
    from ome_zarr.format import FormatV04, FormatV05

    if version not in NGFF:
        raise ValueError(f"--ngff must be one of {', '.join(NGFF)}, got {version}")
    return FormatV04() if version == "0.4" else FormatV05()


def level_shapes(shape, levels: int) -> list[tuple[int, ...]]:
    """Shape of each pyramid level: each halves every axis, rounding up."""
    return [tuple(math.ceil(s / 2**level) for s in shape) for level in range(levels)]


def _datasets(voxel_size, levels: int, translation=None, *, averaged: bool = True) -> list[dict]:
    """``scale`` then ``translation`` per level. ``translation`` (z, y, x, Å) is where the centre of
    voxel (0, 0, 0) of level 0 lies (an MRC origin; see ``io.mrc.translation``). A level-``l``
    voxel of an ``averaged`` image is the mean of 2**l level-0 voxels per axis, so its centre
    lies (2**l - 1) / 2 level-0 voxels further on; a label level takes every 2**l-th voxel
    (nearest), so its first voxel is voxel 0 and it keeps the level-0 translation."""
    t0 = [float(t) for t in (translation if translation is not None else (0.0,) * len(voxel_size))]
    return [{"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [float(v) * 2**level for v in voxel_size]},
                {"type": "translation", "translation": [t + (float(v) * (2**level - 1) / 2 if averaged else 0.0)
                                                        for t, v in zip(t0, voxel_size)]}]}
            for level in range(levels)]


def _create_arrays(group, shapes, chunks, dtype, version: str, *, fill_value=0, layout: str = "default") -> None:
    """One array per level; the portal layout keeps 256^3 chunks even on levels smaller than that."""
    extra = ({"dimension_names": ("z", "y", "x")} if version == "0.5"
             else {"chunk_key_encoding": {"name": "v2", "separator": "/"}})
    if layout == "portal":
        extra["compressors"] = portal_compressor()
    for level, shape in enumerate(shapes):
        level_chunks = tuple(chunks) if layout == "portal" else tuple(min(c, s) for c, s in zip(chunks, shape))
        group.create_array(str(level), shape=shape, chunks=level_chunks,
                           dtype=dtype, fill_value=fill_value, overwrite=True, **extra)


def create_image(path, shape, *, chunks, dtype, voxel_size, levels: int = 3, ngff: str = "0.4",
                 name: str | None = None, attributes: dict | None = None, layout: str = "default",
                 translation=None, averaged: bool = True) -> zarr.Group:
    """Create an empty multiscale image (every level allocated, no chunk written yet); the
    ``portal`` layout takes the Portal's chunks and compressor whatever ``chunks`` says.
    ``averaged`` False for levels that take every 2**l-th voxel (labels): see ``_datasets``."""
    from ome_zarr.writer import write_multiscales_metadata
    fmt = ngff_format(ngff)
    check_layout(layout, ngff)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    _create_arrays(group, level_shapes(shape, levels), PORTAL_CHUNKS if layout == "portal" else chunks, dtype, ngff,
                   layout=layout)
    write_multiscales_metadata(group, _datasets(voxel_size, levels, translation, averaged=averaged), fmt=fmt, axes=AXES,
                               name=name or Path(path).stem)
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


def image_translation(path, level: int = 0) -> tuple[float, float, float]:
    """The NGFF ``translation`` (z, y, x, Å) of one level of an image (zeros if it has none)."""
    group = open_image(path)[0]
    attrs = group.attrs.asdict()
    datasets = attrs.get("ome", attrs)["multiscales"][0]["datasets"]
    for t in datasets[level].get("coordinateTransformations", []):
        if t.get("type") == "translation":
            return tuple(float(v) for v in t["translation"][-3:])
    return (0.0, 0.0, 0.0)


def label_colors(colors: dict[int, list[int]] | None, properties: list[dict] | None):
    """``image-label`` colours and properties that list the same label values, as NGFF asks (and
    ome-zarr-models checks): instance ids described by ``properties`` get spread hues, and a
    coloured value without properties gets a bare property entry."""
    import colorsys

    colors = dict(colors or {1: [255, 64, 64, 255]})
    if properties is None:
        return colors, None
    described = {int(p["label-value"]) for p in properties}
    for value in sorted(described - set(colors)):  # golden-angle hues: neighbours' ids stay apart
        r, g, b = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors[value] = [round(255 * r), round(255 * g), round(255 * b), 255]
    properties = [*properties, *({"label-value": v} for v in sorted(set(colors) - described))]
    return {v: colors[v] for v in sorted(colors)}, properties


def create_labels(image_path, name: str, dtype, *, colors: dict[int, list[int]] | None = None,
                  properties: list[dict] | None = None, translation=None) -> zarr.Group:
    """Create an empty label image ``<image>/labels/<name>`` with one level per image level,
    the image's chunks, ``image-label`` metadata and the ``labels`` listing."""
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    group, arrays, voxel_size, ngff = open_image(image_path, mode="r+")
    fmt = ngff_format(ngff)
    root = group.require_group("labels")
    listing = root.attrs.get("ome", {}).get("labels", []) if ngff == "0.5" else root.attrs.get("labels", [])
    label_group = root.create_group(name, overwrite=True)
    _create_arrays(label_group, [a.shape for a in arrays], arrays[0].chunks, dtype, ngff)
    translation = image_translation(image_path) if translation is None else translation  # overlays the image
    write_multiscales_metadata(label_group, _datasets(voxel_size, len(arrays), translation, averaged=False),
                               fmt=fmt, axes=AXES, name=name)
    colors, properties = label_colors(colors, properties)
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


# ---------------------------------------------------------------- contrast window (NGFF omero)

def sketch(data) -> np.ndarray:
    """A block's summary for the contrast window: ``[finite count, min, max, SKETCH_POINTS
    quantiles]``. Quantiles come from a strided sample of at most 2**18 voxels (about 20 ms), so a block task
    pays little and the blocks merge later without being read again."""
    values = np.asarray(data)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = values[np.isfinite(values)]
    if not values.size:
        return np.array([0.0, np.nan, np.nan] + [np.nan] * SKETCH_POINTS)
    step = 1
    while math.prod(math.ceil(n / step) for n in values.shape) > 2**18:
        step += 1
    sample = values[(slice(None, None, step),) * values.ndim].ravel()
    quantiles = np.quantile(sample, np.linspace(0, 1, SKETCH_POINTS), method="linear")
    return np.concatenate([[values.size, float(values.min()), float(values.max())], quantiles]).astype(np.float64)


def merge_window(sketches, percentiles=WINDOW_PERCENTILES) -> dict | None:
    """``min``/``max`` (exact) and ``start``/``end`` (the percentiles, within 0.1 % of rank) of
    the blocks summarized by ``sketch``; ``None`` when no block has a finite value."""
    sketches = [np.asarray(s, dtype=np.float64) for s in sketches if s is not None and s[0] > 0]
    if not sketches:
        return None
    grid = np.linspace(0, 1, SKETCH_POINTS)
    counts = np.array([s[0] for s in sketches])

    def below(x: float) -> float:  # the share of voxels under x: the blocks' piecewise-linear CDFs, weighted
        return float(sum(n * np.interp(x, s[3:], grid) for n, s in zip(counts, sketches)) / counts.sum())

    def invert(share: float) -> float:  # bisection: the CDF only grows
        lo, hi = min(s[3] for s in sketches), max(s[-1] for s in sketches)
        for _ in range(64):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if below(mid) < share else (lo, mid)
        return float(hi)

    start, end = (invert(p / 100) for p in percentiles)
    return {"min": min(float(s[1]) for s in sketches), "max": max(float(s[2]) for s in sketches),
            "start": start, "end": end}


def write_omero(path, window: dict, *, label: str, z_size: int) -> dict:
    """The NGFF ``omero`` block of a one-channel greyscale image (``attrs["ome"]["omero"]`` in
    0.5): napari and other viewers take their contrast limits from its window."""
    group = zarr.open_group(str(path), mode="r+")
    block = {"name": label,
             "channels": [{"active": True, "coefficient": 1.0, "color": "FFFFFF", "family": "linear",
                           "inverted": False, "label": label, "window": window}],
             "rdefs": {"defaultT": 0, "defaultZ": int(z_size) // 2, "model": "greyscale"}}
    attrs = group.attrs.asdict()
    if "ome" in attrs:
        group.attrs["ome"] = {**attrs["ome"], "omero": block}
    else:
        group.attrs["omero"] = {"version": "0.4", **block}
    return block


# ---------------------------------------------------------------- segmentations, in either layout

def _max_pool(data):
    """2x2x2 maximum, odd edges padded with 0: the Portal's ``downscale_local_mean(...) > 0``."""
    import dask.array as da

    pad = [(0, n % 2) for n in data.shape]
    if any(p for _, p in pad):
        data = da.pad(data, pad, mode="constant", constant_values=0)
    return da.coarsen(np.max, data, {0: 2, 1: 2, 2: 2})


def create_mask_store(path, shape, dtype, *, voxel_size, levels: int, translation=None, binary: bool = True,
                      name: str | None = None, attributes: dict | None = None) -> zarr.Group:
    """An empty segmentation image in the Portal's layout (NGFF 0.4, 256^3 chunks, Blosc lz4).
    Binary masks are max-pooled, so their lower levels are placed like averaged ones; instance
    labels take every second voxel and keep the level-0 translation (see ``_datasets``)."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    _create_arrays(group, level_shapes(shape, levels), PORTAL_CHUNKS, dtype, "0.4", layout="portal")
    write_multiscales_metadata(group, _datasets(voxel_size, levels, translation, averaged=binary), fmt=FormatV04(),
                               axes=AXES, name=name or Path(path).stem)
    # the Portal's masks are plain images: this says they are labels (the napari plugin opens them so)
    ours = {**(attributes or {}).get("cryodask", {}), "segmentation": {"binary": bool(binary)}}
    group.attrs.update({**(attributes or {}), "cryodask": ours})
    return group


def fill_levels(path, *, binary: bool = True) -> None:
    """Write levels 1.. of an image from its level 0: a binary mask max-pooled (the Portal's
    ``downscale_local_mean(...) > 0``), labels every second voxel (ids are never blended)."""
    import dask.array as da

    _, arrays, _, _ = open_image(path, mode="r+")
    level = da.from_zarr(arrays[0])
    for i, target in enumerate(arrays[1:], start=1):
        level = _max_pool(level) if binary else da.from_zarr(arrays[0])[::2**i, ::2**i, ::2**i]
        da.store(level.rechunk(target.chunks), target, lock=False)
        if binary:
            level = da.from_zarr(target)  # the next level pools this one as written, not the whole chain again


def write_mask_store(path, labels, like, *, binary: bool = True, name: str | None = None) -> zarr.Group:
    """A segmentation as its own OME-Zarr, the way the Portal ships masks, with the levels, voxel
    size and origin of the image ``like``: a binary mask as int8 0/1 (the Portal's
    ``MaskConverter``), instance labels in their own integer type."""
    import dask.array as da

    group, arrays, voxel_size, _ = open_image(like)
    labels = da.asarray(labels)
    if tuple(labels.shape) != tuple(arrays[0].shape):
        raise ValueError(f"labels shape {labels.shape} differs from the image {arrays[0].shape}")
    if binary:
        labels = (labels > 0).astype(np.int8)
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    source = group.attrs.get("cryodask", {}).get("source")  # the MRC header's raw origin, for exports
    out = create_mask_store(path, labels.shape, labels.dtype, voxel_size=voxel_size, levels=len(arrays),
                            translation=image_translation(like), binary=binary, name=name,
                            attributes={"cryodask": {"source": source}} if source else None)
    da.store(labels.rechunk(out["0"].chunks), out["0"], lock=False)
    fill_levels(path, binary=binary)
    return out


def write_segmentation(image_path, name: str, labels, *, layout: str = "default", out=None, stem: str | None = None,
                       colors: dict[int, list[int]] | None = None, properties: list[dict] | None = None,
                       binary: bool = True) -> Path:
    """Write a segmentation where its layout wants it and return that image's path:
    ``<image>/labels/<name>`` (default), or ``<out>/<stem>_<name>.zarr`` (``portal``)."""
    check_layout(layout)
    if layout == "portal":
        from .volumes import stem as stem_of

        path = Path(out) / f"{stem or stem_of(image_path)}_{name}.zarr"
        write_mask_store(path, labels, image_path, binary=binary, name=name)
        return path
    write_labels(image_path, name, labels, colors=colors, properties=properties)
    return Path(image_path) / "labels" / name
