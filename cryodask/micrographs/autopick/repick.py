"""Re-pick micrographs with a trained Autopick-BC model: a sliding window over every micrograph.

One task per micrograph: the worker loads the model once, bins the micrograph, scores every
window of a grid (stride ``stride`` px) in batches, and keeps the windows scoring at least
``threshold`` after greedy NMS at ``radius`` as ``<name>_true.star``; the rejected windows,
thinned by NMS from the least particle-like up, go to ``<name>_false.star``; both carry the
score as ``rlnAutopickFigureOfMerit``. ``<name>_picks.png`` shows the picks over the binned
micrograph. Autopick-BC does the same through ``grid.star`` files and RELION extraction, on a
quincunx of pitch box/2 and without NMS.

Each output is written atomically, then a record under ``<out>/.cryodask/autopick-repick/``
with the hash of the model, the micrograph and the parameters: a rerun skips a micrograph whose
record matches and whose files exist, and redoes it after a retrained model or a new parameter
(``overwrite`` redoes everything).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...io.folders import atomic_write
from ...params import file_identity, params_hash

CUT = 4096  # windows cut and held at once per micrograph (4096 × 54² float32 = 48 MB)


@dataclass(frozen=True)
class RepickParams:
    """stride : grid step in original pixels (default box/4: the nearest window centre is then
        at most box/(4√2) ≈ 0.35 particle radius from any particle, for a box twice the
        particle diameter, within what a classifier trained on centred windows accepts).
    threshold : lowest score of a true pick.
    radius : NMS distance in original pixels (default box/2: the particle diameter for a box
        twice the diameter, the closest two particle centres can be).
    batch : windows per forward pass. 16 on a CPU: the first layer's activations take
        390 kB per 54 px window, and tensors past glibc's mmap threshold (32 MB, batch ≥ 64)
        are mapped and page-faulted afresh on every call: measured 1.7× slower (batch 64).
    overlay_false : also draw the false picks (red) in the PNG.
    margin : least distance of a pick from the image border in original pixels (default
        box/2: a window centred nearer reaches past the image, where the mirrored border
        makes particle-like texture); 0 keeps every window.
    Pixels are the model's (its box's): a micrograph at another pixel size is rescaled first.
    """

    stride: float | None = None
    threshold: float = 0.5
    radius: float | None = None
    batch: int = 16
    overlay_false: bool = False
    margin: float | None = None

    def __post_init__(self):
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin >= 0):
            raise InputError(f"--margin must be a number of pixels ≥ 0, got {self.margin}")
        for name, value in (("--stride", self.stride), ("--radius", self.radius)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number of pixels, got {value}")
        if not 0 <= self.threshold <= 1:
            raise InputError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.batch < 1:
            raise InputError(f"--batch must be ≥ 1, got {self.batch}")

    def resolved(self, box_size: int) -> RepickParams:
        """The defaults filled in from the model's box size."""
        return RepickParams(self.stride or box_size / 4, self.threshold, self.radius or box_size / 2, self.batch,
                            self.overlay_false, box_size / 2 if self.margin is None else self.margin)


STEP = "autopick-repick"


def output_paths(out: Path, name: str) -> dict[str, Path]:
    return {"true": out / f"{name}_true.star", "false": out / f"{name}_false.star", "png": out / f"{name}_picks.png"}


def _record(out: Path, name: str) -> Path:
    return out / ".cryodask" / STEP / f"{name}.key"


def is_done(out: Path, name: str, key: str) -> bool:
    record = _record(out, name)
    return (record.is_file() and record.read_text() == key
            and all(f.exists() for f in output_paths(out, name).values()))


def score_grid(net, binned: np.ndarray, window: int, stride: float, batch: int, device: str = "cpu"):
    """Window centres (binned pixels) of the sliding grid and their scores."""
    from .score import score_windows
    from .windows import WindowCutter, grid_centres

    centres = grid_centres(binned.shape, stride)
    cutter = WindowCutter(binned, window)
    scores = np.concatenate([score_windows(net, cutter.cut(centres[i:i + CUT]), batch, device)
                             for i in range(0, len(centres), CUT)] or [np.empty(0, np.float32)])
    return centres, scores


def split_picks(centres, scores, threshold: float, radius: float):
    """``(true, false)`` index arrays into ``centres``: at or above ``threshold`` after NMS
    (best first), and below it after NMS (least particle-like first)."""
    from .nms import nms_points

    above = np.flatnonzero(scores >= threshold)
    below = np.flatnonzero(scores < threshold)
    return (above[nms_points(centres[above], scores[above], radius)],
            below[nms_points(centres[below], scores[below], radius, highest_first=False)])


def overlay_png(binned: np.ndarray, out_png: Path, true_centres, radius: float, false_centres=None, *,
                name: str = "", pixel_size: float | None = None, threshold: float = 0.5) -> Path:
    """The binned micrograph (1–99 % contrast) with green circles at ``true_centres`` and red
    ones at ``false_centres`` (binned pixels, radius in binned pixels), a title, a legend with
    the counts and a scale bar (``pixel_size``: Å per binned pixel), written atomically."""
    from ...viz import micrograph_preview

    points = [(np.reshape(true_centres, (-1, 2)), f"picks (score ≥ {threshold:g}): {len(true_centres)}", "#3cff3c")]
    if false_centres is not None:
        points.insert(0, (np.reshape(false_centres, (-1, 2)), f"rejected (score < {threshold:g}): {len(false_centres)}",
                          "#ff3c3c"))
    height, width = binned.shape
    return micrograph_preview(binned, out_png, points=points, pixel_size=pixel_size, radius=radius,
                              title=f"{name} — {len(true_centres)} particles (Autopick-BC re-pick)".lstrip(" —"),
                              note=f"{width}×{height} px shown" + (f", {pixel_size:g} Å/px" if pixel_size else ""))


def inside(centres, shape, margin: float) -> np.ndarray:
    """Indices of the (row, col) centres at least ``margin`` from every edge of ``shape``
    (pixel centres at integers: the edges are at −0.5 and n − 0.5)."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    low, high = margin - 0.5, np.array(shape) - 0.5 - margin
    return np.flatnonzero(np.all((centres >= low) & (centres <= high), axis=1))


def repick_micrograph(path, key: str, model_dir, out, params: RepickParams, *, flip_y: bool = False,
                      device: str = "auto", pixel_size: float | None = None) -> dict:
    """Re-pick one micrograph (a worker task); returns its counts and timing."""
    from ...io.micrographs import micrograph_name
    from ...io.particles import write_particles_star
    from ...report import stage
    from ...models.sam2 import pick_device
    from .score import cached_model, heap_kept, use_worker_threads
    from .windows import from_model, model_micrograph, to_original

    path, out = Path(path), Path(out)
    name = micrograph_name(path)
    files = output_paths(out, name)
    clock = time.perf_counter()
    use_worker_threads()
    device = pick_device(device)
    net, config = cached_model(model_dir, device)
    params = params.resolved(config.box_size)
    with stage("read", block=path.name, bytes_read=path.stat().st_size):
        micrograph, binned, scale = model_micrograph(path, config.bin, config.pixel_size, pixel_size)
    with stage("infer", block=path.name), heap_kept():
        centres, scores = score_grid(net, binned, config.window, params.stride / config.bin, params.batch, device)
    with stage("post-process", block=path.name):
        kept = inside(to_original(centres, config.bin), np.array(micrograph.image.shape) * scale, params.margin)
        centres, scores = centres[kept], scores[kept]
        true, false = split_picks(to_original(centres, config.bin), scores, params.threshold, params.radius)
        original = from_model(to_original(centres, config.bin), scale)
    with stage("write", block=path.name) as written:
        shape = {str(path): micrograph.image.shape}
        overlay_png(binned, files["png"], centres[true], params.radius / 2 / config.bin,
                    centres[false] if params.overlay_false else None, name=name, threshold=params.threshold,
                    pixel_size=micrograph.pixel_size / scale[0] * config.bin if micrograph.pixel_size else None)
        for kind, index in (("false", false), ("true", true)):
            write_particles_star(files[kind], {str(path): original[index]}, scores={str(path): scores[index]},
                                 pixel_size=micrograph.pixel_size, shapes=shape, flip_y=flip_y)
        written.bytes_written = sum(f.stat().st_size for f in files.values())
    record = _record(out, name)
    record.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(record) as partial:  # last: the files above are complete
        partial.write_text(key)
    return {"name": name, "status": "picked", "windows": len(scores), "true": len(true), "false": len(false),
            "scale": float(scale[0]), "seconds": time.perf_counter() - clock}


@dataclass
class RepickReport:
    results: list[dict]
    seconds: float

    @property
    def picked(self) -> list[dict]:
        return [r for r in self.results if r["status"] == "picked"]


def repick(micrographs, model_dir, out, *, params: RepickParams | None = None, flip_y: bool = False,
           overwrite: bool = False, device: str = "auto", client=None,
           pixel_size: float | None = None) -> RepickReport:
    """Sliding-window re-picking of every micrograph with the model in ``model_dir``.

    Parameters
    ----------
    micrographs : files, folders, globs or a micrographs STAR.
    model_dir : a folder written by :func:`cryodask.micrographs.autopick.train.train`.
    out : output folder: ``<name>_true.star``, ``<name>_false.star``, ``<name>_picks.png``.
    params : :class:`RepickParams` (stride, threshold, NMS radius, batch).
    flip_y : write y counted from the bottom of the image.
    client : ``distributed.Client``: one task per micrograph; None runs them here.
    pixel_size : Å/px of the micrographs (overrides their headers). Micrographs at another
        pixel size than the model's are resampled to it on the workers and the picks mapped back.

    Examples
    --------
    >>> report = repick("mics/", "model/", "picks/")  # doctest: +SKIP
    >>> sum(r["true"] for r in report.picked)         # doctest: +SKIP
    """
    from ...io.folders import check_output_dir
    from .inputs import micrograph_set
    from .score import MODEL_FILE, check_model
    from .tasks import map_micrographs

    clock = time.perf_counter()
    params = params or RepickParams()
    check_model(model_dir)
    mics = micrograph_set(micrographs)
    out = check_output_dir(out).resolve()
    model = file_identity(Path(model_dir) / MODEL_FILE)
    items, skipped = [], []
    for name in mics.names:
        key = params_hash({"params": asdict(params), "flip_y": flip_y, "model": model, "pixel_size": pixel_size,
                           "micrograph": file_identity(mics.paths[name])})
        if not overwrite and is_done(out, name, key):
            skipped.append({"name": name, "status": "skipped"})
        else:
            items.append((mics.paths[name], key))
    results = map_micrographs(client, repick_micrograph, items, STEP, model_dir=str(Path(model_dir).resolve()),
                              out=str(out), params=params, flip_y=flip_y, device=device, pixel_size=pixel_size)
    return RepickReport(skipped + results, time.perf_counter() - clock)
