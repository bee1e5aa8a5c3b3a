"""CryoSAM's instances painted region by region: the same ids in every block, higher scores on top."""

from __future__ import annotations

import numpy as np

from cryodask.prompting.instances import instance_ids, instance_labels, semantic_mask
from cryodask.prompting.selfprompt import Instance


def test_instance_labels_and_semantic_mask_region_wise():
    rng = np.random.default_rng(1)
    shape = (10, 12, 14)
    instances = []
    for _ in range(6):
        lo = rng.integers(0, 6, 3)
        size = rng.integers(1, 6, 3)
        box = tuple(slice(int(a), int(min(a + s, n))) for a, s, n in zip(lo, size, shape))
        instances.append((box, rng.random([b.stop - b.start for b in box]) < 0.6))
    scores = rng.random(6)
    whole = instance_labels(instances, shape, scores=scores)
    ids = instance_ids(instances, scores)
    assert sorted(ids) == list(range(1, 7)) and ids[np.argmax(scores)] == 1
    expected = np.zeros(shape, np.uint32)  # brute force: highest score wins every voxel
    best = np.full(shape, -np.inf)
    for (box, mask), s, i in zip(instances, scores, ids):
        full_mask = np.zeros(shape, bool)
        full_mask[box] = mask
        take = full_mask & (s > best)
        expected[take], best[take] = i, s
    assert (whole == expected).all() and whole.dtype == np.uint32
    for region in [(slice(0, 5), slice(0, 12), slice(7, 14)), (slice(3, 10), slice(4, 8), slice(0, 14))]:
        assert (instance_labels(instances, region, scores=scores) == whole[region]).all()
        assert (semantic_mask(instances, region) == (whole[region] > 0)).all()
    # scores default to the instances' own, else the input order
    inst = [Instance(b, m, None, s) for (b, m), s in zip(instances, scores)]
    assert (instance_labels(inst, shape) == whole).all()
    assert list(instance_ids(instances)) == [1, 2, 3, 4, 5, 6]
