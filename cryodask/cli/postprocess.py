"""``cryodask postprocess``: exact connected-component filtering (and bridge removal) of a mask."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS, cluster_session, parse_triple


@app.command()
def postprocess(
    mask: Path = typer.Argument(..., help="Mask: MRC, OME-Zarr image, or x.zarr/labels/<name>."),
    out: Path = typer.Option(..., "--out", help="Output .mrc or .zarr."),
    min_slices: int = typer.Option(0, "--min-slices", help="Keep components whose z extent is at least N (ETSAM: 10)."),
    min_voxels: int = typer.Option(0, "--min-voxels", help="Keep components of at least N voxels."),
    connectivity: int = typer.Option(26, "--connectivity", help="6, 18 or 26."),
    remove_bridges: bool = typer.Option(False, "--remove-bridges", help="ETSAM's per-slice removal of short bridges between parallel membranes."),
    max_bridge_len: int = typer.Option(5, "--max-bridge-len", help="Longest bridge removed, in pixels."),
    labels: bool = typer.Option(False, "--labels", help="Also write the component labels."),
    chunks: str = typer.Option("64,256,256", "--chunks", help="Block shape z,y,x for MRC input."),
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å, if the input has none."),
    device: str = typer.Option("cpu", "--device", help="cpu (cc3d) or gpu (CuPy on the workers)."),
    layout: str = typer.Option("default", "--layout", help="default, or portal for a .zarr output: the CryoET Data Portal's (int8 mask, 3 levels, 256³ chunks, Blosc lz4; --labels as its own <out>_components.zarr)."),
    copick: Path = typer.Option(None, "--copick", help="copick config JSON (created if missing): also write the mask as a segmentation of user cryodask-postprocess."),
    copick_run: str = typer.Option(None, "--copick-run", help="Its copick run (default: the run the mask lies in, else the mask's name)."),
    copick_object: str = typer.Option("membrane", "--copick-object", help="Its pickable object (added to the config)."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Keep the connected components of a mask that pass the filters; identical to scipy on the whole array."""
    from ..engine.cluster import check_spec
    from ..engine.lock import output_lock
    from ..errors import InputError, where
    from ..postprocess.pipeline import PostprocessParams, open_mask, postprocess as run

    check_spec(cluster)
    PostprocessParams(connectivity, min_slices, min_voxels, remove_bridges, max_bridge_len, labels, layout)
    if device not in ("cpu", "gpu"):
        raise InputError(f"--device must be cpu or gpu, got {device}")
    if out.suffix.lower() not in (".mrc", ".zarr"):
        raise where(out, "output must end in .mrc or .zarr")
    if layout == "portal" and out.suffix.lower() != ".zarr":
        raise where(out, "--layout portal writes an OME-Zarr: the output must end in .zarr")
    block = parse_triple(chunks, "--chunks")
    vs = parse_triple(voxel_size, "--voxel-size", float)
    open_mask(mask, vs, block)  # validate the input before a cluster starts
    project = None
    if copick is not None:
        from ..io.copick import check_writable, copick_part, open_project

        project = check_writable(open_project(copick, create=True))
        copick_object = copick_part(copick_object)
    from ..report import run_report

    with output_lock(out.parent, "postprocess"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
            run_report(report_dir, client, command="postprocess", echo=typer.echo):
        result = run(mask, out, connectivity=connectivity, min_slices=min_slices, min_voxels=min_voxels,
                     remove_bridges=remove_bridges, max_bridge_len=max_bridge_len, labels=labels, chunks=block,
                     voxel_size=vs, client=client, device=device, layout=layout)
        if project is not None:
            from ..io.copick import mask_run, segmentation_from_file

            result.files.append(segmentation_from_file(project, copick_run or mask_run(mask), result.out,
                                                       tool="postprocess", name=copick_object, voxel_size=vs,
                                                       chunks=block))
    if result.status == "skipped":
        typer.echo(f"{out} is already done with these parameters")
        return
    typer.echo(f"components: {result.n_components}, kept: {result.n_kept} ({result.voxels_kept} voxels); "
               f"blocks written: {result.blocks_written}")
    typer.echo("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    for path in result.files:
        typer.echo(f"wrote {path}")
