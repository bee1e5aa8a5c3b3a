"""How many slices go through SAM2's image encoder or DINOv2 per call: on a GPU, as many as the
free memory holds.

One slice of the real size is run first and the peak memory it adds measured (these encoders'
activations grow linearly with the batch); the batch is then what half of the free memory holds,
at most ``CAP``. The answer is kept per process for the model and slice shape, so a worker probes
once. On the CPU a batch saves no time but costs memory (benchmarks/results/README.md, ETSAM's
two stages), so the caller's CPU default is used. A batch given by the user is used as it is.
"""

from __future__ import annotations

import threading

CAP = 64  # slices per call at most: beyond it the GPU is busy anyway and a failed task costs more
FRACTION = 0.5  # of the free memory: the rest for the outputs, the cache and other tasks on the GPU
_CHOSEN: dict = {}
_LOCK = threading.Lock()


def batch_for(probe, *, device: str, key, requested: int | None = None, cpu_default: int = 1) -> int:
    """Slices per encoder call.

    Parameters
    ----------
    probe : callable running the encoder on one slice of the real size (on ``device``)
    device : "cpu" or "cuda" (already resolved)
    key : what the answer depends on besides the GPU (the model and the slice shape)
    requested : the user's batch; used as it is when given
    cpu_default : the batch on the CPU
    """
    if requested:
        return int(requested)
    if device != "cuda":
        return int(cpu_default)
    with _LOCK:
        if key not in _CHOSEN:
            _CHOSEN[key] = _measure(probe)
        return _CHOSEN[key]


def _measure(probe) -> int:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        probe()
    torch.cuda.synchronize()
    per_slice = max(torch.cuda.max_memory_allocated() - base, 1)
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(CAP, int(free * FRACTION // per_slice)))


def sam2_batch(predictor, device: str, requested: int | None, *, config: str, compile: bool = False,
               cpu_default: int = 1) -> int:
    """Slices per call of SAM2's image encoder (one blank frame of the model's size measured)."""
    import torch

    from .sam2 import autocast_for

    size = predictor.image_size

    def probe():
        with autocast_for(device)():
            predictor.forward_image(torch.zeros(1, 3, size, size, device=device))

    return batch_for(probe, device=device, key=("sam2", str(config), size, bool(compile)), requested=requested,
                     cpu_default=cpu_default)
