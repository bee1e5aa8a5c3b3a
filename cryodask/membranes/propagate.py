"""SAM2 video propagation over a tomogram that is never held in memory.

ETSAM preprocesses every slice up front (24 GB for 500 slices at 1024²) and keeps every frame's
outputs; here the same predictor runs the same propagation code on frames made on demand a batch
at a time (``FrameStream``), the encoder batched through SAM2's ``cached_features`` hook
(``BatchedFeatures``), and outputs past the memory window dropped. With ``batch=1`` the logits
are bitwise ETSAM's; larger batches differ only by float rounding inside the encoder.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..models.sam2 import autocast_for
from .preprocess import frames as to_frames


class FrameStream:
    """``inference_state["images"]``: frames made on demand from ``read(z0, z1)`` -> (n, H, W)."""

    def __init__(self, read, n_frames: int, image_size: int):
        self.read = read
        self.n_frames = n_frames
        self.image_size = image_size

    def __len__(self) -> int:
        return self.n_frames

    def batch(self, start: int, stop: int):
        return to_frames(np.asarray(self.read(start, stop), dtype=np.float32), self.image_size)

    def __getitem__(self, index: int):
        return self.batch(index, index + 1)[0]


class BatchedFeatures:
    """SAM2's per-state feature cache, filled a batch of frames at a time.

    ``SAM2VideoPredictor._get_image_feature`` looks a frame up here and only encodes it itself
    on a miss; ``get`` never misses. A miss at the frame after the last one encoded (forward
    propagation) encodes the next ``batch`` frames in one ``forward_image`` call; any other
    miss (a prompt frame) encodes just that frame. Frames behind the propagation are dropped.
    """

    def __init__(self, predictor, stream: FrameStream, batch: int, device: str, autocast):
        self.predictor = predictor
        self.stream = stream
        self.batch = max(1, int(batch))
        self.device = device
        self.autocast = autocast
        self.cache: OrderedDict[int, tuple] = OrderedDict()
        self.next_sequential = 0
        self.encoded = 0

    def _encode(self, start: int, stop: int) -> None:
        import torch

        images = self.stream.batch(start, stop).to(self.device)
        with torch.inference_mode(), self.autocast():
            out = self.predictor.forward_image(images)
        pos = [p[:1] for p in out["vision_pos_enc"]]  # the same for every frame: keep one
        for i, frame in enumerate(range(start, stop)):
            backbone = {"backbone_fpn": [f[i:i + 1] for f in out["backbone_fpn"]], "vision_pos_enc": pos}
            self.cache[frame] = (images[i:i + 1], backbone)
        self.encoded += stop - start

    def get(self, frame: int, default=None):
        if frame not in self.cache:
            if frame == self.next_sequential:
                stop = min(frame + self.batch, len(self.stream))
                self._encode(frame, stop)
                self.next_sequential = stop
            else:
                self._encode(frame, frame + 1)
        return self.cache[frame]

    def forget_before(self, frame: int) -> None:
        for key in [k for k in self.cache if k < frame]:
            del self.cache[key]
        self.next_sequential = max(self.next_sequential, frame)


def new_state(predictor, images, height: int, width: int, device: str, *, offload_state: bool = True) -> dict:
    """The inference state ``SAM2VideoPredictor.init_state`` builds (sam2 1.1.0), for frames
    that are already in memory or streamed; ``init_state`` itself only reads video files."""
    import torch

    state = {
        "images": images, "num_frames": len(images), "offload_video_to_cpu": True,
        "offload_state_to_cpu": offload_state, "video_height": height, "video_width": width,
        "device": torch.device(device),
        "storage_device": torch.device("cpu") if offload_state else torch.device(device),
        "point_inputs_per_obj": {}, "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {},
        "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
        "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
    }
    return state


def memory_window(predictor) -> int:
    """How many past frames SAM2 reads: the memory bank and the object pointers."""
    return max(int(predictor.num_maskmem), int(getattr(predictor, "max_obj_ptrs_in_encoder", 16))) + 1


def add_prompts(predictor, state, prompts: dict[int, np.ndarray], autocast, obj_id: int = 1) -> None:
    import torch

    with torch.inference_mode(), autocast():
        for frame in sorted(prompts):
            predictor.add_new_mask(inference_state=state, frame_idx=int(frame), obj_id=obj_id, mask=prompts[frame])


def _quiet(iterable, **_):
    return iterable


def propagate(predictor, read, n_frames: int, height: int, width: int, prompts: dict[int, np.ndarray], *,
              device: str = "cpu", batch: int = 8):
    """Yield ``(z, logits)`` for every slice in order: SAM2 video propagation from the prompted
    frames, with frames streamed from ``read(z0, z1)`` and the encoder batched.

    ``logits`` is the (H, W) float32 mask logit map at the slice's own resolution, exactly what
    ETSAM collects from ``propagate_in_video``.
    """
    import sam2.sam2_video_predictor as video
    import torch

    video.tqdm = _quiet  # a bar per column from every worker would flood the user's terminal
    autocast = autocast_for(device)
    stream = FrameStream(read, n_frames, predictor.image_size)
    state = new_state(predictor, stream, height, width, device)
    features = BatchedFeatures(predictor, stream, batch, device, autocast)
    state["cached_features"] = features
    add_prompts(predictor, state, prompts, autocast)
    window = memory_window(predictor)
    with torch.inference_mode(), autocast():
        for z, _, masks in predictor.propagate_in_video(state):
            yield z, masks[0, 0].float().cpu().numpy()
            features.forget_before(z + 1)
            for outputs in state["output_dict_per_obj"].values():
                old = outputs["non_cond_frame_outputs"]
                for key in [k for k in old if k <= z - window]:
                    del old[key]
            for tracked in state["frames_tracked_per_obj"].values():
                tracked.pop(z - window, None)
