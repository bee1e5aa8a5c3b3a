"""``cryodask run``: a pipeline file of steps (convert → membranes → postprocess → pick →
evaluate, any subset) run per tomogram over a collection, on one cluster.

Each tomogram goes through its steps in its own client thread of the collection runner, so the
first tomogram reaches its last step while later ones are still converting. A finished step
leaves ``<out>/.cryodask/run/<name>/<step>.json`` (its key and its outputs): a rerun skips every
step whose key (its parameters and those of the steps before it) is unchanged.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .engine.collection import Item, Outcome
from .errors import InputError, where
from .params import params_hash

ORDER = ("convert", "membranes", "postprocess", "pick", "evaluate")

EXAMPLE = """\
# cryodask run: steps run per tomogram, in this order, on one cluster:
#   cryodask run pipeline.yaml tomograms/ --out results/
# Leave a step out to skip it. A step's keys are its command's options in Python form
# (--min-slices is min_slices); `cryodask <step> --help` says what each does.
# A rerun skips every step already done with the same parameters.

convert:                  # MRC/TIFF → chunked OME-Zarr (<out>/<name>.zarr); OME-Zarr inputs are used as they are
  chunks: [64, 256, 256]  # z, y, x
  levels: 3               # pyramid levels

membranes:                # <name>_<method>_predicted_mask.mrc, and labels/ in the OME-Zarr
  method: classical       # classical (no weights) | etsam (weights: a folder with etsam_stage{1,2}_v1.pt)
  thickness: 40           # Å: membrane thickness (classical)
  polarity: auto          # auto | dark | bright

postprocess:              # <name>_<method>_predicted_post_processed_mask.mrc
  min_slices: 10          # keep components spanning at least this many z slices (ETSAM's 10)
  min_voxels: 0

pick:                     # <name>_<method>_picks.star (RELION 5) and .csv, copick JSON
  method: log             # log (no weights) | cryosam (prompts, SAM2 and DINOv2 weights)
  diameter: 120           # Å

evaluate:                 # against truth named after each tomogram: {name} is its name
  membranes: truth/{name}_membranes.mrc   # a mask; scored with the post-processed mask if there is one
  picks: truth/{name}_particles.star      # STAR or CSV (cryodask synth writes both these names)
  radius: 5                               # match radius (picks), in unit
  unit: px                                # px | angstrom
"""


# ------------------------------------------------------------------ the file

@dataclass
class Pipeline:
    """Steps in order, each with its keyword arguments (validated)."""

    steps: dict[str, dict] = field(default_factory=dict)
    source: str = ""
    built: dict[str, tuple] = field(default_factory=dict)  # step -> (parameters, runtime keywords), built once

    def key(self, step: str) -> str:
        """A step's key: its parameters and those of every step before it."""
        upto = ORDER[:ORDER.index(step) + 1]
        return params_hash({s: self.steps[s] for s in upto if s in self.steps})


_EVALUATE = ("membranes", "picks", "radius", "unit", "voxel_size")
#: What a step's options may name besides its parameters' fields: where and how it runs.
_RUNTIME = {"convert": {"voxel_size"}, "membranes": {"batch", "device", "voxel_size"},
            "postprocess": {"device"},
            "pick": {"device", "polarity", "prompts", "prompts_file", "tomograms", "star", "layout", "object_name"}}


def allowed(step: str) -> set[str]:
    """The keys a step takes: its parameters' fields (named as in Python, as the command line's
    flags are) and the few options of where and how it runs."""
    from dataclasses import fields

    if step == "evaluate":
        return set(_EVALUATE)
    if step == "convert":
        from .io.layouts import ConvertParams

        return {f.name for f in fields(ConvertParams)} | _RUNTIME[step]
    if step == "postprocess":
        from .postprocess.params import PostprocessParams

        return {f.name for f in fields(PostprocessParams)} | _RUNTIME[step]
    if step == "membranes":
        from .membranes.params import ClassicalParams, EtsamParams, MembraneParams

        names = {f.name for cls in (ClassicalParams, EtsamParams, MembraneParams) for f in fields(cls) if f.init}
        return names | {"method", "weights"} | _RUNTIME[step]
    from .picking.params import CryosamParams, LogParams

    return {f.name for cls in (LogParams, CryosamParams) for f in fields(cls)} | {"method", "weights"} | _RUNTIME[step]


def load_pipeline(path) -> Pipeline:
    """Read and check a pipeline file: known steps, known keys, values the steps accept — all
    before any cluster starts."""
    import difflib

    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise where(path, f"cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise where(path, f"is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise where(path,
                    f"must map step names to their options ({', '.join(ORDER)}); `cryodask run --example` prints one")
    pipeline = Pipeline(source=str(path))
    for step, options in data.items():
        if step not in ORDER:
            hint = difflib.get_close_matches(str(step), ORDER, n=1)
            raise where(path, f"unknown step {step!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                        + f"; steps: {', '.join(ORDER)}")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise where(path, f"{step}: its options must be a mapping of name: value, got {options!r}")
        known = allowed(step)
        for key in options:
            if key not in known:
                hint = difflib.get_close_matches(str(key).replace("-", "_"), sorted(known), n=1)
                raise where(path, f"{step}: unknown option {key!r}" + (f" (did you mean {hint[0]}?)" if hint else ""))
        pipeline.steps[step] = dict(options)
    pipeline.steps = {s: pipeline.steps[s] for s in ORDER if s in pipeline.steps}
    for step, needed in (("postprocess", "membranes"),):
        if step in pipeline.steps and needed not in pipeline.steps:
            raise where(path, f"{step} works on the masks of {needed}: add a {needed} step")
    evaluate = pipeline.steps.get("evaluate")
    if evaluate is not None:
        if not ({"membranes", "picks"} & set(evaluate)):
            raise where(path, "evaluate: give membranes: (truth masks) or picks: (truth coordinates), with {name}")
        for kind in ("membranes", "picks"):
            if kind in evaluate and ("pick" if kind == "picks" else "membranes") not in pipeline.steps:
                raise where(path, f"evaluate: {kind} needs a {'pick' if kind == 'picks' else 'membranes'} step")
        if "picks" in evaluate and "radius" not in evaluate:
            raise where(path, "evaluate: picks needs radius:")
    _check_values(pipeline, path)
    return pipeline


def _check_values(pipeline: Pipeline, path: Path) -> None:
    """Build each step's parameters once, so a bad value is an error now; the steps use these."""
    from .errors import CryodaskError

    for step, options in pipeline.steps.items():
        runtime = {k: v for k, v in options.items() if k in _RUNTIME.get(step, ())}
        given = {k: v for k, v in options.items() if k not in runtime}
        try:
            pipeline.built[step] = (_build(step, given), runtime)
        except (CryodaskError, TypeError) as exc:
            raise where(path, f"{step}: {exc}") from None


def _build(step: str, options: dict):
    if step == "convert":
        from .io.layouts import ConvertParams

        return ConvertParams(**options)
    if step == "membranes":
        from .membranes.params import membrane_params

        return membrane_params(**options)
    if step == "postprocess":
        from .postprocess.params import PostprocessParams

        return PostprocessParams(**options)
    if step == "pick":
        from .picking.params import pick_params

        return pick_params(**options)
    if options.get("unit", "px") not in ("px", "angstrom"):
        raise InputError(f"unit must be px or angstrom, got {options['unit']!r}")
    return None


# ------------------------------------------------------------------ per tomogram

class StepMarks:
    """``<out>/.cryodask/run/<name>/<step>.json``: a step's key and outputs, written after them."""

    def __init__(self, out: Path, name: str):
        self.folder = out / ".cryodask" / "run" / name

    def get(self, step: str, key: str) -> dict | None:
        try:
            data = json.loads((self.folder / f"{step}.json").read_text())
        except (OSError, ValueError):
            return None
        outputs = data.get("outputs", {})
        files_there = all(Path(p).exists() for p in outputs.get("files", []))
        return outputs if data.get("key") == key and files_there else None

    def put(self, step: str, key: str, outputs: dict) -> None:
        from .io.folders import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.folder / f"{step}.json") as tmp:
            Path(tmp).write_text(json.dumps({"key": key, "outputs": outputs}, default=str))


@dataclass
class StepCounts:
    run: int = 0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ran: bool) -> None:
        with self.lock:
            if ran:
                self.run += 1
            else:
                self.skipped += 1


def run_tomogram(item: Item, pipeline: Pipeline, out: Path, client, counts: StepCounts | None = None) -> Outcome:
    """Every step of the pipeline for one tomogram, skipping those already done."""
    marks = StepMarks(out, item.name)
    state = {"source": str(item.path), "image": str(item.path)}
    lines = [f"{item.path}:"]
    for step, options in pipeline.steps.items():
        key = params_hash({"pipeline": pipeline.key(step), "source": _identity(item.path)})
        done = marks.get(step, key)
        ran = done is None
        if ran:
            params, runtime = pipeline.built[step]
            done = STEPS[step](item, params, dict(runtime if step != "evaluate" else options), state, out, client)
            marks.put(step, key, done)
        lines.append(f"  {step}: {done.get('summary', 'done') if ran else 'skipped (already done)'}")
        if counts is not None:
            counts.add(ran)
        state.update({k: v for k, v in done.items() if k not in ("files", "summary")})
        state.setdefault("files", []).extend(done.get("files", []))
    lines += [f"  wrote {p}" for p in dict.fromkeys(state.get("files", []))]
    return Outcome(item, "done", value=state, lines=lines)


def _identity(path: Path) -> list:
    """A source's size and modification time: a replaced file is new work."""
    try:
        stat = os.stat(path)
        return [str(Path(path).resolve()), stat.st_size, int(stat.st_mtime)]
    except OSError:
        return [str(path)]


def _convert(item, params, options, state, out, client) -> dict:
    from .convert import convert
    from .io.volumes import is_zarr

    if is_zarr(item.path):
        return {"image": str(item.path), "summary": "an OME-Zarr already"}
    result = convert([item.path], out, params, client=client, **options).results[0]
    if result.status == "failed":
        raise InputError(result.message)
    return {"image": str(result.store), "files": [str(result.store)],
            "summary": f"{result.blocks_written} blocks written, {result.blocks_skipped} skipped"}


def _membranes(item, params, options, state, out, client) -> dict:
    from .membranes.pipeline import segment

    report = segment([state["image"]], out, params, client=client, progress=False, **options)
    result = report.results[0]
    if result.status == "failed":
        raise InputError(result.message)
    mask = next(str(f) for f in result.files if str(f).endswith("_mask.mrc") and "post_processed" not in str(f))
    return {"image": result.store or state["image"], "mask": mask, "method": report.method,
            "files": [str(f) for f in result.files],
            "summary": f"{report.method}, membrane {100 * (result.mask_fraction or 0):.2f} %"}


def _postprocess(item, params, options, state, out, client) -> dict:
    from .postprocess.pipeline import postprocess

    mask = Path(state["mask"])
    target = mask.with_name(mask.name.replace("_mask.mrc", "_post_processed_mask.mrc"))
    if target == mask:
        target = out / f"{item.name}_post_processed.mrc"
    result = postprocess(mask, target, params, client=client, **options)
    return {"mask": str(result.out), "files": [str(f) for f in result.files],
            "summary": f"kept {result.n_kept} of {result.n_components} components ({result.voxels_kept} voxels)"}


def _pick(item, params, options, state, out, client) -> dict:
    from .picking.pipeline import pick

    result = pick(state["image"], out, params, client=client, name=item.name, **options)
    star = next(str(f) for f in result.files if str(f).endswith("_picks.star"))
    method = type(params).__name__.removesuffix("Params").lower()
    return {"picks": star, "n_picks": len(result.picks), "files": [str(f) for f in result.files],
            "summary": f"{len(result.picks)} picks ({method})"}


def _evaluate(item, params, options, state, out, client) -> dict:
    from .evaluate import evaluate_membranes, evaluate_picks

    folder = out / "evaluate" / item.name
    scores, files = {}, []
    for kind in ("membranes", "picks"):
        if kind not in options:
            continue
        truth = Path(str(options[kind]).format(name=item.name))
        if not truth.exists():
            raise where(truth, f"(the {kind} truth of {item.name}) does not exist")
        if kind == "membranes":
            metrics = evaluate_membranes(state["mask"], truth, out=folder / "membranes")
        else:
            metrics = evaluate_picks(state["picks"], truth, float(options["radius"]), unit=options.get("unit", "px"),
                                     voxel_size=options.get("voxel_size"), out=folder / "picks")
        files += [str(f) for f in metrics.pop("files", [])]
        scores.update({f"{kind}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()
                      if k.split("_", 1)[1] in ("dice", "iou", "precision", "recall", "f1"))
    return {"scores": scores, "files": files, "summary": shown or "scored"}


STEPS = {"convert": _convert, "membranes": _membranes, "postprocess": _postprocess, "pick": _pick,
         "evaluate": _evaluate}


def write_scores(outcomes: list[Outcome], out: Path) -> Path | None:
    """``<out>/evaluate.csv``: one row of scores per tomogram (and the mean of each column)."""
    import pandas as pd

    rows = [{"tomogram": o.item.name, **o.value.get("scores", {})} for o in outcomes
            if o.status == "done" and o.value and o.value.get("scores")]
    if not rows:
        return None
    table = pd.DataFrame(rows)
    mean = table.drop(columns="tomogram").mean(numeric_only=True)
    table = pd.concat([table, pd.DataFrame([{"tomogram": "mean", **mean.to_dict()}])], ignore_index=True)
    path = out / "evaluate.csv"
    table.to_csv(path, index=False, float_format="%.6g")
    return path
