"""``cryodask membranes``: ETSAM (two-stage SAM2) or the classical sheet filter over tomograms."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from ..membranes.params import ClassicalParams as C, EtsamParams as E, MembraneParams as M
from .options import (CHUNKS, CLUSTER, CLUSTER_CONFIG, DEVICE, MEMORY, POLARITY, REPORT, THREADS, WORKERS,
                      cluster_session, parse_triple)


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
    out: Path = typer.Option(..., "--out", "--output-dir",
                             help="Output folder (MRC outputs; OME-Zarr for MRC inputs)."),
    method: str = typer.Option("auto", "--method",
                               help="auto | etsam | classical (auto: etsam when weights are found, else classical)."),
    stage1_checkpoint: Path = typer.Option(None, "--stage1-checkpoint",
                                           help="ETSAM stage-1 weights (default: etsam_stage1_v1.pt in --weights)."),
    stage2_checkpoint: Path = typer.Option(None, "--stage2-checkpoint",
                                           help="ETSAM stage-2 weights (default: etsam_stage2_v1.pt in --weights)."),
    weights: Path = typer.Option(None, "--weights",
                                 help="Folder holding etsam_stage{1,2}_v1.pt (or CRYODASK_WEIGHTS)."),
    model_config: str = typer.Option(E.config, "--model-config",
                                     help="SAM2 config name (sam2.1_hiera_b+, sam2.1_hiera_t, ...) or YAML path."),
    image_size: int = typer.Option(E.image_size, "--image-size",
                                   help="Model input size (default: the SAM2 config's; published models 1024)."),
    normalize: str = typer.Option(E.normalize, "--normalize", "--normalize-method",
                                  help="min_max_positive_values | softplus_minmax."),
    stage1_prompt: str = typer.Option(E.stage1_prompt, "--stage1-prompt", help="grid_zero | grid | zero."),
    stage2_prompt: str = typer.Option(E.stage2_prompt, "--stage2-prompt",
                                      help="zero | grid | grid_zero | etsam_stage1_partial."),
    grid_interval: int = typer.Option(E.grid_interval, "--grid-interval", show_default=False,
                                      help="Grid prompt spacing in pixels and slices (default: ETSAM's 50, 10 with "
                                           "--split-processing)."),
    logit_threshold: float = typer.Option(M.logit_threshold, "--logit-threshold",
                                          help="Stage-2 logit threshold (ETSAM v1 used -0.5)."),
    store_logits: bool = typer.Option(M.store_logits, "--store-logits",
                                      help="Also write <stem>_<method>_predicted_logits.mrc."),
    post_process: bool = typer.Option(M.post_process, "--post-process",
                                      help="ETSAM's post-processing, both steps: thin-noise removal, then bridges."),
    remove_thin_noise: bool = typer.Option(M.remove_thin_noise, "--postprocess-remove-thin-noise",
                                           help="Only remove components spanning fewer than --post-process-min-slices "
                                                "(with the next flag: both)."),
    remove_bridges: bool = typer.Option(M.remove_bridges, "--postprocess-remove-parallel-membrane-misconnections",
                                        "--remove-bridges",
                                        help="Only remove short bridges between parallel membranes (with the flag "
                                             "above: both)."),
    min_slices: int = typer.Option(M.min_slices, "--post-process-min-slices", "--min-slices",
                                   help="Smallest z extent kept by thin-noise removal."),
    max_bridge_len: int = typer.Option(M.max_bridge_len, "--post-process-max-bridge-len", "--max-bridge-len",
                                       help="Longest bridge removed, in pixels."),
    max_spur_len: int = typer.Option(M.max_spur_len, "--post-process-max-spur-len", "--max-spur-len",
                                     help="If > 0, also prune dead-end spurs up to this length (pixels)."),
    tile: str = typer.Option(None, "--tile", help="Y,X: largest slice part per task (very large slices, more "
                                                  "parallelism; default: whole slices, as ETSAM)."),
    split_processing: bool = typer.Option(E.split, "--split-processing", help="ETSAM's four quadrants."),
    thickness: float = typer.Option(C.thickness, "--thickness", help="Classical: membrane thickness in Å."),
    low: float = typer.Option(C.low, "--low", help="Classical: hysteresis low threshold, robust standard deviations "
                                                   "above the median score."),
    high: float = typer.Option(C.high, "--high", help="Classical: hysteresis high threshold, robust standard "
                                                      "deviations above the median score."),
    polarity: str = POLARITY,
    working_voxel_size: float = typer.Option(M.working_voxel_size, "--working-voxel-size",
                                             help="Å: run the method on the tomogram resampled to this voxel size "
                                                  "(block by block) and map the outputs back onto its grid (default: "
                                                  "the tomogram's own)."),
    batch: int = typer.Option(None, "--batch", help="Slices per image-encoder call (default: what half the free "
                                                             "GPU memory holds on CUDA, 1 on CPU)."),
    compile: bool = typer.Option(E.compile, "--compile", help="etsam: SAM2's image encoder through torch.compile "
                                                            "(slow first call)."),
    device: str = DEVICE,
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å (default: the input's header)."),
    chunks: str = CHUNKS,
    layout: str = typer.Option(M.layout, "--layout", help="default (masks in labels/ of the tomogram's OME-Zarr) or "
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
    from ..membranes.params import membrane_params, resolve_method
    from ..membranes.pipeline import check_models, find_inputs, segment
    from .options import check_device

    check_spec(cluster)
    check_device(device)
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    given = dict(logit_threshold=logit_threshold, store_logits=store_logits, post_process=post_process,
                 remove_thin_noise=remove_thin_noise, remove_bridges=remove_bridges, min_slices=min_slices,
                 max_bridge_len=max_bridge_len, max_spur_len=max_spur_len, layout=layout,
                 polarity=polarity, working_voxel_size=working_voxel_size)
    method = resolve_method(method, stage1_checkpoint, stage2_checkpoint, weights)
    if method == "etsam":
        given.update(config=model_config, image_size=image_size, normalize=normalize, stage1_prompt=stage1_prompt,
                     stage2_prompt=stage2_prompt, grid_interval=grid_interval, tile=parse_pair(tile, "--tile"),
                     split=split_processing, compile=compile,
                     **{k: str(v) for k, v in (("stage1_checkpoint", stage1_checkpoint),
                                               ("stage2_checkpoint", stage2_checkpoint)) if v is not None})
    else:
        given.update(thickness=thickness, low=low, high=high)
    params = membrane_params(method, weights, **given)  # the one time the options become parameters
    check_models(params)
    vs = parse_triple(voxel_size, "--voxel-size", float)
    block = parse_triple(chunks, "--chunks")
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
        report = segment([str(p) for _, p in found], out, params, voxel_size=vs, chunks=block, batch=batch,
                         device=device, client=client, progress=True,
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
