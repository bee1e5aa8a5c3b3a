"""``cryodask demo``: the whole pipeline on built-in synthetic data, no weights, no GPU."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG, MEMORY, THREADS, WORKERS, cluster_session, parse_triple


@app.command()
def demo(
    out: Path = typer.Option(Path("cryodask-demo"), "--out", help="Folder for data, stores, previews and metrics."),
    tomograms: int = typer.Option(3, "--tomograms", help="How many synthetic tomograms."),
    shape: str = typer.Option("64,128,128", "--shape", help="Tomogram shape z,y,x."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG,
):
    """Synthesise a small collection, convert it on a cluster, evaluate against the truth, write previews."""
    from ..engine.cluster import check_spec
    from ..engine.lock import output_lock
    from ..io.folders import check_output_dir
    from ..demo import run_demo

    check_spec(cluster)
    zyx = parse_triple(shape, "--shape")
    check_output_dir(out)
    with output_lock(out, "demo"), \
            cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config) as client:
        result = run_demo(out, tomograms=tomograms, shape=zyx, client=client, progress=True)
    _table(result.rows)
    if result.micrograph_rows:
        typer.echo("micrographs: trained on m0-m2, scored on m3 (match radius: the particle radius)")
        _table(result.micrograph_rows)
    else:
        typer.echo("micrographs: skipped (Autopick-BC and CRISP need torch: bash deploy/install.sh .venv micrographs)")
    typer.echo("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    typer.echo(f"previews: {out / 'previews'}   stores: {out / 'zarr'} (open with napari: the napari extra installs "
               "cryodask's reader)")


def _table(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        typer.echo("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))
