"""Train a CRISP segmentation network on micrographs with particle masks.

Labels are the given masks, or disks of the particle diameter drawn at given coordinates.
Micrographs are binned by an integer factor and each is standardised (zero mean, unit
standard deviation); training draws random square crops (4 per micrograph per epoch, as
CRISP), flipped and rotated by multiples of 90°, and optimises the chosen loss with Adam and a
one-cycle learning-rate schedule (CRISP's OneCycleLR). The trained network then scores a small
dense-CRF grid on (up to four of) its training micrographs; the best setting, both IoUs and
whether the CRF is applied by default go into ``config["crf"]``. The model folder holds ``model.pt``
(state dict + everything needed to rebuild the network and its input), ``config.json``,
``training_log.json`` and ``loss_curve.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError, where
from ...io.folders import atomic_write
from ...io.micrographs import SUFFIXES, bin_image, find_micrographs, micrograph_name, micrograph_shape, read_micrograph
from .labels import bin_mask, disk_mask
from .losses import LOSSES, get_loss
from .networks import DEFAULT_WIDTHS, NETWORKS, build_network

MODEL_FILE = "model.pt"
FORMAT = "cryodask-crisp-1"


@dataclass(frozen=True)
class TrainParams:
    """Everything that shapes the trained model."""

    model: str = "unet"
    loss: str = "dice"
    widths: tuple[int, ...] | None = None
    bin: int = 1
    epochs: int = 50
    crop: int = 256
    batch_size: int = 4
    patches_per_image: int = 4
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.model not in NETWORKS:
            raise InputError(f"--model must be one of {', '.join(NETWORKS)}, got {self.model!r}")
        if self.loss not in LOSSES:
            raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("bin", "epochs", "crop", "batch_size", "patches_per_image"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a whole number ≥ 1, got {value}")
        if self.crop < 16:
            raise InputError(f"--crop must be at least 16 pixels, got {self.crop}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")


@dataclass
class TrainResult:
    model_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    micrographs: int = 0
    crf: dict = field(default_factory=dict)


def standardise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (a flat image becomes zeros)."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    return ((image - image.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def find_masks(folder, names) -> dict[str, Path]:
    """``<name>_mask.<ext>`` in ``folder`` for every micrograph name (a folder holding both
    micrographs and masks then fails loudly on the masks, never trains a mask on itself)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise where(folder, "no such folder (the masks are <name>_mask.png/.jpg/.mrc/.tif files)")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES and p.is_file()}
    out = {}
    for name in names:
        path = files.get(f"{name}_mask")
        if path is None:
            raise where(folder, f"holds no mask for micrograph {name} (expected {name}_mask.png, .jpg, .mrc or "
                                f".tif; keep micrographs and masks in separate folders)")
        out[name] = path
    return out


def read_mask(path, shape=None) -> np.ndarray:
    """A binary mask file: pixels above half its maximum (> 127 for 8-bit JPEG/PNG, > 0.5 for 0/1)."""
    image = read_micrograph(path).image
    if shape is not None and tuple(image.shape) != tuple(shape):
        raise where(path,
                    f"mask is {image.shape[0]}×{image.shape[1]} px but its micrograph is {shape[0]}×{shape[1]} px")
    top = float(image.max())
    return (image > top / 2).astype(np.uint8) if top > 0 else np.zeros(image.shape, np.uint8)


def check_labels(micrographs, *, particles=None, masks=None, diameter=None, flip_y: bool = False,
                 quiet: bool = False):
    """Validate the training inputs (cheap: headers and coordinate files) and return the paths,
    names, shapes and label sources, before anything heavy starts."""
    paths = find_micrographs(micrographs)
    if (particles is None) == (masks is None):
        raise InputError("give exactly one of --particles (with --diameter) or --masks")
    names = [micrograph_name(p) for p in paths]
    shapes = {n: micrograph_shape(p) for n, p in zip(names, paths)}
    if particles is not None:
        if diameter is None or not diameter > 0:
            raise InputError("--particles needs --diameter (particle diameter in full-resolution pixels)")
        from ...io.particles import note_skipped, read_particles

        coords = read_particles(particles, names, shapes=shapes, flip_y=flip_y)
        if not quiet:  # the check before training reads them once more, quietly
            note_skipped(coords)
        return paths, names, shapes, coords
    return paths, names, shapes, find_masks(masks, names)


def _pixel_size(paths, pixel_size, log) -> float | None:
    """``pixel_size`` (checked), else the first micrograph header's; said when unknown."""
    from ..autopick.score import header_pixel_size

    if pixel_size is not None:
        if not pixel_size > 0:
            raise InputError(f"--pixel-size must be positive, got {pixel_size}")
        return float(pixel_size)
    found = next((s for s in map(header_pixel_size, paths) if s), None)
    if found is None and log is not None:
        log("pixel size unknown (no header, no --pixel-size): the model is recorded without one and assumes "
            "the micrographs it segments share the training sampling")
    return found


def load_examples(paths, names, shapes, labels, diameter, factor: int, client=None):
    """(binned standardised image, binned label) per micrograph; one task each on ``client``
    (None: here)."""
    from ..autopick.tasks import map_micrographs

    return map_micrographs(client, _example, [(path, labels[name]) for path, name in zip(paths, names)],
                           "crisp-examples", diameter=diameter, factor=factor)


def _example(path, label, diameter, factor: int):
    image = read_micrograph(path).image
    mask = read_mask(label, image.shape) if isinstance(label, Path) else disk_mask(image.shape, label, diameter)
    return standardise(bin_image(image, factor)), bin_mask(mask, factor)


def _batches(examples, params: TrainParams, rng: np.random.Generator):
    """One epoch of random augmented crops, as (images, labels) arrays of ``batch_size``."""
    picks = [i for i in range(len(examples)) for _ in range(params.patches_per_image)]
    rng.shuffle(picks)
    for start in range(0, len(picks), params.batch_size):
        images, labels = [], []
        for i in picks[start:start + params.batch_size]:
            image, label = examples[i]
            size = min(params.crop, *image.shape)
            y = int(rng.integers(0, image.shape[0] - size + 1))
            x = int(rng.integers(0, image.shape[1] - size + 1))
            a, b = image[y:y + size, x:x + size], label[y:y + size, x:x + size]
            k = int(rng.integers(4))
            a, b = np.rot90(a, k), np.rot90(b, k)
            if rng.random() < 0.5:
                a, b = a[:, ::-1], b[:, ::-1]
            images.append(np.ascontiguousarray(a))
            labels.append(np.ascontiguousarray(b))
        yield np.stack(images)[:, None], np.stack(labels).astype(np.int64)


def loss_curve_png(losses, out_png, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(losses) + 1), losses, "o-", ms=3)
    ax.set(xlabel="epoch", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    FigureCanvasAgg(fig)
    with atomic_write(out_png) as partial:
        fig.savefig(partial, dpi=fig.dpi, format="png")
    return Path(out_png)


def train(micrographs, out, *, particles=None, masks=None, diameter: float | None = None, flip_y: bool | str = False,
          params: TrainParams = TrainParams(), threads: int | None = None, log=None, crf_grid=None,
          pixel_size: float | None = None, checks: bool = True, client=None) -> TrainResult:
    """Train a segmentation network; write the model folder ``out``.

    Parameters
    ----------
    micrographs : files, folders, globs or a STAR listing them
    particles : coordinates (STAR/.box/.coords/.csv file or folder) → disks of ``diameter``
        full-resolution pixels; or ``masks``: a folder of ``<name>_mask.*`` files
    params : network, loss, binning, crops, optimiser (``TrainParams``)
    threads : torch threads (default: torch's, one per core); on a shared, busy machine 1 is
        several times faster, since torch's threads spin waiting for each other
    log : called with one line per epoch and one for the CRF choice (e.g. ``print``)
    crf_grid : CRF settings to choose from (default: ``crf.grid`` at the particle radius)
    flip_y : True / False, or ``"auto"``; with ``checks``, coordinates that look y-flipped
        are refused (``cryodask.micrographs.autopick.checks``)
    pixel_size : Å/px of the micrographs (default: the first header's), recorded with the model
    client : ``distributed.Client`` that reads, labels and bins the micrographs, one task each
        (None: here); the network trains in this process

    Examples
    --------
    >>> train(["mics/"], "model/", particles="picks.star", diameter=108,
    ...       params=TrainParams(model="unet", loss="dice", bin=4, epochs=20))  # doctest: +SKIP
    """
    import torch

    from ...io.folders import check_output_dir
    from ...report import stage

    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    from ..autopick.checks import parse_flip

    mode = parse_flip(flip_y)
    paths, names, shapes, labels = check_labels(micrographs, particles=particles, masks=masks, diameter=diameter,
                                                flip_y=mode == "yes")
    pixel_size = _pixel_size(paths, pixel_size, log)
    flip_y = mode == "yes"
    if particles is not None and (checks or mode == "auto"):
        from ..autopick.inputs import MicrographSet
        from ..autopick.train import check_orientation

        mics = MicrographSet(dict(zip(names, map(Path, paths))), shapes)
        labels, flipped = check_orientation(mics, labels, 2 * float(diameter), mode, where_=str(particles), log=log)
        flip_y = (mode == "yes") != flipped
    out = check_output_dir(out)
    clock = time.perf_counter()
    with stage("read", block="micrographs", bytes_read=sum(Path(p).stat().st_size for p in paths)):
        examples = load_examples(paths, names, shapes, labels, diameter, params.bin, client)
    widths = tuple(params.widths) if params.widths else DEFAULT_WIDTHS[params.model]
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads or previous))
    try:
        with stage("train", block="model"):
            network, history = _fit(examples, params, widths, clock, log)
            network.eval()  # the CRF choice runs the trained network on training micrographs
            diameter_full = float(diameter) if diameter else _mean_diameter(examples, params.bin)
            crf = choose_crf(network, examples, names, diameter_full, params.bin, crf_grid)
    finally:
        torch.set_num_threads(previous)
    if log is not None:
        log(crf_line(crf))
    config = {"format": FORMAT, "network": params.model, "widths": list(widths), "classes": 2, "bin": params.bin,
              "normalisation": "standardise each binned micrograph (mean 0, std 1)",
              "diameter": diameter_full, "pixel_size": pixel_size, "flip_y": flip_y,
              "labels": "particles" if particles is not None else "masks", "train": asdict(params),
              "micrographs": [str(p) for p in paths], "crf": crf}
    state = {"config": config, "state_dict": network.state_dict()}
    with atomic_write(out / MODEL_FILE) as partial:
        torch.save(state, partial)
    with atomic_write(out / "config.json") as partial:
        partial.write_text(json.dumps(config, indent=2))
    with atomic_write(out / "training_log.json") as partial:
        partial.write_text(json.dumps(history, indent=2))
    losses = [h["loss"] for h in history]
    loss_curve_png(losses, out / "loss_curve.png", f"{params.model} + {params.loss}, bin {params.bin}")
    return TrainResult(out, losses, time.perf_counter() - clock, len(examples), crf)


CRF_MICROGRAPHS = 4  # the CRF grid runs on at most this many training micrographs (evenly spaced)


def choose_crf(network, examples, names, diameter, factor: int, settings=None) -> dict:
    """Score the CRF grid on (up to ``CRF_MICROGRAPHS``) training micrographs against their
    labels, at the model's binning; the result goes into ``config["crf"]`` and decides whether
    ``crisp predict --crf auto`` applies the CRF. The network has seen these micrographs, so both
    IoUs are optimistic; their difference is what counts."""
    from .crf import choose, grid
    from .tiles import predict_tiled

    step = max(1, math.ceil(len(examples) / CRF_MICROGRAPHS))
    picked = list(range(0, len(examples), step))[:CRF_MICROGRAPHS]
    cases = []
    for i in picked:
        image, label = examples[i]
        logits = predict_tiled(network, image)
        logits = logits - logits.max(axis=0, keepdims=True)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
        cases.append((probabilities, logits, image, label))
    settings = list(settings) if settings is not None else grid((diameter or 2 * factor) / factor)
    result = choose(cases, settings)
    result["micrographs"] = [names[i] for i in picked]
    return result


def crf_line(crf: dict) -> str:
    """One line: both IoUs and the decision."""
    p = crf["params"]
    return (f"CRF on {len(crf['micrographs'])} training micrograph(s), best of {crf['settings_tried']} settings "
            f"(features {p['features']}, sxy {p['sxy']:g}, compat {p['compat']:g}, gaussian compat "
            f"{p['gaussian_compat']:g}): IoU {crf['iou_nocrf']:.3f} without, {crf['iou_crf']:.3f} with → "
            + ("applied by default" if crf["apply"] else f"not applied by default (gain under {crf['min_gain']:g}; "
                                                        f"crisp predict --crf on forces it)"))


def _fit(examples, params: TrainParams, widths, clock: float, log):
    """The training loop: Adam + one-cycle schedule over random augmented crops."""
    import torch

    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    network = build_network(params.model, widths)
    loss_fn = get_loss(params.loss)
    steps = math.ceil(len(examples) * params.patches_per_image / params.batch_size)
    optimiser = torch.optim.Adam(network.parameters(), lr=params.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=params.lr, total_steps=params.epochs * steps)
    history = []
    network.train()
    for epoch in range(params.epochs):
        total, count = 0.0, 0
        for images, targets in _batches(examples, params, rng):
            optimiser.zero_grad()
            loss = loss_fn(network(torch.from_numpy(images)), torch.from_numpy(targets))
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(images)
            count += len(images)
        history.append({"epoch": epoch + 1, "loss": total / count, "lr": schedule.get_last_lr()[0],
                        "seconds": time.perf_counter() - clock})
        if log is not None:
            log(f"epoch {epoch + 1}/{params.epochs}: loss {total / count:.4f}")
    return network, history


def _mean_diameter(examples, factor: int) -> float | None:
    """A particle size for masks-only training: the median equivalent diameter of the label
    components (full-resolution pixels), so prediction can size its extraction by default."""
    from scipy import ndimage as ndi

    areas = []
    for _, label in examples:
        lab, n = ndi.label(label)
        if n:
            areas.extend(np.bincount(lab.ravel())[1:].tolist())
    if not areas:
        return None
    return float(2 * math.sqrt(np.median(areas) / math.pi) * factor)


def load_model(model_dir):
    """(network in eval mode, config) from a model folder; a missing or unusable folder is a
    one-line error naming it."""
    import torch

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise where(model_dir, f"no {MODEL_FILE} here: not a CRISP model folder (make one with cryodask crisp train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = state["config"]
        if config.get("format") != FORMAT:
            raise ValueError(f"format {config.get('format')!r}, expected {FORMAT!r}")
        network = build_network(config["network"], config["widths"])
        network.load_state_dict(state["state_dict"])
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (pickle, zip, key and shape errors all mean the same)
        text = str(exc).strip().splitlines()
        raise where(path, f"not a usable CRISP model ({type(exc).__name__}: {text[0][:120] if text else ''})") from None
    return network.eval(), config
