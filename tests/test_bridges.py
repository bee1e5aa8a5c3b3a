"""ETSAM's per-slice bridge removal (``cryodask.postprocess.bridges``).

The geometric tests check what the step is for (cut short rungs between parallel membranes,
leave membranes alone); the oracle tests check that it follows ETSAM's definitions exactly
(``sever_connections_bridge`` in github.com/jianlin-cheng/ETSAM ``postprocess.py``, commits
d5c8de3 / 4c8169d): ``_oracle`` restates them pixel by pixel with plain loops and sets, so the
vectorised bookkeeping in the module is checked against a literal reading of the algorithm.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from cryodask.errors import InputError
from cryodask.postprocess.bridges import remove_bridges, remove_bridges_slice

EIGHT = np.ones((3, 3), bool)
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _oracle(mask: np.ndarray, max_bridge_len: int = 5, max_spur_len: int = 0) -> np.ndarray:
    """ETSAM's rule, one pixel at a time: bool (y, x) in, bool out."""
    if not mask.any():
        return mask.copy()
    skel = skeletonize(mask)
    h, w = skel.shape
    pixels = list(zip(*np.nonzero(skel)))

    def neighbours(y, x):
        return [(y + dy, x + dx) for dy, dx in NEIGHBOURS
                if 0 <= y + dy < h and 0 <= x + dx < w and skel[y + dy, x + dx]]

    degree = {p: len(neighbours(*p)) for p in pixels}
    junctions = np.zeros_like(skel)
    for p in pixels:
        junctions[p] = degree[p] >= 3
    seg_lbl, n_seg = ndi.label(skel & ~junctions, structure=EIGHT)
    jun_lbl, _ = ndi.label(junctions, structure=EIGHT)

    size, touched, has_end = {}, {}, {}
    for p in pixels:
        s = seg_lbl[p]
        if s:
            size[s] = size.get(s, 0) + 1
            touched.setdefault(s, set()).update(jun_lbl[q] for q in neighbours(*p) if jun_lbl[q])
            has_end[s] = has_end.get(s, False) or degree[p] == 1
    removed = set()
    for s in range(1, n_seg + 1):
        if size[s] <= max_bridge_len and len(touched[s]) >= 2:
            removed.add(s)
        elif 0 < max_spur_len and size[s] <= max_spur_len and len(touched[s]) == 1 and has_end[s]:
            removed.add(s)
    if not removed:
        return mask.copy()
    nearest = ndi.distance_transform_edt(~skel, return_distances=False, return_indices=True)
    owner = seg_lbl[tuple(nearest)]
    out = mask.copy()
    for y in range(h):
        for x in range(w):
            if owner[y, x] in removed:
                out[y, x] = False
    return out


def ladder(gap: int, width: int = 3, rung: int = 3, length: int = 40) -> np.ndarray:
    """Two horizontal membranes ``width`` thick, ``gap`` apart, joined by one vertical rung.

    The rung's skeleton segment is ``gap`` pixels long.
    """
    m = np.zeros((32, length), bool)
    m[4:4 + width, 3:-3] = True
    m[4 + width + gap:4 + 2 * width + gap, 3:-3] = True
    c = length // 2 - rung // 2
    m[4:4 + 2 * width + gap, c:c + rung] = True
    return m


def ring(stub: int = 0) -> np.ndarray:
    """A thick closed ring (no junctions), optionally with a 3-px-wide stub sticking out right."""
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    m = (r >= 9) & (r <= 11.5)
    m[19:22, 31:32 + stub] = True
    return m


def smooth_mask(seed: int, shape=(24, 24)) -> np.ndarray:
    """Blobby and membrane-like masks: thresholded smooth noise, optionally hollowed out."""
    rng = np.random.default_rng(seed)
    m = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.8, 2.0)) > rng.uniform(0.45, 0.55)
    if seed % 2:
        m &= ~ndi.binary_erosion(m, EIGHT)
    return m


def n_components(m: np.ndarray) -> int:
    return ndi.label(m, structure=EIGHT)[1]


# --- what the step is for -------------------------------------------------------------------

@pytest.mark.parametrize("gap", [2, 3, 5])
def test_short_bridge_is_cut_and_membranes_kept(gap):
    m = ladder(gap)
    out = remove_bridges_slice(m)
    assert n_components(m) == 1 and n_components(out) == 2
    removed = m & ~out
    assert removed.any() and not (out & ~m).any()
    rung_only = m.copy()
    rung_only[4:7, :] = rung_only[7 + gap:10 + gap, :] = False   # the rung between the membranes
    assert np.array_equal(removed, rung_only)                    # membranes untouched


def test_bridge_longer_than_max_bridge_len_is_kept():
    m = ladder(6)
    assert np.array_equal(remove_bridges_slice(m), m)
    assert np.array_equal(remove_bridges_slice(m, max_bridge_len=5), m)
    assert n_components(remove_bridges_slice(m, max_bridge_len=6)) == 2


def test_simple_shapes_without_junction_pairs_are_unchanged():
    from skimage.draw import circle_perimeter, line

    canvas = np.zeros((40, 40), bool)
    thin_line = canvas.copy()
    thin_line[line(2, 3, 35, 30)] = True
    circle = canvas.copy()
    circle[circle_perimeter(20, 20, 12)] = True
    tee = canvas.copy()
    tee[5, 5:35] = True
    tee[5:30, 20] = True  # one junction only: no rung
    for m in (thin_line, circle, ring(), tee, ndi.binary_dilation(thin_line, EIGHT)):
        assert np.array_equal(remove_bridges_slice(m), m)


def test_spurs_are_pruned_only_when_asked_and_short():
    m = ring(stub=4)  # the stub's skeleton spur is 3 px long
    assert np.array_equal(remove_bridges_slice(m), m)                   # default: off
    assert np.array_equal(remove_bridges_slice(m, max_spur_len=2), m)   # too long to prune
    out = remove_bridges_slice(m, max_spur_len=3)
    removed = m & ~out
    assert removed.sum() == 12 and removed[:, :32].sum() == 0           # only the stub goes
    assert np.array_equal(out, ring())


# --- the 3D wrapper: per-slice, slab-safe, dtype-preserving ---------------------------------

@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(0, 4), st.integers(1, 14), st.integers(1, 14))),
       st.integers(0, 7), st.integers(0, 4), st.integers(0, 4))
def test_slices_are_independent(mask, max_bridge_len, max_spur_len, cut):
    out = remove_bridges(mask, max_bridge_len, max_spur_len)
    expected = [remove_bridges_slice(s, max_bridge_len, max_spur_len) for s in mask]
    assert np.array_equal(out, np.array(expected).reshape(mask.shape))
    cut = min(cut, len(mask))  # any z-slab split (as dask blocks) gives the same volume
    slabs = [remove_bridges(mask[:cut], max_bridge_len, max_spur_len),
             remove_bridges(mask[cut:], max_bridge_len, max_spur_len)]
    assert np.array_equal(np.concatenate(slabs), out)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.uint16, np.int32, np.float32])
def test_dtype_preserved_and_input_untouched(dtype):
    vol = np.stack([ladder(3), np.zeros_like(ladder(3)), ladder(8)]).astype(dtype)
    before = vol.copy()
    out = remove_bridges(vol)
    assert out.dtype == vol.dtype and np.array_equal(vol, before)
    assert n_components(out[0]) == 2 and not out[1].any() and np.array_equal(out[2], vol[2])
    assert np.array_equal(remove_bridges_slice(vol[0]), out[0])


def test_non_binary_values_become_one_like_etsam():
    m = ladder(3).astype(np.uint8) * 255
    out = remove_bridges_slice(m)
    assert set(np.unique(out)) == {0, 1}
    assert np.array_equal(out, remove_bridges_slice(m > 0).astype(np.uint8))


@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 3), (1, 1, 1), (3, 2, 2), (2, 1, 9),
                                   (1, 30, 30)])
@pytest.mark.parametrize("fill", [0, 1])
def test_empty_full_and_tiny_inputs(shape, fill):
    for dtype in (np.bool_, np.uint8):
        vol = np.full(shape, fill, dtype)
        out = remove_bridges(vol)
        assert out.shape == vol.shape and out.dtype == vol.dtype
        assert np.array_equal(out, vol)  # a full slice skeletonizes to a junction-free line


def test_wrong_dimensionality_is_an_input_error():
    with pytest.raises(InputError):
        remove_bridges(np.zeros((4, 4), bool))
    with pytest.raises(InputError):
        remove_bridges_slice(np.zeros((2, 4, 4), bool))


# --- exact agreement with ETSAM's definitions -----------------------------------------------

@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 16), st.integers(1, 16))),
       st.integers(0, 8), st.integers(0, 6))
def test_matches_oracle_on_random_masks(mask, max_bridge_len, max_spur_len):
    assert np.array_equal(remove_bridges_slice(mask, max_bridge_len, max_spur_len),
                          _oracle(mask, max_bridge_len, max_spur_len))


@pytest.mark.parametrize("seed", range(24))
def test_matches_oracle_on_membrane_like_masks(seed):
    m = smooth_mask(seed)
    for max_bridge_len, max_spur_len in [(5, 0), (3, 0), (8, 4)]:
        got = remove_bridges_slice(m, max_bridge_len, max_spur_len)
        assert np.array_equal(got, _oracle(m, max_bridge_len, max_spur_len))
