"""Checks of micrograph training inputs that a trained model cannot make: coordinates whose y
axis is flipped, classes too unbalanced to learn from, and a held-out result no better than
the class prior. Each failure is a one-line ``InputError`` that says what to do.

Flipped coordinates: a particle is a blob of the particle's size, so the band-pass energy
(difference of Gaussians at the particle scale, squared, averaged over the particle) is
higher at the true centres than at random places of the same micrograph, whatever the
contrast polarity. The y-flipped centres ``(height − row, col)`` fall on random places, so
correct coordinates give a higher energy than their mirror images; a paired one-sided
Wilcoxon test over the centres decides. Centres within a diameter of the middle row are left
out (their mirror image is the particle itself). The test is wrong where the particles are
invisible at the particle scale (a filtered-out band) or where the labelled "particles" are
places of no structure; ``--no-checks`` skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InputError

MAX_RATIO = 4.0  # largest good:bad (or bad:good) window ratio accepted
MIN_SHARED = 0.5  # least fraction of each class's windows on micrographs that hold the other class
ALPHA = 0.01  # significance of the flip test
MIN_PAIRS = 8  # fewer informative centres cannot decide the orientation


def band_energy(image: np.ndarray, diameter: float) -> np.ndarray:
    """Particle-scale band-pass energy of ``image`` (``diameter`` in its pixels): difference of
    Gaussians (σ = d/8 and d/2) squared and averaged with σ = d/4. Sign-free, so dark and
    bright particles score alike; the image is standardised first."""
    from scipy.ndimage import gaussian_filter

    image = np.asarray(image, dtype=np.float32)
    image = (image - image.mean()) / (image.std() or 1.0)
    band = gaussian_filter(image, diameter / 8) - gaussian_filter(image, diameter / 2)
    return gaussian_filter(band * band, diameter / 4)


def flip_energies(image: np.ndarray, centres: np.ndarray, diameter: float, step: int = 1):
    """Band energy at the centres (rows, cols of ``image``) and at their y-mirrors, for the centres
    whose mirror lies more than a diameter away; computed on ``image`` binned by ``step``."""
    from ...io.micrographs import bin_image

    height = image.shape[0]
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    centres = centres[np.abs(height - 2 * centres[:, 0]) > diameter]
    energy = band_energy(bin_image(image, step), diameter / step)
    mirrored = np.column_stack([height - centres[:, 0], centres[:, 1]])

    def at(points):
        index = np.clip(np.rint((points + 0.5) / step - 0.5), 0, np.array(energy.shape) - 1).astype(int)
        return energy[index[:, 0], index[:, 1]]

    return at(centres), at(mirrored)


@dataclass
class FlipTest:
    """Paired comparison of the band energy at the given centres and at their y-mirrors."""

    n: int
    given: float  # median energy at the given centres
    flipped: float  # ... and at the mirrored ones
    p_given: float  # one-sided p that the given centres are more particle-like
    p_flipped: float  # ... that the mirrored ones are

    @property
    def verdict(self) -> str:
        """``given`` | ``flipped`` | ``unclear`` (no difference) | ``too few`` centres to tell."""
        if self.n < MIN_PAIRS:
            return "too few"
        if self.p_given < ALPHA:
            return "given"
        return "flipped" if self.p_flipped < ALPHA else "unclear"

    def describe(self) -> str:
        return (f"band energy at the particle scale, median over {self.n} centres: {self.given:.3g} as given, "
                f"{self.flipped:.3g} with y flipped")


def flip_test(pairs) -> FlipTest:
    """``pairs``: ``(energy at given, energy at mirrored)`` arrays, one per micrograph."""
    from scipy.stats import wilcoxon

    given = np.concatenate([g for g, _ in pairs] or [np.empty(0)])
    flipped = np.concatenate([f for _, f in pairs] or [np.empty(0)])
    n = len(given)
    if n < MIN_PAIRS:
        return FlipTest(n, float(np.median(given)) if n else 0.0, float(np.median(flipped)) if n else 0.0, 1.0, 1.0)
    diff = np.log(given + 1e-12) - np.log(flipped + 1e-12)
    p_given = float(wilcoxon(diff, alternative="greater").pvalue) if np.any(diff) else 1.0
    p_flipped = float(wilcoxon(diff, alternative="less").pvalue) if np.any(diff) else 1.0
    return FlipTest(n, float(np.median(given)), float(np.median(flipped)), p_given, p_flipped)


def parse_flip(value) -> str:
    """``--flip-y`` as ``no`` | ``yes`` | ``auto`` (booleans accepted)."""
    if isinstance(value, bool) or value is None:
        return "yes" if value else "no"
    text = str(value).strip().lower()
    text = {"true": "yes", "1": "yes", "false": "no", "0": "no", "y": "yes", "n": "no"}.get(text, text)
    if text not in ("yes", "no", "auto"):
        raise InputError(f"--flip-y must be yes, no or auto, got {value!r}")
    return text


def decide_flip(test: FlipTest, mode: str, where_: str) -> bool | None:
    """The orientation to use: ``True`` flips y relative to how the coordinates were read
    (``auto`` only), ``False`` keeps them; raises when they look flipped and ``mode`` is not
    ``auto``. ``where_`` names the coordinates in messages."""
    verdict = test.verdict
    if mode == "auto":
        if verdict == "flipped":
            return True
        if verdict in ("unclear", "too few"):
            raise InputError(f"{where_}: --flip-y auto cannot tell the orientation ({test.describe()}); "
                             "state it with --flip-y yes or --flip-y no")
        return False
    if verdict in ("given", "too few"):
        return False
    what = "look flipped" if verdict == "flipped" else "are no more particle-like than their y-mirrors"
    hint = "--flip-y no" if mode == "yes" else "--flip-y yes"
    raise InputError(f"{where_}: the coordinates {what} ({test.describe()}): rerun with {hint} "
                     "(or --flip-y auto), or check that they belong to these micrographs")


def check_balance(good: dict, bad: dict) -> None:
    """Refuse good:bad window counts beyond ``MAX_RATIO`` either way, and classes that come
    mostly from micrographs holding none of the other class (the classifier would learn the
    micrograph, not the particle)."""
    n_good = sum(len(c) for c in good.values())
    n_bad = sum(len(c) for c in bad.values())
    ratio = max(n_good, n_bad) / max(1, min(n_good, n_bad))
    if ratio > MAX_RATIO:
        more, fewer = ("good", "bad") if n_good > n_bad else ("bad", "good")
        raise InputError(f"{n_good} good and {n_bad} bad particles: {ratio:.1f} {more} for each {fewer} "
                         f"(at most {MAX_RATIO:g} learns more than the majority class); label more {fewer} "
                         f"particles or use fewer {more} ones")
    with_good = {n for n, c in good.items() if len(c)}
    with_bad = {n for n, c in bad.items() if len(c)}
    for kind, own, other, n in (("good", good, with_bad, n_good), ("bad", bad, with_good, n_bad)):
        shared = sum(len(c) for name, c in own.items() if name in other) / max(1, n)
        if shared < MIN_SHARED:
            ours = len(with_good if kind == "good" else with_bad)
            theirs = len(other)
            raise InputError(f"{kind} particles come from {ours} micrograph(s) and the others from {theirs}; "
                             f"only {shared:.0%} of the {kind} ones lie on micrographs that hold both kinds, so "
                             "the classifier would learn the micrograph: label good and bad particles on the "
                             "same micrographs")


def check_held_out(test: dict) -> None:
    """Refuse a held-out result at the class prior: AUC within two standard errors of 0.5 (the
    null's SE of the Mann–Whitney AUC), which is what a model calling every window one class,
    at the majority-class accuracy, scores. The AUC decides, not the accuracy: an
    undertrained model can rank well (AUC 0.8) while its 0.5 threshold still sits near the
    prior; without an AUC (one class absent from the test split) accuracy within one
    standard error of the majority rate is refused."""
    n = test["n"]
    n_pos, n_neg = test["tp"] + test["fn"], test["tn"] + test["fp"]
    if not n:
        return
    prior = max(n_pos, n_neg) / n
    auc = test.get("auc")
    if auc is not None:
        at_prior = auc <= 0.5 + 2 * np.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    else:
        at_prior = test["accuracy"] <= prior + np.sqrt(prior * (1 - prior) / n)
    if at_prior:
        raise InputError(f"held-out accuracy {test['accuracy']:.3f} (majority class {prior:.3f}), AUC "
                         f"{'n/a' if auc is None else format(auc, '.3f')}, on {n} windows: the model learned "
                         "nothing beyond the class prior; check the coordinates' orientation (--flip-y auto), "
                         "the box size and the labels, or label more particles")
