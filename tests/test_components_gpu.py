"""The GPU block labelling gives exactly scipy's components (same partition, any ids)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage

from cryodask.errors import InputError
from cryodask.postprocess.gpu import gpu_available, label_block_gpu

RANK = {6: 1, 18: 2, 26: 3}


def assert_same_partition(labels, n, reference, n_reference):
    """Same background, same number of components, and ids map one-to-one (a bijection)."""
    assert labels.shape == reference.shape
    assert ((labels == 0) == (reference == 0)).all()
    assert n == n_reference
    fg = reference > 0
    pairs = np.unique(np.stack([labels[fg].astype(np.int64), reference[fg].astype(np.int64)]), axis=1)
    # a bijection: every id appears in exactly one pair, on both sides
    assert pairs.shape[1] == n_reference
    assert len(np.unique(pairs[0])) == n_reference and len(np.unique(pairs[1])) == n_reference
    assert pairs[0].min(initial=1) >= 1 and pairs[0].max(initial=0) <= n


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.35, 0.6])
def test_gpu_labels_equal_scipy(connectivity, density):
    rng = np.random.default_rng(int(density * 100) + connectivity)
    block = (rng.random((40, 70, 90)) < density).astype(np.uint8)
    labels, n = label_block_gpu(block, connectivity)
    assert labels.dtype == np.uint32 and isinstance(n, int)
    reference, n_reference = ndimage.label(block, ndimage.generate_binary_structure(3, RANK[connectivity]))
    assert_same_partition(labels, n, reference, n_reference)


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
def test_gpu_empty_and_full_blocks():
    for block, expected in ((np.zeros((8, 9, 10), np.uint8), 0), (np.ones((8, 9, 10), bool), 1)):
        labels, n = label_block_gpu(block, 26)
        assert n == expected and labels.max() == expected


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_without_cupy_is_a_one_line_input_error():
    with pytest.raises(InputError) as info:
        label_block_gpu(np.ones((4, 4, 4), np.uint8), 26)
    message = str(info.value)
    assert "\n" not in message and "CuPy" in message and "cryodask[gpu]" in message
