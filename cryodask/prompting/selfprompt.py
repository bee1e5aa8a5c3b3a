"""CryoSAM's Cross-Plane Self-Prompting with SAM2 in image mode: one point -> one 3-D instance.

CryoSAM (``xulabs/aitom``, ``sam_utils.py``; paper §2.1) segments the slice through a prompt
with SAM, then prompts the next slice with the previous slice's most confident point and its
mask logits, slice after slice, until the new mask no longer agrees with the previous one;
the masks of the ±z, ±y and ±x directions are united into the instance. Here:

**Image mode.** A slice is embedded with the predictor's ``forward_image`` (SAM2's image
path: ``_prepare_backbone_features`` and ``no_mem_embed`` as ``SAM2ImagePredictor`` does)
and decoded with its ``sam_prompt_encoder`` + ``sam_mask_decoder``; no memory bank, so every
slice is an independent image prompt, exactly like CryoSAM's ``SamPredictor.predict``.
SAM2's image predictor imports torchvision; this module never does.

**Preprocessing** (batched, on the model's device): the reader's values are expected in
[0, 1] (use :func:`robust_range` once per volume and :func:`unit_reader`: the 0.5 / 99.5
percentiles of a strided sample of the whole volume map to 0 and 1, the rest is clipped;
CryoSAM casts to uint8 without clipping, so outliers wrap around). A slice is resized with
bilinear, antialiased interpolation (what SAM2's own ``Resize`` does), repeated to 3
channels and ImageNet-normalised. ``resize="stretch"`` (default, SAM2's and ETSAM's
convention) stretches it to the square input; ``"pad"`` keeps its aspect ratio and pads
bottom/right with zeros after normalisation (SAM v1's convention). Either way points and
masks go through :class:`SliceGeometry`, pixel centre to pixel centre, so non-square y/x
slices are handled (CryoSAM maps the low-res argmax as ``(i / 256) * W``, ignoring SAM's
pad-to-square: right only for square slices).

**One slice** (:func:`best_candidate`). Multimask output (3 candidates) on every slice, as
CryoSAM's code (``SamPredictor.predict``'s default). A candidate is the low-res logits
upsampled to the slice (SAM2's ``postprocess_masks``: bilinear) and thresholded at
``logit_threshold``; it passes when ``0 < area < max_area``, predicted IoU ``> score_threshold``
and, after the prompted slice, ``IoU(mask, previous mask) >= iou_threshold``; the passing
candidate with the highest predicted IoU wins (ties: the first).

**Propagation** (:func:`self_prompt`). For each view in ``views``: the slice through the prompt
is decoded from the point alone; then towards + and towards − the next slice is prompted
with the argmax of the previous winner's low-res logits (inside the slice's content, mapped
to slice pixels) and with those logits as the mask prompt. A direction stops when no
candidate passes, at the volume edge, or after ``max_extent`` slices. The union of every
accepted slice mask is the instance, returned as a bounding box and the bool mask inside it.

**Embeddings** are cached per (view, slice) in an LRU bounded in bytes (:class:`EmbeddingCache`),
so neighbouring prompts of one task reuse slices. The encoder runs on batches: along a
direction, after k accepted slices up to ``min(batch, k)`` slices ahead are encoded in one
call, so a run that stops early wastes at most as many slices as it accepted and a long run
is fully batched.

Deviations from CryoSAM's released code, all deliberate (the issue's reading of the paper wins):
SAM2 instead of SAM v1 ViT-H; all three views (the code propagates through z only); the mask
prompt is the previous low-res logits (``mask_prompt="logits"``; the code passes them
binarised at 0, ``"binary"``); a propagation step is kept while ``IoU >= iou_threshold`` (the
issue: "stops when IoU < threshold"; the code keeps ``IoU > 0.5``); an empty mask never
passes; ``max_area`` follows the particle size; aspect-correct coordinates (above).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..engine.blocks import overlap
from ..errors import InputError

VIEWS = ("z", "y", "x")
RESIZES = ("stretch", "pad")
MASK_PROMPTS = ("logits", "binary")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AREA_FACTOR = 1.2  # max_area = (1.2 diameters)^2: CryoSAM's 32x32 px for ~27 px ribosomes
LOGIT_CLAMP = 32.0  # SAM2ImagePredictor clamps the low-res logits it hands back for re-prompting


# ------------------------------------------------------------------ parameters

def _number(name, value, ok, what) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not ok(value):
        raise InputError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _count(name, value, minimum) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SelfPromptParams:
    """Everything that changes an instance mask (CryoSAM's defaults).

    Parameters
    ----------
    iou_threshold : float
        A step is kept while IoU(new slice mask, previous slice mask) >= this (``--iou-threshold``).
    score_threshold : float
        A candidate needs SAM's predicted IoU > this (CryoSAM: 0).
    logit_threshold : float
        Mask = logits > this (CryoSAM: 0).
    max_area : int or None
        A candidate needs fewer pixels than this in its slice (CryoSAM: 32*32 at their scale).
        None: ``(1.2 * diameter)**2`` when ``diameter`` is given, else a quarter of the slice.
    max_extent : int or None
        Slices per direction beyond the prompted one; None: ``ceil(diameter)`` when
        ``diameter`` is given, else up to the volume edge. 0 segments the prompted slices only.
    views : tuple of "z", "y", "x"
        The views to propagate through (CryoSAM's released code: ``("z",)``).
    diameter : float or None
        Particle diameter in voxels; sets the defaults of ``max_area`` and ``max_extent``.
    resize : "stretch" or "pad"
        How a slice becomes SAM2's square input (see the module docstring).
    mask_prompt : "logits" or "binary"
        The previous low-res logits as they are (the issue, SAM's design) or binarised at
        ``logit_threshold`` (CryoSAM's code).

    Examples
    --------
    >>> SelfPromptParams(diameter=27).area_limit(928, 928), SelfPromptParams(diameter=27).extent_limit()
    (1050, 27)
    """

    iou_threshold: float = 0.5
    score_threshold: float = 0.0
    logit_threshold: float = 0.0
    max_area: int | None = None
    max_extent: int | None = None
    views: tuple = VIEWS
    diameter: float | None = None
    resize: str = "stretch"
    mask_prompt: str = "logits"

    def __post_init__(self):
        _number("iou_threshold", self.iou_threshold, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _number("score_threshold", self.score_threshold, lambda v: True, "a finite number")
        _number("logit_threshold", self.logit_threshold, lambda v: True, "a finite number")
        _count("max_area", self.max_area, 1)
        _count("max_extent", self.max_extent, 0)
        if self.diameter is not None:
            _number("diameter", self.diameter, lambda v: v > 0, "a positive number of voxels or None")
        views = (self.views,) if isinstance(self.views, str) and self.views in VIEWS else self.views
        try:
            views = tuple(views)
        except TypeError:
            views = ()
        if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
            raise InputError(f"views must be distinct names among z, y, x, got {self.views!r}")
        object.__setattr__(self, "views", tuple(v for v in VIEWS if v in views))
        if self.resize not in RESIZES:
            raise InputError(f"resize must be 'stretch' or 'pad', got {self.resize!r}")
        if self.mask_prompt not in MASK_PROMPTS:
            raise InputError(f"mask_prompt must be 'logits' or 'binary', got {self.mask_prompt!r}")

    def area_limit(self, height: int, width: int) -> int:
        """Candidates need fewer pixels than this in a (height, width) slice."""
        if self.max_area is not None:
            return int(self.max_area)
        if self.diameter is not None:
            return int(math.ceil((AREA_FACTOR * self.diameter) ** 2))
        return max(1, height * width // 4)

    def extent_limit(self) -> int | None:
        """Slices per direction beyond the prompted one (None: no cap)."""
        if self.max_extent is not None:
            return int(self.max_extent)
        if self.diameter is not None:
            return int(math.ceil(self.diameter))
        return None


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
    ``hits``/``misses`` count look-ups.
    """

    def __init__(self, max_bytes: int = 1 << 30):
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
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key][0]
        self.misses += 1
        return None

    def put(self, key, value, nbytes: int) -> None:
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
    prompt (slice pixels, row and column) and an optional low-res mask prompt.
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
        from ..membranes.propagate import autocast_for

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

    def decode(self, view: str, index: int, point_rc, mask_input, multimask: bool = True):
        import torch

        model = self.predictor
        entry = self.cache.get((view, int(index)))
        if entry is None:
            self._encode(view, [int(index)])
            entry = self.cache.get((view, int(index)))
        embed, high_res = entry
        x, y = self._geometry[view].to_model(*point_rc)
        with torch.inference_mode(), self.autocast():
            coords = torch.tensor([[[x, y]]], dtype=torch.float32, device=embed.device)
            labels = torch.ones((1, 1), dtype=torch.int32, device=embed.device)
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


# ------------------------------------------------------------------ one slice, one instance

@dataclass
class Step:
    """The winning candidate of one slice."""

    index: int
    logits: np.ndarray  # (lowres, lowres): the mask prompt of the next slice
    mask: np.ndarray  # (height, width) bool
    score: float


def best_candidate(logits, scores, geometry: SliceGeometry, params: SelfPromptParams, previous=None,
                   index: int = 0) -> Step | None:
    """CryoSAM's filters on one slice's candidates; the passing one with the highest score.

    A candidate passes when ``0 < area < max_area``, ``score > score_threshold`` and, given
    the previous slice's mask, ``IoU >= iou_threshold``. None when nothing passes.
    """
    masks = geometry.upsample(logits) > params.logit_threshold
    limit = params.area_limit(geometry.height, geometry.width)
    scores = np.asarray(scores, np.float64).reshape(-1)
    best = None
    for m, (mask, score) in enumerate(zip(masks, scores)):
        area = int(mask.sum())
        if not (0 < area < limit) or not score > params.score_threshold:
            continue
        if previous is not None:
            union = int(np.logical_or(mask, previous).sum())
            if np.logical_and(mask, previous).sum() < params.iou_threshold * union:
                continue
        if best is None or score > scores[best]:
            best = m
    if best is None:
        return None
    return Step(int(index), np.asarray(logits[best], np.float32), masks[best], float(scores[best]))


class Instance(tuple):
    """``(box, mask)`` of one prompt — a tuple, so it unpacks as the pair — with what the
    propagation saw: ``point`` (the prompt, z y x), ``score`` (mean predicted IoU of the
    accepted slices, 0 if none) and ``extents`` ({view: (first, stop) slice indices
    accepted, or None when the prompted slice had no candidate})."""

    def __new__(cls, box, mask, point=None, score=0.0, extents=None):
        self = super().__new__(cls, (box, mask))
        self.point = point
        self.score = float(score)
        self.extents = dict(extents or {})
        return self

    def __getnewargs__(self):
        return self[0], self[1], self.point, self.score, self.extents

    @property
    def box(self) -> tuple[slice, ...]:
        return self[0]

    @property
    def mask(self) -> np.ndarray:
        return self[1]


def check_point(point_zyx, shape) -> tuple[float, float, float]:
    """A prompt as three floats inside the volume, else a one-line ``InputError``."""
    try:
        p = np.asarray(point_zyx, np.float64).reshape(-1)
    except (TypeError, ValueError):
        p = np.empty(0)
    if p.shape != (3,) or not np.isfinite(p).all():
        raise InputError(f"a prompt must be 3 finite voxel coordinates (z, y, x), got {point_zyx!r}")
    if (p < 0).any() or (p >= np.asarray(shape)).any():
        raise InputError(f"prompt (z, y, x) = ({p[0]:g}, {p[1]:g}, {p[2]:g}) lies outside the volume "
                         f"of shape {tuple(int(n) for n in shape)}")
    return tuple(float(v) for v in p)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be 3 positive integers (z, y, x), got {shape!r}")
    return shape


def _crop(mask: np.ndarray):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _assemble(pieces, shape) -> tuple[tuple[slice, ...], np.ndarray]:
    """Union of per-slice masks (axis, index, row0, col0, crop) as (box, mask in the box)."""
    lo, hi = [None] * 3, [None] * 3
    placed = []
    for axis, index, r0, c0, crop in pieces:
        others = [a for a in range(3) if a != axis]
        start = [0] * 3
        stop = [0] * 3
        start[axis], stop[axis] = index, index + 1
        start[others[0]], stop[others[0]] = r0, r0 + crop.shape[0]
        start[others[1]], stop[others[1]] = c0, c0 + crop.shape[1]
        placed.append((axis, start, stop, crop))
        for a in range(3):
            lo[a] = start[a] if lo[a] is None else min(lo[a], start[a])
            hi[a] = stop[a] if hi[a] is None else max(hi[a], stop[a])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros([b - a for a, b in zip(lo, hi)], bool)
    for axis, start, stop, crop in placed:
        region = tuple(slice(s - l, e - l) for s, e, l in zip(start, stop, lo))
        out[region] |= np.expand_dims(crop, axis)
    return box, out


def self_prompt(decoder: SliceDecoder, shape, point_zyx, params: SelfPromptParams, *, batch: int = 8) -> Instance:
    """Cross-Plane Self-Prompting from one point with any :class:`SliceDecoder`.

    Returns an :class:`Instance`: the bounding box of the union of the accepted slice masks
    and the bool mask inside it; an empty box (size 0, at the prompt) when no view's prompted
    slice has a passing candidate.
    """
    shape = _check_shape(shape)
    if not isinstance(params, SelfPromptParams):
        raise InputError(f"params must be a SelfPromptParams, got {type(params).__name__}")
    point = check_point(point_zyx, shape)
    voxel = [min(int(math.floor(p + 0.5)), n - 1) for p, n in zip(point, shape)]
    cap = params.extent_limit()
    batch = max(1, int(batch))
    pieces, scores, extents = [], [], {}

    def accept(axis, step):
        r0, c0, crop = _crop(step.mask)
        pieces.append((axis, step.index, r0, c0, crop))
        scores.append(step.score)

    for view in params.views:
        axis = view_axis(view)
        n = shape[axis]
        geo = decoder.geometry(view)
        i0 = voxel[axis]
        rc = tuple(p for a, p in enumerate(point) if a != axis)
        decoder.need(view, [i0])
        logits, iou = decoder.decode(view, i0, rc, None, True)
        first = best_candidate(logits, iou, geo, params, None, i0)
        if first is None:
            extents[view] = None
            continue
        accept(axis, first)
        bounds = [i0, i0 + 1]
        for d in (1, -1):
            prev, k = first, 1
            while True:
                j = i0 + d * k
                if not 0 <= j < n or (cap is not None and k > cap):
                    break
                last = n - 1 if d > 0 else 0
                if cap is not None:
                    last = min(last, i0 + cap) if d > 0 else max(last, i0 - cap)
                ahead = min(batch, k, abs(last - j) + 1)  # k slices accepted so far: look k ahead
                decoder.need(view, [j + d * s for s in range(ahead)])
                prompt = prev.logits if params.mask_prompt == "logits" else \
                    (prev.logits > params.logit_threshold).astype(np.float32)
                logits, iou = decoder.decode(view, j, geo.argmax(prev.logits), prompt, True)
                step = best_candidate(logits, iou, geo, params, prev.mask, j)
                if step is None:
                    break
                accept(axis, step)
                bounds[0 if d < 0 else 1] = j if d < 0 else j + 1
                prev, k = step, k + 1
        extents[view] = tuple(bounds)
    if not pieces:
        box = tuple(slice(v, v) for v in voxel)
        return Instance(box, np.zeros((0, 0, 0), bool), point, 0.0, extents)
    box, mask = _assemble(pieces, shape)
    return Instance(box, mask, point, float(np.mean(scores)), extents)


# ------------------------------------------------------------------ public functions

def segment_instance(predictor, volume_reader, shape, point_zyx, params: SelfPromptParams, *, cache=None,
                     device: str | None = None, batch: int = 8, decoder: SliceDecoder | None = None) -> Instance:
    """One particle's 3-D mask from one point: CryoSAM's Cross-Plane Self-Prompting on SAM2.

    Parameters
    ----------
    predictor : SAM2 model (``cryodask.models.sam2.build_predictor``); its ``image_size`` is used
    volume_reader : callable(region) -> float32 array of the region, values in [0, 1]
        (see :func:`unit_reader`); region is a tuple of three slices
    shape : (Z, Y, X) of the volume
    point_zyx : the prompt, voxel coordinates (fractional allowed; the slice is the nearest)
    params : :class:`SelfPromptParams`
    cache : :class:`EmbeddingCache` shared by the prompts of one volume (default: a new one)
    device : "cpu" or "cuda": must be where ``predictor`` lives (default: there)
    batch : most slices per image-encoder call
    decoder : a :class:`SliceDecoder` replacing SAM2 (tests); ``predictor``, ``volume_reader``,
        ``cache`` and ``device`` are then unused

    Returns
    -------
    Instance
        ``(box, mask)``: a tuple of three slices into the volume and the bool mask of that
        shape; size 0 at the prompt when nothing was segmented (no candidate passed the
        filters on any prompted slice).

    Examples
    --------
    >>> p = build_predictor("sam2.1_hiera_t", image_size=128)  # doctest: +SKIP
    >>> box, mask = segment_instance(p, lambda r: vol[r], vol.shape, (16, 30, 30), SelfPromptParams())  # doctest: +SKIP
    """
    if not isinstance(params, SelfPromptParams):
        raise InputError(f"params must be a SelfPromptParams, got {type(params).__name__}")
    shape = _check_shape(shape)
    check_point(point_zyx, shape)
    if decoder is None:
        if predictor is None:
            raise InputError("segment_instance needs a SAM2 predictor (or a decoder)")
        decoder = SAM2Slices(predictor, volume_reader, shape, resize=params.resize, cache=cache,
                             device=device, batch=batch)
    return self_prompt(decoder, shape, point_zyx, params, batch=batch)


def segment_instances(read, shape, points_zyx, params: SelfPromptParams, *, config, checkpoint,
                      image_size: int | None = None, device: str = "auto", batch: int = 8, seed: int = 0,
                      value_range=None, cache_bytes: int | None = None) -> list[Instance]:
    """One worker task's worth of prompts: the model once per process, one embedding cache.

    Prompts run sorted by (z, y, x), so neighbours follow each other and share cached slices;
    the result is in the input order. ``read(region)`` returns float32; with ``value_range``
    ``(lo, hi)`` (from :func:`robust_range`, once per volume) it is mapped to [0, 1] here,
    without it the values must already be in [0, 1]. ``cache_bytes`` bounds the embedding
    cache (default 1 GiB on CPU, 8 GiB on CUDA; hiera at 1024 takes 16 MB per slice in float32).

    Examples
    --------
    >>> segment_instances(lambda r: vol[r], vol.shape, [(16, 30, 30)], SelfPromptParams(diameter=12),
    ...                   config="sam2.1_hiera_t", checkpoint=None, image_size=128)  # doctest: +SKIP
    """
    from ..models.sam2 import cached_predictor, pick_device

    if not isinstance(params, SelfPromptParams):
        raise InputError(f"params must be a SelfPromptParams, got {type(params).__name__}")
    shape = _check_shape(shape)
    try:
        array = np.asarray(points_zyx, np.float64)
    except (TypeError, ValueError):
        array = np.empty((1, 0))
    if array.size == 0 and array.ndim <= 2 and array.shape[-1] in (0, 3):
        return []
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"points_zyx must be an (N, 3) array of z, y, x voxel coordinates, got shape {array.shape}")
    points = [check_point(p, shape) for p in array]
    device = pick_device(device)
    if value_range is not None:
        read = unit_reader(read, value_range)
    predictor = cached_predictor(config, checkpoint, device=device, image_size=image_size, seed=seed)
    cache = EmbeddingCache(cache_bytes or (8 << 30 if device == "cuda" else 1 << 30))
    decoder = SAM2Slices(predictor, read, shape, resize=params.resize, cache=cache, device=device, batch=batch)
    out: list = [None] * len(points)
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        out[i] = self_prompt(decoder, shape, points[i], params, batch=batch)
    return out


def robust_range(read, shape, *, percentiles=(0.5, 99.5), samples: int = 1 << 22,
                 slab_voxels: int = 8 << 20) -> tuple[float, float]:
    """The values at two percentiles of the whole volume, from one strided pass.

    Reads z-slabs of about ``slab_voxels`` and keeps every k-th voxel (k chosen so about
    ``samples`` are kept), then takes the percentiles of the sample: deterministic, bounded
    memory, and the 0.5 / 99.5 percentiles of a few million voxels are stable to far below
    the noise.

    Examples
    --------
    >>> v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    >>> robust_range(lambda r: v[r], v.shape, percentiles=(0, 100))
    (0.0, 999.0)
    """
    shape = _check_shape(shape)
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise InputError(f"percentiles must be two increasing numbers in [0, 100], got {percentiles!r}")
    total = math.prod(shape)
    step = max(1, total // max(1, int(samples)))
    plane = shape[1] * shape[2]
    depth = max(1, int(slab_voxels) // plane)
    parts, offset = [], 0
    for z in range(0, shape[0], depth):
        data = np.asarray(read((slice(z, min(z + depth, shape[0])), slice(0, shape[1]), slice(0, shape[2]))),
                          np.float32).ravel()
        first = (-offset) % step
        parts.append(data[first::step])
        offset += data.size
    sample = np.concatenate(parts)
    if not np.isfinite(sample).all():
        raise InputError("the volume contains NaN or Inf values")
    lo, hi = (float(v) for v in np.percentile(sample, [lo_p, hi_p]))
    if not hi > lo:
        raise InputError(f"the volume is constant between the {lo_p:g} and {hi_p:g} percentiles: nothing to segment")
    return lo, hi


def unit_reader(read, value_range):
    """``read`` with its values mapped from ``value_range`` (lo, hi) to [0, 1], clipped."""
    lo, hi = (float(v) for v in value_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise InputError(f"value_range must be two finite numbers lo < hi, got {value_range!r}")
    return _UnitReader(read, lo, hi)


class _UnitReader:
    def __init__(self, read, lo, hi):
        self.read, self.lo, self.hi = read, lo, hi

    def __call__(self, region):
        data = np.asarray(self.read(region), np.float32)
        return np.clip((data - np.float32(self.lo)) / np.float32(self.hi - self.lo), 0, 1)


# ------------------------------------------------------------------ from instances to volumes

def _instance(inst, i):
    try:
        box, mask = inst[0], np.asarray(inst[1], bool)
        box = tuple(slice(int(s.start), int(s.stop)) for s in box)
    except (TypeError, IndexError, AttributeError, ValueError):
        raise InputError(f"instance {i} must be a (box, mask) pair") from None
    if len(box) != 3 or mask.shape != tuple(s.stop - s.start for s in box):
        raise InputError(f"instance {i}: mask shape {mask.shape} does not fit its box {box}")
    return box, mask


def instance_ids(instances, scores=None) -> np.ndarray:
    """The label id of each instance: 1 for the highest score, N for the lowest (ties: input
    order). ``scores`` default to each instance's ``score``, else the input order."""
    n = len(instances)
    if scores is None:
        scores = [getattr(inst, "score", None) for inst in instances]
        if any(s is None for s in scores):
            scores = -np.arange(n, dtype=np.float64)
    scores = np.asarray(scores, np.float64)
    if scores.shape != (n,) or not np.isfinite(scores).all():
        raise InputError(f"scores must be {n} finite numbers, one per instance")
    ids = np.empty(n, np.int64)
    ids[np.argsort(-scores, kind="stable")] = np.arange(1, n + 1)
    return ids


def _region(region) -> tuple[slice, ...]:
    items = tuple(region)
    if len(items) == 3 and all(isinstance(r, (int, np.integer)) for r in items):
        return tuple(slice(0, int(n)) for n in items)
    if len(items) != 3 or not all(isinstance(r, slice) for r in items):
        raise InputError(f"region must be 3 slices (or a shape), got {region!r}")
    return tuple(slice(int(r.start or 0), int(r.stop)) for r in items)


def instance_labels(instances, region, *, scores=None, dtype=np.uint32) -> np.ndarray:
    """Paint instances into the label volume of one region (a block of the output).

    Ids are 1..N by score order (:func:`instance_ids`, the same for every region, so blocks
    agree); where instances overlap the higher score keeps the voxel. ``region`` is three
    slices of the volume, or a shape for the whole of it.

    Examples
    --------
    >>> a = ((slice(0, 1), slice(0, 2), slice(0, 2)), np.ones((1, 2, 2), bool))
    >>> b = ((slice(0, 1), slice(1, 3), slice(1, 3)), np.ones((1, 2, 2), bool))
    >>> instance_labels([a, b], (1, 3, 3), scores=[0.2, 0.9])[0].tolist()
    [[2, 2, 0], [2, 1, 1], [0, 1, 1]]
    """
    region = _region(region)
    items = [_instance(inst, i) for i, inst in enumerate(instances)]
    ids = instance_ids(instances, scores)
    out = np.zeros([r.stop - r.start for r in region], dtype)
    for k in np.argsort(-ids, kind="stable"):  # lowest score first: higher scores paint over it
        box, mask = items[k]
        common = overlap(region, box)
        if common is None:
            continue
        here, there = common
        out[here][mask[there]] = ids[k]
    return out


def semantic_mask(instances, region) -> np.ndarray:
    """The union of the instance masks in one region: CryoSAM's semantic segmentation."""
    return instance_labels(instances, region, scores=np.zeros(len(instances))) > 0


def query_from_instances(features, ratio: int, instances, *, points=None) -> np.ndarray:
    """The query of Hierarchical Feature Matching: the mean feature inside the prompted masks.

    CryoSAM's masked average pooling (paper eq. 4): every grid point of level ``ratio``
    (use the finest; grid point (i, j, k) is voxel (i*r, j*r, k*r)) that lies inside an
    instance mask contributes its vector, pooled over all instances, and the mean is
    L2-normalised. An instance whose mask holds no grid point (empty, or thinner than the
    grid) contributes the grid point nearest to its prompt instead (``points``, default each
    instance's ``point``). CryoSAM's released code samples the mask centroid instead.

    Examples
    --------
    >>> f = {4: np.zeros((2, 2, 2, 2), np.float32)}; f[4][0, 0, 0] = (3, 0); f[4][0, 0, 1] = (0, 1)
    >>> inst = ((slice(0, 1), slice(0, 1), slice(0, 5)), np.ones((1, 1, 5), bool))
    >>> query_from_instances(f, 4, [inst]).astype(float).round(3).tolist()
    [0.949, 0.316]
    """
    if not hasattr(features, "__getitem__") or not hasattr(features, "__contains__") or ratio not in features:
        raise InputError(f"features must be a mapping {{ratio: array (Z, Y, X, D)}} with level {ratio}")
    array = features[ratio]
    grid = tuple(int(n) for n in getattr(array, "shape", ())[:3])
    if len(getattr(array, "shape", ())) != 4 or min(grid) < 1:
        raise InputError(f"features[{ratio}] must have shape (Z, Y, X, D), got {getattr(array, 'shape', None)}")
    r = int(ratio)
    instances = list(instances)
    if not instances:
        raise InputError("no instances to make a query from")
    if points is not None and len(points) != len(instances):
        raise InputError(f"points must give one prompt per instance ({len(instances)}), got {len(points)}")
    total = np.zeros(array.shape[3], np.float64)
    count = 0
    for i, inst in enumerate(instances):
        box, mask = _instance(inst, i)
        if any(b.start < 0 or b.stop > g * r for b, g in zip(box, grid)):
            raise InputError(f"instance {i}: box {box} lies outside the features' volume {tuple(g * r for g in grid)}")
        first = [-(-b.start // r) for b in box]
        stop = [min(-(-b.stop // r), g) for b, g in zip(box, grid)]
        inside = None
        if all(a < b for a, b in zip(first, stop)):
            inside = mask[tuple(slice(f * r - b.start, None, r) for f, b in zip(first, box))]
        if inside is not None and inside.any():
            vectors = np.asarray(array[tuple(slice(a, b) for a, b in zip(first, stop))])[inside]
            total += vectors.astype(np.float64).sum(0)
            count += len(vectors)
            continue
        point = points[i] if points is not None else getattr(inst, "point", None)
        if point is None:
            raise InputError(f"instance {i} holds no grid point of ratio {r} and has no prompt point to fall back on")
        p = check_point(point, tuple(g * r for g in grid))
        index = tuple(min(int(math.floor(v / r + 0.5)), g - 1) for v, g in zip(p, grid))
        total += np.asarray(array[index[0]:index[0] + 1, index[1]:index[1] + 1, index[2]:index[2] + 1],
                            np.float64).reshape(-1)
        count += 1
    norm = np.linalg.norm(total)
    if not np.isfinite(norm) or norm == 0:
        raise InputError("the features inside the instances average to zero (or are not finite): no query")
    return (total / norm).astype(np.float32)
