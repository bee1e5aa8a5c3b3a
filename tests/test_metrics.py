"""Segmentation scores, PR curves and picking matches, checked against exact brute force."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from cryodask.metrics import (average_precision, confusion, match_picks, picking_scores, pr_curve, scores,
                              segmentation_scores)
from cryodask.metrics import picking

# ---------------------------------------------------------------- segmentation


def test_confusion_and_scores_by_hand():
    pred = np.array([[1, 1, 0, 0], [2, 0, 0, 0]])  # any nonzero value is positive
    truth = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)
    counts = confusion(pred, truth)
    assert counts == {"tp": 2, "fp": 1, "fn": 2, "tn": 3}
    s = scores(**counts)
    assert s == pytest.approx({"dice": 4 / 7, "iou": 2 / 5, "precision": 2 / 3, "recall": 2 / 4})
    assert segmentation_scores(pred, truth) == {**s, **counts}


def test_empty_conventions():
    empty = np.zeros((3, 4), bool)
    full = np.ones((3, 4), bool)
    assert scores(**confusion(empty, empty)) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert scores(**confusion(empty, full)) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}
    assert scores(**confusion(full, empty)) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}


def test_dask_and_zarr_equal_numpy(tmp_path):
    rng = np.random.default_rng(1)
    pred = rng.random((13, 17, 19)) > 0.6
    truth = rng.random((13, 17, 19)) > 0.5
    expected = segmentation_scores(pred, truth)
    # different chunkings on the two sides, one of them a zarr array on disk
    store = zarr.create_array(tmp_path / "t.zarr", shape=truth.shape, chunks=(4, 9, 7), dtype=bool)
    store[:] = truth
    assert segmentation_scores(da.from_array(pred, chunks=(5, 6, 7)), da.from_zarr(store)) == expected
    assert segmentation_scores(da.from_array(pred, chunks=(5, 6, 7)), store) == expected


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differs"):
        confusion(np.zeros((2, 3)), np.zeros((3, 2)))


def exact_pr(logits, truth):
    """Brute force: precision and recall at every distinct logit, and sklearn's AP."""
    thresholds = np.unique(logits)[::-1]
    pred = logits[None, :] >= thresholds[:, None]
    tp = (pred & truth).sum(1)
    precision, recall = tp / pred.sum(1), tp / truth.sum()
    return thresholds, tp, pred.sum(1) - tp, np.sum(np.diff(recall, prepend=0) * precision)


def test_average_precision_docstring_example():
    assert average_precision([0.5, 1.0, 1.0], [1.0, 0.5, 0.0]) == 0.75


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pr_curve_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random(3000) < 0.3
    logits = rng.normal(truth * 1.0, 1.0)
    curve = pr_curve(logits, truth, bins=20_000)
    assert curve.average_precision == pytest.approx(exact_pr(logits, truth)[3], abs=1e-3)
    # at the bin edges the counts are exact
    for k in rng.integers(0, 20_000, 50):
        at = logits >= curve.thresholds[k]
        assert curve.tp[k] == (at & truth).sum() and curve.fp[k] == (at & ~truth).sum()
    assert curve.recall[0] == 1.0 and curve.recall[-1] == 0.0 and curve.precision[-1] == 1.0
    # the same curve from dask blocks, with truth chunked differently
    lazy = pr_curve(da.from_array(logits, chunks=700), da.from_array(truth, chunks=1100), bins=20_000)
    np.testing.assert_array_equal(lazy.tp, curve.tp)
    np.testing.assert_array_equal(lazy.fp, curve.fp)
    assert lazy.average_precision == curve.average_precision


def test_pr_curve_exact_when_logits_lie_on_edges():
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 10, (6, 7, 8)).astype(np.float32)
    truth = rng.random(logits.shape) < logits / 12
    curve = pr_curve(logits, truth, bins=10, range=(0, 10))  # left edges 0, 1, ..., 9: one per value
    thresholds, tp, fp, ap = exact_pr(logits.ravel(), truth.ravel())
    np.testing.assert_array_equal(curve.thresholds, thresholds[::-1])
    np.testing.assert_array_equal(curve.tp, tp[::-1])
    np.testing.assert_array_equal(curve.fp, fp[::-1])
    assert curve.average_precision == pytest.approx(ap, abs=1e-12)


def test_pr_curve_with_a_given_range():
    logits = np.array([-3.0, 0.1, 0.3, 0.6, 0.9, 5.0])
    truth = np.array([1, 0, 1, 0, 1, 1])
    curve = pr_curve(logits, truth, bins=4, range=(0, 1))
    # above the range: always predicted; below it: never, but still counted as positives to find
    np.testing.assert_array_equal(curve.tp, [3, 3, 2, 2])
    np.testing.assert_array_equal(curve.fp, [2, 1, 1, 0])
    assert curve.recall[0] == 3 / 4


def test_pr_curve_without_positives_has_no_ap():
    curve = pr_curve(np.arange(5.0), np.zeros(5))
    assert np.isnan(curve.average_precision)


# ---------------------------------------------------------------- picking


def brute_force(pred, truth, radius):
    """Most matches within radius, then least total distance, over every permutation."""
    d = cdist(pred, truth) if len(pred) and len(truth) else np.zeros((len(pred), len(truth)))
    best = (0, 0.0)
    for perm in itertools.permutations(range(max(len(pred), len(truth)))):
        pairs = [(i, j) for i, j in zip(range(len(pred)), perm) if j < len(truth) and d[i, j] <= radius]
        best = max(best, (len(pairs), -sum(d[i, j] for i, j in pairs)))
    return best[0], -best[1]


points = st.integers(0, 5).flatmap(lambda n: arrays(np.float64, (n, 2), elements=st.integers(0, 6).map(float)))


@settings(max_examples=150, deadline=None)
@given(pred=points, truth=points, radius=st.sampled_from([0.0, 1.0, 1.5, 2.5]))
def test_matching_equals_brute_force(pred, truth, radius):
    m = match_picks(pred, truth, radius)
    tp, total = brute_force(pred, truth, radius)
    assert m.tp == tp
    assert m.distance.sum() == pytest.approx(total)
    assert len(set(m.pred_index.tolist())) == len(set(m.truth_index.tolist())) == m.tp  # one to one
    assert np.all(m.distance <= radius)


def test_hungarian_beats_greedy():
    pred = np.array([[0.0, 0.85], [0.0, -0.95]])
    truth = np.array([[0.0, 0.0], [0.0, 1.8]])
    # greedy: take the globally closest pair first (pred 0 - truth 0), then nothing else fits
    d = cdist(pred, truth)
    used_p, used_t = set(), set()
    for i, j in sorted(itertools.product(range(2), range(2)), key=lambda ij: d[ij]):
        if d[i, j] <= 1 and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    assert len(used_p) == 1
    m = match_picks(pred, truth, radius=1.0)
    assert m.tp == 2 and m.f1 == 1.0
    np.testing.assert_array_equal(m.truth_index, [1, 0])
    np.testing.assert_allclose(m.distance, [0.95, 0.95])


@pytest.mark.parametrize("dense_limit", [picking.DENSE_LIMIT, 0])  # 0: every component via the sparse solver
def test_components_equal_one_dense_assignment(monkeypatch, dense_limit):
    monkeypatch.setattr(picking, "DENSE_LIMIT", dense_limit)
    rng = np.random.default_rng(7)
    truth = rng.uniform(0, 60, (300, 3))
    pred = np.concatenate([truth[:250] + rng.normal(0, 2, (250, 3)), rng.uniform(0, 60, (40, 3))])
    radius = 4.0
    m = match_picks(pred, truth, radius)
    d = cdist(pred, truth)
    cost = np.where(d <= radius, d, 1e6)
    a, b = linear_sum_assignment(cost)
    real = cost[a, b] < 1e6
    assert m.tp == real.sum()
    assert m.distance.sum() == pytest.approx(cost[a, b][real].sum())
    np.testing.assert_allclose(m.distance, d[m.pred_index, m.truth_index])


def test_scores_and_empty_inputs():
    s = picking_scores([[0, 0], [5, 5], [9, 9]], [[0, 1], [5, 6.5]], radius=1.5)
    assert s == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "tp": 2, "fp": 1, "fn": 0})
    none = np.empty((0, 3))
    assert picking_scores(none, none, 1) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0}
    assert picking_scores(none, [[1, 2, 3]], 1) == {**zero, "fp": 0, "fn": 1}
    assert picking_scores([[1, 2, 3]], none, 1) == {**zero, "fp": 1, "fn": 0}
    far = picking_scores([[0, 0, 0]], [[9, 9, 9]], 1)
    assert far["f1"] == 0.0 and far["fp"] == 1 and far["fn"] == 1


def test_radius_is_inclusive_and_identical_points_match():
    assert match_picks([[0, 0]], [[0, 2]], 2.0).tp == 1
    m = match_picks([[1, 1], [1, 1]], [[1, 1]], 0.0)
    assert m.tp == 1 and m.distance.tolist() == [0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="dimensions"):
        match_picks([[0, 0]], [[0, 0, 0]], 1)
    with pytest.raises(ValueError, match="radius"):
        match_picks([[0, 0]], [[0, 0]], -1)
