"""``cryodask run PIPELINE.yaml INPUTS… --out DIR``: every step of a pipeline file per tomogram,
over a collection, on one cluster (see :mod:`cryodask.pipeline`)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .collection import IN_FLIGHT, finish, over_collection
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS


def _example(value: bool) -> None:
    if value:
        from ..pipeline import EXAMPLE

        typer.echo(EXAMPLE, nl=False)
        raise typer.Exit(0)


@app.command()
def run(
    pipeline_file: Path = typer.Argument(None, metavar="PIPELINE",
                                         help="Pipeline YAML (cryodask run --example prints one)."),
    inputs: list[str] = typer.Argument(None, metavar="INPUTS",
                                       help="Tomograms: MRC/TIFF files, OME-Zarr images, folders, globs, a STAR "
                                            "listing or a copick config."),
    out: Path = typer.Option(None, "--out", help="Output folder: every step's outputs, named after each tomogram."),
    example: bool = typer.Option(False, "--example", callback=_example, is_eager=True,
                                 help="Print a commented pipeline file and exit."),
    copick_type: str = typer.Option(None, "--copick-type",
                                    help="copick tomogram type read from a copick config input."),
    copick_spacing: float = typer.Option(None, "--copick-spacing",
                                         help="Voxel spacing (Å) read from a copick config input."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
    in_flight: int = IN_FLIGHT,
):
    """Run a pipeline (convert → membranes → postprocess → pick → evaluate, any subset) per tomogram
    on one cluster; a rerun skips every step already done."""
    from ..engine.cluster import check_spec
    from ..errors import InputError
    from ..io.folders import check_output_dir
    from ..io.volumes import open_volume
    from ..pipeline import StepCounts, load_pipeline, run_tomogram, write_scores

    if pipeline_file is None or not inputs:
        raise InputError("usage: cryodask run PIPELINE.yaml INPUTS... --out DIR (cryodask run --example prints a "
                         "pipeline)")
    if out is None:
        raise InputError("missing option --out (the output folder)")
    check_spec(cluster)
    pipeline = load_pipeline(pipeline_file)  # every step and value checked before a cluster starts
    voxel_size = (pipeline.steps.get("convert") or pipeline.steps.get("membranes") or {}).get("voxel_size")
    out = check_output_dir(out).resolve()
    counts = StepCounts()
    report = over_collection(
        "run", inputs, lambda item, client: run_tomogram(item, pipeline, out, client, counts),
        check=lambda item: open_volume(item.path, voxel_size), cluster=cluster, workers=workers,
        threads_per_worker=threads_per_worker, memory_limit=memory_limit, cluster_config=cluster_config,
        report_dir=report_dir, lock_folder=out, in_flight=in_flight, finish_later=True,
        copick_type=copick_type, copick_spacing=copick_spacing)
    scores = write_scores(report.outcomes, out)
    if scores is not None:
        typer.echo(f"wrote {scores}")
    typer.echo(f"steps: {counts.run} run, {counts.skipped} skipped (already done)")
    finish(report, several=True)
