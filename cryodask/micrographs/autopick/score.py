"""A trained Autopick-BC model on disk, loaded once per worker, scoring windows in batches.

``MODEL_DIR/model.pt`` holds the state dict and the :class:`ModelConfig` needed to rebuild the
network and to cut windows the way training did (box size, bin, window, normalisation).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...errors import where
from ...io.folders import atomic_write

FORMAT = "cryodask-autopick-bc"
VERSION = 1
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class ModelConfig:
    """How windows are made for this model (a different cut is a different input)."""

    box_size: int
    bin: int
    window: int
    normalisation: str = "minmax"
    pixel_size: float | None = None


def save_model(model_dir, net, config: ModelConfig) -> Path:
    """Write ``model.pt`` atomically (``model.pt.partial`` then rename)."""
    import torch

    path = Path(model_dir) / MODEL_FILE
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_write(path) as partial:
        torch.save({"format": FORMAT, "version": VERSION, "config": asdict(config), "state_dict": state}, partial)
    return path


def _read(model_dir) -> tuple[dict, Path]:
    import torch

    folder = Path(model_dir)
    if not folder.is_dir():
        raise where(folder, "no such model folder (train one with `cryodask autopick train`)")
    path = folder / MODEL_FILE
    if not path.is_file():
        raise where(folder, f"not an Autopick model folder ({MODEL_FILE} is missing)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many kinds on a damaged file)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise where(path, f"cannot be read as a model ({text[:160]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise where(path, "is not an Autopick-BC model written by cryodask")
    if data.get("version") != VERSION:
        raise where(path, f"model format version {data.get('version')} is not supported (expected {VERSION})")
    return data, path


def check_model(model_dir) -> ModelConfig:
    """The model's config, after building the network and loading its weights: a missing,
    damaged or foreign model folder is a one-line error before any cluster starts."""
    return load_model(model_dir)[1]


def load_model(model_dir):
    """``(net, config)``: the network in eval mode on the CPU."""
    from .network import AutopickNet

    data, path = _read(model_dir)
    try:
        config = ModelConfig(**data["config"])
        net = AutopickNet(config.window)
        net.load_state_dict(data["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise where(path, f"does not match the Autopick-BC network ({text[:160]})") from None
    return net.eval(), config


_CACHE: dict = {}
_LOCK = threading.Lock()


def cached_model(model_dir, device: str = "cpu"):
    """``load_model`` once per process (a worker scores many micrographs with one copy),
    BatchNorm folded into the convolutions; keyed on the path and the file's mtime, so a
    retrained model is picked up."""
    path = (Path(model_dir) / MODEL_FILE).resolve()
    key = (str(path), os.stat(path).st_mtime_ns, device)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            net, config = load_model(model_dir)
            _CACHE[key] = (net.fused().to(device), config)
        return _CACHE[key]


def use_worker_threads() -> None:
    """On a Dask worker, let torch use the worker's threads, not every core of the node
    (two one-thread workers on two cores would otherwise run four busy threads)."""
    import torch

    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, int(threads)))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
GLIBC_MMAP_DEFAULT = 128 * 1024


@contextmanager
def heap_kept():
    """Keep freed heap memory while scoring on a Dask worker.

    The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (freed memory goes back to
    the OS at once), which also pins glibc's mmap threshold at 128 kB: every activation
    tensor of every forward pass is then mapped and page-faulted afresh, and scoring ran 6×
    slower (measured: 37.7 s instead of 6.1 s for two 4096² micrographs, mostly system time).
    Inside this block tensors up to 32 MB come from a heap that keeps 256 MB; on leaving it,
    the worker's settings are restored and the heap is trimmed. Elsewhere (no such variable,
    not glibc) it does nothing.
    """
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = None
    if trim is not None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            if not (libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)):
                libc = None
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_TRIM_THRESHOLD, int(trim))
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_DEFAULT)
            libc.malloc_trim(0)


def score_windows(net, windows: np.ndarray, batch: int = 16, device: str = "cpu") -> np.ndarray:
    """P(particle) for (N, w, w) normalised windows, ``batch`` at a time (float32)."""
    import torch

    out = np.empty(len(windows), np.float32)
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            x = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch])).unsqueeze(1).to(device)
            out[start:start + len(x)] = torch.sigmoid(net(x)).float().cpu().numpy()
    return out


def header_pixel_size(path) -> float | None:
    """Å/px from an MRC or TIFF header (None for pictures, or a header without one)."""
    from ...io.micrographs import _kind

    kind = _kind(path)
    if kind == "picture":
        return None
    if kind == "mrc":
        from ...io import mrc
    else:
        from ...io import tiff as mrc
    voxel = mrc.describe(path)[2]
    size = voxel[2] if voxel else None
    return float(size) if size and np.isfinite(size) and size > 0 else None


def sampling_note(config, mics, pixel_size: float | None = None, echo=None) -> list[str]:
    """One line per kind of sampling mismatch between the model (a ``ModelConfig``, or its
    pixel size) and the micrographs: which are rescaled to the model's pixel size, and which
    pixel size is assumed where one is unknown (``pixel_size``, ``--pixel-size``, states it)."""
    from ...errors import InputError
    from ...io.micrographs import sampling_scale

    if pixel_size is not None and not pixel_size > 0:
        raise InputError(f"--pixel-size must be positive, got {pixel_size}")
    sizes = {n: pixel_size or header_pixel_size(p) for n, p in mics.paths.items()}
    model = getattr(config, "pixel_size", config)
    lines = []
    unknown = [n for n, s in sizes.items() if s is None]
    if unknown and model:
        lines.append(f"pixel size of {len(unknown)} micrograph(s) unknown: assuming the model's {model:g} Å/px "
                     "(state it with --pixel-size)")
    known = {n: s for n, s in sizes.items() if s is not None}
    if known and not model:
        lines.append(f"the model records no pixel size: assuming it was trained at the micrographs' "
                     f"({', '.join(sorted({f'{s:g}' for s in known.values()}))} Å/px); no rescaling")
    if unknown and not model:
        lines.append("neither the model nor the micrographs state a pixel size: assuming they match")
    rescaled = {s for s in known.values() if model and sampling_scale(s, model) != 1}
    if rescaled:
        n = sum(1 for s in known.values() if s in rescaled)
        lines.append(f"{n} micrograph(s) at {', '.join(sorted(f'{s:g}' for s in rescaled))} Å/px rescaled to the "
                     f"model's {model:g} Å/px on the workers; picks are mapped back")
    for line in lines:
        if echo:
            echo(line)
    return lines
