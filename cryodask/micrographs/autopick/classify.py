"""Score existing picks with a trained Autopick-BC model and split them into true and false.

This is Autopick-BC's ``gen_picks.py`` without the RELION extraction: the windows are cut
from the micrographs in memory, one task per micrograph. For one STAR file of many
micrographs the outputs are ``<star stem>_true.star`` and ``<star stem>_false.star``: the
input's blocks (optics included) and its original rows, split by score, with the score in
``rlnAutopickFigureOfMerit`` (an existing column of that name is replaced, so RELION's
extraction can threshold on it). For per-micrograph coordinate files (a folder of ``.box``
files, ...) they are ``<name>_true.star`` / ``<name>_false.star`` per micrograph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputError
from ...io.folders import atomic_write

SCORE = "rlnAutopickFigureOfMerit"


def _score_task(path, centres, model_dir, batch: int, device: str, pixel_size: float | None = None) -> np.ndarray:
    from ...report import stage
    from ...models.sam2 import pick_device
    from .score import cached_model, heap_kept, score_windows, use_worker_threads
    from .windows import WindowCutter, model_micrograph, to_binned, to_model

    use_worker_threads()
    device = pick_device(device)
    net, config = cached_model(model_dir, device)
    block = Path(path).name
    with stage("read", block=block, bytes_read=Path(path).stat().st_size):
        _, binned, scale = model_micrograph(path, config.bin, config.pixel_size, pixel_size)
    with stage("preprocess", block=block):
        windows = WindowCutter(binned, config.window).cut(to_binned(to_model(centres, scale), config.bin))
    with stage("infer", block=block), heap_kept():
        return score_windows(net, windows, batch, device)


def score_picks(mics, centres: dict[str, np.ndarray], model_dir, *, batch: int = 16, device: str = "auto",
                client=None, pixel_size: float | None = None) -> dict[str, np.ndarray]:
    """P(particle) of every centre, per micrograph name (one task per micrograph); micrographs
    at another pixel size than the model's are resampled to it first."""
    from .tasks import map_micrographs

    names = [n for n in mics.names if len(centres.get(n, ()))]
    scores = map_micrographs(client, _score_task, [(mics.paths[n], centres[n]) for n in names], "autopick-classify",
                             model_dir=str(Path(model_dir).resolve()), batch=batch, device=device,
                             pixel_size=pixel_size)
    out = {n: np.empty(0, np.float32) for n in mics.names}
    out.update(zip(names, scores))
    return out


@dataclass
class ClassifyResult:
    centres: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    files: list[Path]
    seconds: float
    threshold: float = 0.5

    @property
    def counts(self) -> dict[str, int]:
        values = np.concatenate(list(self.scores.values()) or [np.empty(0)])
        return {"true": int((values >= self.threshold).sum()), "false": int((values < self.threshold).sum())}


def _star_blocks(path: Path) -> tuple[dict, str] | None:
    """The blocks of a STAR whose particle table lists ``rlnMicrographName``, and that table's key."""
    import starfile

    if not (path.is_file() and path.suffix.lower() == ".star"):
        return None
    blocks = starfile.read(path, always_dict=True)
    key = next((k for k, t in blocks.items() if isinstance(t, pd.DataFrame)
                and {"rlnCoordinateX", "rlnCoordinateY", "rlnMicrographName"} <= set(t.columns)), None)
    return (blocks, key) if key is not None else None


def _atomic_star(path: Path, blocks: dict) -> Path:
    import starfile

    with atomic_write(path) as partial:
        starfile.write(blocks, partial, overwrite=True)
    return path


def _split_star(source: Path, blocks: dict, key: str, scores: dict, threshold: float, out: Path) -> list[Path]:
    """The input STAR's rows split by score (``read_particles`` gives each micrograph's centres
    in row order, so the scores line up with the rows of that micrograph)."""
    table = blocks[key]
    stems = np.array([Path(str(n)).stem for n in table["rlnMicrographName"]])
    row_scores = np.full(len(table), np.nan)
    for name, values in scores.items():
        row_scores[np.flatnonzero(stems == name)] = values
    table = table.assign(**{SCORE: row_scores})
    files = []
    for kind, rows in (("true", row_scores >= threshold), ("false", row_scores < threshold)):
        files.append(_atomic_star(out / f"{source.stem}_{kind}.star",
                                  {**blocks, key: table[rows].reset_index(drop=True)}))
    return files


def classify(micrographs, model_dir, particles, out, *, threshold: float = 0.5, flip_y: bool = False,
             batch: int = 16, device: str = "auto", client=None, pixel_size: float | None = None) -> ClassifyResult:
    """Score the picks in ``particles`` and write them, split at ``threshold``, to ``out``.

    Parameters
    ----------
    micrographs : files, folders, globs or a micrographs STAR.
    model_dir : a folder written by :func:`cryodask.micrographs.autopick.train.train`.
    particles : a particles STAR (RELION 3.0 / 3.1+, rows grouped by ``rlnMicrographName``),
        or per-micrograph coordinate files (a folder or glob of ``.box``, ``.star``, ...).
    out : output folder.
    flip_y : the coordinates count y from the bottom of the image.
    pixel_size : Å/px of the micrographs (overrides their headers; see ``score_picks``).

    Examples
    --------
    >>> result = classify("mics/", "model/", "Select/job010/particles.star", "split/")  # doctest: +SKIP
    >>> result.counts                                                                   # doctest: +SKIP
    """
    from ...io.folders import check_output_dir
    from ...io.particles import write_particles_star
    from .inputs import micrograph_set, read_centres
    from .score import check_model, header_pixel_size

    clock = time.perf_counter()
    if not 0 <= threshold <= 1:
        raise InputError(f"--threshold must be between 0 and 1, got {threshold}")
    check_model(model_dir)
    mics = micrograph_set(micrographs)
    centres = read_centres(particles, mics, flip_y=flip_y)
    star = _star_blocks(Path(particles))
    out = check_output_dir(out)
    scores = score_picks(mics, centres, model_dir, batch=batch, device=device, client=client, pixel_size=pixel_size)
    if star is not None:
        files = _split_star(Path(particles), *star, scores, threshold, out)
    else:
        files = []
        for name in mics.names:
            if not len(centres[name]):
                continue
            path = mics.paths[name]
            keep = scores[name] >= threshold
            for kind, rows in (("true", keep), ("false", ~keep)):
                files.append(write_particles_star(
                    out / f"{name}_{kind}.star", {str(path): centres[name][rows]},
                    scores={str(path): scores[name][rows]},
                    pixel_size=pixel_size or header_pixel_size(path), shapes={str(path): mics.shapes[name]},
                    flip_y=flip_y))
    return ClassifyResult(centres, scores, files, time.perf_counter() - clock, threshold)
