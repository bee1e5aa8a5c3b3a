"""The parameters of ``cryodask pick``: ``LogParams`` (the LoG picker) and ``CryosamParams``
(CryoSAM); the method is the parameters' type. Each default lives in one field here.

Light on purpose (no dask, no torch): the command line reads its defaults from these fields.
``pick_params`` builds them from flat options named as in Python (the command line's flags and
``cryodask run``'s keys), the one place such options become parameter objects.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields

from .. import validate
from ..errors import InputError
from ..prompting.params import FeatureParams, MatchParams, SelfPromptParams

SIGMA_PER_RADIUS = 1 / math.sqrt(3)  # where the normalised LoG of a solid ball peaks
METHODS = ("log", "cryosam")
PRESETS = ("cryodask", "cryosam")


@dataclass(frozen=True)
class LogParams:
    """Everything that changes the picks (lengths in Å; its hash can key a done-mark).

    Parameters
    ----------
    diameter : particle diameter, Å.
    threshold : minimum score, in robust standard deviations (1.4826 × MAD) of the LoG response
        over the volume, above its median.
    min_distance : Å between two picks at least (``None``: the particle radius).
    dark : particles are darker than their surroundings (cryo-ET convention); ``False`` for bright ones.
    max_picks : keep at most this many picks, the highest scores first (``None``: all).
    min_roundness : the smaller of the middle Hessian eigenvalue / trace and of the smallest
        eigenvalue / trace of its y, x block, at a pick (``None``: no test).
    max_scale_ratio : response at 1.5σ over response at σ, at most (``None``: no test).
    """

    diameter: float
    threshold: float = 4.0
    min_distance: float | None = None
    dark: bool = True
    max_picks: int | None = None
    min_roundness: float | None = 0.2
    max_scale_ratio: float | None = 0.85

    def __post_init__(self):
        object.__setattr__(self, "diameter", validate.positive("diameter", self.diameter, unit="Å"))
        object.__setattr__(self, "threshold", validate.number(
            "threshold", self.threshold, low=0, rule="a number >= 0 (robust standard deviations of the response)"))
        object.__setattr__(self, "min_distance", validate.positive("min_distance", self.min_distance, unit="Å",
                                                                   none=True))
        object.__setattr__(self, "dark", validate.boolean("dark", self.dark))
        object.__setattr__(self, "max_picks", validate.count("max_picks", self.max_picks, 1, none=True))
        object.__setattr__(self, "min_roundness", validate.number("min_roundness", self.min_roundness, low=0, high=0.5,
                                                                  strict_high=True, none=True))
        object.__setattr__(self, "max_scale_ratio", validate.positive("max_scale_ratio", self.max_scale_ratio,
                                                                      none=True))

    @property
    def distance(self) -> float:
        """The suppression distance in Å."""
        return float(self.min_distance) if self.min_distance is not None else self.diameter / 2

    @property
    def sigma(self) -> float:
        """The pick scale in Å."""
        return self.diameter / 2 * SIGMA_PER_RADIUS


@dataclass(frozen=True)
class CryosamParams:
    """Everything that changes CryoSAM's picks (lengths in Å).

    diameter : particle diameter, Å: sizes the self-prompted masks (None: CryoSAM's own size prior).
    config, sam_checkpoint, image_size : the SAM2 model (``sam2.1_hiera_l`` as CryoSAM), its
        weights file (``{"model": state_dict}``) and input size (None: the config's, 1024).
    dinov2_checkpoint, feature_image_size : the DINOv2 folder (transformers format) and the size
        slices are resized to for it (518: 37x37 patches, CryoSAM).
    iou_threshold : Cross-Plane Self-Prompting stops propagating below this IoU.
    sim_threshold, top_k, matching : Hierarchical Feature Matching: cosine similarity kept per
        level, most detections, "hierarchical" or "naive" (every point, for comparison).
    batch, seed : slices per model call (None: from the free GPU memory on CUDA, 8 on the CPU);
        the seed of anything random.
    compile : SAM2's image encoder and DINOv2 through ``torch.compile`` (``models/compiled.py``).
    preset : "cryodask" (the improved defaults: all three views, the previous mask's logits as
        prompt, the size prior from the diameter, the query pooled over the masks) or
        "cryosam" (CryoSAM's published code: z only, the binarised mask prompt, IoU > 0.5
        strictly, area under CryoSAM's 1024 px of 256² whatever the diameter, the query
        sampled at the mask centroids; matching as in the code, which the defaults already are).

    Examples
    --------
    >>> sp = CryosamParams(preset="cryosam").self_prompt(voxel_size=10.0)
    >>> sp.views, sp.mask_prompt, sp.iou_threshold > 0.5, sp.area_limit(256, 256)
    (('z',), 'binary', True, 1024)
    """

    diameter: float | None = None
    config: str = "sam2.1_hiera_l"
    sam_checkpoint: str | None = None
    dinov2_checkpoint: str | None = None
    image_size: int | None = None
    feature_image_size: int = FeatureParams.image_size
    iou_threshold: float = SelfPromptParams.iou_threshold
    sim_threshold: float = MatchParams.sim_threshold
    top_k: int = MatchParams.top_k
    matching: str = MatchParams.matching
    batch: int | None = FeatureParams.batch
    seed: int = 0
    preset: str = "cryodask"
    compile: bool = False

    def __post_init__(self):
        validate.choice("preset", self.preset, PRESETS)
        object.__setattr__(self, "compile", validate.boolean("compile", self.compile))
        object.__setattr__(self, "diameter", validate.positive("diameter", self.diameter, unit="Å", none=True))
        object.__setattr__(self, "image_size", validate.count("image_size", self.image_size, 16, none=True))
        object.__setattr__(self, "feature_image_size", validate.count("feature_image_size", self.feature_image_size, 1))
        object.__setattr__(self, "batch", validate.count("batch", self.batch, 1, none=True))
        object.__setattr__(self, "seed", validate.count("seed", self.seed, 0))
        object.__setattr__(self, "iou_threshold", validate.number("iou_threshold", self.iou_threshold, low=0, high=1))
        object.__setattr__(self, "sim_threshold", validate.number("sim_threshold", self.sim_threshold, low=-1, high=1))
        object.__setattr__(self, "top_k", validate.count("top_k", self.top_k, 0))  # 0 keeps every detection
        validate.choice("matching", self.matching, ("hierarchical", "naive"))
        for name in ("sam_checkpoint", "dinov2_checkpoint"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else str(value))


    def self_prompt(self, voxel_size: float) -> SelfPromptParams:
        """Cross-Plane Self-Prompting's parameters; ``voxel_size`` (Å, x) turns the diameter into voxels."""
        if self.preset == "cryosam":  # IoU > t, strictly: IoUs are float64 ratios, so >= the next float up
            return SelfPromptParams(iou_threshold=math.nextafter(self.iou_threshold, 2.0), views=("z",),
                                    mask_prompt="binary")
        return SelfPromptParams(iou_threshold=self.iou_threshold,
                                diameter_voxels=self.diameter / voxel_size if self.diameter else None)

    def match(self) -> MatchParams:
        """Hierarchical Feature Matching's parameters (CryoSAM's children rule under either preset)."""
        return MatchParams(sim_threshold=self.sim_threshold, top_k=self.top_k, matching=self.matching)

    @property
    def query_at(self) -> str:
        """Where the query is taken: pooled over the masks, or CryoSAM's mask centroids."""
        return "centroids" if self.preset == "cryosam" else "masks"


def _number_or_none(field: str, value):
    """A shape test's value: ``"none"`` switches the test off (``None``), else a number."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise validate.FieldError(field, f"must be a number or none, got {value!r}") from None


def pick_params(method: str = "log", weights=None, **options) -> LogParams | CryosamParams:
    """``LogParams`` or ``CryosamParams`` from flat options named as their fields. ``weights``
    (or ``CRYODASK_WEIGHTS``) is the folder CryoSAM's checkpoints are found in when not given;
    the LoG shape tests take ``"none"`` to switch them off. An option the method does not take
    is an error, so a typo is not silently ignored."""
    validate.choice("method", method, METHODS)
    cls = LogParams if method == "log" else CryosamParams
    own = {f.name for f in fields(cls)}
    other = {f.name for f in fields(CryosamParams if cls is LogParams else LogParams)}
    for key in sorted(set(options) - own):
        if key in other:
            raise validate.FieldError(key, f"is an option of --method {'cryosam' if cls is LogParams else 'log'}, "
                                           f"not of {method}")
        hint = difflib.get_close_matches(key, sorted(own), n=1)
        raise InputError(f"unknown option {key!r}" + (f" (did you mean {hint[0]}?)" if hint else ""))
    if cls is LogParams:
        if options.get("diameter") is None:
            raise validate.FieldError("diameter", "is needed by --method log (Å)")
        for name in ("min_roundness", "max_scale_ratio"):
            if name in options:
                options[name] = _number_or_none(name, options[name])
        return LogParams(**options)
    params = CryosamParams(**options)
    from .pipeline import resolve_models

    return resolve_models(params, weights)
