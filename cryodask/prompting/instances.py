"""CryoSAM's instances painted into label volumes, region by region, so blocks agree.

An instance is a ``(box, mask)`` pair (a :class:`~cryodask.prompting.selfprompt.Instance` or
any such pair). Ids follow the scores, the same in every region, so an output written block
by block is the one the whole volume would give.
"""

from __future__ import annotations

import numpy as np

from ..engine.blocks import overlap
from ..errors import InputError


def check_instance(inst, i):
    try:
        box, mask = inst[0], np.asarray(inst[1], bool)
        box = tuple(slice(int(s.start), int(s.stop)) for s in box)
    except (TypeError, IndexError, AttributeError, ValueError):
        raise InputError(f"instance {i} must be a (box, mask) pair") from None
    if len(box) != 3 or mask.shape != tuple(s.stop - s.start for s in box):
        raise InputError(f"instance {i}: mask shape {mask.shape} does not fit its box {box}")
    return box, mask


def instance_ids(instances, scores=None) -> np.ndarray:
    """The label id of each instance: 1 for the highest score, N for the lowest (ties: input
    order). ``scores`` default to each instance's ``score``, else the input order."""
    n = len(instances)
    if scores is None:
        scores = [getattr(inst, "score", None) for inst in instances]
        if any(s is None for s in scores):
            scores = -np.arange(n, dtype=np.float64)
    scores = np.asarray(scores, np.float64)
    if scores.shape != (n,) or not np.isfinite(scores).all():
        raise InputError(f"scores must be {n} finite numbers, one per instance")
    ids = np.empty(n, np.int64)
    ids[np.argsort(-scores, kind="stable")] = np.arange(1, n + 1)
    return ids


def _region(region) -> tuple[slice, ...]:
    items = tuple(region)
    if len(items) == 3 and all(isinstance(r, (int, np.integer)) for r in items):
        return tuple(slice(0, int(n)) for n in items)
    if len(items) != 3 or not all(isinstance(r, slice) for r in items):
        raise InputError(f"region must be 3 slices (or a shape), got {region!r}")
    return tuple(slice(int(r.start or 0), int(r.stop)) for r in items)


def instance_labels(instances, region, *, scores=None, dtype=np.uint32) -> np.ndarray:
    """Paint instances into the label volume of one region (a block of the output).

    Ids are 1..N by score order (:func:`instance_ids`, the same for every region, so blocks
    agree); where instances overlap the higher score keeps the voxel. ``region`` is three
    slices of the volume, or a shape for the whole of it.

    Examples
    --------
    >>> a = ((slice(0, 1), slice(0, 2), slice(0, 2)), np.ones((1, 2, 2), bool))
    >>> b = ((slice(0, 1), slice(1, 3), slice(1, 3)), np.ones((1, 2, 2), bool))
    >>> instance_labels([a, b], (1, 3, 3), scores=[0.2, 0.9])[0].tolist()
    [[2, 2, 0], [2, 1, 1], [0, 1, 1]]
    """
    region = _region(region)
    items = [check_instance(inst, i) for i, inst in enumerate(instances)]
    ids = instance_ids(instances, scores)
    out = np.zeros([r.stop - r.start for r in region], dtype)
    for k in np.argsort(-ids, kind="stable"):  # lowest score first: higher scores paint over it
        box, mask = items[k]
        common = overlap(region, box)
        if common is None:
            continue
        here, there = common
        out[here][mask[there]] = ids[k]
    return out


def semantic_mask(instances, region) -> np.ndarray:
    """The union of the instance masks in one region: CryoSAM's semantic segmentation."""
    return instance_labels(instances, region, scores=np.zeros(len(instances))) > 0


def centre(instance) -> np.ndarray:
    """An instance's mask centroid, z, y, x voxels (its prompt ``point`` where the mask is empty)."""
    box, mask = instance[0], np.asarray(instance[1], bool)
    if mask.size and mask.any():
        return np.array([b.start + float(np.mean(c)) for b, c in zip(box, np.nonzero(mask))])
    return np.asarray(instance.point, np.float64)


def _paint(block_info=None, instances=None, scores=None):
    region = tuple(slice(a, b) for a, b in block_info[None]["array-location"])
    return instance_labels(instances, region, scores=scores)


def lazy_instance_labels(instances, shape, chunks, *, scores=None):
    """The label volume of :func:`instance_labels` as a lazy dask array: each chunk painted when
    read (napari draws only the slices it shows; a writer goes chunk by chunk)."""
    import dask.array as da

    items = list(instances)
    scores = instance_ids(items, scores) * -1.0  # fixes the ids once: the same in every chunk
    chunks = da.empty(tuple(int(n) for n in shape), chunks=chunks).chunks
    return da.map_blocks(_paint, dtype=np.uint32, chunks=chunks, instances=items, scores=scores)
