"""The parameters of CryoSAM's three parts: the DINOv2 feature store (``FeatureParams``),
Cross-Plane Self-Prompting (``SelfPromptParams``) and Hierarchical Feature Matching
(``MatchParams``). Each default lives in one field here.

Light on purpose (no dask, no torch): the command line reads its defaults from these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import validate

VIEWS = ("z", "y", "x")
RESIZES = ("stretch", "pad")
MASK_PROMPTS = ("logits", "binary")
AREA_FACTOR = 1.2  # max_area = (1.2 diameters)^2: CryoSAM's 32x32 px for ~27 px ribosomes
CRYOSAM_AREA_FRACTION = 64  # without a diameter: CryoSAM's 1024 of 256x256 low-res pixels


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class FeatureParams:
    """Everything that changes the feature store (its hash keys the done-marks).

    image_size : side of the square each slice is resized to (518: 37x37 patches, CryoSAM)
    ratios : grid spacings in voxels (CryoSAM's ``down_sample_ratios``), each a multiple of the
        smallest: the slices at multiples of the smallest are the stored planes
    batch : slices per DINOv2 forward pass; None: what half the free GPU memory holds on CUDA
        (``models/batching.py``), 8 on the CPU
    slab : voxels along a view's slice axis per task; a multiple of the smallest ratio
    dtype : stored precision, float16 or float32
    checkpoint : a local DINOv2 folder (transformers format); None: ``dinov2-with-registers-large``
        (CryoSAM's), else ``dinov2-large``, in the weights folder (``CRYODASK_WEIGHTS``)
    compile : run DINOv2 through ``torch.compile`` (``models/compiled.py``)
    """

    image_size: int = 518
    ratios: tuple[int, ...] = (4, 8, 16)
    batch: int | None = None
    slab: int = 64
    dtype: str = "float16"
    checkpoint: str | None = None
    compile: bool = False

    def __post_init__(self):
        try:
            ratios = tuple(int(r) for r in self.ratios)
        except (TypeError, ValueError):
            ratios = ()
        if not ratios or min(ratios) < 1 or len(set(ratios)) != len(ratios):
            raise validate.FieldError("ratios", f"must be distinct positive integers, got {self.ratios}")
        object.__setattr__(self, "ratios", ratios)
        if any(r % min(ratios) for r in ratios):
            raise validate.FieldError("ratios", f"must each be a multiple of the smallest, got {self.ratios}")
        for name in ("image_size", "slab"):
            object.__setattr__(self, name, validate.count(name, getattr(self, name), 1))
        object.__setattr__(self, "batch", validate.count("batch", self.batch, 1, none=True))
        if self.slab % min(ratios):
            base = min(ratios)
            raise validate.FieldError("slab", f"{self.slab} must be a multiple of the smallest ratio {base} "
                                      f"(e.g. {base * max(1, self.slab // base)})")
        validate.choice("dtype", self.dtype, ("float16", "float32"))
        object.__setattr__(self, "checkpoint", None if self.checkpoint is None else str(self.checkpoint))
        object.__setattr__(self, "compile", validate.boolean("compile", self.compile))


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
        None: ``(1.2 * diameter_voxels)**2`` when ``diameter_voxels`` is given, else CryoSAM's size
        prior: 1/64 of the slice (1024 px of SAM's 256x256 low-res mask).
    max_extent : int or None
        Slices per direction beyond the prompted one; None: ``ceil(diameter_voxels)`` when
        ``diameter_voxels`` is given, else up to the volume edge. 0 segments the prompted slices only.
    views : tuple of "z", "y", "x"
        The views to propagate through (CryoSAM's released code: ``("z",)``).
    diameter_voxels : float or None
        Particle diameter in voxels (``pick --diameter`` is Å; ``picking.pipeline`` divides by the
        voxel size): every limit here counts pixels and slices. Sets the defaults of ``max_area``
        and ``max_extent``.
    resize : "stretch" or "pad"
        How a slice becomes SAM2's square input (:class:`~cryodask.models.sam2_slices.SliceGeometry`).
    mask_prompt : "logits" or "binary"
        The previous low-res logits as they are (the issue, SAM's design) or binarised at
        ``logit_threshold`` (CryoSAM's code).

    Examples
    --------
    >>> SelfPromptParams(diameter_voxels=27).area_limit(928, 928), SelfPromptParams(diameter_voxels=27).extent_limit()
    (1050, 27)
    """

    iou_threshold: float = 0.5
    score_threshold: float = 0.0
    logit_threshold: float = 0.0
    max_area: int | None = None
    max_extent: int | None = None
    views: tuple = VIEWS
    diameter_voxels: float | None = None
    resize: str = "stretch"
    mask_prompt: str = "logits"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "iou_threshold", validate.number("iou_threshold", self.iou_threshold, low=0, high=1))
        set_(self, "score_threshold", validate.number("score_threshold", self.score_threshold))
        set_(self, "logit_threshold", validate.number("logit_threshold", self.logit_threshold))
        set_(self, "max_area", validate.count("max_area", self.max_area, 1, none=True))
        set_(self, "max_extent", validate.count("max_extent", self.max_extent, 0, none=True))
        set_(self, "diameter_voxels", validate.positive("diameter_voxels", self.diameter_voxels, unit="voxels",
                                                        none=True))
        views = (self.views,) if isinstance(self.views, str) and self.views in VIEWS else self.views
        try:
            views = tuple(views)
        except TypeError:
            views = ()
        if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
            raise validate.FieldError("views", f"must be distinct names among z, y, x, got {self.views!r}")
        set_(self, "views", tuple(v for v in VIEWS if v in views))
        validate.choice("resize", self.resize, RESIZES)
        validate.choice("mask_prompt", self.mask_prompt, MASK_PROMPTS)

    def area_limit(self, height: int, width: int) -> int:
        """Candidates need fewer pixels than this in a (height, width) slice."""
        if self.max_area is not None:
            return int(self.max_area)
        if self.diameter_voxels is not None:
            return int(math.ceil((AREA_FACTOR * self.diameter_voxels) ** 2))
        # CryoSAM's size prior: under 1024 px of SAM's 256x256 low-res mask of the whole slice,
        # i.e. under 1/64 of the slice (a quarter of the slice let a membrane or the background pass)
        return max(1, height * width // CRYOSAM_AREA_FRACTION)

    def extent_limit(self) -> int | None:
        """Slices per direction beyond the prompted one (None: no cap)."""
        if self.max_extent is not None:
            return int(self.max_extent)
        if self.diameter_voxels is not None:
            return int(math.ceil(self.diameter_voxels))
        return None


@dataclass(frozen=True)
class MatchParams:
    """Parameters of Hierarchical Feature Matching (CryoSAM's defaults).

    Parameters
    ----------
    sim_threshold : float
        Candidates with a cosine similarity below it are dropped on every level but the
        last (``similarity_threshold``). -1 keeps everything.
    ratios : tuple of int
        Downsampling ratios of the pyramid, coarse to fine (``down_sample_ratios``).
    top_k : int
        Detections kept after NMS; 0 keeps all of them.
    nms_window : int
        Odd side of the cubic NMS window, in grid points of the last level.
    matching : {"hierarchical", "naive"}
        "naive" scores every point of the finest level (``ratios[-1]``) instead.
    centre : bool
        Report grid point ``i`` at voxel ``i * r + r // 2`` instead of ``i * r`` (CryoSAM:
        no centring). Only for features that describe a cell ``[i*r, (i+1)*r)``.
    children : {"cryosam", "nearest"}
        Which finer points a survivor passes on as candidates. "cryosam": CryoSAM's
        ``F.interpolate(mode="nearest")`` index mapping, ``parent = (i * r_child) // r_parent``,
        which on grids whose point ``i`` sits at voxel ``i * r`` reaches only forward (+z,
        +y, +x) of each survivor, so a particle whose lower-corner coarse point was dropped
        is found one grid point off its centre. "nearest": the finer points whose nearest
        coarse point (in voxels) it is, both coarse points on a tie, so the candidates
        surround every survivor and the detections are naive matching's — at the price of
        about 2.5× more candidates (``benchmarks/matching.py``).
    """

    sim_threshold: float = 0.5
    ratios: tuple[int, ...] = (16, 8, 4)
    top_k: int = 512
    nms_window: int = 5
    matching: str = "hierarchical"
    centre: bool = False
    children: str = "cryosam"

    def __post_init__(self):
        object.__setattr__(self, "sim_threshold", validate.number("sim_threshold", self.sim_threshold, low=-1, high=1))
        try:
            ratios = tuple(self.ratios)
        except TypeError:
            ratios = ()
        if (not ratios or any(not _is_int(r) or r < 1 for r in ratios)
                or any(a <= b for a, b in zip(ratios, ratios[1:]))):
            raise validate.FieldError("ratios", "must be positive integers, strictly decreasing (coarse to fine), "
                                      f"got {self.ratios!r}")
        object.__setattr__(self, "ratios", tuple(int(r) for r in ratios))
        object.__setattr__(self, "top_k", validate.count("top_k", self.top_k, 0))  # 0 keeps every detection
        object.__setattr__(self, "nms_window", validate.count("nms_window", self.nms_window, 1, odd=True))
        validate.choice("matching", self.matching, ("hierarchical", "naive"))
        object.__setattr__(self, "centre", validate.boolean("centre", self.centre))
        validate.choice("children", self.children, ("nearest", "cryosam"))

    @property
    def levels(self) -> tuple[int, ...]:
        """The ratios actually visited: all of them, or only the finest for naive matching."""
        return self.ratios if self.matching == "hierarchical" else self.ratios[-1:]
