"""``cryodask features`` and ``cryodask pick``: DINOv2 feature pyramids and particle picks."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import (CLUSTER, CLUSTER_CONFIG, MEMORY, POLARITY, REPORT, THREADS, WORKERS, cluster_session,
                      parse_triple)


def parse_prompt(text: str) -> tuple[float, float, float]:
    """``"0,12.5,40"`` → ``(0.0, 12.5, 40.0)``: any three finite voxel coordinates (0 is a voxel;
    whether the point lies in the volume is checked against its shape)."""
    import math

    from ..errors import InputError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise InputError(f"--prompt must be three numbers z,y,x (voxels), got {text!r}")
    return values


@app.command()
def features(
    tomogram: Path = typer.Argument(..., help="Tomogram: MRC/TIFF or OME-Zarr image."),
    out: Path = typer.Option(..., "--out", help="Output folder; the store is <out>/<stem>_features.zarr."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Local DINOv2 folder (transformers format; ViT-L/14 default)."),
    weights: Path = typer.Option(None, "--weights", help="Weights folder holding dinov2-large (or CRYODASK_WEIGHTS)."),
    image_size: int = typer.Option(518, "--image-size", help="Slices are resized to this (CryoSAM: 518)."),
    batch: int = typer.Option(8, "--batch", help="Slices per model call."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | gpu (on the workers)."),
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å, if the input has none."),
    polarity: str = POLARITY,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Per-slice DINOv2 features of the z, y and x views, stored as a float16 pyramid at ratios 4, 8, 16."""
    from ..engine.cluster import check_spec
    from ..engine.lock import output_lock
    from ..io.folders import check_output_dir
    from ..io.volumes import open_reader
    from ..models.dinov2 import describe_dinov2, resolve_dinov2
    from ..polarity import check_polarity, resolve_polarity
    from ..prompting.features import FeatureParams, extract_features

    check_spec(cluster)
    check_polarity(polarity)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    params = FeatureParams(image_size=image_size, batch=batch)
    describe_dinov2(resolve_dinov2(checkpoint, weights))
    read, shape, vs_read, _ = open_reader(tomogram, vs)
    contrast = resolve_polarity(polarity, read, shape, vs_read)  # before a cluster starts
    typer.echo(f"{tomogram}: {contrast.describe()}")
    out = check_output_dir(out)
    store = out / f"{tomogram.name.split('.')[0]}_features.zarr"
    from ..report import run_report

    with output_lock(out, "features"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="features", echo=typer.echo):
        path = extract_features(tomogram, store, checkpoint=checkpoint, weights=weights, params=params, client=client,
                                device=device, voxel_size=vs, polarity=contrast)
    typer.echo(f"wrote {path}")


@app.command()
def pick(
    tomogram: Path = typer.Argument(..., help="Tomogram: MRC/TIFF or OME-Zarr image."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    method: str = typer.Option("log", "--method", help="log (no weights) | cryosam (SAM2 + DINOv2 weights)."),
    diameter: float = typer.Option(None, "--diameter", help="Particle diameter in Å (log: required; cryosam: sizes the masks)."),
    threshold: float = typer.Option(None, "--threshold", help="log: response threshold in robust standard deviations "
                                    "above the median response (default 4)."),
    min_distance: float = typer.Option(None, "--min-distance", help="log: closest two picks, Å."),
    max_picks: int = typer.Option(None, "--max-picks", help="log: keep the best N."),
    min_roundness: str = typer.Option(None, "--min-roundness", help="log: Hessian roundness at a pick, at least "
                                      "(default 0.2; balls 0.33-0.38 under any wedge, sheets 0); none: off."),
    max_scale_ratio: str = typer.Option(None, "--max-scale-ratio", help="log: response at 1.5σ over at σ, at most (default "
                                        "0.85: a ball of the diameter 0.7, 1.25x it 1.1); none: off."),
    prompt: list[str] = typer.Option(None, "--prompt", help="cryosam: a clicked particle z,y,x in voxels (repeatable)."),
    prompts: Path = typer.Option(None, "--prompts", help="cryosam: prompts as STAR, CSV or copick JSON."),
    sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint", help="cryosam: SAM2.1 checkpoint ({'model': state_dict})."),
    dinov2_checkpoint: Path = typer.Option(None, "--dinov2-checkpoint", help="cryosam: local DINOv2 folder."),
    weights: Path = typer.Option(None, "--weights", help="Weights folder (sam2.1_hiera_*.pt, dinov2-large/)."),
    model_config: str = typer.Option("sam2.1_hiera_l", "--model-config", help="cryosam: SAM2 config name or YAML."),
    image_size: int = typer.Option(None, "--image-size", help="cryosam: SAM2 input size override."),
    feature_image_size: int = typer.Option(518, "--feature-image-size", help="cryosam: DINOv2 slice size."),
    iou_threshold: float = typer.Option(0.5, "--iou-threshold", help="cryosam: stop propagating below this IoU."),
    sim_threshold: float = typer.Option(0.5, "--sim-threshold", help="cryosam: cosine similarity kept per level."),
    top_k: int = typer.Option(512, "--top-k", help="cryosam: most detections."),
    matching: str = typer.Option("hierarchical", "--matching", help="cryosam: hierarchical | naive."),
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
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (on the workers)."),
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å, if the input has none."),
    chunks: str = typer.Option("64,256,256", "--chunks", help="Block shape z,y,x."),
    layout: str = typer.Option("default", "--layout", help="cryosam labels: default (labels/ of the tomogram's OME-Zarr) or portal (the CryoET Data Portal's: each its own <out>/<stem>_cryosam_<name>.zarr)."),
    copick: Path = typer.Option(None, "--copick", help="copick config JSON (created if missing): an MRC input is converted into the project, picks written as user cryodask-<method>, the object added to the config."),
    copick_type: str = typer.Option("wbp", "--copick-type", help="copick tomogram type written with --copick."),
    polarity: str = POLARITY,
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Pick particles; writes <stem>_<method>_picks.star (RELION 5, with tomograms.star) and .csv, and
    copick/ExperimentRuns/<stem>/Picks/*.json."""
    from ..engine.cluster import check_spec
    from ..engine.lock import output_lock
    from ..report import run_report
    from ..errors import InputError
    from ..io.folders import check_output_dir
    from ..io.picks import StarStyle
    from ..io.volumes import is_zarr, open_reader
    from ..picking.pipeline import load_prompts, pick as run, sam2_checkpoint
    from ..polarity import check_polarity, resolve_polarity

    check_spec(cluster)
    check_polarity(polarity)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    block = parse_triple(chunks, "--chunks")
    if method not in ("log", "cryosam"):
        raise InputError(f"--method must be log or cryosam, got {method!r}")
    from ..io.omezarr import check_layout

    check_layout(layout)
    if layout == "portal" and copick is not None:
        raise InputError("--layout portal and --copick write the labels differently: give one of them")
    _, shape, tomo_vs, _ = open_reader(tomogram, vs, block)
    style = StarStyle(star, tilt_series_pixel_size, voltage, cs, amplitude_contrast)
    style.row(tomogram.name.split(".")[0], shape, tomo_vs[2])  # binning < 1 is refused before a cluster starts
    points = [parse_prompt(p) for p in (prompt or [])]
    if method == "log":
        from ..picking.log import LogParams

        if diameter is None:
            raise InputError("--method log needs --diameter (Å)")
        from ..picking.pipeline import log_options

        LogParams(diameter, **log_options(threshold=threshold, min_distance=min_distance, max_picks=max_picks,
                                          min_roundness=min_roundness, max_scale_ratio=max_scale_ratio))
    else:
        from ..models.dinov2 import describe_dinov2, resolve_dinov2
        from ..models.sam2 import config_path

        load_prompts(points, prompts, shape=shape, voxel_size=tomo_vs[2], tomograms=tomograms,
                     tomo_name=tomogram.name.split(".")[0])
        config_path(model_config)
        sam2_checkpoint(sam_checkpoint, weights, model_config)
        describe_dinov2(resolve_dinov2(dinov2_checkpoint, weights))
    check_output_dir(out)
    contrast = resolve_polarity(polarity, *open_reader(tomogram, vs, block, dtype="float32")[:3])  # before a cluster
    project = None
    if copick is not None:
        from ..io.copick import check_writable, open_project

        project = check_writable(open_project(copick, create=True))
    with output_lock(out, "pick"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="pick", echo=typer.echo):
        if project is not None and not is_zarr(tomogram):  # the tomogram goes straight into the project's run
            from ..io.copick import tomograms_into

            tomogram = tomograms_into(project, [tomogram], tomo_type=copick_type, chunks=block, voxel_size=vs,
                                      work=out, client=client)[tomogram]
        result = run(tomogram, out, method=method, diameter=diameter, threshold=threshold, min_distance=min_distance,
                     max_picks=max_picks, min_roundness=min_roundness, max_scale_ratio=max_scale_ratio,
                     prompts=points, prompts_file=prompts, sam_checkpoint=sam_checkpoint,
                     dinov2_checkpoint=dinov2_checkpoint, weights=weights, config=model_config, image_size=image_size,
                     feature_image_size=feature_image_size, iou_threshold=iou_threshold, sim_threshold=sim_threshold,
                     top_k=top_k, matching=matching, object_name=object_name, voxel_size=vs, chunks=block,
                     device=device, star=style, tomograms=tomograms, client=client, layout=layout, polarity=contrast)
        if project is not None:
            from ..io.copick import run_of, segmentation_from_labels, write_picks_into

            run_name = run_of(tomogram) or tomogram.name.split(".")[0]
            result.files.append(write_picks_into(project, run_name, result.picks, tomo_vs, tool=method,
                                                 object_name=object_name, radius=diameter / 2 if diameter else None))
            if result.store and (Path(result.store) / "labels" / "cryosam_semantic").exists():
                result.files.append(segmentation_from_labels(project, result.store, run_name, "cryosam_semantic",
                                                             tool=method, name=object_name))
    for note in result.notes:
        typer.echo(note)
    typer.echo(f"{len(result.picks)} picks ({method}); time: "
               + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    for path in result.files:
        typer.echo(f"wrote {path}")
