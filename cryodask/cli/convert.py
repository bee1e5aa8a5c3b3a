"""``cryodask convert`` and ``cryodask export``."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from ..io.layouts import ConvertParams as P
from .collection import IN_FLIGHT, over_collection
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS, cluster_session, parse_triple


@app.command()
def convert(
    inputs: list[str] = typer.Argument(..., help="MRC/REC/MAP/TIFF files, folders or glob patterns."),
    out: Path = typer.Option(..., "--out", help="Output folder: one <stem>.zarr per tomogram."),
    levels: int = typer.Option(P.levels, "--levels", help="Pyramid levels (2x mean along z, y and x)."),
    chunks: str = typer.Option(",".join(map(str, P.chunks)), "--chunks", help="Chunk shape z,y,x."),
    ngff: str = typer.Option(P.ngff, "--ngff", help="0.4 (zarr v2: CryoET Data Portal, napari) or 0.5 (zarr v3)."),
    dtype: str = typer.Option(P.dtype, "--dtype", help="float32 to convert; default keeps the input's type."),
    voxel_size: str = typer.Option(None, "--voxel-size",
                                   help="Voxel size in Å (one value or z,y,x; default: the input's header)."),
    layout: str = typer.Option(P.layout, "--layout", help="default, or portal: the CryoET Data Portal's (NGFF 0.4, "
                                                           "float32, 256³ chunks, Blosc lz4; --chunks and --dtype "
                                                           "ignored)."),
    copick: Path = typer.Option(None, "--copick", help="copick config JSON (created if missing): write each tomogram "
                                                       "into the project as "
                                                       "ExperimentRuns/<stem>/VoxelSpacing<vs>/<type>.zarr instead of "
                                                       "--out (which keeps the resume marks)."),
    copick_type: str = typer.Option("wbp", "--copick-type", help="copick tomogram type written with --copick."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
):
    """Convert tomograms to chunked multiscale OME-Zarr (resumable; bad inputs are listed, the rest converted)."""
    from ..engine.cluster import check_spec
    from ..convert import plan_conversion, run_conversion
    from ..io.folders import check_output_dir
    from ..engine.lock import output_lock
    from ..report import run_report

    check_spec(cluster)
    params = P(parse_triple(chunks, "--chunks"), levels, ngff, dtype, layout)
    store_path = None
    if copick is not None:
        from ..errors import InputError
        from ..io.copick import check_writable, open_project, store_into

        if ngff != "0.4":
            raise InputError(f"--copick needs --ngff 0.4: copick reads zarr v2 only, got --ngff {ngff}")
        store_path = store_into(check_writable(open_project(copick, create=True)), copick_type)
    with output_lock(check_output_dir(out), "convert"):
        plan = plan_conversion(inputs, out, params, voxel_size=parse_triple(voxel_size, "--voxel-size", float),
                               store_path=store_path)
        if plan.todo:
            with cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client, \
                    run_report(report_dir, client, command="convert", echo=typer.echo):
                report = run_conversion(plan, client, progress=True)
        else:
            with run_report(report_dir, None, command="convert", echo=typer.echo):
                report = run_conversion(plan, None)
    for r in report.results:
        extra = f"{r.nbytes / 1e6:8.1f} MB {r.seconds:6.1f} s  blocks {r.blocks_written} written, " \
            f"{r.blocks_skipped} skipped" \
            if r.status != "failed" else r.message
        typer.echo(f"{r.status:>9}  {Path(r.source).name:<30} {extra}")
    failed = report.failed
    typer.echo(f"{len(report.results) - len(failed)} of {len(report.results)} tomograms ready in {copick or out}")
    if failed:
        typer.echo(f"{len(failed)} failed:", err=True)
        for r in failed:
            typer.echo(f"error: {r.message}", err=True)
        raise typer.Exit(2)


@app.command()
def export(
    inputs: list[str] = typer.Argument(...,
                                       help="OME-Zarr images written by cryodask convert (stores, folders, globs)."),
    out: Path = typer.Option(..., "--out", help="Output MRC file for one image; for several, a folder of <name>.mrc "
                                                "(<name>_<labels>.mrc with --labels)."),
    level: int = typer.Option(0, "--level", help="Pyramid level."),
    labels: str = typer.Option(None, "--labels", help="Export the label image labels/<NAME> instead."),
    in_flight: int = IN_FLIGHT,
):
    """Write one level of an OME-Zarr image (or of one of its label images) to MRC, with the voxel size."""
    from ..engine.collection import Outcome, find_items
    from ..export import export as run
    from ..io.omezarr import open_image

    from ..errors import InputError, where
    from ..io.volumes import is_zarr

    items = find_items(inputs, stores=True)
    named = next((i for i in items if not is_zarr(i.path) and str(i.path) in inputs), None)
    if named is not None:
        raise where(named.path, "not an OME-Zarr image (export reads what convert wrote)")
    items = [item for item in items if is_zarr(item.path)]  # a folder's MRC files stay where they are
    if not items:
        raise InputError(f"no OME-Zarr image in {', '.join(inputs)}")
    one_file = len(items) == 1 and out.suffix.lower() in (".mrc", ".map", ".rec")
    if not one_file:
        from ..io.folders import check_output_dir

        check_output_dir(out)

    def target(item):
        return out if one_file else out / (f"{item.name}_{labels}.mrc" if labels else f"{item.name}.mrc")

    def work(item, client):
        return Outcome(item, "done", lines=[f"wrote {run(item.path, target(item), level=level, labels=labels)}"])

    over_collection("export", None, work, items=items, check=lambda item: open_image(item.path), needs_cluster=False,
                    in_flight=in_flight)
