"""The README's first command: every step that exists, end to end, on built-in synthetic data.

Synthesises a small collection with ground truth, converts it on the cluster, stores the
truth as OME-Zarr label images (so napari shows them as overlays), round-trips image and
labels back through MRC export and scores them with the evaluation code, cleans a speckled
copy of the membrane truth with ``postprocess`` (ETSAM's component filter) and scores it
before and after, and writes PNG previews. Segmentation and picking methods add their rows as they land; the demo is
resumable like every step (a rerun skips finished tomograms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class DemoResult:
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _synthesise(data: Path, tomograms: int, shape, voxel_size: float) -> tuple[list[dict], dict]:
    from .synth import synth_micrograph, synth_tomogram, write_micrograph, write_tomogram

    data.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(tomograms):
        path = data / f"tomo_{i:02d}.mrc"
        paths = {"tomogram": path, "membranes": data / f"tomo_{i:02d}_membranes.mrc",
                 "particles": data / f"tomo_{i:02d}_particles.star"}
        if not all(p.exists() for p in paths.values()):  # same seed, same data: keep it for resuming
            paths = write_tomogram(path, synth_tomogram(shape, voxel_size=voxel_size, seed=i))
        written.append(paths)
    micrograph = data / "micrograph.mrc"
    micrograph_paths = {"micrograph": micrograph, "mask": data / "micrograph_mask.mrc",
                        "particles": data / "micrograph_particles.star"}
    if not all(p.exists() for p in micrograph_paths.values()):
        micrograph_paths = write_micrograph(micrograph, synth_micrograph((512, 512), seed=0))
    return written, micrograph_paths


def _with_specks(mask: np.ndarray, seed: int) -> np.ndarray:
    """The mask plus small blobs a few slices thick: the false positives a segmentation makes."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    seeds = rng.random(mask.shape) < 4e-4
    return (mask.astype(bool) | ndimage.binary_dilation(seeds, iterations=2)).astype(np.uint8)


def run_demo(out="cryodask-demo", *, tomograms: int = 3, shape=(64, 128, 128), voxel_size: float = 10.0,
             client=None, progress: bool = False) -> DemoResult:
    """Run the demo into ``out``; returns one summary row per tomogram and the files written.

    >>> result = run_demo("cryodask-demo", tomograms=2)  # doctest: +SKIP
    >>> [row["labels dice"] for row in result.rows]     # doctest: +SKIP
    [1.0, 1.0]
    """
    from .convert import convert
    from .evaluate import evaluate_membranes
    from .export import export
    from .io.mrc import read_region
    from .io.omezarr import open_image, write_labels
    from .io.picks import read_picks
    from .io.mrc import write_mrc
    from .io.volumes import open_volume
    from .postprocess.pipeline import postprocess
    from .viz import orthoslices

    out = Path(out)
    result = DemoResult()
    clock = time.perf_counter()
    truth, micrograph = _synthesise(out / "data", tomograms, shape, voxel_size)
    result.seconds["synthesise"] = time.perf_counter() - clock

    clock = time.perf_counter()
    report = convert([t["tomogram"] for t in truth], out / "zarr", chunks=(32, 64, 64), levels=3,
                     client=client, progress=progress)
    result.seconds["convert"] = time.perf_counter() - clock
    failed = [r.message for r in report.failed]
    if failed:
        from .errors import CryodaskError

        raise CryodaskError("demo conversion failed: " + "; ".join(failed))

    clock = time.perf_counter()
    for paths, converted in zip(truth, report.results):
        stem = paths["tomogram"].stem
        store = Path(converted.store)
        membranes = np.asarray(read_region(paths["membranes"], np.s_[:, :, :]))
        write_labels(store, "truth_membranes", membranes.astype(np.uint32), colors={1: [255, 200, 0, 255]},
                     properties=[{"label-value": 1, "class": "membrane (ground truth)"}])
        exports = out / "exports"
        exports.mkdir(exist_ok=True)
        image_back = export(store, exports / f"{stem}.mrc")
        labels_back = export(store, exports / f"{stem}_truth_membranes.mrc", labels="truth_membranes")
        source = open_volume(paths["tomogram"])
        exact = np.array_equal(read_region(image_back, np.s_[:, :, :]), read_region(paths["tomogram"], np.s_[:, :, :]))
        scores = evaluate_membranes(labels_back, paths["membranes"], out=out / "evaluation" / stem)
        # a segmentation with false-positive specks, cleaned by ETSAM's component filter
        noisy_path = write_mrc(exports / f"{stem}_noisy_membranes.mrc", _with_specks(membranes, seed=len(result.rows)),
                               source.voxel_size)
        post = postprocess(noisy_path, exports / f"{stem}_postprocessed.mrc", min_slices=10, chunks=(32, 64, 64),
                           client=client)
        noisy = evaluate_membranes(noisy_path, paths["membranes"], out=out / "evaluation" / stem / "noisy")
        cleaned = evaluate_membranes(post.out, paths["membranes"], out=out / "evaluation" / stem / "postprocessed")
        picks = read_picks(paths["particles"])
        kinds = picks.table["rlnClassNumber"].value_counts().sort_index()
        _, arrays, _, _ = open_image(store)
        _, label_arrays, _, _ = open_image(store / "labels" / "truth_membranes")
        preview = orthoslices(arrays[0], out / "previews" / f"{stem}.png", overlay=label_arrays[0],
                              points=picks.coords, title=f"{stem}: membranes (truth) and particles")
        result.files += [store, preview, *scores["files"]]
        result.rows.append({
            "tomogram": stem, "shape": "x".join(map(str, source.shape)), "voxel Å": source.voxel_size[0],
            "convert": converted.status, "MB": round(converted.nbytes / 1e6, 1),
            "membrane %": round(100 * float(membranes.mean()), 2),
            "particles": ", ".join(f"kind {k}: {n}" for k, n in kinds.items()),
            "level-0 exact": exact, "labels dice": round(scores["dice"], 4),
            "noisy dice": round(noisy["dice"], 3), "postprocessed dice": round(cleaned["dice"], 3),
        })
    mic = read_picks(micrograph["particles"])
    image = read_region(micrograph["micrograph"], np.s_[:, :])
    result.files.append(orthoslices(image, out / "previews" / "micrograph.png",
                                    overlay=read_region(micrograph["mask"], np.s_[:, :]),
                                    points=mic.coords, title="micrograph: particles (truth)"))
    result.seconds["labels, export, evaluate, previews"] = time.perf_counter() - clock
    return result
