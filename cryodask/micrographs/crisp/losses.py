"""The losses CRISP chooses between (``segmentation_models_pytorch`` multiclass mode, two classes).

Every loss takes logits (N, C, H, W) and integer targets (N, H, W) and returns a scalar.
Region losses (Dice, Jaccard, Tversky, Lovász) are computed over the whole batch per class
and averaged over the classes present in the target, as smp does; cross-entropy uses label
smoothing 0.1, as CRISP's ``SoftCrossEntropyLoss(smooth_factor=0.1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dice", "ce", "jaccard", "tversky", "lovasz")
EPS = 1e-7


def _counts(logits: torch.Tensor, target: torch.Tensor):
    """Soft true positives, predicted and true sums per class, and which classes are present."""
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    return tp, probs.sum(dims), onehot.sum(dims), onehot.sum(dims) > 0


def _present_mean(loss: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return (loss * present).sum() / present.sum().clamp(min=1)


def dice_loss(logits, target) -> torch.Tensor:
    """1 − soft Dice, 2·Σpt / (Σp + Σt), averaged over present classes."""
    tp, pred, true, present = _counts(logits, target)
    return _present_mean(1 - 2 * tp / (pred + true).clamp(min=EPS), present)


def jaccard_loss(logits, target) -> torch.Tensor:
    """1 − soft IoU, Σpt / (Σp + Σt − Σpt), averaged over present classes."""
    tp, pred, true, present = _counts(logits, target)
    return _present_mean(1 - tp / (pred + true - tp).clamp(min=EPS), present)


def tversky_loss(logits, target, alpha: float = 0.45, beta: float = 0.55, gamma: float = 2.0) -> torch.Tensor:
    """Focal Tversky (CRISP: α 0.45 on false positives, β 0.55 on false negatives, γ 2):
    (mean over present classes of 1 − TP / (TP + α·FP + β·FN))^γ."""
    tp, pred, true, present = _counts(logits, target)
    index = tp / (tp + alpha * (pred - tp) + beta * (true - tp)).clamp(min=EPS)
    return _present_mean(1 - index, present) ** gamma


def soft_cross_entropy(logits, target, smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy against labels smoothed by ``smoothing`` (spread evenly over the classes)."""
    return F.cross_entropy(logits, target.long(), label_smoothing=smoothing)


def _lovasz_grad(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted decreasingly."""
    total = sorted_truth.sum()
    intersection = total - sorted_truth.cumsum(0)
    union = total + (1 - sorted_truth).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_loss(logits, target) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018): the convex extension of 1 − IoU evaluated at the
    errors |1[class] − p|, averaged over present classes. For hard predictions it equals the
    Jaccard loss exactly."""
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1).long()
    losses, present = [], []
    for c in range(probs.shape[1]):
        truth = (labels == c).to(probs.dtype)
        errors = (truth - probs[:, c]).abs()
        errors, order = errors.sort(descending=True)
        losses.append(torch.dot(errors, _lovasz_grad(truth[order])))
        present.append(truth.sum() > 0)
    return _present_mean(torch.stack(losses), torch.stack(present))


_FUNCTIONS = {"dice": dice_loss, "ce": soft_cross_entropy, "jaccard": jaccard_loss, "tversky": tversky_loss,
              "lovasz": lovasz_loss}


def get_loss(name: str):
    """The loss function called ``name`` (one of ``LOSSES``).

    Examples
    --------
    >>> logits = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])  # (1, 2, 1, 2): class 0 then 1
    >>> round(float(get_loss("dice")(logits, torch.tensor([[[0, 1]]]))), 4)
    0.0
    """
    from ...errors import InputError

    if name not in _FUNCTIONS:
        raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return _FUNCTIONS[name]
