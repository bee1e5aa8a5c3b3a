"""PNG figures: PR curves, picking scores against the radius, and orthoslice previews.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through ``pyplot``: no global state, no display needed, safe to call from worker threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=fig.dpi)
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


def _overlay(ax, labels, extent) -> None:
    """Masks in one colour; label images with a colour per id (cycling through 20)."""
    labels = np.asarray(labels)
    if not labels.any():
        return
    binary = labels.max() <= 1
    values = np.ma.masked_where(labels == 0, np.ones(labels.shape) if binary else labels % 20)
    ax.imshow(values, cmap="autumn" if binary else "tab20", vmin=0, vmax=1 if binary else 19,
              alpha=0.45, interpolation="nearest", extent=extent)


def orthoslices(volume, out_png, *, overlay=None, points=None, title: str | None = None,
                near: float | None = None) -> Path:
    """Save a preview PNG: central xy, xz and yz slices, or the image itself if 2D.

    Only the three slices are read, so ``volume`` may be a zarr, dask or memory-mapped
    array of any size. Contrast spans the 1st–99th percentile of those slices.

    Parameters
    ----------
    volume : array (z, y, x) or (y, x)
    out_png : path of the PNG to write
    overlay : label or mask array of the same shape, drawn semi-transparent (0 = none)
    points : (N, 3) z, y, x (or (N, 2) y, x) coordinates, drawn as circles when within
        ``near`` voxels of a slice (default: 2 % of the largest axis, at least 3)
    title : figure title

    Examples
    --------
    >>> orthoslices(np.random.rand(32, 64, 64), "preview.png", points=[[16, 10, 20]])  # doctest: +SKIP
    """
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"orthoslices needs a 2D or 3D array, got shape {shape}")
    if overlay is not None and tuple(overlay.shape) != shape:
        raise ValueError(f"overlay shape {tuple(overlay.shape)} differs from the volume's {shape}")
    points = None if points is None else np.asarray(points, dtype=np.float64).reshape(-1, len(shape))
    near = max(3.0, 0.02 * max(shape)) if near is None else near
    if len(shape) == 2:
        views = [("xy", (slice(None), slice(None)), (1, 0), None)]
    else:
        z, y, x = (s // 2 for s in shape)
        # (name, region, (point axes drawn across, down), (fixed axis, its index))
        views = [(f"xy (z={z})", (z, slice(None), slice(None)), (2, 1), (0, z)),
                 (f"xz (y={y})", (slice(None), y, slice(None)), (2, 0), (1, y)),
                 (f"yz (x={x})", (slice(None), slice(None), x), (0, 1), (2, x))]
    images = [np.asarray(volume[v[1]]) for v in views]
    masks = [None] * len(views) if overlay is None else [np.asarray(overlay[v[1]]) for v in views]
    if len(shape) == 3:  # yz is shown with z along the horizontal axis, next to xy
        images[2] = images[2].T
        masks[2] = None if masks[2] is None else masks[2].T
    factor = max(1, -(-max(shape) // DISPLAY_PIXELS))  # one scale for all panels
    extents = [(-0.5, i.shape[1] // factor * factor - 0.5, i.shape[0] // factor * factor - 0.5, -0.5) for i in images]
    images = [_binned(i.astype(np.float32), factor, np.mean) for i in images]
    masks = [None if m is None else _binned(m, factor, np.max) for m in masks]
    vmin, vmax = _contrast(images)

    if len(shape) == 2:
        height, width = shape
        fig = Figure(figsize=(7, 7 * height / width + 0.4), dpi=100, layout="constrained")
        axes = [fig.add_subplot()]
    else:
        nz, ny, nx = shape
        scale = 8 / (nx + nz)
        fig = Figure(figsize=(8, scale * (ny + nz) + 0.6), dpi=100, layout="constrained")
        grid = fig.add_gridspec(2, 2, width_ratios=(nx, nz), height_ratios=(ny, nz))
        axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[0, 1])]
    for ax, (name, _, (across, down), fixed), image, mask, extent in zip(axes, views, images, masks, extents):
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", extent=extent)
        if mask is not None:
            _overlay(ax, mask, extent)
        if points is not None and len(points):
            close = np.ones(len(points), bool) if fixed is None else np.abs(points[:, fixed[0]] - fixed[1]) <= near
            ax.scatter(points[close, across], points[close, down], s=60, facecolors="none", edgecolors="cyan",
                       linewidths=1)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)
