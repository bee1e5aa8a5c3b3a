"""DINOv2 patch features of tomogram slices, computed the way CryoSAM computes them.

CryoSAM loads ViT-L/14 with registers from ``torch.hub`` (a download at run time) and feeds
slices one at a time. Here the same network comes from a local transformers folder
(``Dinov2Model`` or ``Dinov2WithRegistersModel`` written by ``save_pretrained``), resolved
offline; slices go through in batches, and each worker process loads the model once.

CryoSAM's preprocessing, kept exactly: the slice (already normalised with the volume's
global mean and std) is resized bilinearly with ``align_corners=True`` to a square of
``image_size`` (518: 37x37 patches of 14), whatever its aspect ratio, and repeated to three
channels, with no ImageNet normalisation. The features are the layer-normed patch tokens
(hub ``x_norm_patchtokens`` = transformers ``last_hidden_state`` without CLS and registers).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CryodaskError, InputError, where
from .weights import resolve

# In a weights folder: CryoSAM's ViT-L/14 with registers (torch.hub dinov2_vitl14_reg) first; the
# plain ViT-L/14 is used where it is the only one there.
NAMES = ("dinov2-with-registers-large", "dinov2-large")
IMAGE_SIZE = 518
# model_type in config.json -> transformers class
CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

_MODELS: dict[tuple, object] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Dinov2Info:
    """What a DINOv2 folder holds, read from its ``config.json`` without loading weights."""

    path: str
    model_type: str
    hidden_size: int
    patch_size: int
    num_register_tokens: int
    num_hidden_layers: int
    name: str

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_dinov2(checkpoint=None, weights=None) -> Path:
    """The local DINOv2 folder: ``checkpoint`` if given, else, in the weights folder,
    ``dinov2-with-registers-large`` (CryoSAM's) or else ``dinov2-large``; a one-line error names
    CryoSAM's when neither is there."""
    if not checkpoint:
        from .weights import weights_folder

        base = weights_folder(weights)
        found = next((base / name for name in NAMES if base is not None and (base / name).exists()), None)
        if found is not None:
            return found
    return resolve(checkpoint, default_name=NAMES[0], folder=weights, option="--checkpoint")


def describe_dinov2(path) -> Dinov2Info:
    """Check that ``path`` is a transformers DINOv2 folder (config and a weight file) and
    describe it; cheap enough to run on the client before any cluster starts.

    >>> describe_dinov2("weights/dinov2-large").hidden_size  # doctest: +SKIP
    1024
    """
    path = Path(path)
    if not path.is_dir():
        raise where(path, "not a DINOv2 model folder (expected a transformers save_pretrained folder)")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise where(path, "not a DINOv2 model folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise where(config_file, f"unreadable model config ({exc.__class__.__name__})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CLASSES:
        raise where(path, f"not a DINOv2 model folder (model_type {model_type!r}; expected {' or '.join(CLASSES)})")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise where(path, f"no weight file ({' or '.join(WEIGHT_FILES[::2])})")
    try:
        return Dinov2Info(str(path), model_type, int(config.get("hidden_size", 768)), int(config.get("patch_size", 14)),
                          int(config.get("num_register_tokens", 4 if model_type == "dinov2_with_registers" else 0)),
                          int(config.get("num_hidden_layers", 12)), path.name)
    except (TypeError, ValueError) as exc:
        raise where(config_file, f"invalid model config ({exc})") from None


def _stamp(path: Path) -> float:
    """Latest modification time of the files that make the model (a rewrite reloads it)."""
    files = [path / "config.json", *(path / n for n in WEIGHT_FILES)]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def torch_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``; ``gpu`` -> ``cuda``."""
    import torch

    if device not in ("auto", "cpu", "gpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or gpu, got {device}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device gpu: this worker sees no CUDA device")
        return "cuda"
    return "cpu"


def load_dinov2(path, device: str = "auto", compile: bool = False):
    """Load a DINOv2 folder once per process (per path, file times, device and ``compile``:
    ``torch.compile`` of the model, ``models/compiled.py``), in eval mode.

    Missing, corrupt or mismatched weights are a one-line ``InputError`` naming the folder,
    never a silently re-initialised model.

    >>> model = load_dinov2("weights/dinov2-with-registers-large", "cuda")  # doctest: +SKIP
    """
    path = Path(path).expanduser().resolve()
    info = describe_dinov2(path)
    device = torch_device(device)
    key = (str(path), _stamp(path), device, bool(compile))
    with _LOCK:
        if key not in _MODELS:
            for old in [k for k in _MODELS if k[0] == key[0] and k[2:] == key[2:]]:
                del _MODELS[old]  # the folder was rewritten: drop the stale copy
            model = _load(path, info, device)
            if compile:
                from .compiled import compiled

                model = compiled(model)
            _MODELS[key] = model
        return _MODELS[key]


def _load(path: Path, info: Dinov2Info, device: str):
    import importlib.util

    import transformers

    try:
        cls = getattr(transformers, CLASSES[info.model_type])
    except (ImportError, RuntimeError) as exc:
        hint = ("; torchvision is installed and, on a CPU torch, breaks transformers: uninstall it"
                if importlib.util.find_spec("torchvision") else "")
        name = CLASSES[info.model_type]
        raise CryodaskError(f"transformers cannot import {name} ({exc.__class__.__name__}){hint}") from None
    try:
        model, loading = cls.from_pretrained(str(path), output_loading_info=True)
    except Exception as exc:  # noqa: BLE001  (safetensors, torch and transformers each raise their own)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise where(path, f"cannot load DINOv2 weights ({message[:200]})") from None
    missing = sorted(loading.get("missing_keys") or []) + sorted(loading.get("mismatched_keys") or [])
    if missing:
        raise where(path, f"weights do not match its config.json ({len(missing)} tensors missing or mismatched, "
                          f"e.g. {missing[0]})")
    return model.eval().to(device)


def patch_grid(model, image_size: int = IMAGE_SIZE) -> int:
    """Patches per side for ``image_size`` (518 / 14 = 37)."""
    patch = model.config.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if image_size % patch:
        raise InputError(f"--image-size {image_size} is not a multiple of the model's patch size {patch}")
    return image_size // patch


def patch_maps(model, slices, *, image_size: int = IMAGE_SIZE):
    """The patch feature maps of a batch of slices, as a torch tensor on the model's device.

    Parameters
    ----------
    model : a loaded ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (see :func:`load_dinov2`)
    slices : (B, H, W) float array or tensor, already normalised with the volume's mean/std
    image_size : side of the square the slices are resized to (518 in CryoSAM)

    Returns
    -------
    (B, C, L, L) float32 tensor, L = image_size // patch_size; rows follow H, columns W.
    """
    import torch
    import torch.nn.functional as F

    grid = patch_grid(model, image_size)
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(slices, dtype=np.float32) if not torch.is_tensor(slices) else slices)
    if x.ndim != 3:
        raise ValueError(f"slices must be (B, H, W), got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)[:, None]
    with torch.inference_mode():
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=True)
        x = x.expand(-1, 3, -1, -1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = model(pixel_values=x).last_hidden_state
        # CLS (and register) tokens come first; the last L*L are the patches, row-major
        patches = tokens[:, -grid * grid:].float()
        return patches.reshape(len(x), grid, grid, -1).permute(0, 3, 1, 2).contiguous()


def patch_features(model, slices, *, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """DINOv2 patch features of a batch of slices, CryoSAM's preprocessing, in one forward pass.

    Parameters
    ----------
    model : a loaded DINOv2 model (see :func:`load_dinov2`)
    slices : (B, H, W) float32, already normalised with the whole volume's mean and std
    image_size : side of the square input (518 gives 37x37 patches)

    Returns
    -------
    (B, L, L, C) float32 numpy array.

    Examples
    --------
    >>> model = load_dinov2(resolve_dinov2("weights/dinov2-large"))  # doctest: +SKIP
    >>> patch_features(model, (tomo[:8] - tomo.mean()) / tomo.std()).shape  # doctest: +SKIP
    (8, 37, 37, 1024)
    """
    return patch_maps(model, slices, image_size=image_size).permute(0, 2, 3, 1).cpu().numpy()
