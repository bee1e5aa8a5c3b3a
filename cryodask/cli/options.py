"""Options shared by every command that computes: which cluster, how many workers."""

from __future__ import annotations

import math
from contextlib import contextmanager

import typer

from ..errors import InputError
from ..io.layouts import CHUNKS as _CHUNKS

CLUSTER = typer.Option("local", "--cluster", help="local | cuda | slurm | pbs | sge | lsf | tcp://host:port")
WORKERS = typer.Option(None, "--workers",
                       help="Workers (local/cuda) or batch jobs (slurm, pbs, ...) (default: one per core / "
                                                "--threads-per-worker for local, one per GPU for cuda, the cluster "
                                                "config's jobs or 1).")
THREADS = typer.Option(None, "--threads-per-worker", help="Threads per worker (default 1).")
MEMORY = typer.Option("auto", "--memory-limit", help="Memory limit per worker, e.g. 4GB.")
CLUSTER_CONFIG = typer.Option(None, "--cluster-config", help="YAML with options per cluster kind; FILE:PROFILE picks a "
                                                             "profile (see deploy/README.md).")
REPORT = typer.Option(None, "--report", help="Write a run report (JSON, PNG, Dask's HTML) to this folder.")
POLARITY = typer.Option("auto", "--polarity", help="auto | dark | bright: is dense matter dark (most tomograms) or "
                                                   "bright? auto decides per tomogram from the data and prints why.")
CHUNKS = typer.Option(",".join(map(str, _CHUNKS)), "--chunks",
                      help="Blocks z,y,x: of an MRC/TIFF input, and the chunks of its OME-Zarr conversion.")
DEVICE = typer.Option("auto", "--device",
                      help="auto | cpu | cuda: where the workers run the models (auto: a GPU where a worker has one).")


def check_device(device: str) -> str:
    """One spelling of the device for every command: auto, cpu or cuda."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def cluster_kwargs(workers, threads_per_worker, memory_limit, cluster_config) -> dict:
    return {"workers": workers, "threads_per_worker": threads_per_worker, "memory_limit": memory_limit,
            "config": cluster_config}


@contextmanager
def cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config):
    """Start (or reach) the cluster for a command and print its dashboard link."""
    from ..engine.cluster import connect

    with connect(cluster, **cluster_kwargs(workers, threads_per_worker, memory_limit, cluster_config)) as client:
        typer.echo(f"dashboard: {client.dashboard_link}")
        yield client


def parse_triple(text: str | None, name: str, cast=int):
    """``"64,256,256"`` → ``(64, 256, 256)``; one number is used for all three axes."""
    if text is None:
        return None
    try:
        values = tuple(cast(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise InputError(f"{name} must be numbers separated by commas, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{name} must be one or three positive numbers, got {text!r}")
    return values
