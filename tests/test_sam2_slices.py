"""SAM2 slice driving without a model: how slices map to SAM2's input and logits (stretched or
padded, non-square), and the byte-bounded LRU of slice embeddings."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from cryodask.errors import InputError  # noqa: E402
from cryodask.models.sam2_slices import EmbeddingCache, SliceGeometry  # noqa: E402


def test_geometry_of_non_square_slices():
    g = SliceGeometry(32, 64, 128, 32)  # stretch: rows x4, columns x2
    assert g.to_model(0, 0) == (0.5, 1.5) and g.to_model(31, 63) == (127.5 - 1, 127.5 - 2)
    for r, c in [(0, 0), (10, 20), (31, 63)]:  # low-res pixel under a point maps back next to it
        x, y = g.to_model(r, c)
        i, j = int((y + 0.5) // 4), int((x + 0.5) // 4)
        rr, cc = g.lowres_to_slice(i, j)
        assert abs(rr - r) <= 1 and abs(cc - c) <= 2
    assert g.upsample(np.zeros((3, 32, 32))).shape == (3, 32, 64)
    p = SliceGeometry(32, 64, 128, 32, "pad")  # aspect kept: 64 x 128 of content, rows 64.. padding
    assert p.content == (64, 128) and p.lowres_content() == (16, 32) and p.scale == (2.0, 2.0)
    logits = np.zeros((32, 32), np.float32)
    logits[20, 3] = 9  # in the padding: ignored
    logits[5, 7] = 1
    assert p.argmax(logits) == p.lowres_to_slice(5, 7) == (11, 15)
    images = p.images(np.ones((2, 32, 64), np.float32)).numpy()
    assert images.shape == (2, 3, 128, 128) and (images[:, :, 64:] == 0).all()
    np.testing.assert_allclose(images[0, :, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225],
                               rtol=1e-5)
    up = p.upsample(np.ones((1, 32, 32)))
    assert up.shape == (1, 32, 64)


def test_embedding_cache_is_lru_and_bounded():
    cache = EmbeddingCache(max_bytes=30)
    for i in range(4):
        cache.put(("z", i), i, 10)
    assert ("z", 0) not in cache and len(cache) == 3 and cache.nbytes == 30
    assert cache.get(("z", 1)) == 1  # now the most recent
    cache.put(("z", 9), 9, 10)
    assert ("z", 2) not in cache and ("z", 1) in cache
    assert (cache.hits, cache.misses) == (1, 0)
    cache.bind("a")
    with pytest.raises(InputError):
        cache.bind("b")


def test_negative_points_reach_sam2_as_background_labels():
    """Real SAM2 (hiera-t, random weights): a negative point is a second prompt point labelled 0,
    which changes the decoded logits; without one the call is SAM2's single positive point."""
    pytest.importorskip("sam2")
    import numpy as np

    from cryodask.models.sam2 import build_predictor
    from cryodask.models.sam2_slices import SAM2Slices

    volume = np.random.default_rng(0).random((8, 40, 48)).astype(np.float32)
    decoder = SAM2Slices(build_predictor("sam2.1_hiera_t", image_size=128), lambda r: volume[r], volume.shape)
    alone, iou = decoder.decode("z", 4, (20, 24), None)
    again, _ = decoder.decode("z", 4, (20, 24), None, negatives=[])
    cut, iou_cut = decoder.decode("z", 4, (20, 24), None, negatives=[(10.0, 30.0), (30.0, 10.0)])
    assert alone.shape == cut.shape == (3, 32, 32) and iou.shape == iou_cut.shape == (3,)
    np.testing.assert_array_equal(alone, again)
    assert not np.allclose(alone, cut)
