"""Segment micrographs with a trained CRISP model, refine with a dense CRF, extract particles.

One task per micrograph on the Dask cluster; each worker loads the model once and keeps it.
A task bins and standardises the micrograph as in training, runs the network over
overlapping tiles, thresholds the particle probability at 0.5 (the raw mask), refines it with
the dense CRF (the CRF mask) when the CRF is on, extracts particles from the final mask and
writes, atomically:

- ``<name>_mask.png``: the final mask at full micrograph resolution (0/255, 8-bit PNG);
  with the CRF on, ``<name>_mask_nocrf.png`` is the network's own mask beside it;
- ``<name>_overlay.png``: the final mask and picks over the micrograph, to look at;
- ``<name>_probability.mrc`` (optional): the particle probability at the binned resolution;
- ``<name>_particles.star``: ``rlnMicrographName``, ``rlnCoordinateX/Y`` at full resolution,
  ``rlnAutopickFigureOfMerit`` (component area or distance-transform depth, binned pixels).

A micrograph is done when its record ``.cryodask/crisp-predict/<name>.json`` (written last)
holds the key of this model, these parameters and these inputs; a rerun skips it. With truth
masks or coordinates the records hold per-micrograph scores of both masks, and
``metrics.csv``/``metrics.json`` gather them, pooled over the micrographs that have truth
(a micrograph without a truth mask or coordinate file is left out and counted, not scored as
all wrong).

``--crf auto`` (the default) applies the CRF with the settings ``crisp train`` chose on its
training micrographs, and only if they raised IoU there; ``on`` applies it anyway, ``off``
never. CRF settings given explicitly mean ``on``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError, where
from ...io.folders import atomic_write
from ...params import file_identity
from .crf import CRFParams
from .extract import METHODS

STEP = "crisp-predict"
CRF_MODES = ("auto", "on", "off")
_MODELS: dict = {}  # per worker process: model path + identity → (network, config)


@dataclass(frozen=True)
class PredictParams:
    """Everything that changes a micrograph's outputs."""

    crf: str = "auto"                   # auto | on | off (True/False mean on/off)
    crf_params: CRFParams | None = None  # None: the model's chosen settings (CRISP's if it has none)
    extract: str = "peaks"
    diameter: float | None = None  # full-resolution pixels; default: the model's
    threshold: float = 0.5
    tile: int = 512
    overlap: int = 64
    probability: bool = False

    def __post_init__(self):
        if isinstance(self.crf, bool):
            object.__setattr__(self, "crf", "on" if self.crf else "off")
        if self.crf not in CRF_MODES:
            raise InputError(f"--crf must be one of {', '.join(CRF_MODES)}, got {self.crf!r}")
        if self.extract not in METHODS:
            raise InputError(f"--extract must be one of {', '.join(METHODS)}, got {self.extract!r}")
        if self.diameter is not None and not self.diameter > 0:
            raise InputError(f"--diameter must be positive, got {self.diameter}")
        if not 0 < self.threshold < 1:
            raise InputError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.tile < 16 or not 0 <= self.overlap < self.tile // 2:
            raise InputError(f"--tile must be ≥ 16 and --overlap from 0 to under half the tile, "
                             f"got {self.tile} and {self.overlap}")


@dataclass
class PredictReport:
    results: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    crf_note: str = ""
    without_truth: list[str] = field(default_factory=list)  # left out of the metrics: no truth for them


def resolve_crf(params: PredictParams, config: dict) -> tuple[PredictParams, str]:
    """``params`` with the CRF decided (``on``/``off``, concrete settings) for a model's
    ``config``, and one line saying what was decided and why."""
    from dataclasses import replace

    choice = config.get("crf")
    chosen = CRFParams(**choice["params"]) if choice else CRFParams()
    mode = params.crf
    if mode == "auto" and params.crf_params is not None:
        mode, why = "on", "CRF settings given"
    elif mode == "auto" and choice:
        mode = "on" if choice["apply"] else "off"
        why = (f"chosen by crisp train on {len(choice['micrographs'])} training micrograph(s): IoU "
               f"{choice['iou_nocrf']:.3f} without, {choice['iou_crf']:.3f} with")
    elif mode == "auto":
        mode, why = "off", "the model records no CRF choice (trained before crisp train chose one)"
    else:
        why = f"--crf {mode}"
    settings = params.crf_params or chosen
    resolved = replace(params, crf=mode, crf_params=settings if mode == "on" else None)
    if mode == "off":
        return resolved, f"CRF off ({why})"
    return resolved, (f"CRF on ({why}; features {settings.features}, sxy {settings.sxy:g}, srgb {settings.srgb:g}, "
                      f"compat {settings.compat:g}, gaussian compat {settings.gaussian_compat:g})")


def cached_model(model_dir: str):
    """The model of ``model_dir``, loaded once per worker process (reloaded if the file changes)."""
    from .train import MODEL_FILE, load_model

    key = (os.path.abspath(model_dir), *file_identity(Path(model_dir) / MODEL_FILE)[1:])
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(model_dir)
    return _MODELS[key]


def _write_png(path: Path, mask: np.ndarray) -> Path:
    from PIL import Image

    with atomic_write(path) as partial:
        Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255).save(partial, format="PNG")
    return path


def overlay_png(path: Path, parts: dict, final: str, picks: np.ndarray, factor: int, diameter: float, *, name: str,
                pixel_size: float | None = None, truth: np.ndarray | None = None) -> Path:
    """``<name>_overlay.png``: the final mask (orange) and its picks (cyan) over the binned
    micrograph, truth picks (yellow) when given, counts in the legend, a scale bar when the
    pixel size is known. Drawn at the model's binning: no full-resolution mask is needed."""
    from ...viz import micrograph_preview

    mask = parts[final]
    kind = "CRF" if final == "crf" else "network"
    points = [(np.reshape(picks, (-1, 2)) / factor, f"picks: {len(picks)}", "#00e5ff")]
    if truth is not None:
        points.append((np.reshape(truth, (-1, 2)) / factor, f"truth: {len(truth)}", "#ffe135", "+"))
    height, width = mask.shape
    return micrograph_preview(parts["image"], path, overlay=[(mask, f"particle mask ({kind}): "
                              f"{100 * float(np.mean(mask)):.1f} % of the pixels")], points=points,
                              pixel_size=pixel_size * factor if pixel_size else None, radius=diameter / 2 / factor,
                              title=f"{name} — {len(picks)} particles (CRISP)",
                              note=f"{width}×{height} px shown (bin {factor})"
                                   + (f", {pixel_size * factor:g} Å/px" if pixel_size else ""))


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial:
        partial.write_text(json.dumps(data, indent=2, default=float))
    return path


def segment(network, config, image: np.ndarray, params: PredictParams) -> dict:
    """Binned probability, raw mask and (with ``params.crf``) CRF mask of one full-resolution
    image, as arrays at the model's binning."""
    from ...io.micrographs import bin_image
    from .crf import refine
    from .tiles import predict_tiled
    from .train import standardise

    binned = standardise(bin_image(image, config["bin"]))
    logits = predict_tiled(network, binned, tile=params.tile, overlap=params.overlap)
    logits = logits - logits.max(axis=0, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    out = {"image": binned, "probability": probabilities[1], "nocrf": probabilities[1] > params.threshold}
    if params.crf == "on":
        refined = refine(probabilities, image=binned, logits=logits, params=params.crf_params or CRFParams())
        out["crf"] = refined[1] > params.threshold
    return out


def segment_at_model_sampling(network, config, micrograph, params: PredictParams) -> tuple[dict, float]:
    """``segment`` on the micrograph resampled to the model's pixel size (when both are known
    and differ), its outputs resampled back onto the micrograph's binned grid; and the scale
    (model pixels per micrograph pixel)."""
    from scipy.ndimage import zoom

    from ...io.micrographs import bin_image, resample, sampling_scale
    from .train import standardise

    scale = sampling_scale(micrograph.pixel_size, config.get("pixel_size"))
    if scale == 1:
        return segment(network, config, micrograph.image, params), 1.0
    parts = segment(network, config, resample(micrograph.image, scale), params)
    binned = standardise(bin_image(micrograph.image, config["bin"]))
    factors = np.array(binned.shape) / np.array(parts["probability"].shape)
    back = {"image": binned, "probability": zoom(parts["probability"], factors, order=1, grid_mode=True,
                                                 mode="grid-mirror")}
    back["nocrf"] = back["probability"] > params.threshold
    if "crf" in parts:
        back["crf"] = zoom(parts["crf"].astype(np.uint8), factors, order=0, grid_mode=True, mode="grid-mirror") > 0
    return back, scale


def mask_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Pixel accuracy, precision, recall, IoU, F1 (= Dice) and the counts."""
    from ...metrics.segmentation import segmentation_scores

    s = segmentation_scores(pred, truth)
    return {"pixel_accuracy": (s["tp"] + s["tn"]) / max(1, pred.size), "precision": s["precision"],
            "recall": s["recall"], "iou": s["iou"], "f1": s["dice"],
            "tp": s["tp"], "fp": s["fp"], "fn": s["fn"], "tn": s["tn"]}


def predict_one(path: str, model_dir: str, out: str, params: PredictParams, diameter: float, key: str,
                truth_mask: str | None = None, truth_particles: np.ndarray | None = None) -> dict:
    """The task for one micrograph (runs on a worker): segment, refine, extract, write, score."""
    from ...io.micrographs import read_micrograph
    from ...io.mrc import write_mrc
    from ...io.particles import write_particles_star
    from ...metrics.picking import picking_scores
    from ...report import stage
    from .extract import extract
    from .labels import to_full_resolution, unbin_mask
    from .train import read_mask

    clock = time.perf_counter()
    out = Path(out)
    network, config = cached_model(model_dir)
    block = Path(path).name
    with stage("read", block=block) as s:
        micrograph = read_micrograph(path)
        s.bytes_read = Path(path).stat().st_size
    factor = int(config["bin"])
    with stage("infer", block=block):  # the network, then the CRF
        parts, scale = segment_at_model_sampling(network, config, micrograph, params)
    if scale != 1 and diameter == config.get("diameter"):  # the model's diameter is in its own pixels
        diameter = diameter / scale
    variants = ["nocrf", "crf"] if params.crf == "on" else ["nocrf"]
    final = variants[-1]
    shape = micrograph.image.shape
    picks = {}
    with stage("post-process", block=block):
        for variant in variants:
            centres, scores = extract(parts[variant], diameter / factor, params.extract)
            picks[variant] = (to_full_resolution(centres, factor), scores)
    name = micrograph.name
    with stage("write", block=block) as s:
        files = [_write_png(out / f"{name}_mask.png", unbin_mask(parts[final], factor, shape))]
        if params.crf == "on":
            files.append(_write_png(out / f"{name}_mask_nocrf.png", unbin_mask(parts["nocrf"], factor, shape)))
        files.append(overlay_png(out / f"{name}_overlay.png", parts, final, picks[final][0], factor, diameter,
                                 name=name, pixel_size=micrograph.pixel_size, truth=truth_particles))
        if params.probability:
            pixel = (micrograph.pixel_size or 1.0) * factor
            files.append(write_mrc(out / f"{name}_probability.mrc", parts["probability"].astype(np.float32), pixel))
        files.append(write_particles_star(out / f"{name}_particles.star", {micrograph.path.name: picks[final][0]},
                                          scores={micrograph.path.name: picks[final][1]},
                                          pixel_size=micrograph.pixel_size))
        s.bytes_written = sum(Path(f).stat().st_size for f in files)
    record = {"name": name, "path": str(path), "key": key, "picks": int(len(picks[final][0])),
              "files": [str(f) for f in files], "metrics": {}}
    truth = read_mask(truth_mask, shape) if truth_mask is not None else None
    for variant in variants:
        row = {}
        if truth is not None:
            row.update(mask_scores(unbin_mask(parts[variant], factor, shape), truth))
        if truth_particles is not None:
            scored = picking_scores(picks[variant][0], truth_particles, radius=diameter / 2)
            row.update({f"pick_{k}": v for k, v in scored.items()})
            row.update(n_picks=int(len(picks[variant][0])), n_truth=int(len(truth_particles)))
        if row:
            record["metrics"][variant] = row
    record["seconds"] = time.perf_counter() - clock
    _write_json(out / ".cryodask" / STEP / f"{name}.json", record)
    return record


def _check_truth_masks(folder, names, shapes) -> dict[str, Path]:
    """``<name>_mask.*`` for the micrographs that have one (the others are scored on nothing);
    a folder holding none of them is an error."""
    from ...io.micrographs import SUFFIXES, micrograph_shape

    folder = Path(folder)
    if not folder.is_dir():
        raise where(folder, "no such folder (the truth masks are <name>_mask.png/.jpg/.mrc/.tif files)")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES and p.is_file()}
    masks = {name: files[f"{name}_mask"] for name in names if f"{name}_mask" in files}
    if not masks:
        raise where(folder, f"holds no mask for any of the {len(names)} micrograph(s) (expected <name>_mask.png, "
                            f".jpg, .mrc or .tif, e.g. {names[0]}_mask.png)")
    for name, path in masks.items():
        if micrograph_shape(path) != shapes[name]:
            raise where(path, f"mask is {micrograph_shape(path)} px but micrograph {name} is {shapes[name]} px")
    return masks


def summarise(records: list[dict]) -> dict:
    """Scores of the micrographs that have truth, together (pixel counts and pick counts pooled,
    each over the micrographs with that kind of truth) and the mean of the per-micrograph scores,
    for each variant (``nocrf``, ``crf``). Micrographs without truth are left out, never counted
    as all wrong; ``micrographs_masks``/``micrographs_particles`` say how many each pool holds."""
    from ...metrics.segmentation import scores

    summary = {}
    for variant in ("nocrf", "crf"):
        rows = [r["metrics"][variant] for r in records if r.get("metrics", {}).get(variant)]
        if not rows:
            continue
        entry = {"micrographs": len(rows)}
        pixel_rows = [r for r in rows if "tp" in r]
        pick_rows = [r for r in rows if "pick_tp" in r]
        if pixel_rows:
            counts = {k: sum(r[k] for r in pixel_rows) for k in ("tp", "fp", "fn", "tn")}
            s = scores(**counts)
            entry["micrographs_masks"] = len(pixel_rows)
            entry["pooled"] = {"pixel_accuracy": (counts["tp"] + counts["tn"]) / sum(counts.values()),
                               "precision": s["precision"], "recall": s["recall"], "iou": s["iou"], "f1": s["dice"]}
        if pick_rows:
            entry["micrographs_particles"] = len(pick_rows)
            tp, fp, fn = (sum(r[f"pick_{k}"] for r in pick_rows) for k in ("tp", "fp", "fn"))
            p = tp / (tp + fp) if tp + fp else float(tp + fn == 0)
            rc = tp / (tp + fn) if tp + fn else float(tp + fp == 0)
            entry.setdefault("pooled", {}).update(pick_precision=p, pick_recall=rc,
                                                  pick_f1=2 * p * rc / (p + rc) if p + rc else 0.0,
                                                  pick_tp=tp, pick_fp=fp, pick_fn=fn)
        keys = dict.fromkeys(k for r in rows for k in r if k not in ("tp", "fp", "fn", "tn", "pick_tp", "pick_fp",
                                                                      "pick_fn"))
        entry["mean"] = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
        summary[variant] = entry
    return summary


def _write_metrics(out: Path, records: list[dict], summary: dict, without_truth=(), crf_note: str = "") -> list[Path]:
    import pandas as pd

    rows = [{"micrograph": r["name"], "variant": v, **m} for r in records for v, m in r.get("metrics", {}).items()]
    if not rows:
        return []
    csv = out / "metrics.csv"
    with atomic_write(csv) as partial:
        pd.DataFrame(rows).to_csv(partial, index=False)
    return [csv, _write_json(out / "metrics.json", {"summary": summary, "micrographs": rows,
                                                     "without_truth": list(without_truth), "crf": crf_note})]


@dataclass
class PredictPlan:
    """Validated inputs (before any cluster): what to run and what is already done."""

    jobs: list[dict]
    done: list[dict]
    out: Path
    params: PredictParams
    model_dir: Path
    diameter: float
    crf_note: str = ""
    without_truth: list[str] = field(default_factory=list)  # truth given, but none for these micrographs


def plan_prediction(micrographs, model_dir, out, *, params: PredictParams = PredictParams(), truth_masks=None,
                    truth_particles=None, truth_flip_y: bool = False) -> PredictPlan:
    """Check the model, micrographs and truth files; find what earlier runs finished."""
    from ...io.folders import check_output_dir
    from ...io.micrographs import find_micrographs, micrograph_name, micrograph_shape
    from ...params import params_hash
    from .train import MODEL_FILE, load_model

    _, config = load_model(model_dir)
    params, crf_note = resolve_crf(params, config)
    diameter = params.diameter or config.get("diameter")
    if not diameter:
        raise InputError("--diameter is needed: the model does not record a particle diameter")
    paths = find_micrographs(micrographs)
    names = [micrograph_name(p) for p in paths]
    shapes = {n: micrograph_shape(p) for n, p in zip(names, paths)}
    small = [n for n in names if min(shapes[n]) < config["bin"]]
    if small:
        raise where(paths[names.index(small[0])], f"is smaller than the model's bin factor {config['bin']}")
    masks = _check_truth_masks(truth_masks, names, shapes) if truth_masks is not None else {}
    coords = {}
    if truth_particles is not None:
        from ...io.particles import note_skipped, read_particles

        coords = read_particles(truth_particles, names, shapes=shapes, flip_y=truth_flip_y)
        note_skipped(coords, "truth coordinates")
        coords = {n: c for n, c in coords.items() if n in getattr(coords, "matched", coords)}
    given = truth_masks is not None or truth_particles is not None
    without_truth = [n for n in names if given and n not in masks and n not in coords]
    out = check_output_dir(out).resolve()
    model = file_identity(Path(model_dir) / MODEL_FILE)
    jobs, done = [], []
    for path, name in zip(paths, names):
        truth = {"mask": file_identity(masks[name]) if name in masks else None,
                 "particles": np.round(coords[name], 3).tolist() if name in coords else None}
        key = params_hash({"params": asdict(params), "diameter": diameter, "model": model,
                           "source": file_identity(path), "truth": truth})
        record = _read_record(out / ".cryodask" / STEP / f"{name}.json")
        if record.get("key") == key and all(Path(f).exists() for f in record.get("files", [])):
            done.append(record)
            continue
        jobs.append({"path": str(path), "key": key, "truth_mask": str(masks[name]) if name in masks else None,
                     "truth_particles": coords.get(name)})
    return PredictPlan(jobs, done, out, params, Path(model_dir).resolve(), float(diameter), crf_note, without_truth)


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_prediction(plan: PredictPlan, client) -> PredictReport:
    """Run the plan's micrograph tasks on ``client`` through the collection runner (a failed
    micrograph is named and the others go on); gather records, write metrics."""
    from ...engine.collection import Item, run_collection

    report = PredictReport(results=list(plan.done), crf_note=plan.crf_note, without_truth=list(plan.without_truth))
    jobs = {job["path"]: job for job in plan.jobs}

    def one(item: Item) -> dict:
        job = jobs[str(item.path)]
        args = (job["path"], str(plan.model_dir), str(plan.out), plan.params, plan.diameter, job["key"],
                job["truth_mask"], job["truth_particles"])
        return client.submit(predict_one, *args, pure=False, retries=1).result()

    collection = run_collection([Item(Path(path), Path(path).stem) for path in jobs], one, command="crisp predict",
                                client=client, echo=None)
    for outcome in collection.outcomes:
        if outcome.status == "done":
            report.results.append(outcome.value)
        else:
            report.failed.append(outcome.message)
    order = {Path(j["path"]).stem: i for i, j in enumerate(plan.jobs)}
    report.results.sort(key=lambda r: (order.get(r["name"], -1), r["name"]))
    report.summary = summarise(report.results)
    report.files = _write_metrics(plan.out, report.results, report.summary, report.without_truth, report.crf_note)
    return report


def predict(micrographs, model_dir, out, *, params: PredictParams = PredictParams(), truth_masks=None,
            truth_particles=None, truth_flip_y: bool = False, client=None) -> PredictReport:
    """Segment micrographs with a CRISP model folder; masks, STAR picks and (with truth) metrics in ``out``.

    Examples
    --------
    >>> report = predict(["test/"], "model/", "pred/", params=PredictParams(extract="components"),
    ...                  truth_masks="masks/")  # doctest: +SKIP
    >>> report.summary["crf"]["pooled"]["iou"]  # doctest: +SKIP
    """
    from ...engine.cluster import current_client

    plan = plan_prediction(micrographs, model_dir, out, params=params, truth_masks=truth_masks,
                           truth_particles=truth_particles, truth_flip_y=truth_flip_y)
    client = client or current_client()
    if client is None and plan.jobs:
        from ...engine.cluster import connect

        with connect("local") as local:
            return run_prediction(plan, local)
    return run_prediction(plan, client)
