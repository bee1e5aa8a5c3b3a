"""Options shared by every command that computes: which cluster, how many workers."""

from __future__ import annotations

import typer

CLUSTER = typer.Option("local", "--cluster", help="local | cuda | slurm | pbs | sge | lsf | tcp://host:port")
WORKERS = typer.Option(None, "--workers", help="Workers (local/cuda) or batch jobs (slurm, pbs, ...).")
THREADS = typer.Option(None, "--threads-per-worker", help="Threads per worker (default 1).")
MEMORY = typer.Option("auto", "--memory-limit", help="Memory limit per worker, e.g. 4GB.")
CLUSTER_CONFIG = typer.Option(None, "--cluster-config", help="YAML with options per cluster kind (see deploy/).")


def cluster_kwargs(workers, threads_per_worker, memory_limit, cluster_config) -> dict:
    return {"workers": workers, "threads_per_worker": threads_per_worker, "memory_limit": memory_limit,
            "config": cluster_config}
