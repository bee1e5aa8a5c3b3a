"""SAM2 in image mode over the slices of a volume: geometry, batched embeddings, decoding.

Every slice is an independent image prompt (no memory bank), as CryoSAM's ``SamPredictor``;
embeddings are cached per (view, slice) so neighbouring prompts reuse them. Why it is built
this way (resize, pixel-centre mapping, batching): docs/architecture.md, "CryoSAM".
SAM2's image predictor imports torchvision; this module never does.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .sam2 import autocast_for

VIEWS = ("z", "y", "x")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOGIT_CLAMP = 32.0  # SAM2ImagePredictor clamps the low-res logits it hands back for re-prompting


# ------------------------------------------------------------------ geometry

def view_axis(view: str) -> int:
    """The volume axis a view's slices are taken across: z 0 (slices (Y, X)), y 1 ((Z, X)), x 2 ((Z, Y))."""
    return VIEWS.index(view)


def slice_shape(shape, view: str) -> tuple[int, int]:
    axis = view_axis(view)
    return tuple(int(n) for a, n in enumerate(shape) if a != axis)


@dataclass(frozen=True)
class SliceGeometry:
    """Where a (height, width) slice sits in SAM2's size x size input and lowres x lowres logits.

    ``content`` is the part of the input the slice fills: all of it when stretched, the
    top-left (round(height * s), round(width * s)) with ``s = size / max(height, width)`` when
    padded. Pixel centres map to pixel centres (SAM2's prompt encoder adds 0.5 to a point).

    Examples
    --------
    >>> g = SliceGeometry(32, 64, 128, 32)
    >>> g.to_model(10, 20), g.lowres_to_slice(2, 3)
    ((40.5, 41.5), (2, 7))
    """

    height: int
    width: int
    size: int
    lowres: int
    resize: str = "stretch"

    @property
    def content(self) -> tuple[int, int]:
        if self.resize == "stretch":
            return self.size, self.size
        s = self.size / max(self.height, self.width)
        return max(1, round(self.height * s)), max(1, round(self.width * s))

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per slice pixel, (rows, columns)."""
        ch, cw = self.content
        return ch / self.height, cw / self.width

    def to_model(self, row: float, col: float) -> tuple[float, float]:
        """A slice pixel (row, col) as SAM2's point coordinates (x, y) in input pixels."""
        sr, sc = self.scale
        return (col + 0.5) * sc - 0.5, (row + 0.5) * sr - 0.5

    def lowres_to_slice(self, i: int, j: int) -> tuple[int, int]:
        """The slice pixel under the centre of low-res logit (i, j), clipped to the slice."""
        step = self.size / self.lowres
        sr, sc = self.scale
        row = math.floor((i + 0.5) * step / sr - 0.5 + 0.5)
        col = math.floor((j + 0.5) * step / sc - 0.5 + 0.5)
        return min(max(row, 0), self.height - 1), min(max(col, 0), self.width - 1)

    def lowres_content(self) -> tuple[int, int]:
        """Low-res rows and columns that cover some of the slice."""
        ch, cw = self.content
        return (min(self.lowres, math.ceil(ch * self.lowres / self.size)),
                min(self.lowres, math.ceil(cw * self.lowres / self.size)))

    def argmax(self, logits: np.ndarray) -> tuple[int, int]:
        """The slice pixel of the highest low-res logit inside the content (first on a tie)."""
        rows, cols = self.lowres_content()
        inside = np.asarray(logits)[:rows, :cols]
        i, j = np.unravel_index(int(np.argmax(inside)), inside.shape)
        return self.lowres_to_slice(int(i), int(j))

    def upsample(self, logits: np.ndarray) -> np.ndarray:
        """(M, lowres, lowres) logits -> (M, height, width) float32 at the slice's pixels,
        bilinear: SAM2's ``postprocess_masks`` (stretch), SAM v1's crop-then-resize (pad)."""
        import torch
        import torch.nn.functional as F

        t = torch.as_tensor(np.asarray(logits, np.float32))[:, None]
        if self.resize == "pad":
            ch, cw = self.content
            t = F.interpolate(t, (self.size, self.size), mode="bilinear", align_corners=False)[..., :ch, :cw]
        if tuple(t.shape[-2:]) != (self.height, self.width):
            t = F.interpolate(t, (self.height, self.width), mode="bilinear", align_corners=False)
        return t[:, 0].numpy()

    def images(self, slices, device="cpu"):
        """(n, height, width) values in [0, 1] -> torch (n, 3, size, size) SAM2 input."""
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.clip(np.asarray(slices, np.float32), 0, 1)).to(device)[:, None]
        ch, cw = self.content
        if tuple(x.shape[-2:]) != (ch, cw):
            x = F.interpolate(x, (ch, cw), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        if (ch, cw) != (self.size, self.size):
            out = x.new_zeros((len(x), 3, self.size, self.size))
            out[..., :ch, :cw] = x
            x = out
        return x.contiguous()


# ------------------------------------------------------------------ embeddings

class EmbeddingCache:
    """Least-recently-used slice embeddings, bounded in bytes: one per volume and predictor.

    Keys are ``(view, index)``; a cache is bound to the first (predictor, shape, geometry)
    that uses it and refuses any other, so two volumes never share entries.
    ``hits``/``misses`` count look-ups. Safe to share between a worker's threads.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self._lock = threading.Lock()
        if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise InputError(f"cache max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.owner = None
        self._items: OrderedDict = OrderedDict()

    def bind(self, owner) -> None:
        if self.owner is None:
            self.owner = owner
        elif self.owner != owner:
            raise InputError("an EmbeddingCache serves one volume and one predictor; make a new one for another")

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key][0]
            self.misses += 1
            return None

    def put(self, key, value, nbytes: int) -> None:
        with self._lock:
            if key in self._items:
                self.nbytes -= self._items.pop(key)[1]
            self._items[key] = (value, int(nbytes))
            self.nbytes += int(nbytes)
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                self.nbytes -= self._items.popitem(last=False)[1][1]


# ------------------------------------------------------------------ decoders

class SliceDecoder:
    """The per-slice step of the propagation: a strategy, so tests can supply known masks.

    ``geometry(view)`` says how slices map to the logits; ``need(view, indices)`` is a hint
    that these slices come next (encode them together); ``decode`` returns the candidates'
    low-res logits (M, lowres, lowres) float32 and their predicted IoUs (M,) for a point
    prompt (slice pixels, row and column) and an optional low-res mask prompt; ``negatives``,
    (row, column) points the mask must leave out, are passed only when there are some.
    """

    def geometry(self, view: str) -> SliceGeometry:
        raise NotImplementedError

    def need(self, view: str, indices) -> None:
        return None

    def decode(self, view: str, index: int, point_rc, mask_input, multimask: bool = True):
        raise NotImplementedError


class SAM2Slices(SliceDecoder):
    """SAM2 in image mode over the slices of one volume, embeddings cached and batched.

    ``read(region)`` returns float32 values in [0, 1] for a tuple of three slices.
    ``device`` defaults to the predictor's; ``encoded`` counts slices through the image
    encoder, ``calls`` encoder calls.
    """

    def __init__(self, predictor, read, shape, *, resize: str = "stretch", cache: EmbeddingCache | None = None,
                 device: str | None = None, batch: int = 8):
        own = next(predictor.parameters()).device.type
        if device is not None and str(device) != own:
            raise InputError(f"device {device!r} does not match the predictor's device {own!r}")
        device = own
        self.predictor = predictor
        self.read = read
        self.shape = tuple(int(n) for n in shape)
        self.size = int(predictor.image_size)
        self.lowres = int(predictor.sam_prompt_encoder.mask_input_size[0])
        self.resize = resize
        self.device = device
        self.batch = max(1, int(batch))
        self.cache = EmbeddingCache() if cache is None else cache
        self.cache.bind((id(predictor), self.shape, self.size, resize))
        self.autocast = autocast_for(device)
        self.encoded = 0
        self.calls = 0
        self._geometry = {v: SliceGeometry(*slice_shape(self.shape, v), self.size, self.lowres, resize) for v in VIEWS}

    def geometry(self, view: str) -> SliceGeometry:
        return self._geometry[view]

    def _slices(self, view: str, indices) -> np.ndarray:
        axis = view_axis(view)
        lo, hi = min(indices), max(indices) + 1
        region = tuple(slice(lo, hi) if a == axis else slice(0, n) for a, n in enumerate(self.shape))
        data = np.asarray(self.read(region), np.float32)
        expected = tuple(hi - lo if a == axis else n for a, n in enumerate(self.shape))
        if data.shape != expected:
            raise InputError(f"the volume reader returned shape {data.shape} for region {region}, expected {expected}")
        if not np.isfinite(data).all():
            raise InputError("the volume contains NaN or Inf values")
        return np.moveaxis(data, axis, 0)[[i - lo for i in indices]]

    def _encode(self, view: str, indices) -> None:
        import torch

        model = self.predictor
        for start in range(0, len(indices), self.batch):
            part = list(indices[start:start + self.batch])
            images = self._geometry[view].images(self._slices(view, part), self.device)
            with torch.inference_mode(), self.autocast():
                out = model.forward_image(images)
                _, feats, _, sizes = model._prepare_backbone_features(out)
                if model.directly_add_no_mem_embed:  # SAM2ImagePredictor.set_image
                    feats[-1] = feats[-1] + model.no_mem_embed
                maps = [f.permute(1, 2, 0).reshape(len(part), -1, *s) for f, s in zip(feats, sizes)]
            self.calls += 1
            self.encoded += len(part)
            for i, index in enumerate(part):
                levels = [m[i:i + 1].clone() for m in maps]
                nbytes = sum(t.numel() * t.element_size() for t in levels)
                self.cache.put((view, int(index)), (levels[-1], levels[:-1]), nbytes)

    def need(self, view: str, indices) -> None:
        """On a miss at ``indices[0]``, encode the missing ones of ``indices`` together."""
        if not len(indices) or (view, int(indices[0])) in self.cache:
            return
        missing = [int(i) for i in indices if (view, int(i)) not in self.cache]
        if missing:
            self._encode(view, missing)

    def decode(self, view: str, index: int, point_rc, mask_input, multimask: bool = True, negatives=()):
        import torch

        model = self.predictor
        entry = self.cache.get((view, int(index)))
        if entry is None:
            self._encode(view, [int(index)])
            entry = self.cache.get((view, int(index)))
        embed, high_res = entry
        points = [self._geometry[view].to_model(*rc) for rc in [point_rc, *negatives]]
        with torch.inference_mode(), self.autocast():
            coords = torch.tensor([points], dtype=torch.float32, device=embed.device)
            labels = torch.tensor([[1] + [0] * len(negatives)], dtype=torch.int32, device=embed.device)
            masks = None
            if mask_input is not None:
                masks = torch.as_tensor(np.asarray(mask_input, np.float32), device=embed.device)[None, None]
            sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
            low, iou, _, _ = model.sam_mask_decoder(
                image_embeddings=embed, image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask, repeat_image=False, high_res_features=high_res)
        low = torch.clamp(low.float(), -LOGIT_CLAMP, LOGIT_CLAMP)
        return low[0].cpu().numpy(), iou[0].float().cpu().numpy()

