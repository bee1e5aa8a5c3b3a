"""Train Autopick-BC's good/bad classifier from particle coordinates on micrographs.

Windows are cut in memory from the binned micrographs, one task per micrograph on the
cluster; the network trains in this process (torch on the CPU threads, or a GPU). As in
Autopick-BC: binary cross-entropy, Adam, batch 32, up to 50 epochs, early stopping on the
validation loss with patience 2, decision threshold 0.5. Differences: the split is shuffled
and seeded (Autopick-BC splits by STAR row order: a collection sorted by micrograph puts whole
micrographs in the test set), the weights of the best validation epoch are restored (Keras'
``EarlyStopping`` keeps the last), and augmentation turns each window by a uniform angle and
flips half of them (Autopick-BC: ``RandomRotation(0.2)``, ±72°, no flip), optionally with a
random centre offset.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...io.folders import atomic_write

MIN_PER_CLASS = 5  # fewer windows of a class cannot fill a train, a validation and a test split


@dataclass(frozen=True)
class TrainParams:
    """Everything that changes the trained model.

    box_size : particle box in original pixels (Autopick-BC's extraction box).
    bin : integer binning before cutting windows (Autopick-BC bins 216 px boxes to 64; 4×).
    epochs, batch_size, lr, patience : Adam and early stopping (on the validation loss).
    test, validation : fractions held out for testing, and of the rest for validation
        (Autopick-BC: 20 % and 20 % of the remaining 80 %).
    augment : random rotation (any angle) and flips while training.
    shift : largest random centre offset in original pixels (0: none, as Autopick-BC).
    seed : the split, the initial weights and the augmentation.
    """

    box_size: int
    bin: int = 4
    epochs: int = 50
    batch_size: int = 32
    lr: float = 5e-5
    patience: int = 2
    test: float = 0.2
    validation: float = 0.2
    augment: bool = True
    shift: float = 0.0
    seed: int = 0

    def __post_init__(self):
        from .inputs import check_box

        check_box(self.box_size, self.bin)
        for name, value, ok, rule in (
                ("--epochs", self.epochs, self.epochs >= 1, "≥ 1"),
                ("--batch-size", self.batch_size, self.batch_size >= 1, "≥ 1"),
                ("--lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "> 0"),
                ("--patience", self.patience, self.patience >= 1, "≥ 1"),
                ("--test-fraction", self.test, 0 < self.test < 1, "between 0 and 1"),
                ("--validation-fraction", self.validation, 0 < self.validation < 1, "between 0 and 1"),
                ("--shift", self.shift, math.isfinite(self.shift) and self.shift >= 0, "≥ 0")):
            if not ok:
                raise InputError(f"{name} must be {rule}, got {value}")


@dataclass
class TrainResult:
    model_dir: Path
    test: dict
    history: list[dict]
    counts: dict
    seconds: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------ windows (one task per micrograph)

def _labelled_windows(path, good, bad, box_size: int, bin_factor: int, pixel_size: float | None = None):
    from ...report import stage
    from .windows import WindowCutter, binned_micrograph, to_binned, window_size

    with stage("read", block=Path(path).name, bytes_read=Path(path).stat().st_size):
        micrograph, binned = binned_micrograph(path, bin_factor, pixel_size)
    with stage("preprocess", block=Path(path).name):
        centres = np.concatenate([good, bad]).reshape(-1, 2)
        windows = WindowCutter(binned, window_size(box_size, bin_factor)).cut(to_binned(centres, bin_factor))
    return windows, np.r_[np.ones(len(good), np.float32), np.zeros(len(bad), np.float32)], micrograph.pixel_size


def collect_windows(mics, good: dict, bad: dict, box_size: int, bin_factor: int, client=None,
                    pixel_size: float | None = None):
    """All labelled windows (N, w, w), labels (N,) (1 = good), and the micrographs' pixel
    size (Å/px: ``pixel_size``, else the first one stated; None), micrograph by micrograph."""
    from .tasks import map_micrographs

    items = [(mics.paths[n], good.get(n, np.empty((0, 2))), bad.get(n, np.empty((0, 2)))) for n in mics.names
             if len(good.get(n, ())) or len(bad.get(n, ()))]
    results = map_micrographs(client, _labelled_windows, items, "autopick-windows", box_size=box_size,
                              bin_factor=bin_factor, pixel_size=pixel_size)
    windows = np.concatenate([w for w, _, _ in results])
    labels = np.concatenate([y for _, y, _ in results])
    return windows, labels, next((p for _, _, p in results if p), None)


def _flip_task(path, centres, diameter: float):
    """Band energy at ``centres`` and at their y-mirrors (a worker task, see ``checks``)."""
    from ...io.micrographs import read_micrograph
    from .checks import flip_energies

    return flip_energies(read_micrograph(path).image, centres, diameter, step=max(1, int(diameter // 12)))


def check_orientation(mics, good: dict, box_size: int, mode: str, client=None, where_="--good", log=None):
    """Test the good centres against their y-mirrors (particle diameter taken as half the box);
    returns the centres to train on and whether they were flipped (``checks.decide_flip``)."""
    from .checks import decide_flip, flip_test
    from .tasks import map_micrographs

    items = [(mics.paths[n], good[n]) for n in mics.names if len(good.get(n, ()))]
    test = flip_test(map_micrographs(client, _flip_task, items, "autopick-flip-test", diameter=box_size / 2))
    flip = decide_flip(test, mode, where_)
    if mode == "auto" and log:
        log(f"--flip-y auto: y counted from the {'bottom' if flip else 'top'} of the image ({test.describe()})")
    if not flip:
        return good, False
    return {n: np.column_stack([mics.shapes[n][0] - c[:, 0], c[:, 1]]) if len(c) else c
            for n, c in good.items()}, True


def split(n: int, test: float, validation: float, seed: int) -> dict[str, np.ndarray]:
    """Shuffled, seeded train / validation / test indices (each non-empty for n ≥ 3)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, round(test * n)), n - 2)
    n_val = min(max(1, round(validation * (n - n_test))), n - n_test - 1)
    return {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


# ------------------------------------------------------------------ training

def augment(x, generator, max_shift: float = 0.0):
    """Turn each (B, 1, w, w) window by a uniform angle, mirror half of them, shift by up to
    ``max_shift`` window pixels; the border is filled by reflection (Keras' default)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    angle = torch.rand(b, generator=generator) * (2 * math.pi)
    mirror = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * max_shift / w)
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _evaluate(net, x, y, batch: int, loss_fn) -> tuple[float, float, np.ndarray]:
    import torch

    net.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            logits.append(net(x[start:start + batch]))
    logits = torch.cat(logits)
    loss = float(loss_fn(logits, y))
    probability = torch.sigmoid(logits)
    return loss, float(((probability >= 0.5).float() == y).float().mean()), probability.numpy()


def fit(windows: np.ndarray, labels: np.ndarray, parts: dict, params: TrainParams, *, log=None,
        device: str = "cpu"):
    """Train a fresh :class:`AutopickNet` on ``parts["train"]``, early-stopping on
    ``parts["validation"]``; returns ``(net, history)`` with the best epoch's weights."""
    import torch

    from .network import AutopickNet

    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    data = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).unsqueeze(1)
    target = torch.from_numpy(labels.astype(np.float32))
    xt, yt = data[parts["train"]], target[parts["train"]]
    xv, yv = data[parts["validation"]].to(device), target[parts["validation"]].to(device)
    net = AutopickNet(windows.shape[-1]).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=params.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    max_shift = params.shift / params.bin
    history, best, best_state, waited = [], math.inf, None, 0
    for epoch in range(1, params.epochs + 1):
        clock = time.perf_counter()
        net.train()
        order = torch.randperm(len(xt), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(order), params.batch_size):
            index = order[start:start + params.batch_size]
            x = augment(xt[index], generator, max_shift) if params.augment else xt[index]
            x, y = x.to(device), yt[index].to(device)
            if len(index) == 1:  # BatchNorm needs two samples to train on
                continue
            optimiser.zero_grad()
            logits = net(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
            correct += int(((logits >= 0).float() == y).sum())
        val_loss, val_acc, _ = _evaluate(net, xv, yv, 256, loss_fn)
        history.append({"epoch": epoch, "loss": total / len(xt), "accuracy": correct / len(xt),
                        "val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.perf_counter() - clock})
        if log:
            log(f"epoch {epoch}: loss {history[-1]['loss']:.4f} acc {history[-1]['accuracy']:.3f} "
                f"val_loss {val_loss:.4f} val_acc {val_acc:.3f} ({history[-1]['seconds']:.1f} s)")
        if val_loss < best:
            best, waited = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= params.patience:
                break
    net.load_state_dict(best_state)
    return net.eval(), history


def held_out_scores(net, windows: np.ndarray, labels: np.ndarray, device: str = "cpu") -> tuple[dict, np.ndarray]:
    """Classification scores of ``net`` on windows it did not train on, and its probabilities."""
    from .metrics import classification_scores
    from .score import score_windows

    probability = score_windows(net, windows, device=device)
    return classification_scores(labels > 0.5, probability), probability


# ------------------------------------------------------------------ outputs

def _write_json(path: Path, data) -> Path:
    with atomic_write(path) as partial:
        partial.write_text(json.dumps(data, indent=2))
    return path


def results_figure(history: list[dict], test: dict, out_png: Path) -> Path:
    """Loss and accuracy per epoch (train, validation) beside the test scores, as
    Autopick-BC's ``train_and_test_results.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=100, layout="constrained")
    epochs = [h["epoch"] for h in history]
    for i, (key, title) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(epochs, [h[key] for h in history], marker=".", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], marker=".", label="validation")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = fig.add_subplot(1, 3, 3)
    ax.axis("off")
    rows = [[k, f"{test[k]:.3f}" if isinstance(test[k], float) else str(test[k])]
            for k in ("accuracy", "precision", "recall", "auc", "tp", "fp", "tn", "fn", "n")]
    ax.table(cellText=rows, colLabels=["test", "value"], loc="center")
    ax.set_title("test split")
    FigureCanvasAgg(fig)
    with atomic_write(out_png) as partial:
        fig.savefig(partial, format="png")
    return out_png


def training_inputs(micrographs, good, bad, *, flip_y: bool = False, quiet: bool = False):
    """``(micrographs, good centres, bad centres)``, checked: names match, centres lie in their
    images, each class has enough windows. Cheap (headers and coordinate files only)."""
    from .inputs import micrograph_set, read_centres

    mics = micrograph_set(micrographs)
    centres = {kind: read_centres(source, mics, flip_y=flip_y, quiet=quiet)
               for kind, source in (("good", good), ("bad", bad))}
    for (kind, found), source in zip(centres.items(), (good, bad)):
        n = sum(len(c) for c in found.values())
        if n < MIN_PER_CLASS:
            raise InputError(f"{source}: {n} {kind} particle(s) on the micrographs given; "
                             f"training needs at least {MIN_PER_CLASS}")
    return mics, centres["good"], centres["bad"]


def train(micrographs, good, bad, out, *, params: TrainParams, flip_y: bool | str = False, client=None,
          device: str = "auto", log=None, pixel_size: float | None = None, checks: bool = True) -> TrainResult:
    """Train the good/bad classifier and write it to the folder ``out``.

    Parameters
    ----------
    micrographs : micrograph files, folders, globs or a micrographs STAR.
    good, bad : particle coordinates: a STAR (rows grouped by ``rlnMicrographName``), a
        per-micrograph coordinate file, or a folder / glob of them (``.box``, ``.star``, ...).
    out : model folder: ``model.pt``, ``config.json``, ``training_log.json``,
        ``test_results.json``, ``train_and_test_results.png``.
    params : :class:`TrainParams`.
    flip_y : the coordinate files count y from the bottom of the image: True / False, or
        ``"auto"`` (chosen by ``checks.flip_test``).
    client : ``distributed.Client`` for cutting windows (one task per micrograph); None: here.
    device : auto | cpu | cuda, for training.
    pixel_size : Å/px of the micrographs (overrides their headers), recorded with the model.
    checks : refuse coordinates that look flipped, unbalanced classes and a held-out result
        at the class prior (``cryodask.micrographs.autopick.checks``).

    Examples
    --------
    >>> result = train("mics/", "good.star", "bad.star", "model/", params=TrainParams(box_size=216))  # doctest: +SKIP
    >>> result.test["accuracy"]                                                                     # doctest: +SKIP
    """
    from ...io.folders import check_output_dir
    from ...report import stage
    from ...models.sam2 import pick_device
    from .score import ModelConfig, save_model
    from .windows import window_size

    from .checks import check_balance, check_held_out, parse_flip

    clock = time.perf_counter()
    mode = parse_flip(flip_y)
    mics, good_centres, bad_centres = training_inputs(micrographs, good, bad, flip_y=mode == "yes")
    if pixel_size is not None and not pixel_size > 0:
        raise InputError(f"--pixel-size must be positive, got {pixel_size}")
    if checks:
        check_balance(good_centres, bad_centres)
    flipped = False
    if checks or mode == "auto":
        good_centres, flipped = check_orientation(mics, good_centres, params.box_size, mode, client, str(good), log)
        if flipped:  # the bad coordinates come in the same convention
            bad_centres = {n: np.column_stack([mics.shapes[n][0] - c[:, 0], c[:, 1]]) if len(c) else c
                           for n, c in bad_centres.items()}
    flip_y = (mode == "yes") != flipped
    counts = {"good": int(sum(len(c) for c in good_centres.values())),
              "bad": int(sum(len(c) for c in bad_centres.values()))}
    out = check_output_dir(out)
    windows, labels, pixel_size = collect_windows(mics, good_centres, bad_centres, params.box_size, params.bin, client,
                                                  pixel_size)
    if pixel_size is None and log:
        log("pixel size unknown (no header, no --pixel-size): the model is recorded without one and assumes "
            "the micrographs it scores share the training sampling")
    seconds = {"windows": time.perf_counter() - clock}

    clock = time.perf_counter()
    device = pick_device(device)
    parts = split(len(labels), params.test, params.validation, params.seed)
    with stage("train", block="model"):  # in this process, on the windows gathered from the workers
        net, history = fit(windows, labels, parts, params, log=log, device=device)
    seconds["training"] = time.perf_counter() - clock
    test, _ = held_out_scores(net.cpu(), windows[parts["test"]], labels[parts["test"]])
    if checks:
        check_held_out(test)
    counts.update({k: int(len(v)) for k, v in parts.items()}, micrographs=len(mics.names),
                  window=window_size(params.box_size, params.bin))

    config = ModelConfig(box_size=params.box_size, bin=params.bin, window=window_size(params.box_size, params.bin),
                         pixel_size=pixel_size)
    files = [save_model(out, net, config),
             _write_json(out / "config.json", {"model": asdict(config), "training": asdict(params),
                                               "flip_y": flip_y, "counts": counts,
                                               "micrographs": [str(p) for p in mics.paths.values()],
                                               "good": str(good), "bad": str(bad)}),
             _write_json(out / "training_log.json", history),
             _write_json(out / "test_results.json", test),
             results_figure(history, test, out / "train_and_test_results.png")]
    return TrainResult(out, test, history, counts, seconds, files)
