"""The README's first command: every step that exists, end to end, on built-in synthetic data.

Synthesises a small collection with ground truth, converts it on the cluster, stores the
truth as OME-Zarr label images (so napari shows them as overlays), round-trips image and
labels back through MRC export, segments the membranes with the classical sheet filter (no
weights) and post-processes them with ETSAM's component filter, picks the large particles
with the LoG picker, scores all of it against the truth (Dice, F1) and writes PNG previews.
Then the micrograph methods, trained on three synthetic micrographs and scored on a fourth:
Autopick-BC (train from good/bad boxes, sliding-window re-pick) and CRISP (U-Net + Dice from
the particle coordinates, dense-CRF refinement, particles from the mask); these need torch
(``deploy/install.sh .venv micrographs``) and are skipped without it.
The demo is resumable like every step (a rerun skips finished tomograms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


MICROGRAPH_SHAPE, MICROGRAPH_DIAMETER = (384, 384), 40  # px; small enough to train in seconds on a laptop


@dataclass
class DemoResult:
    rows: list[dict] = field(default_factory=list)
    micrograph_rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _synthesise(data: Path, tomograms: int, shape, voxel_size: float) -> tuple[list[dict], dict]:
    from .synth import synth_micrograph, synth_tomogram, write_micrograph, write_tomogram

    data.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(tomograms):
        path = data / f"tomo_{i:02d}.mrc"
        paths = {"tomogram": path, "membranes": data / "truth" / f"tomo_{i:02d}_membranes.mrc",
                 "particles": data / "truth" / f"tomo_{i:02d}_particles.star"}
        if not all(p.exists() for p in paths.values()):  # same seed, same data: keep it for resuming
            paths = write_tomogram(path, synth_tomogram(shape, voxel_size=voxel_size, seed=i))
        written.append(paths)
    micrograph = data / "micrograph.mrc"
    micrograph_paths = {"micrograph": micrograph, "mask": data / "truth" / "micrograph_mask.mrc",
                        "particles": data / "truth" / "micrograph_particles.star"}
    if not all(p.exists() for p in micrograph_paths.values()):
        micrograph_paths = write_micrograph(micrograph, synth_micrograph((512, 512), seed=0))
    return written, micrograph_paths


def run_demo(out="cryodask-demo", *, tomograms: int = 3, shape=(64, 128, 128), voxel_size: float = 10.0,
             client=None, progress: bool = False) -> DemoResult:
    """Run the demo into ``out``; returns one summary row per tomogram and the files written.

    >>> result = run_demo("cryodask-demo", tomograms=2)  # doctest: +SKIP
    >>> [row["membranes dice"] for row in result.rows]  # doctest: +SKIP
    """
    from .convert import ConvertParams, convert
    from .evaluate import evaluate_membranes, evaluate_picks
    from .export import export
    from .io.mrc import read_region
    from .io.omezarr import write_labels
    from .io.picks import read_picks, write_picks
    from .io.volumes import open_volume
    from .membranes.pipeline import ClassicalParams, MembraneParams, segment
    from .picking.pipeline import LogParams, pick
    from .viz import tomogram_preview

    out = Path(out)
    result = DemoResult()
    clock = time.perf_counter()
    truth, micrograph = _synthesise(out / "data", tomograms, shape, voxel_size)
    result.seconds["synthesise"] = time.perf_counter() - clock

    clock = time.perf_counter()
    report = convert([t["tomogram"] for t in truth], out / "zarr", ConvertParams(chunks=(32, 64, 64), levels=3),
                     client=client, progress=progress)
    result.seconds["convert"] = time.perf_counter() - clock
    failed = [r.message for r in report.failed]
    if failed:
        from .errors import CryodaskError

        raise CryodaskError("demo conversion failed: " + "; ".join(failed))

    clock = time.perf_counter()
    membranes = segment([r.store for r in report.results], out / "membranes",
                        MembraneParams(ClassicalParams(), post_process=True, min_slices=10), client=client)
    failed = [r.message for r in membranes.failed]
    if failed:
        from .errors import CryodaskError

        raise CryodaskError("demo membrane segmentation failed: " + "; ".join(failed))
    result.seconds["membranes (classical)"] = time.perf_counter() - clock

    clock = time.perf_counter()
    for paths, converted in zip(truth, report.results):
        stem = paths["tomogram"].stem
        store = Path(converted.store)
        truth_mask = np.asarray(read_region(paths["membranes"], np.s_[:, :, :]))
        write_labels(store, "truth_membranes", truth_mask.astype(np.uint32), colors={1: [255, 200, 0, 255]},
                     properties=[{"label-value": 1, "class": "membrane (ground truth)"}])
        exports = out / "exports"
        exports.mkdir(exist_ok=True)
        image_back = export(store, exports / f"{stem}.mrc")
        labels_back = export(store, exports / f"{stem}_truth_membranes.mrc", labels="truth_membranes")
        source = open_volume(paths["tomogram"])
        exact = np.array_equal(read_region(image_back, np.s_[:, :, :]), read_region(paths["tomogram"], np.s_[:, :, :]))
        scores = evaluate_membranes(labels_back, paths["membranes"], out=out / "evaluation" / stem)
        predicted = out / "membranes" / f"{stem}_classical_predicted_mask.mrc"
        cleaned_path = out / "membranes" / f"{stem}_classical_predicted_post_processed_mask.mrc"
        raw = evaluate_membranes(predicted, paths["membranes"], out=out / "evaluation" / stem / "classical")
        cleaned = evaluate_membranes(cleaned_path, paths["membranes"],
                                     out=out / "evaluation" / stem / "classical_post_processed")
        picks = read_picks(paths["particles"])
        kinds = picks.table["rlnClassNumber"].value_counts().sort_index()
        large = picks.coords[picks.table["rlnClassNumber"].to_numpy() == 1]
        write_picks(out / "evaluation" / stem / "truth_large.star", large)
        picked = pick(paths["tomogram"], out / "picks", LogParams(diameter=250.0), client=client)
        picking = evaluate_picks(out / "picks" / f"{stem}_log_picks.star",
                                 out / "evaluation" / stem / "truth_large.star",
                                 radius=125.0, unit="angstrom", voxel_size=voxel_size,
                                 out=out / "evaluation" / stem / "log_picks")
        preview = tomogram_preview(
            store, out / "previews" / f"{stem}.png",
            labels=[("classical_predicted_post_processed_mask", f"membranes (classical, post-processed): "
                     f"Dice {cleaned['dice']:.2f}")],
            points=[(picked.picks[["z", "y", "x"]].to_numpy(), f"LoG picks: {len(picked.picks)} "
                     f"(F1 {picking['f1']:.2f})"), (large, f"large particles (truth): {len(large)}", "#ffe135", "+")],
            radius=125.0 / voxel_size, at="points", title=f"{stem}: membranes (classical) and LoG picks")
        result.files += [store, preview, *scores["files"]]
        result.rows.append({
            "tomogram": stem, "shape": "x".join(map(str, source.shape)), "voxel Å": source.voxel_size[0],
            "convert": converted.status, "MB": round(converted.nbytes / 1e6, 1),
            "membrane %": round(100 * float(truth_mask.mean()), 2),
            "particles": ", ".join(f"kind {k}: {n}" for k, n in kinds.items()),
            "level-0 exact": exact, "labels dice": round(scores["dice"], 4),
            "membranes dice": round(raw["dice"], 3), "post-processed dice": round(cleaned["dice"], 3),
            "LoG picks": len(picked.picks), "picks F1": round(picking["f1"], 3),
        })
    result.seconds["labels, export, picks, evaluate, previews"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result.micrograph_rows = run_micrograph_demo(out, client=client)
    if result.micrograph_rows:
        result.seconds["micrographs (Autopick-BC, CRISP)"] = time.perf_counter() - clock
        result.files.append(out / "previews" / "micrograph.png")
    else:  # no torch, no prediction: the truth alone, said so in the title
        from .viz import micrograph_preview

        mic = read_picks(micrograph["particles"])
        result.files.append(micrograph_preview(
            read_region(micrograph["micrograph"], np.s_[:, :]), out / "previews" / "micrograph.png",
            overlay=[(read_region(micrograph["mask"], np.s_[:, :]), "particle disks (truth)", "#ffe135")],
            points=[(mic.coords, f"particles (truth): {len(mic.coords)}", "#ffe135", "+")],
            title="synthetic micrograph: the truth (the micrograph methods need torch)"))
    return result


def _micrograph_set(data: Path) -> dict[str, np.ndarray]:
    """Four synthetic micrographs (train/m0-m2, test/m3) with good boxes at every particle and
    bad boxes on ice, carbon and empty places at least a diameter from any particle."""
    from scipy.spatial import cKDTree

    from .io.particles import write_box
    from .synth import synth_micrograph, write_micrograph

    truth = {}
    box = 2 * MICROGRAPH_DIAMETER
    for i in range(4):
        folder = data / ("train" if i < 3 else "test")
        for sub in ("good", "bad"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        m = synth_micrograph(MICROGRAPH_SHAPE, diameter=MICROGRAPH_DIAMETER, seed=10 + i, snr=0.3)
        write_micrograph(folder / f"m{i}.mrc", m)
        places = np.random.default_rng(i).uniform(0, np.array(MICROGRAPH_SHAPE) - 1, (3000, 2))
        places = places[cKDTree(m.particles).query(places)[0] > MICROGRAPH_DIAMETER]
        dirty = m.contaminants[places[:, 0].astype(int), places[:, 1].astype(int)] > 0
        half = len(m.particles) // 2 + 1
        write_box(folder / "good" / f"m{i}.box", m.particles, box)
        write_box(folder / "bad" / f"m{i}.box", np.concatenate([places[dirty][:half], places[~dirty][:half]]), box)
        truth[f"m{i}"] = m.particles
    return truth


def run_micrograph_demo(out, *, client=None) -> list[dict]:
    """Autopick-BC and CRISP trained on three synthetic micrographs, scored on a fourth; one row
    per method. Needs torch; returns ``[]`` without it."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return []
    from .metrics.picking import picking_scores
    from .micrographs.autopick import RepickParams, TrainParams, repick, train
    from .micrographs.crisp.predict import PredictParams, predict
    from .micrographs.crisp.train import TrainParams as CrispParams
    from .micrographs.crisp.train import train as train_crisp

    out = Path(out)
    data = out / "data" / "micrographs"
    truth = _micrograph_set(data)
    radius = MICROGRAPH_DIAMETER / 2
    rows = []

    clock = time.perf_counter()
    model = train(data / "train", data / "train" / "good", data / "train" / "bad", out / "autopick" / "model",
                  params=TrainParams(box_size=2 * MICROGRAPH_DIAMETER, bin=2, epochs=10, lr=1e-3, patience=10, seed=1),
                  client=client)
    repick(data / "test", model.model_dir, out / "autopick" / "picks", params=RepickParams(), client=client)
    from .io.particles import read_particles

    picks = read_particles(out / "autopick" / "picks" / "m3_true.star", ["m3"])["m3"]
    scores = picking_scores(picks, truth["m3"], radius=radius)
    rows.append({"method": "Autopick-BC", "trained on": "3 micrographs (good/bad boxes)",
                 "test accuracy": round(model.test["accuracy"], 3), "particle IoU": "",
                 "picks": len(picks), "pick precision": round(scores["precision"], 3),
                 "pick recall": round(scores["recall"], 3), "pick F1": round(scores["f1"], 3),
                 "seconds": round(time.perf_counter() - clock, 1)})

    clock = time.perf_counter()
    crisp = train_crisp(data / "train", out / "crisp" / "model", particles=data / "train" / "truth",
                        diameter=MICROGRAPH_DIAMETER, params=CrispParams(bin=2, epochs=25, crop=96, widths=(8, 16, 32)))
    report = predict(data / "test", crisp.model_dir, out / "crisp" / "predictions", params=PredictParams(),
                     truth_masks=data / "test" / "truth", truth_particles=data / "test" / "truth", client=client)
    crf_row = report
    if "crf" not in report.summary:  # the CRF did not help on the training micrographs: scored here anyway
        crf_row = predict(data / "test", crisp.model_dir, out / "crisp" / "predictions_crf",
                          params=PredictParams(crf="on"),
                          truth_masks=data / "test" / "truth", truth_particles=data / "test" / "truth", client=client)
    _micrograph_preview(out, data / "test" / "m3.mrc", picks, truth["m3"], rows[0]["pick F1"],
                        crf=crisp.crf["apply"])
    chosen = (f"3 micrographs; CRF IoU there {crisp.crf['iou_nocrf']:.2f} → {crisp.crf['iou_crf']:.2f}: "
              + ("applied" if crisp.crf["apply"] else "not applied by default"))
    for variant, label in (("nocrf", "CRISP U-Net + Dice"), ("crf", "CRISP + dense CRF")):
        pooled = (crf_row if variant == "crf" else report).summary[variant]["pooled"]
        rows.append({"method": label,
                     "trained on": "3 micrographs (coordinates → disks)" if variant == "nocrf" else chosen,
                     "test accuracy": "",
                     "particle IoU": round(pooled["iou"], 3), "picks": int(pooled["pick_tp"] + pooled["pick_fp"]),
                     "pick precision": round(pooled["pick_precision"], 3),
                     "pick recall": round(pooled["pick_recall"], 3), "pick F1": round(pooled["pick_f1"], 3),
                     "seconds": round(time.perf_counter() - clock, 1) if variant == "crf" else ""})
    return rows


def _micrograph_preview(out: Path, micrograph: Path, autopick, truth, autopick_f1: float, crf: bool = True) -> Path:
    """``previews/micrograph.png``: the test micrograph with what the methods predicted (CRISP's
    mask and picks, Autopick-BC's picks, as circles) and the truth as small crosses."""
    from PIL import Image

    from .io.micrographs import read_micrograph
    from .io.particles import read_particles
    from .viz import micrograph_preview

    crisp = out / "crisp" / "predictions"
    mask = np.asarray(Image.open(crisp / "m3_mask.png")) > 0
    crisp_picks = read_particles(crisp / "m3_particles.star", ["m3"])["m3"]
    image = read_micrograph(micrograph)
    return micrograph_preview(
        image.image, out / "previews" / "micrograph.png", pixel_size=image.pixel_size,
        overlay=[(mask, "CRISP mask (U-Net + CRF)" if crf else "CRISP mask (U-Net; the CRF lowered training IoU)")],
        points=[(crisp_picks, f"CRISP picks: {len(crisp_picks)}", "#00e5ff"),
                (autopick, f"Autopick-BC picks: {len(autopick)} (F1 {autopick_f1:.2f})", "#ff2fd0"),
                (truth, f"truth: {len(truth)}", "#ffe135", "+")],
        radius=MICROGRAPH_DIAMETER / 2, title="m3 (test micrograph): predictions and truth")
