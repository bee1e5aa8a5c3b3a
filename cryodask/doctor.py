"""``cryodask doctor``: what this install can run, which weights it finds, whether the cluster answers.

Each check gives ``ok``, ``warn`` (something optional is missing: a GPU, a weight file) or
``fail`` (something a command needs is broken), with what to do about it. Nothing is
downloaded and no job is submitted; a batch-system cluster is checked by rendering its job
script, a scheduler address by connecting to it.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from dataclasses import dataclass

INSTALL = "bash deploy/install.sh .venv sam2"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    advice: str = ""


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001  (any import failure is what we report)
        return None
    return str(getattr(mod, "__version__", "installed"))


def check_core() -> list[Check]:
    checks = [Check("python", "ok" if sys.version_info >= (3, 11) else "fail", sys.version.split()[0],
                    "cryodask needs Python >= 3.11")]
    for module in ("numpy", "dask", "distributed", "zarr", "ome_zarr", "mrcfile", "cc3d", "starfile", "scipy",
                   "skimage"):
        version = _version(module)
        checks.append(Check(module, "ok" if version else "fail", version or "missing",
                            "" if version else "reinstall: bash deploy/install.sh .venv"))
    return checks


def check_models() -> list[Check]:
    """torch (and that it is the pinned one), SAM2 without torchvision, transformers' DINOv2."""
    checks = []
    torch_version = _version("torch")
    checks.append(Check("torch", "ok" if torch_version else "warn", torch_version or "missing",
                        "" if torch_version else f"needed by --method etsam/cryosam and features: {INSTALL}"))
    if importlib.util.find_spec("torchvision") is not None:
        checks.append(Check("torchvision", "warn", "installed",
                            "PyPI's torchvision is a CUDA build that breaks transformers on a CPU torch: "
                            "pip uninstall torchvision (cryodask does not use it)"))
    sam2 = _version("sam2")
    checks.append(Check("sam2", "ok" if sam2 else "warn", sam2 or "missing",
                        "" if sam2 else f"needed by ETSAM and CryoSAM: {INSTALL}"))
    if sam2:
        from .models.sam2 import PACKAGED, config_path

        try:
            for name in PACKAGED:
                config_path(name)
            checks.append(Check("sam2 configs", "ok", ", ".join(PACKAGED)))
        except Exception as exc:  # noqa: BLE001
            checks.append(Check("sam2 configs", "fail", str(exc), f"reinstall SAM2: {INSTALL}"))
    try:
        from transformers import Dinov2Model  # noqa: F401

        checks.append(Check("transformers DINOv2", "ok", _version("transformers") or "installed"))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("transformers DINOv2", "warn", f"{type(exc).__name__}: {str(exc)[:80]}",
                            f"needed by features and CryoSAM: {INSTALL}"))
    return checks


def check_gpu() -> list[Check]:
    checks = []
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            checks.append(Check("CUDA (torch)", "ok",
                                f"{torch.cuda.device_count()} device(s), {name}, CUDA {torch.version.cuda}"))
        else:
            checks.append(Check("CUDA (torch)", "warn", "no CUDA device visible",
                                "everything runs on CPU; on a GPU node install a CUDA torch and use --cluster cuda"))
    except ImportError:
        checks.append(Check("CUDA (torch)", "warn", "torch missing", INSTALL))
    for module, use in (("cupy", "GPU connected components (postprocess --device gpu)"),
                        ("dask_cuda", "--cluster cuda"), ("cucim", "GPU image filters")):
        version = _version(module)
        checks.append(Check(module, "ok" if version else "warn", version or "missing",
                            "" if version else f"optional, for {use}: bash deploy/install.sh .venv gpu"))
    if shutil.which("nvidia-smi") is None:
        checks.append(Check("nvidia-smi", "warn", "not found", "no NVIDIA driver on this node (fine for CPU runs)"))
    return checks


def check_weights(folder=None) -> list[Check]:
    from .models.weights import PUBLISHED, weights_folder

    base = weights_folder(folder)
    if base is None:
        return [Check("weights folder", "warn", "not set",
                      "set --weights, CRYODASK_WEIGHTS or 'weights:' in ~/.config/cryodask/config.yaml "
                      "(the classical membrane filter and the LoG picker need none)")]
    if not base.is_dir():
        return [Check("weights folder", "fail", f"{base} does not exist", "create it and copy the weight files in")]
    checks = [Check("weights folder", "ok", str(base))]
    from .models.dinov2 import NAMES as DINOV2

    for name, where in PUBLISHED.items():
        found = (base / name).exists()
        other = next((n for n in DINOV2 if n != name and (base / n).exists()), None) if name in DINOV2 else None
        if not found and other and name == DINOV2[1]:  # the plain one is only a fallback
            checks.append(Check(name, "ok", f"not needed: {other} is used (CryoSAM's)"))
        elif not found and other:
            checks.append(Check(name, "warn", f"missing: {other} is used instead",
                                f"CryoSAM used this one; copy it from {where}"))
        else:
            checks.append(Check(name, "ok" if found else "warn", "found" if found else "missing",
                                "" if found else f"copy it from {where}"))
    return checks


def check_cluster(spec: str = "local", config=None, timeout: float = 5.0) -> list[Check]:
    """A scheduler address is connected to; a batch system renders its job script; local is started."""
    from .engine.cluster import check_spec

    try:
        spec = check_spec(spec)
    except Exception as exc:  # noqa: BLE001
        return [Check("cluster", "fail", str(exc), "use local, cuda, slurm, pbs, sge, lsf or tcp://host:port")]
    if spec.startswith("tcp://"):
        from distributed import Client

        try:
            with Client(spec, timeout=timeout) as client:
                workers = len(client.scheduler_info().get("workers", {}))
            return [Check("cluster", "ok", f"{spec}: {workers} worker(s)")]
        except Exception as exc:  # noqa: BLE001
            return [Check("cluster", "fail", f"{spec}: {type(exc).__name__}", "is the scheduler running and reachable "
                          "from this node (firewall, address)?")]
    if spec in ("slurm", "pbs", "sge", "lsf"):
        from .engine.cluster import jobqueue_cluster, load_config

        try:
            options = load_config(config).get(spec, {}) if config else {}
            cluster = jobqueue_cluster(spec, {**options, "scheduler_options": {"dashboard_address": ":0"}})
            script = cluster.job_script()
            cluster.close()
        except Exception as exc:  # noqa: BLE001
            return [Check("cluster", "fail", f"{spec}: {type(exc).__name__}: {str(exc)[:100]}",
                          "see deploy/cluster.example.yaml and --cluster-config")]
        submit = {"slurm": "sbatch", "pbs": "qsub", "sge": "qsub", "lsf": "bsub"}[spec]
        found = shutil.which(submit) is not None
        return [Check("cluster", "ok" if found else "warn",
                      f"{spec} job script renders ({len(script.splitlines())} lines)",
                      "" if found else f"{submit} not found on this node: run from a login node")]
    if spec == "cuda":
        return [Check("cluster", "ok" if _version("dask_cuda") else "fail",
                      "dask-cuda " + (_version("dask_cuda") or "missing"),
                      "" if _version("dask_cuda") else "bash deploy/install.sh .venv gpu")]
    from distributed import LocalCluster

    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
            return [Check("cluster", "ok", f"local cluster starts ({cluster.scheduler_address})")]
    except Exception as exc:  # noqa: BLE001
        return [Check("cluster", "fail", f"local: {type(exc).__name__}: {exc}", "check free ports and /tmp space")]


def diagnose(*, cluster: str = "local", cluster_config=None, weights=None) -> list[Check]:
    """Every check, in the order a user would fix them."""
    return check_core() + check_models() + check_gpu() + check_weights(weights) + check_cluster(cluster, cluster_config)
