"""Quality measured against ground truth: voxel-wise segmentation scores and picking F1."""

from .picking import Matching, match_picks, picking_scores
from .segmentation import PRCurve, average_precision, confusion, pr_curve, scores, segmentation_scores

__all__ = ["Matching", "match_picks", "picking_scores", "PRCurve", "average_precision", "confusion", "pr_curve",
           "scores", "segmentation_scores"]
