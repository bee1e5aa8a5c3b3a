"""Intensity normalisations fixed by one pass over the whole volume, applied to any slab."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.errors import InputError
from cryodask.io.normalize import robust_range, unit_reader


def test_robust_range_and_unit_reader():
    v = np.random.default_rng(3).normal(size=(9, 10, 11)).astype(np.float32)
    lo, hi = robust_range(lambda reg: v[reg], v.shape, slab_voxels=150)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(v, [0.5, 99.5])))
    read = unit_reader(lambda reg: v[reg], (lo, hi))
    out = read((slice(0, 9), slice(0, 10), slice(0, 11)))
    assert out.min() == 0 and out.max() == 1 and out.dtype == np.float32
    with pytest.raises(InputError, match="constant"):
        robust_range(lambda reg: np.ones((2, 2, 2), np.float32)[reg], (2, 2, 2))
