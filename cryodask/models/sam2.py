"""SAM2 video predictors built from a config and a local checkpoint, once per worker.

The configs are SAM2's own YAML files (the packaged ``sam2.1_hiera_{t,s,b+,l}`` or any path),
loaded with OmegaConf and instantiated directly, so a config outside the package works and no
global Hydra state is touched. Checkpoints are SAM2's format, ``{"model": state_dict}``, which
is also how ETSAM publishes ``etsam_stage{1,2}_v1.pt``. Every way a checkpoint can be wrong
(absent, not a torch file, no ``model`` key, other architecture) is a one-line ``InputError``.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

from ..errors import InputError, where

PACKAGED = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
_CACHE: dict = {}
_LOCK = threading.Lock()


def config_path(config: str) -> Path:
    """A packaged config name (``sam2.1_hiera_b+``, with or without ``.yaml``) or a YAML path."""
    name = str(config)
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem in PACKAGED or stem.startswith("configs/"):
        import importlib.util

        spec = importlib.util.find_spec("sam2")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("SAM2 is not installed: run deploy/install.sh with the 'sam2' extra")
        base = Path(list(spec.submodule_search_locations)[0])
        path = base / (stem + ".yaml" if stem.startswith("configs/") else f"configs/sam2.1/{stem}.yaml")
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise where(path, f"SAM2 config not found (packaged names: {', '.join(PACKAGED)})")
    return path


def _model_config(config: str, image_size: int | None):
    from omegaconf import OmegaConf

    path = config_path(config)
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001  (any YAML problem is the user's file)
        raise where(path, f"not a readable SAM2 config ({exc.__class__.__name__})") from None
    if "model" not in cfg:
        raise where(path, "not a SAM2 config (no 'model' section)")
    # ETSAM's predictor settings: video predictor, no hole filling, overlapping masks allowed
    overrides = ["model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
                 "model.non_overlap_masks=false", "model.fill_hole_area=0"]
    if image_size:
        overrides.append(f"model.image_size={int(image_size)}")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    OmegaConf.resolve(cfg)
    return cfg.model


def load_state_dict(checkpoint) -> dict:
    """The ``model`` state dict of a SAM2-format checkpoint, checked."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise where(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated, not a torch file, pickled code)
        raise where(path, f"not a readable PyTorch checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise where(path, "not a SAM2 checkpoint (expected {'model': state_dict})")
    return payload["model"]


def check_checkpoint(config: str, checkpoint) -> Path:
    """What :func:`build_predictor` refuses, found without building the model, so the client can
    check before a cluster starts: the file is a SAM2 checkpoint and its image encoder has the
    config's width and number of blocks (hiera-t weights under a hiera-s config fail here)."""
    import torch

    path = Path(checkpoint)
    try:  # memory-mapped: only the tensors' descriptions are read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    except Exception:  # noqa: BLE001  (not a zip checkpoint, or not SAM2's: the full load says which)
        state = None
    if not isinstance(state, dict):
        state = load_state_dict(path)
    trunk = _model_config(config, None).get("image_encoder", {}).get("trunk", {})
    if not str(trunk.get("_target_", "")).endswith("hieradet.Hiera"):
        return path  # another encoder: build_predictor checks it on the worker
    expected = (int(trunk.get("embed_dim", 96)), sum(trunk.get("stages", (2, 3, 16, 3))))  # Hiera's defaults
    proj = state.get("image_encoder.trunk.patch_embed.proj.weight")
    blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
    found = (int(proj.shape[0]) if hasattr(proj, "shape") else 0, len(blocks))
    if found != expected:
        raise where(path, f"does not match config {config}: its image encoder has width {found[0]} and "
                          f"{found[1]} blocks, the config's has {expected[0]} and {expected[1]}")
    return path


def build_predictor(config: str = "sam2.1_hiera_b+", checkpoint=None, *, device: str = "cpu",
                    image_size: int | None = None):
    """A ``SAM2VideoPredictor`` in eval mode, as ETSAM builds it.

    Parameters
    ----------
    config : packaged config name or YAML path
    checkpoint : SAM2-format ``.pt``; ``None`` keeps the random initialisation (tests, benchmarks)
    device : "cpu" or "cuda"
    image_size : input size override (the published models use 1024)

    Examples
    --------
    >>> p = build_predictor("sam2.1_hiera_t", image_size=256)  # doctest: +SKIP
    """
    from hydra.utils import instantiate

    model_cfg = _model_config(config, image_size)
    state = load_state_dict(checkpoint) if checkpoint is not None else None
    model = instantiate(model_cfg, _recursive_=True)
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:120])
            raise where(checkpoint, f"does not match config {config}: {first}") from None
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise where(checkpoint, f"does not match config {config}: {len(missing)} missing and "
                                    f"{len(unexpected)} unexpected weights (e.g. {example})")
    return model.to(device).eval()


def checkpoint_identity(checkpoint) -> str:
    """Name, size and mtime: enough to tell two weight files apart in a done-mark key."""
    if checkpoint is None:
        return "random"
    stat = Path(checkpoint).stat()
    return f"{Path(checkpoint).name}:{stat.st_size}:{stat.st_mtime_ns}"


def cached_predictor(config: str, checkpoint, *, device: str, image_size: int | None = None, seed: int = 0,
                     compile: bool = False):
    """``build_predictor`` once per process (a Dask worker keeps its models between tasks).

    Random models (no checkpoint) are seeded, so every worker builds the same one. ``compile``:
    the image encoder, which does nearly all the work, through ``torch.compile``."""
    key = (str(config), checkpoint_identity(checkpoint), device, image_size, seed if checkpoint is None else None,
           bool(compile))
    with _LOCK:
        if key not in _CACHE:
            if checkpoint is None:
                import torch

                torch.manual_seed(seed)
            predictor = build_predictor(config, checkpoint, device=device, image_size=image_size)
            if compile:
                from .compiled import compiled

                predictor.image_encoder = compiled(predictor.image_encoder)
            _CACHE[key] = predictor
        return _CACHE[key]


def worker_threads() -> None:
    """Give torch the worker's thread count, not the whole machine's (workers share cores; the
    nanny starts workers with one OpenMP thread)."""
    import torch

    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except (ImportError, ValueError):
        pass


def pick_device(device: str = "auto") -> str:
    """"auto" is CUDA when this process sees a GPU, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device visible to this process")
    return device


def autocast_for(device: str):
    """bf16 autocast on CUDA, as ETSAM runs; nothing on CPU."""
    import torch

    if device == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext
