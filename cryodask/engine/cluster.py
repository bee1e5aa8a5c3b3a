"""How a Dask client is made: one ``--cluster`` spec for a laptop, a GPU box or a batch system.

``local`` is a ``distributed.LocalCluster``; ``cuda`` is dask-cuda's ``LocalCUDACluster``
(one worker per GPU, each with the resource ``GPU=1``); ``slurm``/``pbs``/``sge``/``lsf`` are
dask-jobqueue clusters configured by the standard jobqueue config or a cryodask YAML file;
anything with ``://`` is the address of a running scheduler.

A cryodask cluster YAML holds one mapping per kind (plus ``jobs``), or named ``profiles`` of
such mappings, picked with ``--cluster-config FILE:PROFILE`` (``deploy/slurm/cluster.yaml:gpu``).
A batch-system configuration is checked before any job is submitted: unknown keys, a worker
``--lifetime`` that reaches the walltime, a GPU job without the ``GPU=1`` worker resource (or
the reverse) are one-line errors, because on the cluster they fail late, or silently.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shlex
import sys
from pathlib import Path

from ..errors import InputError

JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
KINDS = ("local", "cuda", *JOBQUEUE)
SUBMIT = {"slurm": "sbatch", "pbs": "qsub", "sge": "qsub", "lsf": "bsub"}
JOB_ID = {"slurm": "${SLURM_JOB_ID}", "pbs": "${PBS_JOBID}", "sge": "${JOB_ID}", "lsf": "${LSB_JOBID}"}
PLACEHOLDER_SCHEDULER = "tcp://<scheduler-address>:8786"
DASHBOARD_PORT = 8787  # LocalCluster's and LocalCUDACluster's default dashboard_address
# JobQueueCluster arguments that are not job options but still belong in a config file
CLUSTER_ONLY = ("scheduler_options", "shared_temp_directory", "silence_logs", "name")
# list-valued job options: a YAML string here would be spliced into the script character by character
LIST_OPTIONS = ("worker_extra_args", "job_extra_directives", "job_script_prologue", "job_directives_skip",
                "extra", "job_extra", "env_extra", "header_skip")


def check_spec(spec: str) -> str:
    """Validate a ``--cluster`` value before anything starts."""
    if spec in KINDS or "://" in spec:
        return spec
    raise InputError(f"--cluster {spec}: expected one of {', '.join(KINDS)} or a scheduler address tcp://host:port")


def split_profile(path) -> tuple[Path, str | None]:
    """``deploy/slurm/cluster.yaml:gpu`` → (the file, ``"gpu"``); a plain path has no profile."""
    text = str(path)
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(text).exists():
        return Path(head), tail
    return Path(text), None


def load_config(path, profile: str | None = None) -> dict:
    """Keyword arguments for a cluster class from a cryodask cluster YAML file.

    The file holds one mapping per kind, e.g. ``slurm: {cores: 8, memory: 32GB}``;
    a top-level ``jobs: N`` sets how many batch jobs to start. Or it holds
    ``profiles: {gpu: {...}, cpu: {...}}`` of such mappings (and optionally ``default: gpu``);
    the profile is ``profile`` or the ``:NAME`` suffix of ``path``.
    """
    return read_config(path, profile)[2]


def read_config(path, profile: str | None = None) -> tuple[Path, str | None, dict]:
    """(the file, the profile chosen or None, its checked mapping): see :func:`load_config`."""
    import yaml

    path, suffix = split_profile(path)
    if profile and suffix and profile != suffix:
        raise InputError(f"{path}: two profiles asked for ({suffix!r} and {profile!r})")
    profile = profile or suffix
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read cluster config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: cluster config must be a mapping of kind -> options")
    if "profiles" in data:
        profile, data = _profile(path, data, profile)
    elif profile:
        raise InputError(f"{path}: has no profiles, so profile {profile!r} cannot be chosen "
                         "(write 'profiles: {name: {...}}', see deploy/slurm/cluster.yaml)")
    unknown = sorted(map(str, set(data) - {"jobs", *KINDS}))
    if unknown:
        raise InputError(f"{path}{_named(profile)}: unknown key(s) {', '.join(unknown)} "
                         f"(expected jobs, {', '.join(KINDS)})")
    jobs = data.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"{path}{_named(profile)}: jobs must be a positive integer, got {jobs!r}")
    for kind in KINDS:
        if not isinstance(data.get(kind, {}), dict):
            raise InputError(f"{path}{_named(profile)}: {kind} must be a mapping of options, got {data[kind]!r}")
    if profile:
        _check_profile_role(path, profile, data)
    return path, profile, data


def _named(profile) -> str:
    return f" (profile {profile})" if profile else ""


def _profile(path: Path, data: dict, name: str | None) -> tuple[str, dict]:
    profiles = data["profiles"]
    extra = sorted(map(str, set(data) - {"profiles", "default"}))
    if extra:
        raise InputError(f"{path}: unknown top-level key(s) {', '.join(extra)} next to profiles "
                         "(put them inside a profile)")
    if not isinstance(profiles, dict) or not profiles or not all(isinstance(v, dict) for v in profiles.values()):
        raise InputError(f"{path}: profiles must map each profile name to a mapping of kind -> options")
    names = ", ".join(map(str, profiles))
    name = name or data.get("default")
    if name is None:
        raise InputError(f"{path}: choose a profile with --cluster-config {path}:NAME (profiles: {names})")
    if name not in profiles:
        raise InputError(f"{path}: unknown profile {name!r} (profiles: {names})")
    return str(name), profiles[name]


def _check_profile_role(path: Path, profile: str, data: dict) -> None:
    """A profile named for GPUs must give its batch workers the GPU resource, one for CPUs must not."""
    for kind in JOBQUEUE:
        if kind not in data:
            continue
        has_gpu = "GPU" in worker_resources(setting(kind, data[kind], "worker_extra_args") or [])
        if "gpu" in profile.lower() and not has_gpu:
            raise InputError(f"{path} (profile {profile}): {kind} workers have no '--resources GPU=1', so no GPU "
                             "task would ever run on them (add it to worker_extra_args)")
        if "cpu" in profile.lower() and has_gpu:
            raise InputError(f"{path} (profile {profile}): {kind} workers advertise GPU=1 in a CPU profile; "
                             "GPU tasks would be sent to them")


def make_cluster(spec: str = "local", *, workers: int | None = None, threads_per_worker: int | None = None,
                 memory_limit: str | int | None = "auto", config: str | os.PathLike | None = None):
    """Start the cluster named by ``spec`` and return it (``None`` for a scheduler address)."""
    spec = check_spec(spec)
    loaded = load_config(config) if config else {}
    options = loaded.get(spec, {})
    if spec == "local":
        import logging

        from distributed import LocalCluster

        threads = threads_per_worker or 1
        n = workers or max(1, (os.cpu_count() or 1) // threads)
        # failed blocks are reported by the step itself, in one line per input
        options.setdefault("silence_logs", logging.CRITICAL)
        if "dashboard_address" not in options and dashboard_port_taken():
            options["dashboard_address"] = ":0"
        return LocalCluster(n_workers=n, threads_per_worker=threads, memory_limit=memory_limit,
                            processes=True, **options)
    if spec == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise InputError(f"--cluster cuda needs dask-cuda ({exc}); install cryodask[gpu]") from None
        kwargs = {"threads_per_worker": threads_per_worker or 1, "resources": {"GPU": 1}, **options}
        if "dashboard_address" not in kwargs and dashboard_port_taken():
            kwargs["dashboard_address"] = ":0"
        if memory_limit not in (None, "auto"):
            kwargs["memory_limit"] = memory_limit
        return LocalCUDACluster(**kwargs)
    if spec in JOBQUEUE:
        cluster = jobqueue_cluster(spec, options, source=split_profile(config)[0] if config else None)
        jobs = workers or loaded.get("jobs", 1)
        cluster.scale(jobs=jobs)
        replace_retired_jobs(cluster, jobs)  # retired at --lifetime, cancelled, pre-empted: resubmitted
        return cluster
    return None


def dashboard_port_taken(port: int = DASHBOARD_PORT) -> bool:
    """Whether another process (a second command, a notebook's cluster) listens on ``port``.
    Then the dashboard takes a free port (``:0``), as distributed would after a three-line
    warning; the command's one ``dashboard:`` line gives the address either way."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado binds it
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def jobqueue_cluster(kind: str, options: dict, *, source=None):
    """A dask-jobqueue cluster (no job submitted yet); options override the jobqueue config.

    The options are checked first (:func:`check_jobqueue`): nothing starts for a bad one."""
    dask_jobqueue = _dask_jobqueue(kind)
    check_jobqueue(kind, options, source=source)
    try:
        return getattr(dask_jobqueue, JOBQUEUE[kind])(**options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"--cluster {kind}: invalid configuration ({str(exc).splitlines()[0]})") from None


def _dask_jobqueue(kind: str):
    try:
        import dask_jobqueue
    except ImportError:
        raise InputError(f"--cluster {kind} needs dask-jobqueue; install cryodask[jobqueue]") from None
    return dask_jobqueue


def job_script(kind: str, options: dict, *, scheduler: str | None = None, name: str | None = None,
               source=None) -> str:
    """The batch script ``--cluster kind`` would submit, rendered without a scheduler or a job.

    dask-jobqueue's ``cluster.job_script()`` needs a cluster, which starts a scheduler; here
    the job class is built directly, with the same arguments the cluster would give it, so
    nothing listens and nothing is submitted. ``scheduler`` is the address the workers will
    join (a placeholder by default); ``name`` the worker name."""
    import dask

    dask_jobqueue = _dask_jobqueue(kind)
    check_jobqueue(kind, options, source=source)
    job_cls = getattr(dask_jobqueue, JOBQUEUE[kind]).job_cls
    kwargs = {k: v for k, v in options.items() if k not in CLUSTER_ONLY}
    config_name = kwargs.get("config_name") or job_cls.config_name
    kwargs.update(config_name=config_name, protocol=kwargs.get("protocol"), security=kwargs.get("security"))
    if kwargs.get("interface") is None:
        kwargs["interface"] = dask.config.get(f"jobqueue.{config_name}.interface", None)
    try:
        return job_cls(scheduler or PLACEHOLDER_SCHEDULER, name=name or "dummy-name", **kwargs).job_script()
    except (TypeError, ValueError) as exc:
        raise InputError(f"--cluster {kind}: invalid configuration ({str(exc).splitlines()[0]})") from None


def check_jobqueue(kind: str, options: dict, *, source=None) -> None:
    """Raise a one-line ``InputError`` for job options that dask-jobqueue would reject, or accept
    and then fail on the cluster: unknown keys, a missing ``jobqueue.<config_name>`` section,
    list options given as strings, cores/memory unset, a worker ``--lifetime`` that dask cannot
    parse or that does not end before the walltime, a GPU request without the ``GPU=1`` worker
    resource (or the resource without a GPU), more than one GPU or worker process per GPU job."""
    import dask
    from dask.utils import parse_bytes

    dask_jobqueue = _dask_jobqueue(kind)
    cluster_cls = getattr(dask_jobqueue, JOBQUEUE[kind])

    def bad(problem: str) -> InputError:
        return InputError(f"{source}: {kind}: invalid configuration ({problem})" if source
                          else f"--cluster {kind}: invalid configuration ({problem})")

    if not isinstance(options, dict):
        raise bad(f"expected a mapping of options, got {options!r}")
    allowed = _job_keys(cluster_cls.job_cls) | set(CLUSTER_ONLY) | {"interface", "protocol", "config_name"}
    for key in sorted(map(str, set(options) - allowed)):
        hint = (f"; put it in scheduler_options: {{{key}: ...}}" if key in ("dashboard_address", "host") else
                f"; did you mean {key.replace('-', '_')}?" if key.replace("-", "_") in allowed else "")
        raise bad(f"unknown option {key!r} for {cluster_cls.__name__}{hint}")
    config_name = options.get("config_name") or kind
    if dask.config.get(f"jobqueue.{config_name}", None) is None:
        raise bad(f"config_name {config_name!r}: no jobqueue.{config_name} section in the dask configuration "
                  f"(copy deploy/{kind}/jobqueue.yaml to ~/.config/dask/)")
    for key in LIST_OPTIONS:
        if key in options and options[key] is not None and not isinstance(options[key], list):
            raise bad(f"{key} must be a list, e.g. ['--resources', 'GPU=1'], got {options[key]!r}")
    cores, memory = setting(kind, options, "cores"), setting(kind, options, "memory")
    if cores is None or memory is None:
        raise bad("cores and memory per job are required")
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise bad(f"cores must be a positive integer, got {cores!r}")
    try:
        parse_bytes(memory)
    except (ValueError, TypeError):
        raise bad(f"memory {memory!r} is not a size like 64GB") from None
    processes = setting(kind, options, "processes")
    if processes is None:  # dask-jobqueue's default: about sqrt(cores) worker processes
        from distributed.deploy.local import nprocesses_nthreads

        processes = nprocesses_nthreads(cores)[0]
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= cores:
        raise bad(f"processes must be an integer from 1 to cores ({cores}), got {processes!r}")
    args = setting(kind, options, "worker_extra_args") or []
    try:
        lifetime, stagger, restart = _lifetime(args)
    except ValueError as exc:
        raise bad(str(exc)) from None
    walltime = setting(kind, options, "walltime")
    if lifetime and walltime:
        seconds = walltime_seconds(kind, walltime)
        if seconds is None:
            raise bad(f"walltime {walltime!r} is not a time like 04:00:00")
        if lifetime + stagger >= seconds:
            raise bad(f"worker --lifetime {_arg(args, '--lifetime')}"
                      + (f" + --lifetime-stagger {_arg(args, '--lifetime-stagger')}" if stagger else "")
                      + f" does not end before the walltime {walltime}: the batch system would kill workers "
                        "instead of letting them retire; use a lifetime a few minutes shorter")
    if restart and walltime:
        raise bad("--lifetime-restart restarts the worker inside the same job, which still ends at the walltime; "
                  "drop it (cryodask submits a new job for a retired worker)")
    requests = " ".join(map(str, [*(setting(kind, options, "job_extra_directives") or []),
                                  setting(kind, options, "resource_spec") or ""]))
    gpus = requested_gpus(requests)
    resources = worker_resources(args)
    if gpus and "GPU" not in resources:
        raise bad("the job requests a GPU but its worker has no '--resources GPU=1' in worker_extra_args, "
                  "so cryodask's GPU tasks would never run on it")
    if "GPU" in resources and not gpus:
        raise bad("the worker advertises GPU=1 but the job requests no GPU "
                  + {"slurm": "(add '--gres=gpu:1' to job_extra_directives)",
                     "pbs": "(add ':ngpus=1' to resource_spec)"}.get(kind, "(request one GPU per job)"))
    if gpus:
        if gpus > 1 or resources["GPU"] != 1:
            raise bad(f"one GPU per job: the job requests {gpus} and the worker advertises GPU={resources['GPU']:g}; "
                      "request 1 and use --resources GPU=1 (more GPUs: more jobs)")
        if processes != 1:
            raise bad(f"a GPU job runs one worker process (processes: 1), not {processes}: "
                      "they would share its one GPU")


def setting(kind: str, options: dict, key: str):
    """A job option as the job will see it: the options' value, else the jobqueue config's
    (``jobqueue.<config_name>.<key>``), else None."""
    import dask

    value = options.get(key)
    if value is not None:
        return value
    return dask.config.get(f"jobqueue.{options.get('config_name') or kind}.{key}", None)


def _job_keys(job_cls) -> set[str]:
    keys = set()
    for cls in job_cls.__mro__:
        if "__init__" in vars(cls):
            keys |= {name for name, p in inspect.signature(cls.__init__).parameters.items()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys - {"self", "scheduler", "name"}


def _words(args) -> list[str]:
    """Worker arguments as the shell will split them (``["--resources GPU=1"]`` is two words)."""
    if isinstance(args, str):
        args = [args]
    try:
        return shlex.split(" ".join(map(str, args)))
    except ValueError:
        return [str(a) for a in args]


def _arg(args, flag: str) -> str | None:
    words = _words(args)
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def worker_resources(args) -> dict[str, float]:
    """``--resources "GPU=1 MEM=4e9"`` (or comma-separated) in worker arguments → ``{"GPU": 1.0, ...}``."""
    text = _arg(args, "--resources") or ""
    out = {}
    for item in re.split(r"[\s,]+", text.strip()):
        name, sep, value = item.partition("=")
        if sep:
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = float("nan")
    return out


def on_worker(client, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a worker: for work of a tomogram that would otherwise pass its
    whole output through the client (an MRC export) or cost the client of a collection CPU time
    it cannot spare (a preview); in this process when there is no client."""
    if client is None:
        return fn(*args, **kwargs)
    return client.submit(fn, *args, **kwargs, pure=False).result()


def gpu_resources(client, device: str = "auto") -> dict | None:
    """``{"GPU": 1}`` for GPU tasks, required at submission so they never land on a CPU-only
    worker of a mixed cluster; None for CPU tasks.

    ``device="cuda"`` always asks for it; ``"auto"`` when a worker advertises GPUs (dask-cuda,
    jobqueue with ``--resources GPU=1``) or the cluster is built for them (``LocalCUDACluster``,
    a jobqueue GPU profile) even before its workers join. When no connected worker has a GPU,
    one line says the tasks wait for one (the scheduler holds them until a GPU worker joins)."""
    if device == "cpu":
        return None
    workers = list(client.scheduler_info().get("workers", {}).values())
    has_gpu = any("GPU" in w.get("resources", {}) for w in workers)
    if not (device == "cuda" or has_gpu or gpu_cluster(getattr(client, "cluster", None))):
        return None
    if not has_gpu and client.id not in _WAITING:
        _WAITING.add(client.id)
        print(f"cryodask: waiting for a GPU worker: none of the {len(workers)} connected workers has the resource "
              "GPU=1; GPU tasks stay queued until one joins (dask-cuda workers, or a jobqueue GPU profile)",
              file=sys.stderr, flush=True)
    return {"GPU": 1}


_WAITING: set = set()  # clients already told that their GPU tasks wait


def gpu_cluster(cluster) -> bool:
    """Whether a cluster object starts GPU workers: dask-cuda's, or jobqueue jobs whose workers
    advertise ``GPU`` (what ``check_jobqueue`` requires of a GPU profile)."""
    if cluster is None:
        return False
    if type(cluster).__name__ == "LocalCUDACluster":
        return True
    args = (getattr(cluster, "_job_kwargs", None) or {}).get("worker_extra_args") or []
    return "GPU" in worker_resources(args)


def _lifetime(args) -> tuple[float, float, bool]:
    """dask's own parser, so a value it cannot read (``3h50m``: one unit only) is an error here
    rather than a crash of every worker on the cluster."""
    from dask.utils import parse_timedelta

    values = []
    for flag in ("--lifetime", "--lifetime-stagger"):
        text = _arg(args, flag)
        try:
            values.append(float(parse_timedelta(text)) if text else 0.0)
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{flag} {text!r} is not a duration dask can read; "
                             "use one unit, e.g. 230m or 13800s") from None
    return values[0], values[1], "--lifetime-restart" in _words(args)


def walltime_seconds(kind: str, text) -> float | None:
    """A batch walltime in seconds: ``[D-]HH:MM:SS``; two fields are MM:SS, or HH:MM for LSF;
    one field is minutes (SLURM, LSF) or seconds (PBS, SGE)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) * (60 if kind in ("slurm", "lsf") else 1)
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(text).strip())
    if not match:
        return None
    days = int(match.group(1) or 0)
    fields = [int(v) for v in match.group(2).split(":")]
    if len(fields) == 3:
        h, m, s = fields
    elif len(fields) == 2:
        (h, m), s = (fields, 0) if kind == "lsf" or match.group(1) else ((0, fields[0]), fields[1])
    else:
        h, m, s = (fields[0], 0, 0) if match.group(1) else (
            (0, fields[0], 0) if kind in ("slurm", "lsf") else (0, 0, fields[0]))
    return float(days * 86400 + h * 3600 + m * 60 + s)


def requested_gpus(directives: str) -> int:
    """GPUs that a job's directives request: SLURM ``--gres=gpu[:type]:N``, ``--gpus[-per-*]=N``,
    PBS ``ngpus=N``, SGE ``gpu=N``, LSF ``-gpu "num=N"``; 0 when none (a partition or queue
    named gpu is not a request)."""
    text = directives.lower()
    counts = []
    for spec in re.findall(r"gres[=\s]+(\S+)", text):
        for item in spec.strip("'\"").split(","):
            fields = item.split(":")
            if fields[0] == "gpu":
                counts.append(int(fields[-1]) if fields[-1].isdigit() and len(fields) > 1 else 1)
    counts += [int(n) for n in re.findall(r"--gpus(?:-per-[a-z]+)?[=\s]+(?:[\w.-]+:)?(\d+)", text)]
    counts += [int(n) for n in re.findall(r"(?<![\w-])n?gpus?=(\d+)", text)]
    counts += [int(n) if n else 1 for n in re.findall(r"(?<![\w-])-gpu\s+[\"']?(?:num=(\d+)|-)", text)]
    return max(counts, default=0)


def replace_retired_jobs(cluster, jobs: int, interval: float = 2.0) -> None:
    """Keep ``jobs`` batch jobs running: a job ends when its worker retires at ``--lifetime`` or
    it is cancelled (``scancel``), pre-empted or loses its node, and dask-jobqueue does not submit
    a new one (dask-jobqueue #691); re-asserting the job count every ``interval`` s does. A job of
    several worker processes (``processes: 2``) is never even forgotten: distributed forgets a
    lost worker by its own name, not by its job's. So a job whose workers were seen here (checked
    every ``interval`` s; a queued job has none yet) and have all been gone for
    ``distributed.deploy.lost-worker-timeout`` is forgotten here. Stopped with the cluster (a
    periodic callback of it)."""
    import asyncio
    import time
    import weakref

    import dask
    from dask.utils import parse_timedelta
    from distributed.core import Status
    from tornado.ioloop import PeriodicCallback

    # jobs whose workers have connected, and when the last one left; by job, not by name (a job
    # submitted in a lost one's place has its name), and weakly: the cluster checks at its close
    # that every job object still alive was closed
    seen, gone = weakref.WeakSet(), weakref.WeakKeyDictionary()

    def keep():
        if cluster.status != Status.running:
            return
        present = {w.get("name") for w in cluster.scheduler_info.get("workers", {}).values()}
        timeout = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
        for name, job in list(cluster.workers.items()):
            spec = cluster.worker_spec.get(name, {})
            if present & {f"{name}{suffix}" for suffix in spec.get("group", [""])}:
                seen.add(job)
                gone.pop(job, None)
            elif job in seen and time.monotonic() - gone.setdefault(job, time.monotonic()) >= timeout:
                del cluster.workers[name]
                cluster._futures.add(asyncio.ensure_future(job.close()))
        cluster.scale(jobs=jobs)

    callback = PeriodicCallback(keep, interval * 1000)
    cluster.periodic_callbacks["cryodask-replace-retired-jobs"] = callback
    cluster.loop.add_callback(callback.start)


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
