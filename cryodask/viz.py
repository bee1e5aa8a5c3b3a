"""PNG figures: PR curves, picking scores against the radius, and the previews a person reads:
orthoslices of a tomogram with its mask or picks (from a coarse pyramid level, or three slices),
micrographs with their masks and picks, each with a legend, counts and a scale bar in Å.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through ``pyplot``: no global state, no display needed, safe to call from worker threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io.folders import atomic_write


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=fig.dpi, format="png")  # also for a ``.partial`` name, renamed after
    return out_png


def pr_plot(recall, precision, out_png, *, average_precision: float | None = None,
            operating_point: tuple[float, float] | None = None, title: str | None = None) -> Path:
    """Plot a precision–recall curve, AP in the legend, ``operating_point`` (recall, precision) marked.

    Examples
    --------
    >>> pr_plot([1, 0.5, 0], [0.5, 1, 1], "pr.png", average_precision=0.75)  # doctest: +SKIP
    """
    fig = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    label = "PR curve" if average_precision is None else f"PR curve (AP = {average_precision:.3f})"
    ax.step(recall, precision, where="post", label=label)
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="C3",
                label=f"prediction (R = {operating_point[0]:.3f}, P = {operating_point[1]:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01), title=title or "Precision–recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, out_png)


def picks_radius_plot(radii, precision, recall, f1, out_png, *, radius: float | None = None,
                      unit: str = "px", title: str | None = None) -> Path:
    """Plot precision, recall and F1 against the matching radius, ``radius`` (the chosen one) marked.

    Examples
    --------
    >>> picks_radius_plot([1, 2], [0.5, 0.9], [0.4, 0.8], [0.44, 0.85], "f1.png", radius=2)  # doctest: +SKIP
    """
    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for values, name in ((precision, "precision"), (recall, "recall"), (f1, "F1")):
        ax.plot(radii, values, marker=".", label=name)
    if radius is not None:
        ax.axvline(radius, color="0.5", linestyle="--", label=f"radius = {radius:g} {unit}")
    ax.set(xlabel=f"matching radius ({unit})", ylabel="score", ylim=(0, 1.02),
           title=title or "Picking scores vs radius")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, out_png)


DISPLAY_PIXELS = 1024  # larger slices are binned to about this size before drawing


def _binned(image, factor: int, reduce):
    """Bin a 2D slice by ``factor`` (mean for images, max for masks): a 4k micrograph
    draws in a fraction of the time and shows more contrast than a strided view."""
    if factor == 1:
        return image
    h, w = (s // factor for s in image.shape)
    return reduce(image[:h * factor, :w * factor].reshape(h, factor, w, factor), axis=(1, 3))


def _contrast(slices, percentiles=(1, 99)):
    values = np.concatenate([np.ravel(s) for s in slices]).astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, percentiles)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


OVERLAY_COLOUR = "#ff8c00"  # masks: orange, distinct from grey and from the pick colours
POINT_COLOURS = ("#00e5ff", "#ff2fd0", "#7cff4f", "#ffe135")  # cyan, magenta, green, yellow


def _overlay(ax, labels, extent, colour=OVERLAY_COLOUR) -> None:
    """Masks in one colour; label images with a colour per id (cycling through 20)."""
    from matplotlib.colors import ListedColormap

    labels = np.asarray(labels)
    if not labels.any():
        return
    binary = labels.max() <= 1
    values = np.ma.masked_where(labels == 0, np.ones(labels.shape) if binary else labels % 20)
    ax.imshow(values, cmap=ListedColormap([colour]) if binary else "tab20", vmin=0, vmax=1 if binary else 19,
              alpha=0.45, interpolation="nearest", extent=extent)


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 × 10ⁿ not above ``target``: a scale bar's length."""
    if not target > 0:
        return 0.0
    power = 10.0 ** np.floor(np.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)


def _scale_bar(ax, pixel_size: float, width_px: float) -> None:
    """A bar of about a fifth of the panel's width, labelled in Å (nm from 1000 Å on)."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    length = nice_length(width_px * pixel_size / 5)
    if not length:
        return
    label = f"{length / 10:g} nm" if length >= 1000 else f"{length:g} Å"
    ax.add_artist(AnchoredSizeBar(ax.transData, length / pixel_size, label, "lower right", pad=0.4, color="white",
                                  frameon=True, size_vertical=max(1.0, width_px / 150), label_top=True,
                                  fontproperties=FontProperties(size=9)))
    ax.artists[-1].patch.set(facecolor="black", alpha=0.55, edgecolor="none")


def densest(points, shape, near: float) -> tuple[int, ...]:
    """Per axis, the slice index with the most ``points`` within ``near`` of it (the centre
    when there are none): orthogonal slices through where the picks are."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, len(shape))
    if not len(points):
        return tuple(s // 2 for s in shape)
    at = []
    for axis, size in enumerate(shape):
        counts = np.histogram(points[:, axis], bins=size, range=(-0.5, size - 0.5))[0]
        window = np.convolve(counts, np.ones(2 * int(near) + 1), mode="same")
        ties = np.flatnonzero(window == window.max())
        run = np.split(ties, np.flatnonzero(np.diff(ties) > 1) + 1)[0]  # the first run of best positions:
        at.append(int(run[len(run) // 2]))  # its middle, not its edge
    return tuple(at)


def marker_area(radius: float | None, pixels_across: int, inches: float) -> float:
    """Scatter marker area (points²) of a circle ``radius`` pixels wide on a panel row of
    ``pixels_across`` pixels drawn ``inches`` wide: circles the size of the particles."""
    if radius is None:
        return 60.0
    diameter = 2 * radius * 72 * 0.92 * inches / max(pixels_across, 1)  # 0.92: constrained layout's margins
    return float(np.clip(diameter ** 2, 16, 900))


class Reader:
    """An array face (``shape``, ``[region]``) on a ``read(region)`` callable such as
    ``cryodask.io.volumes.Volume``: orthoslices then reads three slices of an MRC."""

    def __init__(self, read, shape):
        self.read, self.shape = read, tuple(int(s) for s in shape)

    def __getitem__(self, region):
        return self.read(region)


def _as_layers(items, default_label: str, colours) -> list[tuple]:
    """``array`` or ``[(array, label[, colour[, marker]]), ...]`` → ``[(array, label, colour, marker), ...]``."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)) or (len(items) and not isinstance(items[0], tuple)):
        items = [(items, default_label)]
    return [(item[0], item[1], item[2] if len(item) > 2 else colours[i % len(colours)],
             item[3] if len(item) > 3 else "o") for i, item in enumerate(items)]


def orthoslices(volume, out_png, **options) -> Path:
    """Save :func:`orthoslices_figure` as a PNG (``options`` are its keywords).

    Examples
    --------
    >>> orthoslices(np.random.rand(32, 64, 64), "preview.png", points=[[16, 10, 20]])  # doctest: +SKIP
    """
    return _save(orthoslices_figure(volume, **options), out_png)


def orthoslices_figure(volume, *, overlay=None, points=None, title: str | None = None, near: float | None = None,
                       voxel_size: float | None = None, at=None, note: str | None = None,
                       point_size: float = 60) -> Figure:
    """A preview figure: xy, xz and yz slices (through the centre, or ``at``), or the image
    itself if 2D, with masks and picks overlaid, a legend below the images and a scale bar.

    Only the three slices are read, so ``volume`` may be a zarr, dask or memory-mapped
    array (or a :class:`Reader`) of any size. Contrast spans the 1st–99th percentile of
    those slices, so a few hot pixels or a dark edge do not wash the image out.

    Parameters
    ----------
    volume : array (z, y, x) or (y, x)
    overlay : label or mask array of the same shape, drawn semi-transparent (0 = none), or a
        list of ``(array, legend label[, colour])``
    points : (N, 3) z, y, x (or (N, 2) y, x) coordinates, drawn as circles when within
        ``near`` voxels of a slice (default: 2 % of the largest axis, at least 3), or a list
        of ``(points, legend label[, colour[, marker]])``: marker ``"o"`` (a circle of
        ``point_size``, the default) or another matplotlib marker drawn small and filled
    title : figure title (the tomogram's name); note : a second line (shape, counts)
    voxel_size : Å per voxel of ``volume`` along x: draws a scale bar
    at : (z, y, x) slice indices, ``"points"`` for where the first point set is densest
    point_size : marker area (points²), e.g. to match the particle size
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shape = tuple(int(s) for s in volume.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"orthoslices needs a 2D or 3D array, got shape {shape}")
    overlays = _as_layers(overlay, "mask", (OVERLAY_COLOUR, "#3c9bff", "#ff4040"))
    point_sets = [(np.asarray(p, dtype=np.float64).reshape(-1, len(shape)), label, colour, marker)
                  for p, label, colour, marker in _as_layers(points, "picks", POINT_COLOURS)]
    for array, _, _, _ in overlays:
        if tuple(array.shape) != shape:
            raise ValueError(f"overlay shape {tuple(array.shape)} differs from the volume's {shape}")
    near = max(3.0, 0.02 * max(shape)) if near is None else near
    if len(shape) == 2:
        views = [("xy", (slice(None), slice(None)), (1, 0), None)]
    else:
        if isinstance(at, str):
            at = densest(point_sets[0][0] if point_sets else [], shape, near)
        z, y, x = (min(max(int(round(a)), 0), s - 1) for a, s in zip(at, shape)) if at is not None \
            else (s // 2 for s in shape)
        # (name, region, (point axes drawn across, down), (fixed axis, its index))
        views = [(f"xy (z={z})", (z, slice(None), slice(None)), (2, 1), (0, z)),
                 (f"xz (y={y})", (slice(None), y, slice(None)), (2, 0), (1, y)),
                 (f"yz (x={x})", (slice(None), slice(None), x), (0, 1), (2, x))]
    images = [np.asarray(volume[v[1]]) for v in views]
    masks = [[np.asarray(array[v[1]]) for v in views] for array, _, _, _ in overlays]
    if len(shape) == 3:  # yz is shown with z along the horizontal axis, next to xy
        images[2] = images[2].T
        for m in masks:
            m[2] = m[2].T
    factor = max(1, -(-max(shape) // DISPLAY_PIXELS))  # one scale for all panels
    extents = [(-0.5, i.shape[1] // factor * factor - 0.5, i.shape[0] // factor * factor - 0.5, -0.5) for i in images]
    images = [_binned(i.astype(np.float32), factor, np.mean) for i in images]
    masks = [[_binned(m, factor, np.max) for m in ms] for ms in masks]
    vmin, vmax = _contrast(images)

    lines = 1 + bool(note) + 0.5 * (len(overlays) + len(point_sets))
    if len(shape) == 2:
        height, width = shape
        fig = Figure(figsize=(9, 9 * height / width + 0.35 * lines), dpi=100, layout="constrained")
        axes = [fig.add_subplot()]
    else:
        nz, ny, nx = shape
        scale = 8 / (nx + nz)
        fig = Figure(figsize=(8, max(4.0, scale * (ny + nz)) + 0.35 * lines), dpi=100, layout="constrained")
        grid = fig.add_gridspec(2, 2, width_ratios=(nx, nz), height_ratios=(ny, nz))
        axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[0, 1])]
    for i, (ax, (name, _, (across, down), fixed), image, extent) in enumerate(zip(axes, views, images, extents)):
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", extent=extent)
        for ms, (_, _, colour, _) in zip(masks, overlays):
            _overlay(ax, ms[i], extent, colour)
        shown = []
        for coords, _, colour, marker in point_sets:
            close = np.ones(len(coords), bool) if fixed is None else np.abs(coords[:, fixed[0]] - fixed[1]) <= near
            shown.append(int(close.sum()))
            if close.any() and marker == "o":
                ax.scatter(coords[close, across], coords[close, down], s=point_size, facecolors="none",
                           edgecolors=colour, linewidths=1.2)
            elif close.any():
                ax.scatter(coords[close, across], coords[close, down], s=30, marker=marker, color=colour,
                           linewidths=1.2)
        if fixed is not None and point_sets:
            counts = ", ".join(f"{n}/{len(c)}" for n, (c, *_) in zip(shown, point_sets))
            name += f" · {counts} within ±{near:g} vox"
        if fixed is not None:  # a 2D image needs no panel name
            ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        if i == 0 and voxel_size:
            _scale_bar(ax, float(voxel_size), extent[1] - extent[0])
    handles = [Patch(facecolor=colour, alpha=0.6, label=label) for _, label, colour, _ in overlays]
    handles += [Line2D([], [], ls="", marker=marker, markerfacecolor="none" if marker == "o" else colour,
                       markeredgecolor=colour, markersize=9 if marker == "o" else 6, label=label)
                for _, label, colour, marker in point_sets]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=1 if len(shape) == 3 else min(2, len(handles)),
                   fontsize=9, frameon=False)
    if title or note:
        fig.suptitle("\n".join(t for t in (title, note) if t), fontsize=11)
    return fig


def preview_level(arrays, max_pixels: int = DISPLAY_PIXELS) -> int:
    """The finest pyramid level whose largest axis fits in ``max_pixels`` (else the coarsest):
    a preview then reads three slices of at most that size, whatever the tomogram's."""
    return next((i for i, a in enumerate(arrays) if max(a.shape) <= max_pixels), len(arrays) - 1)


def tomogram_preview(store, out_png, *, labels=(), points=None, title: str | None = None, note: str | None = None,
                     radius: float | None = None, at=None, max_pixels: int = DISPLAY_PIXELS) -> Path:
    """Orthoslices of an OME-Zarr tomogram from a coarse pyramid level (:func:`preview_level`),
    its ``labels/<name>`` images at the same level overlaid, and picks given in level-0 voxels.

    labels : ``[(label image name, legend label[, colour]), ...]``; a name may also be the path of
        a mask's own OME-Zarr with the same pyramid (the Portal's layout keeps masks apart)
    points : ``[(z, y, x level-0 voxels, legend label[, colour]), ...]``
    radius : particle radius in level-0 voxels: markers of that size; picks within it of a
        slice are drawn (default: orthoslices' 2 % of the largest axis)
    """
    from .io.omezarr import open_image

    _, arrays, voxel_size, _ = open_image(store)
    level = preview_level(arrays, max_pixels)
    image = arrays[level]
    factor = np.array(image.shape) / np.array(arrays[0].shape)
    step = np.array(voxel_size) / factor
    overlays = []
    for name, label, *colour in labels:
        mask = Path(name) if Path(name).is_absolute() else Path(store) / "labels" / name
        overlays.append((open_image(mask)[1][level], label, *colour))
    # level-0 voxel centres onto the level's grid (its voxel i spans level-0 voxels i/f … (i+1)/f)
    point_sets = [((np.asarray(p, dtype=np.float64).reshape(-1, 3) + 0.5) * factor - 0.5, label, *colour)
                  for p, label, *colour in (points or [])]
    near = None if radius is None else max(1.0, radius * factor.min())
    size = marker_area(None if radius is None else radius * factor.min(), image.shape[2] + image.shape[0], 8)
    note = "\n".join(t for t in (note, f"level {level} of {len(arrays)} ({step[2]:g} Å/voxel), "
                                     f"{'×'.join(map(str, arrays[0].shape[::-1]))} voxels (x×y×z)") if t)
    return orthoslices(image, out_png, overlay=overlays or None, points=point_sets or None, title=title, note=note,
                       voxel_size=float(step[2]), near=near, at=at, point_size=size)


def membranes_preview(store, label: str, out_png, *, name: str, method: str, fraction: float | None = None) -> Path:
    """``<stem>_<method>_preview.png`` of ``membranes``: the mask ``labels/<label>`` (or the mask
    store at the absolute path ``label``) over the tomogram, with the marked voxels counted
    (``fraction`` of level 0, as measured by the run)."""
    from .io.omezarr import open_image

    shape = open_image(store)[1][0].shape
    total = int(np.prod(shape))
    counted = "" if fraction is None else f": {round(fraction * total):,} voxels ({100 * fraction:.2f} %)"
    return tomogram_preview(store, out_png, labels=[(label, f"membrane mask ({method}){counted}")],
                            title=f"{name} — membranes ({method})")


def picks_preview(read, shape, out_png, points, *, name: str, method: str, voxel_size: float,
                  radius: float | None = None) -> Path:
    """``<stem>_<method>_picks.png`` of ``pick``: picks (z, y, x level-0 voxels) on slices through
    where they are densest, each drawn on the slices it is within ``radius`` voxels of. ``read``
    (a ``cryodask.io.volumes.Volume``): level 0 of an OME-Zarr is swapped for a coarse level
    of it; an MRC/TIFF is read three slices only."""
    from .io.volumes import is_zarr

    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    label = f"{method} picks: {len(points)}"
    title = f"{name} — {len(points)} particles ({method})"
    store = Path(read.array).parent if getattr(read, "array", None) else None
    if store is not None and is_zarr(store) and (store / "0").exists():
        return tomogram_preview(store, out_png, points=[(points, label)], title=title, radius=radius, at="points")
    shape = tuple(int(s) for s in shape)
    size = marker_area(radius, shape[2] + shape[0], 8)
    return orthoslices(Reader(read, shape), out_png, points=[(points, label)], title=title, at="points",
                       near=None if radius is None else max(1.0, radius), voxel_size=float(voxel_size),
                       note=f"{'×'.join(map(str, shape[::-1]))} voxels (x×y×z), {float(voxel_size):g} Å/voxel",
                       point_size=size)


def micrograph_preview(image, out_png, *, points=None, overlay=None, pixel_size: float | None = None,
                       title: str | None = None, note: str | None = None, radius: float | None = None) -> Path:
    """A micrograph (binned for display to about 1000 px) with masks and picks overlaid, a legend
    below it and a scale bar when ``pixel_size`` (Å per pixel of ``image``) is known.

    points : ``[(y, x pixels of image, legend label[, colour]), ...]``; overlay : ``[(mask of
    image's shape, legend label[, colour]), ...]``; radius : particle radius (pixels) for the
    circles' size. Written through a ``.partial`` file, so a reader never sees half a PNG.
    """
    out_png = Path(out_png)
    size = marker_area(radius, np.shape(image)[1], 9)
    if not pixel_size:
        note = ", ".join(t for t in (note, "pixel size unknown: no scale bar") if t)
    with atomic_write(out_png) as partial:
        orthoslices(image, partial, overlay=overlay, points=points, title=title, note=note, voxel_size=pixel_size,
                    point_size=size)
    return out_png
