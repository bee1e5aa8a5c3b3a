"""``cryodask features`` and ``cryodask pick``: DINOv2 feature pyramids and particle picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import typer

from . import app
from ..engine.collection import Outcome, find_items
from ..picking.params import CryosamParams as S, LogParams as L
from ..prompting.params import FeatureParams as F
from .collection import IN_FLIGHT, finish, over_collection
from .options import (CHUNKS, CLUSTER, CLUSTER_CONFIG, DEVICE, MEMORY, POLARITY, REPORT, THREADS, WORKERS, check_device,
                      parse_triple)


def parse_prompt(text: str) -> tuple[str | None, tuple[float, float, float]]:
    """``"0,12.5,40"`` → ``(None, (0.0, 12.5, 40.0))``; ``"TS_01:0,12.5,40"`` names its tomogram.
    Any three finite voxel coordinates (0 is a voxel; whether the point lies in the volume is
    checked against its shape)."""
    import math

    from ..errors import InputError

    tomogram, _, point = text.rpartition(":")
    try:
        values = tuple(float(v) for v in point.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise InputError(f"--prompt must be three numbers z,y,x (voxels), optionally after TOMOGRAM:, got {text!r}")
    return tomogram or None, values


@app.command()
def features(
    inputs: list[str] = typer.Argument(..., help="Tomograms: MRC/TIFF files, OME-Zarr images, folders, globs, a STAR "
                                                 "listing or a copick config."),
    out: Path = typer.Option(..., "--out", help="Output folder; each store is <out>/<stem>_features.zarr."),
    checkpoint: Path = typer.Option(None, "--checkpoint",
                                    help="Local DINOv2 folder (transformers format; ViT-L/14 default)."),
    weights: Path = typer.Option(None, "--weights", help="Weights folder holding dinov2-with-registers-large "
                                                         "(CryoSAM's) or dinov2-large (or CRYODASK_WEIGHTS)."),
    image_size: int = typer.Option(F.image_size, "--image-size", help="Slices are resized to this (CryoSAM: 518)."),
    batch: int = typer.Option(F.batch, "--batch", help="Slices per model call (default: what half the free GPU "
                                                      "memory holds on CUDA, 8 on CPU)."),
    compile: bool = typer.Option(F.compile, "--compile", help="DINOv2 through torch.compile (slow first call)."),
    device: str = DEVICE,
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å (default: the input's header)."),
    polarity: str = POLARITY,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
    in_flight: int = IN_FLIGHT,
):
    """Per-slice DINOv2 patch maps of the z, y and x views (float16), read as a pyramid at ratios 16, 8, 4."""
    from ..engine.cluster import check_spec
    from ..io.folders import check_output_dir
    from ..io.volumes import open_volume
    from ..models.dinov2 import describe_dinov2, resolve_dinov2
    from ..polarity import check_polarity, resolve_polarity
    from ..prompting.features import extract_features

    check_spec(cluster)
    check_polarity(polarity)
    check_device(device)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    model = resolve_dinov2(checkpoint, weights)
    describe_dinov2(model)
    params = F(image_size=image_size, batch=batch, checkpoint=str(model), compile=compile)
    out = check_output_dir(out)

    def work(item, client):
        volume = open_volume(item.path, vs)
        contrast = resolve_polarity(polarity, volume, volume.shape, volume.voxel_size)
        store = out / f"{item.name}_features.zarr"
        path = extract_features(volume, store, params, client=client, device=device, polarity=contrast)
        return Outcome(item, "done", value=path, lines=[f"{item.path}: {contrast.describe()}", f"wrote {path}"])

    over_collection("features", inputs, work, check=lambda item: open_volume(item.path, vs), cluster=cluster,
                    workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                    cluster_config=cluster_config, report_dir=report_dir, lock_folder=out, in_flight=in_flight)


@app.command()
def pick(
    inputs: list[str] = typer.Argument(..., help="Tomograms: MRC/TIFF files, OME-Zarr images, folders, globs, a STAR "
                                                 "listing or a copick config."),
    out: Path = typer.Option(..., "--out", help="Output folder (one <stem>_<method>_picks.star per tomogram, and "
                                                "<method>_picks.star for all)."),
    method: str = typer.Option("log", "--method", help="log (no weights) | cryosam (SAM2 + DINOv2 weights)."),
    diameter: float = typer.Option(None, "--diameter",
                                   help="Particle diameter in Å (log: required; cryosam: sizes the masks)."),
    threshold: float = typer.Option(L.threshold, "--threshold", help="log: response threshold in robust standard "
                                                                     "deviations above the median response."),
    min_distance: float = typer.Option(None, "--min-distance", help="log: closest two picks, Å (default: the particle "
                                                                    "radius, --diameter / 2)."),
    max_picks: int = typer.Option(L.max_picks, "--max-picks", help="log: keep the best N (default: all)."),
    min_roundness: str = typer.Option(f"{L.min_roundness:g}", "--min-roundness",
                                      help="log: Hessian roundness at a pick, at least (balls 0.33-0.38 under any "
                                           "wedge, sheets 0); none: off."),
    max_scale_ratio: str = typer.Option(f"{L.max_scale_ratio:g}", "--max-scale-ratio",
                                        help="log: response at 1.5σ over at σ, at most (a ball of the diameter 0.7, "
                                             "1.25x it 1.1); none: off."),
    prompt: list[str] = typer.Option(None, "--prompt", help="cryosam: a clicked particle z,y,x in voxels, or "
                                                            "TOMOGRAM:z,y,x in a collection (repeatable)."),
    prompts: Path = typer.Option(None, "--prompts", help="cryosam: prompts as STAR, CSV or copick JSON."),
    sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint",
                                        help="cryosam: SAM2.1 checkpoint ({'model': state_dict})."),
    dinov2_checkpoint: Path = typer.Option(None, "--dinov2-checkpoint", help="cryosam: local DINOv2 folder."),
    weights: Path = typer.Option(None, "--weights", help="Weights folder (sam2.1_hiera_*.pt, "
                                                         "dinov2-with-registers-large/ or dinov2-large/)."),
    model_config: str = typer.Option(S.config, "--model-config", help="cryosam: SAM2 config name or YAML."),
    image_size: int = typer.Option(S.image_size, "--image-size",
                                   help="cryosam: SAM2 input size (default: the SAM2 config's, 1024)."),
    feature_image_size: int = typer.Option(S.feature_image_size, "--feature-image-size",
                                           help="cryosam: DINOv2 slice size."),
    iou_threshold: float = typer.Option(S.iou_threshold, "--iou-threshold",
                                        help="cryosam: stop propagating below this IoU."),
    sim_threshold: float = typer.Option(S.sim_threshold, "--sim-threshold",
                                        help="cryosam: cosine similarity kept per level."),
    top_k: int = typer.Option(S.top_k, "--top-k", help="cryosam: most detections."),
    matching: str = typer.Option(S.matching, "--matching", help="cryosam: hierarchical | naive."),
    compile: bool = typer.Option(S.compile, "--compile", help="cryosam: SAM2's image encoder and DINOv2 through "
                                                             "torch.compile (slow first call)."),
    preset: str = typer.Option(S.preset, "--preset", help="cryosam: cryodask (improved defaults) | cryosam (CryoSAM's "
                                                          "published settings: z only, binary mask prompt, IoU > 0.5, "
                                                          "1024 px area prior, query at the mask centroids)."),
    object_name: str = typer.Option("particle", "--object", help="Object name in the copick file."),
    star: str = typer.Option("relion5", "--star", help="STAR picks: relion5 (centred Å, tomograms.star beside) | "
                                                         "relion4 (rlnCoordinateX/Y/Z pixels)."),
    tilt_series_pixel_size: float = typer.Option(None, "--tilt-series-pixel-size",
                                                 help="relion5: Å per tilt-series pixel (default: the voxel size, "
                                                      "binning 1); binning = voxel size / this."),
    voltage: float = typer.Option(300.0, "--voltage", help="relion5: kV, for RELION's optics group."),
    cs: float = typer.Option(2.7, "--cs", help="relion5: spherical aberration, mm."),
    amplitude_contrast: float = typer.Option(0.1, "--amplitude-contrast", help="relion5: amplitude contrast."),
    tomograms: Path = typer.Option(None, "--tomograms", help="cryosam: tomograms.star of RELION 5 --prompts "
                                                             "(default: found beside them or above)."),
    device: str = DEVICE,
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å (default: the input's header)."),
    chunks: str = CHUNKS,
    layout: str = typer.Option("default", "--layout", help="cryosam labels: default (labels/ of the tomogram's "
                                                           "OME-Zarr) or portal (the CryoET Data Portal's: each its "
                                                           "own <out>/<stem>_cryosam_<name>.zarr)."),
    copick: Path = typer.Option(None, "--copick", help="copick config JSON (created if missing): an MRC input is "
                                                       "converted into the project, picks written as user "
                                                       "cryodask-<method>, the object added to the config."),
    copick_type: str = typer.Option("wbp", "--copick-type", help="copick tomogram type written with --copick."),
    polarity: str = POLARITY,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
    in_flight: int = IN_FLIGHT,
):
    """Pick particles; writes <stem>_<method>_picks.star (RELION 5, with tomograms.star) and .csv, and
    copick/ExperimentRuns/<stem>/Picks/*.json."""
    from ..engine.cluster import check_spec
    from ..errors import InputError
    from ..io.folders import check_output_dir
    from ..io.picks import StarStyle
    from ..io.volumes import is_zarr, open_volume
    from ..io.layouts import check_layout
    from ..picking.pipeline import load_prompts, pick as run, pick_params
    from ..polarity import check_polarity

    check_spec(cluster)
    check_polarity(polarity)
    check_device(device)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    block = parse_triple(chunks, "--chunks")
    check_layout(layout)
    if method == "log":
        options = dict(diameter=diameter, threshold=threshold, min_distance=min_distance, max_picks=max_picks,
                       min_roundness=min_roundness, max_scale_ratio=max_scale_ratio)
    else:
        options = dict(diameter=diameter, config=model_config, image_size=image_size,
                       feature_image_size=feature_image_size, iou_threshold=iou_threshold, sim_threshold=sim_threshold,
                       top_k=top_k, matching=matching, sam_checkpoint=sam_checkpoint,
                       dinov2_checkpoint=dinov2_checkpoint, preset=preset, compile=compile)
    if layout == "portal" and copick is not None:
        raise InputError("--layout portal and --copick write the labels differently: give one of them")
    style = StarStyle(star, tilt_series_pixel_size, voltage, cs, amplitude_contrast)
    points = [parse_prompt(p) for p in (prompt or [])]

    def points_of(item):
        return [point for tomogram, point in points if tomogram in (None, item.name)]

    items = find_items(inputs)
    unknown = sorted({t for t, _ in points if t} - {item.name for item in items})
    if unknown:
        raise InputError(f"--prompt names {', '.join(unknown)}, not among the tomograms "
                         f"({', '.join(i.name for i in items[:5])}{', ...' if len(items) > 5 else ''})")
    named = _prompted_names(prompts) if prompts is not None else set()
    prompted = {item.name for item in items if points_of(item) or named is None or item.name in named}
    shared = {}  # cryosam over a collection: one query from the prompted tomograms, matched in all
    collective = method == "cryosam" and len(items) > 1

    def check(item):
        volume = open_volume(item.path, vs, chunks=block)
        shape, tomo_vs = volume.shape, volume.voxel_size
        style.row(item.name, shape, tomo_vs[2])  # binning < 1 is refused before a cluster starts
        if method == "cryosam" and (item.name in prompted or len(items) == 1):  # one: its prompts' own error
            load_prompts(points_of(item), prompts, shape=shape, voxel_size=tomo_vs[2], tomograms=tomograms,
                         tomo_name=item.name)

    if len(items) == 1:  # one tomogram: its header, STAR options and prompts before any model is looked for
        check(items[0])

    if method == "cryosam" and not prompted:
        raise InputError("cryosam needs at least one prompt (--prompt [TOMOGRAM:]z,y,x or --prompts FILE)")
    params = pick_params(method, weights, **options)  # the one time the options become parameters (models found)
    check_output_dir(out)
    project = None
    if copick is not None:
        from ..io.copick import check_writable, open_project

        project = check_writable(open_project(copick, create=True))

    def query_of(item, client):
        volume = open_volume(item.path, vs, chunks=block, dtype="float32")
        result = run(volume, out, params, prompts=points_of(item), prompts_file=prompts, device=device, star=style,
                     tomograms=tomograms, client=client, layout=layout, polarity=_polarity(polarity, volume),
                     name=item.name, query_only=True)
        done = f" ({', '.join(result.resumed)} already done)" if result.resumed else ""
        return Outcome(item, "done", value=result.query,
                       lines=[f"{item.path}: query from {result.prompts} prompts{done}"])

    def prepare(client, good):
        """Phase one of cryosam over a collection: each prompted tomogram's query, then one for all."""
        from ..engine.collection import run_collection
        from ..picking.pipeline import combine_queries

        first = run_collection([i for i in good if i.name in prompted], lambda i: query_of(i, client),
                               command="pick (query)", client=client, window=in_flight, echo=typer.echo)
        queries = [o.value for o in first.outcomes if o.status == "done"]
        if not queries:
            raise InputError("no prompted tomogram gave a query: nothing to match")
        shared["query"] = combine_queries(queries)
        np.save(out / "cryosam_query.npy", shared["query"])
        typer.echo(f"one query from {len(queries)} prompted tomograms, matched in all {len(good)}: "
                   f"wrote {out / 'cryosam_query.npy'}")

    def work(item, client):
        tomogram = item.path
        contrast = _polarity(polarity, open_volume(tomogram, vs, chunks=block, dtype="float32"))
        if project is not None and not is_zarr(tomogram):  # the tomogram goes straight into the project's run
            from ..io.copick import tomograms_into

            tomogram = tomograms_into(project, [tomogram], tomo_type=copick_type, chunks=block, voxel_size=vs,
                                      work=out, client=client)[tomogram]
        volume = open_volume(tomogram, vs, chunks=block)
        result = run(volume, out, params, prompts=points_of(item), prompts_file=prompts, object_name=object_name,
                     device=device, star=style, tomograms=tomograms, client=client, layout=layout, polarity=contrast,
                     name=item.name, query=shared.get("query"))
        if project is not None:
            from ..io.copick import segmentation_from_labels, write_picks_into

            tomo_vs = volume.voxel_size
            run_name = item.run or item.name
            result.files.append(write_picks_into(project, run_name, result.picks, tomo_vs, tool=method,
                                                 object_name=object_name, radius=diameter / 2 if diameter else None))
            if result.store and (Path(result.store) / "labels" / "cryosam_semantic").exists():
                result.files.append(segmentation_from_labels(project, result.store, run_name, "cryosam_semantic",
                                                             tool=method, name=object_name))
        lines = [f"{item.path}:", *(f"  {note}" for note in result.notes),
                 f"  {len(result.picks)} picks ({method}); time: "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()),
                 *(f"  wrote {path}" for path in result.files)]
        return Outcome(item, result.status, value=result, lines=lines)

    report = over_collection("pick", inputs, work, check=check, items=items, prepare=prepare if collective else None,
                             cluster=cluster, workers=workers,
                             threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                             cluster_config=cluster_config, report_dir=report_dir, lock_folder=out,
                             in_flight=in_flight, finish_later=True)
    done = [o for o in report.outcomes if o.status in ("done", "skipped") and o.value is not None]
    if len(report.outcomes) > 1 and star == "relion5" and done:
        from ..io.picks import merge_particle_stars

        path = merge_particle_stars([f for o in done for f in o.value.files if str(f).endswith("_picks.star")],
                                    out / f"{method}_picks.star")
        typer.echo(f"wrote {path} ({sum(len(o.value.picks) for o in done)} picks of {len(done)} tomograms)")
    finish(report, several=len(report.outcomes) > 1)


def _prompted_names(path: Path) -> set[str] | None:
    """The tomograms a prompts file names (``rlnTomoName``); None when it names none (its prompts
    are the one tomogram's)."""
    import pandas as pd

    from ..errors import where

    if not path.is_file():
        return None  # the prompts' own reader says what is wrong
    try:
        if path.suffix.lower() == ".star":
            import starfile

            tables = [t for t in starfile.read(path, always_dict=True).values() if isinstance(t, pd.DataFrame)]
        elif path.suffix.lower() == ".csv":
            tables = [pd.read_csv(path)]
        else:
            return None
    except Exception as exc:  # noqa: BLE001  (starfile and pandas raise many kinds)
        raise where(path, f"is not a readable prompts file ({type(exc).__name__})") from None
    names = {str(n) for t in tables if "rlnTomoName" in t.columns for n in t["rlnTomoName"]}
    return names or None


def _polarity(choice: str, volume):
    """The tomogram's contrast polarity (``auto``: decided from its data, :mod:`cryodask.polarity`)."""
    from ..polarity import resolve_polarity

    return resolve_polarity(choice, volume, volume.shape, volume.voxel_size)
