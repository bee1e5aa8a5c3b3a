"""The parameters of ``cryodask membranes``: each default lives in one field here.

Light on purpose (no dask, no torch): the command line reads its defaults from these fields.
``membrane_params`` builds them from flat options named as in Python (the command line's flags
and ``cryodask run``'s keys), the one place such options become parameter objects.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import validate
from ..errors import InputError
from ..io.layouts import check_layout
from ..io.normalize import check_method as check_normalize
from ..polarity import check_polarity
from .prompts import check as check_prompt

ETSAM_FILES = ("etsam_stage1_v1.pt", "etsam_stage2_v1.pt")


def _identity(checkpoint) -> str:
    """Name, size and mtime: enough to tell two weight files apart in a done-mark key."""
    try:
        stat = os.stat(checkpoint)
    except OSError:
        raise validate.FieldError("stage1_checkpoint" if "1" in Path(checkpoint).name else "stage2_checkpoint",
                                  f"{checkpoint} cannot be read") from None
    return f"{Path(checkpoint).name}:{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True)
class ClassicalParams:
    """Everything that changes the classical filter's output (its hash keys the done-marks).

    Parameters
    ----------
    thickness : membrane (bilayer) thickness in Å. Sets the filter scale and the thickness of
        the output mask.
    low, high : hysteresis thresholds on the score, in robust standard deviations above its
        median over the whole volume. Voxels above ``high`` seed a membrane. Voxels above
        ``low`` that are connected to a seed are added to it.
    high_fraction : a seed must also score at least this fraction of the volume's 99.9th
        percentile score (0 turns this off). This makes ``high`` follow the contrast of the
        strongest membranes. Then the CTF fringes around particles, which are sheet-like but
        weaker, cannot seed at high SNR, and one default works at low SNR too.
    low_fraction : the same for ``low``: a voxel joins a membrane only if it scores at least this
        fraction of the 99.9th percentile. At high SNR (where that percentile is far above the
        noise) the fringes of particles and the missing wedge's streaks next to a membrane are
        not grown into it; at low SNR ``low`` decides. Dice on the README's example (SNR 0.5)
        0.53 -> 0.74; 0.2 and 0.4 did worse over both simulators at SNR 0.1-0.5.
    scale : the Gaussian sigma of the Hessian, as a fraction of ``thickness``.
    reach : how far (Å) a seed's hysteresis region can extend into a neighbouring block. It is
        also the halo of the mask pass.
    dark : True when dense matter is dark (low values), as in reconstructed tomograms (the same
        polarity switch as ``LogParams.dark``).

    Examples
    --------
    >>> ClassicalParams(thickness=40.0).high
    6.0
    >>> ClassicalParams(low=9.0)
    Traceback (most recent call last):
    ...
    cryodask.validate.FieldError: low (9.0) must not exceed high (6.0)
    """

    thickness: float = 45.0
    # Measured on synthetic tomograms (SNR 0.1-0.5, 10-14 Å voxels, 60° missing wedge, 32x40x40
    # to 96x160x160). Without high_fraction no pair worked everywhere. High SNR wanted high >= 9:
    # the fringes around particles score above the noise. Small or membrane-dense volumes wanted
    # high <= 6: their membranes widen the score's spread, so they score fewer spreads above it.
    low: float = 2.5
    high: float = 6.0
    high_fraction: float = 0.8
    low_fraction: float = 0.3
    # sigma = 0.7 x thickness (31.5 Å for a 45 Å bilayer). A Gaussian matched to the bilayer
    # (a box of width t has std t / (2 sqrt 3) = 0.29 t) is too small for tomograms: at the
    # SNR of real data the Hessian is mostly noise. A larger sigma averages more of the sheet.
    # It also merges the two leaflets and the CTF fringes into one dark band. On synthetic data
    # Dice rises from 0.29 t up to about 0.7 t and falls after that. The ridge step then puts
    # back the true thickness, so the wider response does not fatten the mask.
    scale: float = 0.7
    reach: float = 200.0
    dark: bool = True

    def __post_init__(self):
        for name in ("thickness", "scale"):
            object.__setattr__(self, name, validate.positive(name, getattr(self, name)))
        for name in ("reach", "high_fraction", "low_fraction"):
            object.__setattr__(self, name, validate.number(name, getattr(self, name), low=0))
        for name in ("low", "high"):  # 3 and 3.0 are the same parameters (and hash)
            object.__setattr__(self, name, validate.number(name, getattr(self, name)))
        if self.low > self.high:
            raise validate.FieldError("low", f"({self.low}) must not exceed high ({self.high})")
        object.__setattr__(self, "dark", validate.boolean("dark", self.dark))

    def sigma(self) -> float:
        """The Gaussian sigma of the Hessian, in Å."""
        return self.scale * self.thickness


@dataclass(frozen=True)
class EtsamParams:
    """Everything that changes ETSAM's logits (its hash keys the done-marks)."""

    config: str = "sam2.1_hiera_b+"
    stage1_checkpoint: str | None = None
    stage2_checkpoint: str | None = None
    random_weights: bool = False  # seeded random SAM2 weights in place of checkpoints (tests, benchmarks)
    image_size: int | None = None
    normalize: str = "min_max_positive_values"
    stage1_prompt: str = "grid_zero"
    stage2_prompt: str = "zero"
    grid_interval: int | None = None  # ETSAM's: 50, or 10 with split
    tile: tuple[int, int] | None = None
    split: bool = False  # ETSAM's --split-processing: four quadrants
    compile: bool = False  # SAM2's image encoder through torch.compile (models/compiled.py)
    weights_id: tuple = field(init=False, default=("random", "random"))  # name:size:mtime of each checkpoint

    def __post_init__(self):
        object.__setattr__(self, "random_weights", validate.boolean("random_weights", self.random_weights))
        if not self.random_weights:
            for name in ("stage1_checkpoint", "stage2_checkpoint"):
                if getattr(self, name) is None:
                    raise validate.FieldError(name, "must be given (ETSAM's etsam_stage{1,2}_v1.pt; "
                                                    "random_weights=True runs untrained SAM2 for tests)")
            object.__setattr__(self, "weights_id", tuple(_identity(getattr(self, name))
                                                         for name in ("stage1_checkpoint", "stage2_checkpoint")))
        else:
            object.__setattr__(self, "stage1_checkpoint", None)
            object.__setattr__(self, "stage2_checkpoint", None)
        check_normalize(self.normalize)
        check_prompt(self.stage1_prompt, 1)
        check_prompt(self.stage2_prompt, 2)
        object.__setattr__(self, "split", validate.boolean("split", self.split))
        interval = self.grid_interval if self.grid_interval is not None else 10 if self.split else 50
        object.__setattr__(self, "grid_interval", validate.count("grid_interval", interval, 1))
        if self.image_size is not None and (validate.count("image_size", self.image_size, 64) % 16):
            raise validate.FieldError("image_size", f"must be a multiple of 16 and >= 64, got {self.image_size}")
        object.__setattr__(self, "tile", validate.shape("tile", self.tile, 2, 16, none=True))  # (y, x)
        object.__setattr__(self, "split", validate.boolean("split", self.split))
        object.__setattr__(self, "compile", validate.boolean("compile", self.compile))

    def key_fields(self) -> dict:
        """The hashed fields: checkpoint identity, not their paths."""
        fields = dict(self.__dict__)
        fields.pop("stage1_checkpoint")
        fields.pop("stage2_checkpoint")
        return fields


@dataclass(frozen=True)
class MembraneParams:
    """Everything that changes a tomogram's membrane outputs (its hash keys the complete mark).

    method : ``ClassicalParams`` (no weights) or ``EtsamParams`` (two-stage SAM2): the method is
        its parameters' type.
    logit_threshold : ETSAM's stage-2 logit threshold (ETSAM v1 used -0.5).
    store_logits : also write ``<stem>_<method>_predicted_logits.mrc``.
    post_process, remove_thin_noise, remove_bridges : ETSAM's post-processing: ``post_process``
        runs both of its steps, thin-noise removal (components spanning fewer than ``min_slices``
        z slices) and then the removal of bridges (up to ``max_bridge_len`` pixels, and dead-end
        spurs up to ``max_spur_len`` when > 0) between parallel membranes; naming one step or both
        runs those only (ETSAM's --postprocess-remove-thin-noise and
        --postprocess-remove-parallel-membrane-misconnections).
    layout : "default" (masks in ``labels/`` of the tomogram's OME-Zarr) or "portal" (the CryoET
        Data Portal's: MRC inputs converted in its layout, each mask its own ``<out>/<stem>_<name>.zarr``).
    polarity : "auto" (decided per tomogram), "dark" or "bright" (dense matter bright: the tomogram
        is negated before the method sees it).
    working_voxel_size : Å; the method runs on the tomogram resampled to this voxel size and its
        outputs are mapped back onto the input grid (None: the tomogram's own).
    """

    method: ClassicalParams | EtsamParams = field(default_factory=ClassicalParams)
    logit_threshold: float = -0.25
    store_logits: bool = False
    post_process: bool = False
    remove_thin_noise: bool = False
    remove_bridges: bool = False
    min_slices: int = 10
    max_bridge_len: int = 5
    max_spur_len: int = 0
    layout: str = "default"
    polarity: str = "auto"
    working_voxel_size: float | None = None

    def __post_init__(self):
        if not isinstance(self.method, (ClassicalParams, EtsamParams)):
            raise validate.FieldError("method", f"must be ClassicalParams or EtsamParams, got {self.method!r}")
        check_layout(self.layout)
        check_polarity(self.polarity)
        object.__setattr__(self, "logit_threshold", validate.number("logit_threshold", self.logit_threshold))
        for name in ("store_logits", "post_process", "remove_thin_noise", "remove_bridges"):
            object.__setattr__(self, name, validate.boolean(name, getattr(self, name)))
        for name in ("min_slices", "max_bridge_len", "max_spur_len"):
            object.__setattr__(self, name, validate.count(name, getattr(self, name), 0))
        object.__setattr__(self, "working_voxel_size",
                           validate.positive("working_voxel_size", self.working_voxel_size, none=True, unit="Å"))

    def post_steps(self) -> tuple[bool, bool]:
        """(thin-noise removal, bridge removal), as ETSAM's ``_resolve_postprocess_steps``: the
        steps named, else both with ``post_process``, else none."""
        if self.remove_thin_noise or self.remove_bridges:
            return self.remove_thin_noise, self.remove_bridges
        return self.post_process, self.post_process

    @property
    def method_name(self) -> str:
        return "etsam" if isinstance(self.method, EtsamParams) else "classical"

    def key(self) -> dict:
        """What the complete mark's key hashes: checkpoint identities, not their paths."""
        from dataclasses import asdict

        method = self.method.key_fields() if isinstance(self.method, EtsamParams) else asdict(self.method)
        return {"method": self.method_name, "params": method,
                "outputs": {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method"}}


def resolve_method(method: str | None, stage1_checkpoint=None, stage2_checkpoint=None, weights=None) -> str:
    """``etsam`` when weights are given or found in the weights folder, else ``classical``."""
    if method not in (None, "auto", "etsam", "classical"):
        raise validate.FieldError("method", f"must be auto, etsam or classical, got {method!r}")
    if method in ("etsam", "classical"):
        return method
    if stage1_checkpoint or stage2_checkpoint:
        return "etsam"
    from ..models.weights import weights_folder

    folder = weights_folder(weights)
    return "etsam" if folder and all((folder / f).exists() for f in ETSAM_FILES) else "classical"


def membrane_params(method: str | None = "auto", weights=None, **options) -> MembraneParams:
    """``MembraneParams`` from flat options named as their fields (``thickness``, ``grid_interval``,
    ``post_process`` ...): the method (``auto``: ETSAM when its checkpoints are given or found in
    ``weights`` or ``CRYODASK_WEIGHTS``), its parameters, then the outputs. An option the chosen
    method does not take is an error, so a typo is not silently ignored."""
    name = resolve_method(method, options.get("stage1_checkpoint"), options.get("stage2_checkpoint"), weights)
    cls = EtsamParams if name == "etsam" else ClassicalParams
    own = {f.name for f in fields(cls) if f.init}
    other = {f.name for f in fields(ClassicalParams if cls is EtsamParams else EtsamParams) if f.init}
    outputs = {f.name for f in fields(MembraneParams)} - {"method"}
    unknown = set(options) - own - outputs
    for key in sorted(unknown):
        if key in other:
            raise validate.FieldError(key, f"is an option of the {'etsam' if cls is ClassicalParams else 'classical'} "
                                           f"method, not of {name}")
        hint = difflib.get_close_matches(key, sorted(own | outputs), n=1)
        raise InputError(f"unknown option {key!r}" + (f" (did you mean {hint[0]}?)" if hint else ""))
    given = {k: v for k, v in options.items() if k in own}
    if cls is EtsamParams and not given.get("random_weights"):
        given.update(zip(("stage1_checkpoint", "stage2_checkpoint"),
                         etsam_checkpoints(given.get("stage1_checkpoint"), given.get("stage2_checkpoint"), weights)))
    return MembraneParams(cls(**given), **{k: v for k, v in options.items() if k in outputs})


def etsam_checkpoints(stage1=None, stage2=None, weights=None) -> tuple[str, str]:
    """ETSAM's two checkpoint files: as given, or ``etsam_stage{1,2}_v1.pt`` in the weights folder."""
    from ..models.weights import resolve

    return tuple(str(resolve(given, default_name=default, folder=weights, option=f"--stage{i}-checkpoint"))
                 for i, (given, default) in enumerate(zip((stage1, stage2), ETSAM_FILES), 1))
