"""``cryodask doctor``: check the install, the weights and the cluster, and say what to fix."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .options import CLUSTER, CLUSTER_CONFIG

MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


@app.command()
def doctor(
    weights: Path = typer.Option(None, "--weights",
                                 help="Weights folder to check (default: CRYODASK_WEIGHTS / config)."),
    cluster: str = CLUSTER, cluster_config: Path = CLUSTER_CONFIG,
):
    """Check torch/SAM2/DINOv2, GPU and CUDA libraries, the weights found, and that the cluster is reachable."""
    from ..doctor import diagnose

    checks = diagnose(cluster=cluster, cluster_config=cluster_config, weights=weights)
    width = max(len(c.name) for c in checks)
    for c in checks:
        typer.echo(f"{MARK[c.status]}  {c.name:<{width}}  {c.detail}" + (f"\n      {'':<{width}}  -> {c.advice}"
                                                                          if c.advice and c.status != "ok" else ""))
    failed = [c for c in checks if c.status == "fail"]
    typer.echo(f"{len(failed)} problem(s), {sum(c.status == 'warn' for c in checks)} warning(s)")
    if failed:
        raise typer.Exit(1)
