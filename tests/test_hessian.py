"""The fast numerics of the classical filter against LAPACK's eigh and scipy's map_coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cryodask.membranes import classical
from cryodask.membranes.classical import ClassicalParams, membrane_score
from cryodask.membranes.hessian import PAIRS, GaussianHessian, ridge, sheet_eigen
from cryodask.synth import synth_tomogram


def symmetric_cases(n=30000, seed=0) -> np.ndarray:
    """(N, 3, 3) float32 symmetric matrices: random, plus the cases a closed form gets wrong."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 3, 3))
    cases = [(a + a.transpose(0, 2, 1)) / 2]
    rotations = np.linalg.qr(rng.normal(size=(500, 3, 3)))[0]
    for eigenvalues in ([3, 1, 1], [1, 1, -2], [1, 1 + 1e-4, -2], [2, 2, 2], [0, 0, 0], [5, -5, 0], [1e-3, 0, 0],
                        [1 + 1e-6, 1, 1 - 1e-6], [-1, -1, -1 + 1e-3]):
        cases.append(rotations @ np.diag(eigenvalues) @ rotations.transpose(0, 2, 1))
        cases.append(np.broadcast_to(np.diag(eigenvalues), (5, 3, 3)))  # diagonal, unrotated
    cases.append(cases[0][:500] * 1e6)  # scale does not matter
    cases.append(cases[0][:500] * 1e-6)
    cases.append(np.zeros((3, 3, 3)))
    return np.concatenate(cases).astype(np.float32)


def fields(matrices: np.ndarray) -> dict:
    """The six entries as (N, 1, 1) fields, the layout ``sheet_eigen`` takes."""
    return {(i, j): np.ascontiguousarray(matrices[:, i, j]).reshape(-1, 1, 1) for i, j in PAIRS}


def test_closed_form_eigen_matches_eigh():
    matrices = symmetric_cases()
    score, normal = sheet_eigen(fields(matrices))
    score, normal = score.reshape(-1), normal.reshape(-1, 3)
    w, v = np.linalg.eigh(matrices.astype(np.float64))  # ascending
    size = np.linalg.norm(matrices.reshape(len(matrices), -1), axis=1).astype(np.float64)
    expected = w[:, 2] - np.abs(w[:, 1])
    # float32 accuracy relative to the matrix, degenerate and near-degenerate ones included
    assert np.all(np.abs(score - expected) <= 2e-6 * size + 1e-30), np.abs(score - expected).max()
    # the normal: a unit vector, eigh's λ_max eigenvector up to sign where λ_max is well separated
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-6)
    separated = (w[:, 2] - w[:, 1]) > 1e-2 * size
    assert separated.sum() > 0.7 * len(matrices)  # most cases test the normal
    dots = np.abs(np.einsum("ni,ni->n", normal[separated], v[separated, :, 2]))
    assert dots.min() > 1 - 1e-5
    # where λ_max is (nearly) double, any unit vector of its plane is right: orthogonal to λ_min's
    double = ((w[:, 2] - w[:, 1]) < 1e-6 * size) & ((w[:, 1] - w[:, 0]) > 1e-2 * size)
    assert double.sum() >= 500
    assert np.abs(np.einsum("ni,ni->n", normal[double], v[double, :, 0])).max() < 1e-3


def test_score_only_and_scaled_entries():
    matrices = symmetric_cases(2000, seed=1)
    h = fields(matrices)
    scale = {(i, j): 3.0 * (i + 1) * (j + 1) for i, j in PAIRS}
    alone = sheet_eigen(h, scale, normal=False)
    scaled = matrices * np.float32(3.0) * np.outer([1, 2, 3], [1, 2, 3]).astype(np.float32)
    size = np.linalg.norm(scaled.reshape(len(scaled), -1), axis=1).reshape(alone.shape)
    assert np.all(np.abs(alone - sheet_eigen(fields(scaled), normal=False)) <= 2e-6 * size)
    np.testing.assert_array_equal(alone, sheet_eigen(h, scale)[0])


def test_hessian_on_a_region_equals_the_full_hessian_cropped():
    x = np.random.default_rng(2).normal(size=(30, 34, 38)).astype(np.float32)
    sigmas = (2.0, 3.0, 1.5)
    hessian = GaussianHessian(x, sigmas, 4.0)
    region = (slice(5, 20), slice(3, 31), slice(0, 38))
    part = hessian.at(region)
    assert set(hessian) == set(PAIRS) and len(hessian) == 6
    for (i, j), h in part.items():
        order = [0, 0, 0]
        order[i] += 1
        order[j] += 1
        direct = ndi.gaussian_filter(x, sigmas, order=order, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(hessian[i, j], direct, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(h, hessian[i, j][region])  # bit for bit: cropping commutes


def test_ridge_equals_map_coordinates():
    rng = np.random.default_rng(3)
    score = ndi.gaussian_filter(rng.normal(size=(14, 20, 24)), 1.5).astype(np.float32)
    score[:3] = 0.25  # a flat stretch: ties must count as ridge, as with map_coordinates
    normal = rng.normal(size=score.shape + (3,)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    for inner, steps in (((slice(0, 14), slice(0, 20), slice(0, 24)), (1.0, 1.0, 1.0)),  # the edges clamp
                         ((slice(1, 13), slice(2, 19), slice(1, 23)), (0.5, 1.0, 1.0))):  # anisotropic
        n = normal[inner]
        got = ridge(score, n, inner, steps)
        grid = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float64) for s in inner), indexing="ij")
        centre = score[inner]
        expected = np.ones(centre.shape, bool)
        for sign in (1, -1):
            coords = np.stack([g + sign * n[..., a] * steps[a] for a, g in enumerate(grid)])
            value = ndi.map_coordinates(score, coords, order=1, mode="nearest", prefilter=False)  # float32, as before
            expected &= centre >= value
        assert 0.05 < expected.mean() < 0.95 and expected[:2 - inner[0].start].all()  # z <= 1: flat around
        mismatch = got != expected
        assert mismatch.sum() <= 0.001 * got.size, mismatch.sum()


def test_membrane_score_equals_an_eigh_reference():
    t = synth_tomogram((40, 48, 56), voxel_size=10.0, seed=1, snr=0.3)
    spacing = (12.0, 10.0, 10.0)
    params = ClassicalParams()
    mean, std = float(t.volume.mean()), float(t.volume.std())
    score = membrane_score(t.volume, spacing, params, mean=mean, std=std)
    # the direct route: float64, scipy's n-D Gaussian derivatives, eigh per voxel
    x = (t.volume.astype(np.float64) - mean) / std
    sigma = params.sigma()
    h = np.empty(x.shape + (3, 3))
    for i, j in PAIRS:
        order = [0, 0, 0]
        order[i] += 1
        order[j] += 1
        h[..., i, j] = h[..., j, i] = ndi.gaussian_filter(x, [sigma / s for s in spacing], order=order,
                                                          mode="reflect", truncate=4.0) \
            * sigma**2 / (spacing[i] * spacing[j])
    w = np.linalg.eigvalsh(h)
    expected = w[..., 2] - np.abs(w[..., 1])
    scale = np.abs(expected).max()
    assert scale > 0.05
    np.testing.assert_allclose(score, expected, atol=1e-5 * scale)


def test_histogram_counts_as_in_float64():
    score = np.random.default_rng(4).standard_normal(200000).astype(np.float32) * np.float32(0.3)
    score[:4] = [0, 1e30, -1e30, -1e-30]  # far beyond the histogram's range at both ends
    counts = classical._histogram(score)
    u = np.arcsinh(score.astype(np.float64) / classical.HIST_EPS)
    index = np.clip(((u + classical.HIST_U) * (classical.HIST_BINS / (2 * classical.HIST_U))).astype(np.int64), 0,
                    classical.HIST_BINS - 1)
    expected = np.bincount(index, minlength=classical.HIST_BINS)
    assert counts.sum() == score.size and counts.shape == expected.shape
    # float32 rounding moves the values that lie within ~1e-4 bin of an edge to the next bin: a few
    assert np.abs(counts - expected).sum() <= 1e-3 * score.size
    assert np.abs(np.cumsum(counts) - np.cumsum(expected)).max() <= 1e-4 * score.size
    assert classical.robust_stats(counts) == pytest.approx(classical.robust_stats(expected), rel=1e-3)
