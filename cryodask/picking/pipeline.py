"""``cryodask pick``: every particle of one kind in a tomogram, as RELION STAR, CSV and copick.

``log``: the LoG blob detector at the particle diameter (no weights, the embedded default).
``cryosam``: CryoSAM from one or more clicked particles. Cross-Plane Self-Prompting segments
each prompt with SAM2; the DINOv2 feature inside those masks is the query; Hierarchical
Feature Matching over the tri-view feature pyramid finds every similar location (NMS, top-K);
each detection is segmented with SAM2 in turn, batches of detections mapped over the
workers. Instance labels and their union (the semantic mask) go to ``labels/`` of the
tomogram's OME-Zarr, so napari shows them over the tomogram.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine.blocks import DoneMarks
from ..errors import InputError, where
from ..io.volumes import stem as stem_of
from .params import CryosamParams, LogParams, pick_params

__all__ = ["CryosamParams", "LogParams", "pick", "pick_params", "load_prompts", "combine_queries"]

SAM2_FILES = {"sam2.1_hiera_t": "sam2.1_hiera_tiny.pt", "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
              "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_l": "sam2.1_hiera_large.pt"}
STAR_SCORE = "rlnAutopickFigureOfMerit"


@dataclass
class PickResult:
    picks: pd.DataFrame
    files: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    store: str | None = None
    prompts: int = 0
    notes: list = field(default_factory=list)  # lines for the user: what each LoG rule removed
    query: np.ndarray | None = None  # cryosam: the query matched (D,)
    status: str = "done"  # "skipped": every output was already written by a run of the same parameters
    instances_computed: int = 0  # cryosam: instances segmented by this run (not taken from a resumed run's)
    resumed: list = field(default_factory=list)  # cryosam: what was taken from an earlier run's marks


def load_prompts(prompts=None, prompts_file=None, *, shape, voxel_size, tomograms=None, tomo_name=None) -> np.ndarray:
    """(N, 3) z, y, x prompt voxels from ``--prompt`` triples and/or a STAR/CSV/copick file,
    all inside the volume; anything else is a one-line error. RELION 5 prompts are placed with
    their ``tomograms.star`` (``tomograms``, else found), rows of the tomogram ``tomo_name``."""
    from ..io.picks import read_picks

    points = [np.asarray(p, dtype=np.float64).reshape(3) for p in (prompts or [])]
    given = len(points)  # the first ones come from --prompt, the rest from the file
    if prompts_file is not None:
        picks = read_picks(prompts_file, voxel_size=voxel_size, tomograms=tomograms, tomo_name=tomo_name)
        if picks.coords.shape[1] != 3:
            raise where(prompts_file, "prompts for a tomogram need x, y and z")
        if len(picks.coords) == 0:
            raise where(prompts_file, "holds no prompt")
        points += list(picks.coords)
    if not points:
        raise InputError("cryosam needs at least one prompt (--prompt z,y,x or --prompts FILE)")
    points = np.array(points)
    outside = ~np.all((points >= 0) & (points <= np.array(shape) - 1), axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        z, y, x = points[i]
        raise where("--prompt" if i < given else prompts_file,
                    f"prompt (z, y, x) = ({z:g}, {y:g}, {x:g}) lies outside the volume of shape {tuple(shape)}")
    return points


def sam2_checkpoint(checkpoint, weights, config: str) -> Path:
    """The SAM2 checkpoint for ``config``, checked to be SAM2 weights of that architecture."""
    from ..models.sam2 import check_checkpoint
    from ..models.weights import resolve

    name = SAM2_FILES.get(str(config).removesuffix(".yaml"), "sam2.1_hiera_large.pt")
    return check_checkpoint(config, resolve(checkpoint, default_name=name, folder=weights, option="--sam-checkpoint"))


def write_outputs(out: Path, stem: str, method: str, picks: pd.DataFrame, voxel_size: float,
                  object_name: str, *, shape=None, star=None) -> list[Path]:
    """STAR (RELION 5 with tomograms.star, or ``star`` relion4 pixels; score as
    rlnAutopickFigureOfMerit), CSV and copick JSON."""
    from ..io.copick import write_run_picks
    from ..io.picks import write_picks, write_tomogram_picks

    coords = picks[["z", "y", "x"]].to_numpy(dtype=np.float64)
    scores = picks["score"].to_numpy(dtype=np.float64)
    prefix = out / f"{stem}_{method}_picks"
    files = [write_tomogram_picks(prefix.with_suffix(".star"), coords, stem, shape, voxel_size, {STAR_SCORE: scores},
                                  star),
             write_picks(prefix.with_suffix(".csv"), coords, {"score": scores})]
    if star is None or star.version == "relion5":
        files.insert(1, out / "tomograms.star")  # written with the STAR: its tomogram sizes and pixel sizes
    # one copick user per method (cryodask-log, cryodask-cryosam), the same in the file name and inside
    files.append(write_run_picks(out / "copick" / "ExperimentRuns" / stem, coords, voxel_size, tool=method,
                                 object_name=object_name, scores=scores))
    return files


def resolve_models(params: CryosamParams, weights=None) -> CryosamParams:
    """``params`` with both checkpoints found (given, or in ``weights`` / ``CRYODASK_WEIGHTS``) and
    checked (the SAM2 file matches its config), on the client before any cluster starts."""
    import dataclasses

    from ..models.dinov2 import describe_dinov2, resolve_dinov2
    from ..models.sam2 import config_path

    config_path(params.config)
    sam = sam2_checkpoint(params.sam_checkpoint, weights, params.config)
    dino = resolve_dinov2(params.dinov2_checkpoint, weights)
    describe_dinov2(dino)
    return dataclasses.replace(params, sam_checkpoint=str(sam), dinov2_checkpoint=str(dino))


def pick(tomogram, out, params: LogParams | CryosamParams, *, client=None, device: str = "auto", polarity="auto",
         prompts=None, prompts_file=None, tomograms=None, star=None, layout: str = "default",
         object_name: str = "particle", name: str | None = None, query=None, query_only: bool = False) -> PickResult:
    """Pick particles in one tomogram.

    Parameters
    ----------
    tomogram : an MRC/TIFF file or OME-Zarr image, or a ``Volume`` (``io.volumes.open_volume``:
        it carries a voxel size that overrides the header, and the block shape)
    params : ``LogParams`` (the LoG picker, no weights) or ``CryosamParams`` (CryoSAM: prompts,
        SAM2 and DINOv2 weights): the method is the parameters' type; :func:`pick_params` builds
        them from flat options
    prompts, prompts_file : cryosam: z, y, x voxel triples and/or a STAR, CSV or copick JSON file
    tomograms : the tomograms.star of RELION 5 prompts, when it is not found beside them
    star : ``io.picks.StarStyle`` or "relion5" / "relion4" (default RELION 5 with tomograms.star)
    layout : cryosam's labels in ``labels/`` of the tomogram's OME-Zarr ("default") or, "portal",
        each its own ``<out>/<stem>_cryosam_{instances,semantic}.zarr`` (the CryoET Data Portal's)
    polarity : "auto", "dark", "bright" or a decided ``cryodask.polarity.Polarity``: a bright
        tomogram is read negated, so both methods see dense matter dark
    name : what its outputs are named after (default: the file name up to its first dot)
    query : cryosam: a query vector made elsewhere (a collection's, :func:`combine_queries`):
        matched here without prompts of this tomogram
    query_only : cryosam: stop once the prompts' query is made (``PickResult.query``)

    Examples
    --------
    >>> result = pick("tomo.mrc", "picks/", LogParams(diameter=250))  # doctest: +SKIP
    >>> result.files                                                  # doctest: +SKIP
    """
    from ..io.folders import check_output_dir
    from ..io.volumes import open_volume
    from ..polarity import dark_reader, resolve_polarity

    if not isinstance(params, (LogParams, CryosamParams)):
        raise TypeError(f"params must be LogParams or CryosamParams, got {type(params).__name__}")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    raw = open_volume(tomogram, dtype="float32")
    source = raw.path
    shape, vs = raw.shape, raw.voxel_size
    out = check_output_dir(out).resolve()
    contrast = resolve_polarity(polarity, raw, shape, vs)
    read = dark_reader(raw, contrast)  # dense matter dark from here on
    stem = name or stem_of(source)
    star = _star_style(star, source, shape, vs)
    if isinstance(params, LogParams):
        result = _pick_log(read, shape, vs, params, out, stem, object_name, log_blocks(raw), client, star=star, raw=raw,
                           contrast=contrast)
        result.notes.insert(0, contrast.describe())
        return result
    points = ([] if query is not None else
              load_prompts(prompts, prompts_file, shape=shape, voxel_size=vs[2], tomograms=tomograms, tomo_name=stem))
    if params.sam_checkpoint is None or params.dinov2_checkpoint is None:
        params = resolve_models(params)
    if client is None:
        from ..engine.cluster import current_client

        client = current_client()
    options = dict(star=star, layout=layout, raw=raw, contrast=contrast, query=query, query_only=query_only,
                   device=device)
    if client is None:
        from ..engine.cluster import connect

        with connect("local") as local:
            result = _pick_cryosam(raw, read, points, params, out, stem, object_name, local, **options)
    else:
        result = _pick_cryosam(raw, read, points, params, out, stem, object_name, client, **options)
    result.notes.insert(0, contrast.describe())
    return result


def log_blocks(volume) -> tuple[int, int, int]:
    """The LoG's blocks: an MRC/TIFF file's blocks as given; for a zarr array, the default block
    shape rounded up to whole chunks, so small chunks (16x32x32) do not become tasks that each read
    a halo of several particle radii around a little data."""
    from ..io.layouts import CHUNKS

    if volume.format != "zarr":
        return tuple(volume.chunks)
    return tuple(-(-max(b, c) // c) * c for b, c in zip(CHUNKS, volume.chunks))


def _star_style(star, tomogram, shape, vs):
    """``star`` as a ``StarStyle`` naming the tomogram, checked against its voxel size up front."""
    import dataclasses

    from ..io.picks import StarStyle

    style = StarStyle() if star is None else StarStyle(star) if isinstance(star, str) else star
    if style.tomogram is None:
        style = dataclasses.replace(style, tomogram=str(Path(tomogram).resolve()))
    style.row(stem_of(tomogram), shape, vs[2])  # a tilt-series pixel finer than the voxels: error now
    return style


def _pick_log(read, shape, vs, params, out, stem, object_name, chunks, client, star=None, raw=None,
              contrast=None) -> PickResult:
    """LoG picks with per-block done-marks under ``<out>/.cryodask/<stem>/pick-log-<key>/``:
    a killed run resumes at its unfinished blocks; the marks go once the files are written."""
    import shutil
    from dataclasses import asdict

    from ..io.volumes import source_identity
    from ..params import params_hash
    from .log import describe, log_pick

    clock = time.perf_counter()
    raw = read if raw is None else raw  # as stored: its identity, and the preview as the user sees it
    key = params_hash({**asdict(params), "chunks": list(chunks), "voxel_size": list(vs),
                       "source": source_identity(raw), "polarity": contrast.polarity if contrast else "dark"})
    marks = DoneMarks(out / ".cryodask" / stem, "pick-log", key)
    if not marks.folder.exists():
        marks.clear_step()  # other parameters' or inputs' blocks are of no use now
    picks = log_pick(read, shape, vs, params, chunks=chunks, client=client, marks=marks)
    result = PickResult(picks, notes=[describe(picks, params)])
    result.seconds["log"] = time.perf_counter() - clock
    result.files = write_outputs(out, stem, "log", picks, vs[2], object_name, shape=shape, star=star)
    result.files.append(_preview(raw, shape, out / f"{stem}_log_picks.png", picks, stem, "log", vs,
                                 params.diameter / 2, client=client))
    shutil.rmtree(marks.folder, ignore_errors=True)
    return result


def _preview(read, shape, out_png: Path, picks: pd.DataFrame, stem: str, method: str, vs, radius_a,
             client=None) -> Path:
    """The picks over orthoslices of the tomogram (a coarse level or three slices; ``viz``), drawn
    on a worker: matplotlib costs about a CPU-second, which the client of a collection cannot spare."""
    from ..viz import picks_preview

    from ..engine.cluster import on_worker

    return on_worker(client, picks_preview, read, shape, out_png, picks[["z", "y", "x"]].to_numpy(dtype=np.float64),
                     name=stem, method=method, voxel_size=vs[2], radius=radius_a / vs[2] if radius_a else None)


def store_of(volume, out: Path, client, layout="default") -> Path:
    """The tomogram's OME-Zarr: itself, or converted under ``out`` (with the volume's voxel size and blocks)."""
    from ..convert import ConvertParams, convert
    from ..io.volumes import is_zarr

    if is_zarr(volume.path):
        return Path(volume.path)
    report = convert([volume.path], out, ConvertParams(chunks=volume.chunks, layout=layout),
                     voxel_size=volume.voxel_size, client=client)
    if report.failed:
        raise InputError(report.failed[0].message)
    return Path(report.results[0].store)


def _groups(points: np.ndarray, size: int) -> list[np.ndarray]:
    """Detections in z order, cut into tasks: neighbours share cached slice embeddings."""
    order = np.lexsort((points[:, 2], points[:, 1], points[:, 0]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _cryosam_marks(out: Path, stem: str, step: str, params: CryosamParams, features_store: Path, raw, contrast,
                   **inputs) -> DoneMarks:
    """CryoSAM's done-marks under ``<out>/.cryodask/<stem>/<step>-<key>/``, keyed by everything
    the work depends on (the parameters, the SAM2 file, the feature store's own key, the
    tomogram, its polarity, and ``inputs``: the prompts, or the query matched), so a rerun redoes
    only what is not done and a changed input redoes everything. Two steps: ``cryosam-query``
    (the prompts' instances and their query) and ``pick-cryosam`` (matching and instances), so
    a collection's own query, or new matching parameters, keep the prompts' query."""
    from dataclasses import asdict

    from ..io.volumes import source_identity
    from ..params import file_identity, params_hash
    from ..prompting.features import feature_key

    fields = asdict(params)
    if step == "cryosam-query":  # matching's parameters do not change the query
        for name in ("sim_threshold", "top_k", "matching"):
            fields.pop(name)
    key = params_hash({**fields, "sam": file_identity(params.sam_checkpoint) if params.sam_checkpoint else None,
                       "features": feature_key(features_store), "source": source_identity(raw),
                       "polarity": getattr(contrast, "polarity", contrast),
                       **{k: np.asarray(v, np.float64).round(7).tolist() for k, v in inputs.items()}})
    marks = DoneMarks(out / ".cryodask" / stem, step, key)
    if not marks.folder.exists():
        marks.clear_step()  # other parameters' or inputs' work of this step is of no use now
    return marks


def _pack(instances) -> dict:
    """Instances as arrays (a done-mark's payload): boxes, masks end to end, points, scores."""
    boxes = np.array([[(s.start, s.stop) for s in box] for box, _ in instances], np.int64).reshape(-1, 3, 2)
    masks = [np.asarray(mask, bool).ravel() for _, mask in instances]
    return {"boxes": boxes, "masks": np.concatenate(masks) if masks else np.zeros(0, bool),
            "points": np.array([getattr(i, "point", None) or (np.nan,) * 3 for i in instances],
                               np.float64).reshape(-1, 3),
            "scores": np.array([getattr(i, "score", 0.0) for i in instances], np.float64)}


def _unpack(payload: dict) -> list:
    from ..prompting.selfprompt import Instance

    instances, start = [], 0
    for box, point, score in zip(payload["boxes"], payload["points"], payload["scores"]):
        slices = tuple(slice(int(a), int(b)) for a, b in box)
        shape = tuple(int(b - a) for a, b in box)
        size = int(np.prod(shape))
        mask = payload["masks"][start:start + size].reshape(shape)
        start += size
        instances.append(Instance(slices, mask, None if np.isnan(point).any() else tuple(point), score))
    return instances


def _segment_group(segment, read, shape, coords, sp_params, marks, name, **options) -> list:
    """One task's instances, done-marked with their arrays, so a rerun takes them from the mark."""
    instances = segment(read, shape, coords, sp_params, **options)
    marks.mark(name, _pack(instances))
    return instances


def _pick_cryosam(volume, read, points, params: CryosamParams, out, stem, object_name, client, *, device="auto",
                  star=None, layout="default", raw=None, contrast="auto", query=None, query_only=False) -> PickResult:
    import shutil

    from ..engine.cluster import gpu_resources
    from ..io.normalize import robust_range
    from ..prompting.features import FeatureParams, extract_features, open_features
    from ..prompting.matching import match, query_from_instances
    from ..prompting.selfprompt import segment_instances
    from ..report import RecordedRead, recorded

    segment = recorded(segment_instances, "infer", step="cryosam-segment")  # reads nested: timed apart
    result = PickResult(pd.DataFrame(columns=["z", "y", "x", "score"]), prompts=len(points))
    clock = time.perf_counter()
    shape, vs = volume.shape, volume.voxel_size
    store = store_of(volume, out, client, layout)
    result.store = str(store)
    features_store = out / f"{stem}_features.zarr"
    extract_features(store, features_store, FeatureParams(checkpoint=params.dinov2_checkpoint,
                                                          image_size=params.feature_image_size,
                                                          compile=params.compile),
                     client=client, device=device, polarity=contrast)
    result.seconds["features"] = time.perf_counter() - clock
    source = raw if raw is not None else read
    clock = time.perf_counter()

    @functools.cache
    def options() -> dict:
        """SAM2's options; robust_range samples the volume, so only when SAM2 runs (not on a resumed run)."""
        return dict(config=params.config, checkpoint=params.sam_checkpoint, image_size=params.image_size,
                    device=device, batch=params.batch, seed=params.seed, value_range=robust_range(read, shape),
                    compile=params.compile)

    sp_params = params.self_prompt(vs[2])
    features = open_features(features_store)
    resumed = result.resumed
    if query is None:
        asked = _cryosam_marks(out, stem, "cryosam-query", params, features_store, source, contrast, prompts=points)
        if asked.done("query.npy"):
            query = asked.payload("query.npy")
            resumed.append("query")
        else:
            prompted = client.submit(segment, RecordedRead(read), shape, points, sp_params, pure=False,
                                     resources=gpu_resources(client, device), **options()).result()
            query = query_from_instances(features, min(features), prompted, points=points, at=params.query_at)
            asked.mark("query.npy", np.asarray(query, np.float32))
    result.query = np.asarray(query)
    if query_only:
        return result
    marks = _cryosam_marks(out, stem, "pick-cryosam", params, features_store, source, contrast, query=query)
    if marks.done("complete"):  # every output written by a run of these parameters
        files = [Path(f) for f in marks.payload("complete")["files"]]
        if all(f.exists() for f in files):
            kept = marks.payload("matching.npz")
            result.picks = pd.DataFrame({k: kept[k] for k in ("z", "y", "x", "score")})
            result.files, result.status = files, "skipped"
            result.notes.append("already done with these parameters: nothing recomputed")
            return result
    if marks.done("matching.npz"):
        kept = marks.payload("matching.npz")
        detections = pd.DataFrame({k: kept[k] for k in ("z", "y", "x", "score")})
        resumed.append("matching")
    else:
        detections = match(features, query, params.match(), client=client)
        marks.mark("matching.npz", {k: detections[k].to_numpy() for k in ("z", "y", "x", "score")})
    result.seconds["prompts + matching"] = time.perf_counter() - clock

    clock = time.perf_counter()
    coords = detections[["z", "y", "x"]].to_numpy(dtype=np.float64)
    coords = np.minimum(coords, np.array(shape) - 1)
    instances = [None] * len(coords)
    groups = _groups(coords, 16) if len(coords) else []
    futures, loaded = [], 0
    for g, group in enumerate(groups):
        name = f"instances/{g}.npz"
        if marks.done(name):
            for i, instance in zip(group, _unpack(marks.payload(name))):
                instances[i] = instance
            loaded += len(group)
        else:
            futures.append((group, client.submit(_segment_group, segment, RecordedRead(read), shape, coords[group],
                                                 sp_params, marks, name, pure=False,
                                                 resources=gpu_resources(client, device), **options())))
    for group, future in futures:
        for i, instance in zip(group, future.result()):
            instances[i] = instance
    result.instances_computed = len(coords) - loaded
    if loaded:
        resumed.append(f"{loaded} of {len(coords)} instances")
    if resumed:
        result.notes.append(f"resumed: {', '.join(resumed)} already done, not redone")
    result.seconds["instances"] = time.perf_counter() - clock
    result.picks = detections.reset_index(drop=True)
    result.files = write_outputs(out, stem, "cryosam", result.picks, vs[2], object_name, shape=shape, star=star)
    result.files.append(_preview(read if raw is None else raw, shape, out / f"{stem}_cryosam_picks.png", result.picks,
                                 stem, "cryosam", vs,
                                 params.diameter / 2 if params.diameter else None,
                                 client=client))
    result.files += write_instance_labels(store, instances, result.picks["score"].to_numpy(), layout=layout, out=out,
                                          stem=stem)
    shutil.rmtree(marks.folder / "instances", ignore_errors=True)  # in the labels now; query and matching stay
    marks.mark("complete", {"files": np.array([str(f) for f in result.files])})
    return result


def combine_queries(queries) -> np.ndarray:
    """One query for a collection from its prompted tomograms' queries: their L2-normalised mean
    (each tomogram's is already the normalised mean of its prompts' features)."""
    total = np.sum([np.asarray(q, np.float64) for q in queries], axis=0)
    norm = np.linalg.norm(total)
    if not norm > 0:
        raise InputError("the prompted tomograms' queries cancel out: no common query")
    return (total / norm).astype(np.float32)


def write_instance_labels(store: Path, instances, scores, *, name: str = "cryosam", layout: str = "default", out=None,
                          stem=None) -> list[Path]:
    """Instance labels (1 = best score) and the semantic mask, written chunk by chunk, as
    ``<name>_instances`` and ``<name>_semantic`` in ``labels/`` of the store or
    (``layout="portal"``) as their own OME-Zarr under ``out``."""
    from ..io.omezarr import open_image, write_segmentation
    from ..prompting.instances import lazy_instance_labels

    _, arrays, _, _ = open_image(store)
    labels = lazy_instance_labels(instances, arrays[0].shape, arrays[0].chunks, scores=scores)
    where_to = dict(layout=layout, out=out, stem=stem)
    return [write_segmentation(store, f"{name}_instances", labels, binary=False, **where_to,
                               properties=[{"label-value": i + 1, "score": float(s)} for i, s in enumerate(scores)]),
            write_segmentation(store, f"{name}_semantic", (labels > 0).astype(np.uint8), colors={1: [255, 160, 0, 255]},
                               **where_to)]
