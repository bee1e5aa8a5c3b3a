"""``cryodask features`` and ``cryodask pick``: DINOv2 feature pyramids and particle picks."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS, cluster_session, parse_triple


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
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Per-slice DINOv2 features of the z, y and x views, stored as a float16 pyramid at ratios 4, 8, 16."""
    from ..cluster import check_spec
    from ..lock import output_lock
    from ..io.folders import check_output_dir
    from ..io.volumes import open_reader
    from ..models.dinov2 import describe_dinov2, resolve_dinov2
    from ..prompting.features import FeatureParams, extract_features

    check_spec(cluster)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    params = FeatureParams(image_size=image_size, batch=batch)
    describe_dinov2(resolve_dinov2(checkpoint, weights))
    open_reader(tomogram, vs)
    out = check_output_dir(out)
    store = out / f"{tomogram.name.split('.')[0]}_features.zarr"
    from ..report import run_report

    with output_lock(out, "features"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="features", echo=typer.echo):
        path = extract_features(tomogram, store, checkpoint=checkpoint, weights=weights, params=params, client=client,
                                device=device, voxel_size=vs)
    typer.echo(f"wrote {path}")


@app.command()
def pick(
    tomogram: Path = typer.Argument(..., help="Tomogram: MRC/TIFF or OME-Zarr image."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    method: str = typer.Option("log", "--method", help="log (no weights) | cryosam (SAM2 + DINOv2 weights)."),
    diameter: float = typer.Option(None, "--diameter", help="Particle diameter in Å (log: required; cryosam: sizes the masks)."),
    threshold: float = typer.Option(None, "--threshold", help="log: response threshold in standard deviations."),
    min_distance: float = typer.Option(None, "--min-distance", help="log: closest two picks, Å."),
    max_picks: int = typer.Option(None, "--max-picks", help="log: keep the best N."),
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
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (on the workers)."),
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å, if the input has none."),
    chunks: str = typer.Option("64,256,256", "--chunks", help="Block shape z,y,x."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Pick particles; writes <stem>_<method>_picks.star/.csv and copick/ExperimentRuns/<stem>/Picks/*.json."""
    from ..cluster import check_spec
    from ..lock import output_lock
    from ..report import run_report
    from ..errors import InputError
    from ..io.folders import check_output_dir
    from ..io.volumes import open_reader
    from ..picking.pipeline import load_prompts, pick as run, sam2_checkpoint

    check_spec(cluster)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    block = parse_triple(chunks, "--chunks")
    if method not in ("log", "cryosam"):
        raise InputError(f"--method must be log or cryosam, got {method!r}")
    _, shape, tomo_vs, _ = open_reader(tomogram, vs, block)
    points = [parse_prompt(p) for p in (prompt or [])]
    if method == "log":
        from ..picking.log import LogParams

        if diameter is None:
            raise InputError("--method log needs --diameter (Å)")
        LogParams(diameter, **{k: v for k, v in (("threshold", threshold), ("min_distance", min_distance),
                                                 ("max_picks", max_picks)) if v is not None})
    else:
        from ..models.dinov2 import describe_dinov2, resolve_dinov2
        from ..models.sam2 import config_path

        load_prompts(points, prompts, shape=shape, voxel_size=tomo_vs[2])
        config_path(model_config)
        sam2_checkpoint(sam_checkpoint, weights, model_config)
        describe_dinov2(resolve_dinov2(dinov2_checkpoint, weights))
    check_output_dir(out)
    with output_lock(out, "pick"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="pick", echo=typer.echo):
        result = run(tomogram, out, method=method, diameter=diameter, threshold=threshold, min_distance=min_distance,
                     max_picks=max_picks, prompts=points, prompts_file=prompts, sam_checkpoint=sam_checkpoint,
                     dinov2_checkpoint=dinov2_checkpoint, weights=weights, config=model_config, image_size=image_size,
                     feature_image_size=feature_image_size, iou_threshold=iou_threshold, sim_threshold=sim_threshold,
                     top_k=top_k, matching=matching, object_name=object_name, voxel_size=vs, chunks=block,
                     device=device, client=client)
    typer.echo(f"{len(result.picks)} picks ({method}); time: "
               + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    for path in result.files:
        typer.echo(f"wrote {path}")
