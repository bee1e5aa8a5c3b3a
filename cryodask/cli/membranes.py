"""``cryodask membranes``: ETSAM (two-stage SAM2) or the classical sheet filter over tomograms."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import (CLUSTER, CLUSTER_CONFIG, MEMORY, POLARITY, REPORT, THREADS, WORKERS, cluster_session,
                      parse_triple)


def parse_pair(text: str | None, name: str) -> tuple[int, int] | None:
    from ..errors import InputError

    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise InputError(f"{name} must be two integers Y,X, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise InputError(f"{name} must be two positive integers Y,X, got {text!r}")
    return values


@app.command()
def membranes(
    inputs: list[str] = typer.Argument(..., help="Tomograms: MRC/REC/MAP files, folders, globs, or OME-Zarr images."),
    out: Path = typer.Option(..., "--out", help="Output folder (MRC outputs; OME-Zarr for MRC inputs)."),
    method: str = typer.Option(None, "--method",
                               help="etsam | classical (default: etsam when weights are found, else classical)."),
    stage1_checkpoint: Path = typer.Option(None, "--stage1-checkpoint",
                                           help="ETSAM stage-1 weights (default: etsam_stage1_v1.pt in --weights)."),
    stage2_checkpoint: Path = typer.Option(None, "--stage2-checkpoint",
                                           help="ETSAM stage-2 weights (default: etsam_stage2_v1.pt in --weights)."),
    weights: Path = typer.Option(None, "--weights",
                                 help="Folder holding etsam_stage{1,2}_v1.pt (or CRYODASK_WEIGHTS)."),
    model_config: str = typer.Option("sam2.1_hiera_b+", "--model-config",
                                     help="SAM2 config name (sam2.1_hiera_b+, sam2.1_hiera_t, ...) or YAML path."),
    image_size: int = typer.Option(None, "--image-size",
                                   help="Model input size (default: the SAM2 config's; published models 1024)."),
    normalize: str = typer.Option("min_max_positive_values", "--normalize",
                                  help="min_max_positive_values | softplus_minmax."),
    stage1_prompt: str = typer.Option("grid_zero", "--stage1-prompt", help="grid_zero | grid | zero."),
    stage2_prompt: str = typer.Option("zero", "--stage2-prompt",
                                      help="zero | grid | grid_zero | etsam_stage1_partial."),
    grid_interval: int = typer.Option(50, "--grid-interval",
                                      help="Grid prompt spacing in pixels and slices (ETSAM: 50, 10 when split)."),
    logit_threshold: float = typer.Option(-0.25, "--logit-threshold",
                                          help="Stage-2 logit threshold (ETSAM v1 used -0.5)."),
    store_logits: bool = typer.Option(False, "--store-logits", help="Also write <stem>_<method>_predicted_logits.mrc."),
    post_process: bool = typer.Option(False, "--post-process",
                                      help="Remove components spanning fewer than --post-process-min-slices."),
    min_slices: int = typer.Option(10, "--post-process-min-slices", help="Smallest z extent kept by --post-process."),
    remove_bridges: bool = typer.Option(False, "--remove-bridges",
                                        help="Also remove short bridges between parallel membranes."),
    max_bridge_len: int = typer.Option(5, "--max-bridge-len", help="Longest bridge removed, in pixels."),
    tile: str = typer.Option(None, "--tile", help="Y,X: largest slice part per task (very large slices, more "
                                                  "parallelism; default: whole slices, as ETSAM)."),
    split_processing: bool = typer.Option(False, "--split-processing", help="ETSAM's four quadrants."),
    thickness: float = typer.Option(None, "--thickness", help="Classical: membrane thickness in Å (default 45)."),
    low: float = typer.Option(None, "--low", help="Classical: hysteresis low threshold, robust standard deviations "
                                                  "above the median score (default 2.5)."),
    high: float = typer.Option(None, "--high", help="Classical: hysteresis high threshold, robust standard deviations "
                                                    "above the median score (default 6)."),
    polarity: str = POLARITY,
    working_voxel_size: float = typer.Option(None, "--working-voxel-size",
                                             help="Å: run the method on the tomogram resampled to this voxel size "
                                                  "(block by block) and map the outputs back onto its grid (default: "
                                                  "the tomogram's own)."),
    batch: int = typer.Option(None, "--batch", help="Slices per image-encoder call (default 8 on CUDA, 1 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (on the workers)."),
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å (default: the input's header)."),
    chunks: str = typer.Option("64,256,256", "--chunks", help="Chunks z,y,x of converted OME-Zarr."),
    layout: str = typer.Option("default", "--layout", help="default (masks in labels/ of the tomogram's OME-Zarr) or "
                                                           "portal (the CryoET Data Portal's: each mask its own "
                                                           "<out>/<stem>_<name>.zarr; MRC inputs converted in its "
                                                           "layout)."),
    copick: Path = typer.Option(None, "--copick", help="copick config JSON (created if missing): MRC inputs are "
                                                       "converted into the project, masks written as its 'membrane' "
                                                       "segmentations (user cryodask-membranes)."),
    copick_type: str = typer.Option(None, "--copick-type", help="copick tomogram type: read from a config given as "
                                                                "input, written with --copick (default wbp)."),
    copick_spacing: float = typer.Option(None, "--copick-spacing",
                                         help="Voxel spacing (Å) of the tomograms read from a copick config given as "
                                              "input."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Segment membranes; outputs use ETSAM's names: <stem>_<method>_predicted_{mask,logits,post_processed_mask}.mrc."""
    from ..engine.cluster import check_spec
    from ..engine.lock import output_lock
    from ..report import run_report
    from ..errors import InputError
    from ..membranes.classical import ClassicalParams
    from ..membranes.pipeline import find_inputs, resolve_checkpoints, resolve_method, segment

    from ..polarity import check_polarity

    check_spec(cluster)
    check_polarity(polarity)
    if working_voxel_size is not None:
        from ..io.resample import working_grid

        working_grid((1, 1, 1), (1.0, 1.0, 1.0), working_voxel_size)
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    method = resolve_method(method, stage1_checkpoint, stage2_checkpoint, weights)
    classical = None
    if method == "etsam":
        from ..membranes.etsam import EtsamParams
        from ..models.sam2 import config_path

        resolve_checkpoints(stage1_checkpoint, stage2_checkpoint, weights, model_config)
        config_path(model_config)
        EtsamParams(model_config, image_size=image_size, normalize=normalize, stage1_prompt=stage1_prompt,
                    stage2_prompt=stage2_prompt, grid_interval=grid_interval, tile=parse_pair(tile, "--tile"))
    else:
        given = {k: v for k, v in (("thickness", thickness), ("low", low), ("high", high)) if v is not None}
        classical = ClassicalParams(**given)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    block = parse_triple(chunks, "--chunks")
    from ..io.omezarr import check_layout

    check_layout(layout)
    if layout == "portal" and copick is not None:
        raise InputError("--layout portal and --copick write the masks differently: give one of them")
    project = None
    if copick_type or copick_spacing:
        from ..io.copick import expand_inputs

        inputs = expand_inputs(inputs, tomo_type=copick_type, voxel_spacing=copick_spacing)
    if copick is not None:
        from ..io.copick import check_writable, open_project

        project = check_writable(open_project(copick, create=True))
    found, failed = find_inputs(inputs, vs)  # every input checked before a cluster starts
    for bad in failed:
        typer.echo(f"error: {bad.message}", err=True)
    if not found:
        raise typer.Exit(2)  # every input was bad, and each has had its one line
    with output_lock(out, "membranes"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="membranes", echo=typer.echo):
        if project is not None:  # MRC inputs go straight into the project's runs
            from ..io.copick import tomograms_into

            links = tomograms_into(project, [p for kind, p in found if kind == "volume"],
                                   tomo_type=copick_type or "wbp", chunks=block, voxel_size=vs, work=out, client=client)
            found = [(kind, links.get(p, p)) for kind, p in found]
        report = segment([str(p) for _, p in found], out, method=method, stage1_checkpoint=stage1_checkpoint,
                         stage2_checkpoint=stage2_checkpoint, weights=weights, config=model_config,
                         image_size=image_size, normalize=normalize, stage1_prompt=stage1_prompt,
                         stage2_prompt=stage2_prompt, grid_interval=grid_interval, logit_threshold=logit_threshold,
                         tile=parse_pair(tile, "--tile"), split_processing=split_processing, store_logits=store_logits,
                         post_process=post_process, min_slices=min_slices, remove_bridges=remove_bridges,
                         max_bridge_len=max_bridge_len, classical=classical, voxel_size=vs, chunks=block,
                         batch=batch, device=device, client=client, progress=True, layout=layout,
                         polarity=polarity, working_voxel_size=working_voxel_size,
                         echo=lambda line: typer.echo(line, err=line.startswith("error: ")))
        if project is not None:
            from ..io.copick import write_membranes

            for result in report.results:
                if result.status != "failed" and result.store:
                    segmentation = write_membranes(project, result.source, result.store, report.method)
                    if segmentation:
                        result.files.append(segmentation)
                        typer.echo(f"{result.source}: wrote {segmentation}")
    from ..engine.collection import CollectionReport, Item, Outcome
    from .collection import finish

    summary = CollectionReport("membranes", [Outcome(Item(Path(r.source), ""), r.status, r.message)
                                             for r in report.results] + [Outcome(Item(Path(r.source), ""), "failed")
                                                                         for r in failed])
    finish(summary, several=len(summary.outcomes) > 1)
