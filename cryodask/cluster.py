"""How a Dask client is made: one ``--cluster`` spec for a laptop, a GPU box or a batch system.

``local`` is a ``distributed.LocalCluster``; ``cuda`` is dask-cuda's ``LocalCUDACluster``
(one worker per GPU, each with the resource ``GPU=1``); ``slurm``/``pbs``/``sge``/``lsf`` are
dask-jobqueue clusters configured by the standard jobqueue config or a cryodask YAML file;
anything with ``://`` is the address of a running scheduler.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import InputError

JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
KINDS = ("local", "cuda", *JOBQUEUE)


def check_spec(spec: str) -> str:
    """Validate a ``--cluster`` value before anything starts."""
    if spec in KINDS or "://" in spec:
        return spec
    raise InputError(f"--cluster {spec}: expected one of {', '.join(KINDS)} or a scheduler address tcp://host:port")


def load_config(path) -> dict:
    """Keyword arguments for a cluster class from a cryodask cluster YAML file.

    The file holds one mapping per kind, e.g. ``slurm: {cores: 8, memory: 32GB}``;
    a top-level ``jobs: N`` sets how many batch jobs to start.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read cluster config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: cluster config must be a mapping of kind -> options")
    return data


def make_cluster(spec: str = "local", *, workers: int | None = None, threads_per_worker: int | None = None,
                 memory_limit: str | int | None = "auto", config: str | os.PathLike | None = None):
    """Start the cluster named by ``spec`` and return it (``None`` for a scheduler address)."""
    spec = check_spec(spec)
    options = load_config(config).get(spec, {}) if config else {}
    if spec == "local":
        import logging

        from distributed import LocalCluster

        threads = threads_per_worker or 1
        n = workers or max(1, (os.cpu_count() or 1) // threads)
        # failed blocks are reported by the step itself, in one line per input
        options.setdefault("silence_logs", logging.CRITICAL)
        return LocalCluster(n_workers=n, threads_per_worker=threads, memory_limit=memory_limit,
                            processes=True, **options)
    if spec == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise InputError(f"--cluster cuda needs dask-cuda ({exc}); install cryodask[gpu]") from None
        kwargs = {"threads_per_worker": threads_per_worker or 1, "resources": {"GPU": 1}, **options}
        if memory_limit not in (None, "auto"):
            kwargs["memory_limit"] = memory_limit
        return LocalCUDACluster(**kwargs)
    if spec in JOBQUEUE:
        cluster = jobqueue_cluster(spec, options)
        cluster.scale(jobs=workers or (load_config(config).get("jobs", 1) if config else 1))
        return cluster
    return None


def jobqueue_cluster(kind: str, options: dict):
    """A dask-jobqueue cluster (no job submitted yet); options override the jobqueue config."""
    try:
        import dask_jobqueue
    except ImportError:
        raise InputError(f"--cluster {kind} needs dask-jobqueue; install cryodask[jobqueue]") from None
    try:
        return getattr(dask_jobqueue, JOBQUEUE[kind])(**options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"--cluster {kind}: invalid configuration ({exc})") from None


def current_client():
    """The ``distributed.Client`` already in use (a notebook's, a caller's), or None."""
    try:
        from distributed import get_client

        return get_client()
    except ValueError:
        return None


@contextlib.contextmanager
def connect(spec: str = "local", *, timeout: str = "20s", **kwargs):
    """A ``distributed.Client`` for ``spec`` (see :func:`make_cluster`); closes what it started.

    >>> with connect("local", workers=2) as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    from distributed import Client

    cluster = make_cluster(spec, **kwargs)
    try:
        client = Client(cluster) if cluster is not None else Client(spec, timeout=timeout)
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        raise InputError(f"--cluster {spec}: cannot reach the scheduler ({exc})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
