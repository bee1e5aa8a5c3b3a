"""Cross-Plane Self-Prompting: the propagation rule on known per-slice masks, the geometry, the
embedding cache and the whole path on a small random SAM2 (the real model code, random weights:
masks are arbitrary, so the logic is checked, not the quality)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cryodask.errors import InputError
from cryodask.io.normalize import robust_range, unit_reader
from cryodask.models.sam2_slices import EmbeddingCache, SAM2Slices, SliceDecoder, SliceGeometry
from cryodask.prompting.instances import semantic_mask
from cryodask.prompting.selfprompt import Instance, SelfPromptParams, segment_instance, segment_instances, self_prompt

N = 12  # side of the cube the known-mask tests run on


# ------------------------------------------------------------------ a decoder with known masks

def box_mask(r0, r1, c0, c1, n=N):
    m = np.zeros((n, n), bool)
    m[r0:r1, c0:c1] = True
    return m


class Known(SliceDecoder):
    """Per (view, slice) candidates given as (mask, score, peak): logits +1 inside, -1 outside,
    +2 at ``peak``; identity geometry (low-res grid = slice pixels). Records every call."""

    def __init__(self, table, n=N):
        self.table, self.n, self.calls, self.needed = table, n, [], []

    def geometry(self, view):
        return SliceGeometry(self.n, self.n, self.n, self.n)

    def need(self, view, indices):
        self.needed.append((view, list(indices)))

    def decode(self, view, index, point_rc, mask_input, multimask=True):
        self.calls.append((view, index, tuple(point_rc), None if mask_input is None else np.array(mask_input)))
        cands = self.table.get((view, index), [])
        if not cands:  # one candidate that is empty: never passes
            return np.full((1, self.n, self.n), -1, np.float32), np.array([0.9], np.float32)
        logits = []
        for mask, _, peak in cands:
            lg = np.where(mask, 1.0, -1.0).astype(np.float32)
            lg[peak] = 2.0
            logits.append(lg)
        return np.stack(logits), np.array([s for _, s, _ in cands], np.float32)


def run(table, point=(6, 6, 6), **params):
    decoder = Known(table)
    inst = self_prompt(decoder, (N, N, N), point, SelfPromptParams(**{"views": ("z",), "max_area": N * N, **params}))
    return inst, decoder


def full(inst, shape=(N, N, N)):
    out = np.zeros(shape, bool)
    out[inst[0]] = inst[1]
    return out


def test_stops_exactly_when_iou_drops_below_threshold():
    base = box_mask(2, 6, 2, 6)  # 16 px
    plus16 = base | box_mask(8, 12, 8, 12)  # IoU with base: 16 / 32 = 0.5 exactly: kept
    part = box_mask(2, 6, 2, 6) & ~box_mask(2, 3, 2, 3)  # 15 px: IoU with plus16 = 15/32 < 0.5: stop
    table = {("z", 6): [(base, 0.9, (3, 3))], ("z", 7): [(plus16, 0.9, (4, 4))], ("z", 8): [(part, 0.9, (4, 4))],
             ("z", 9): [(part, 0.9, (4, 4))],
             ("z", 5): [(box_mask(2, 6, 2, 7), 0.9, (3, 3))],  # 16/20 = 0.8: kept
             ("z", 4): [(box_mask(2, 6, 5, 12), 0.9, (3, 6))]}  # 8/40 < 0.5: stop
    inst, decoder = run(table)
    assert inst.extents == {"z": (5, 8)}
    assert [c[1] for c in decoder.calls] == [6, 7, 8, 5, 4]  # 9 and 3 are never asked for
    expected = np.zeros((N, N, N), bool)
    expected[5], expected[6], expected[7] = box_mask(2, 6, 2, 7), base, plus16
    assert (full(inst) == expected).all()
    # a lower threshold lets slice 8 (IoU 15/32) and 9 (IoU 1) through
    inst, _ = run(table, iou_threshold=0.45)
    assert inst.extents == {"z": (5, 10)}


def test_stops_at_volume_edge_and_at_max_extent():
    disc = box_mask(3, 8, 3, 8)
    table = {("z", i): [(disc, 0.8, (5, 5))] for i in range(N)}
    inst, decoder = run(table, point=(9, 5, 5))
    assert inst.extents == {"z": (0, N)} and sorted(c[1] for c in decoder.calls) == list(range(N))
    assert inst[0] == (slice(0, N), slice(3, 8), slice(3, 8)) and inst[1].all()
    inst, decoder = run(table, point=(9, 5, 5), max_extent=2)
    assert inst.extents == {"z": (7, N)}  # 2 below; 2 above would pass the edge at 11
    inst, _ = run(table, point=(6, 5, 5), max_extent=0)
    assert inst.extents == {"z": (6, 7)}
    # the derived cap: ceil(diameter) slices per direction
    inst, _ = run(table, point=(6, 5, 5), diameter_voxels=2.5)
    assert inst.extents == {"z": (3, 10)}


def test_next_prompt_is_argmax_of_previous_logits():
    table = {("z", 6): [(box_mask(2, 9, 2, 9), 0.9, (3, 7))],
             ("z", 7): [(box_mask(2, 9, 2, 9), 0.9, (8, 2))],
             ("z", 8): [(box_mask(2, 9, 2, 9), 0.9, (5, 5))]}
    inst, decoder = run(table, point=(6, 4.2, 5.7), max_extent=2)
    calls = {c[1]: c for c in decoder.calls}
    assert calls[6][2] == (4.2, 5.7) and calls[6][3] is None  # the prompted slice: the point alone
    assert calls[7][2] == (3, 7) and calls[8][2] == (8, 2) and calls[5][2] == (3, 7)
    first = np.where(box_mask(2, 9, 2, 9), 1.0, -1.0)
    first[3, 7] = 2.0
    np.testing.assert_array_equal(calls[7][3], first)  # the previous low-res logits as the mask prompt
    _, decoder = run(table, point=(6, 4, 5), max_extent=1, mask_prompt="binary")
    np.testing.assert_array_equal([c for c in decoder.calls if c[1] == 7][0][3],
                                  box_mask(2, 9, 2, 9).astype(np.float32))


def test_area_and_score_filters_pick_the_best_passing_candidate():
    big, neg, small, tiny = box_mask(0, 10, 0, 10), box_mask(4, 8, 4, 8), box_mask(5, 8, 5, 8), box_mask(6, 7, 6, 7)
    table = {("z", 6): [(big, 0.99, (5, 5)), (neg, -0.1, (5, 5)), (tiny, 0.3, (6, 6)), (small, 0.5, (6, 6))]}
    inst, _ = run(table, max_area=50, max_extent=0)  # big: 100 px, too large; neg: score <= 0
    assert inst[1].sum() == 9 and inst.score == pytest.approx(0.5)
    inst, _ = run(table, max_area=9, max_extent=0)  # area must be < max_area: only tiny
    assert inst[1].sum() == 1
    inst, _ = run(table, max_area=200, max_extent=0, score_threshold=0.995)  # nothing scores above it
    assert inst[1].size == 0 and inst[0] == (slice(6, 6), slice(6, 6), slice(6, 6)) and inst.extents == {"z": None}
    inst, _ = run(table, max_area=200, max_extent=0, score_threshold=-0.5)  # neg passes, big wins
    assert inst[1].sum() == 100
    # max_area = ceil((1.2 * 5)^2) = 36: small wins
    inst, _ = run(table, diameter_voxels=5, max_area=None, max_extent=0)
    assert inst[1].sum() == 9


def test_directions_are_united():
    z = box_mask(4, 8, 5, 7)  # rows y, columns x
    y = box_mask(5, 8, 3, 9)  # rows z, columns x
    x = box_mask(2, 10, 6, 7)  # rows z, columns y
    table = {("z", 6): [(z, 0.9, (6, 6))], ("z", 7): [(z, 0.9, (6, 6))],
             ("y", 5): [(y, 0.9, (6, 6))], ("x", 7): [(x, 0.9, (6, 6))], ("x", 6): [(x, 0.9, (6, 6))]}
    inst, decoder = run(table, point=(6, 5, 7), views=("x", "z", "y"))
    expected = np.zeros((N, N, N), bool)
    expected[6] |= z
    expected[7] |= z
    expected[:, 5, :] |= y
    expected[:, :, 7] |= x
    expected[:, :, 6] |= x
    assert (full(inst) == expected).all()
    assert inst.extents == {"z": (6, 8), "y": (5, 6), "x": (6, 8)}
    assert inst[0] == tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(expected))
    # each view's slice is prompted at its own in-plane coordinates: (y, x), (z, x), (z, y)
    firsts = {c[0]: c[2] for c in decoder.calls if c[3] is None}
    assert firsts == {"z": (5, 7), "y": (6, 7), "x": (6, 5)}


def test_params_and_prompts_are_validated_in_one_line():
    for bad in [dict(iou_threshold=1.5), dict(max_area=0), dict(max_extent=-1), dict(views=("z", "w")),
                dict(views=()), dict(resize="crop"), dict(mask_prompt="soft"), dict(diameter_voxels=0),
                dict(score_threshold=float("nan"))]:
        with pytest.raises(InputError):
            SelfPromptParams(**bad)
    assert SelfPromptParams(views=("x", "z")).views == ("z", "x")
    decoder = Known({})
    for point in [(12, 0, 0), (-1, 3, 3), (0, 0, 12.2), (1, 2), ("a", 1, 2), (np.nan, 1, 1)]:
        with pytest.raises(InputError) as err:
            segment_instance(None, None, (N, N, N), point, SelfPromptParams(), decoder=decoder)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"lies outside the volume of shape \(12, 12, 12\)"):
        segment_instances(lambda r: None, (N, N, N), [(1, 1, 1), (3, 12, 3)], SelfPromptParams(),
                          config="sam2.1_hiera_t", checkpoint=None, image_size=128, device="cpu")
    assert decoder.calls == []
    assert segment_instances(None, (N, N, N), [], SelfPromptParams(), config="x", checkpoint=None) == []
    with pytest.raises(InputError, match=r"\(N, 3\) array"):
        segment_instances(None, (N, N, N), [(1, 2)], SelfPromptParams(), config="x", checkpoint=None)


# ------------------------------------------------------------------ the real SAM2 code, random weights

pytest.importorskip("sam2")

SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on two shared cores are ~10x slower than one for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def predictor(seed=0):
    from cryodask.models.sam2 import build_predictor

    torch.manual_seed(seed)
    return build_predictor("sam2.1_hiera_t", image_size=SIZE)


@pytest.fixture(scope="module")
def tomo():
    from cryodask.synth.tomogram import synth_tomogram

    t = synth_tomogram((32, 64, 64), seed=0)
    lo, hi = robust_range(lambda r: t.volume[r], t.volume.shape)
    return t, unit_reader(lambda r: t.volume[r], (lo, hi)), (lo, hi)


# random weights give masks of about half a slice: allow them, and cap the extent to stay quick
E2E = SelfPromptParams(max_area=64 * 64, max_extent=3)


def test_sam2_end_to_end_is_bounded_and_deterministic(tomo):
    t, read, _ = tomo
    point = t.particles[0]
    model = predictor()
    inst = segment_instance(model, read, t.volume.shape, point, E2E)
    box, mask = inst
    assert mask.dtype == bool and mask.shape == tuple(s.stop - s.start for s in box)
    assert all(0 <= s.start <= s.stop <= n for s, n in zip(box, t.volume.shape))
    voxel = np.floor(np.asarray(point) + 0.5).astype(int)
    for axis, view in enumerate("zyx"):
        extent = inst.extents[view]
        if extent is not None:  # never more than max_extent slices either side of the prompt
            assert voxel[axis] - 3 <= extent[0] <= voxel[axis] < extent[1] <= voxel[axis] + 4
    if mask.size:  # an accepted view puts its prompted slice in the box
        assert mask.any()
        assert all(box[a].start <= voxel[a] < box[a].stop for a, v in enumerate("zyx") if inst.extents[v])
    else:  # nothing passed the filters on any prompted slice
        assert all(e is None for e in inst.extents.values())
    again = segment_instance(predictor(), read, t.volume.shape, point, E2E)
    assert again[0] == box and (again[1] == mask).all() and again.extents == inst.extents
    restored = pickle.loads(pickle.dumps(inst))  # instances travel back from Dask workers
    assert restored[0] == box and (restored[1] == mask).all() and restored.score == inst.score


def test_sam2_embedding_cache_is_reused_by_a_neighbour(tomo):
    t, read, _ = tomo
    model = predictor()
    calls = []
    encoder = model.forward_image
    model.forward_image = lambda images: calls.append(len(images)) or encoder(images)
    cache = EmbeddingCache()
    decoder = SAM2Slices(model, read, t.volume.shape, cache=cache, batch=4)
    point = np.asarray(t.particles[0])
    first = segment_instance(model, read, t.volume.shape, point, E2E, decoder=decoder)
    n_first = sum(calls)
    assert n_first == decoder.encoded and len(calls) == decoder.calls and max(calls) <= 4
    accepted = sum(e[1] - e[0] for e in first.extents.values() if e)
    assert accepted <= n_first == len(cache)  # every accepted slice encoded, none twice
    second = segment_instance(model, read, t.volume.shape, point + (0, 1, 1), E2E, cache=cache,
                              decoder=decoder)
    n_second = sum(calls) - n_first
    assert n_second < n_first and cache.hits > 0
    assert second.extents.keys() == first.extents.keys()
    with pytest.raises(InputError, match="one volume"):
        SAM2Slices(model, read, (32, 64, 63), cache=cache)
    with pytest.raises(InputError, match="does not match the predictor's device 'cpu'"):
        SAM2Slices(model, read, t.volume.shape, device="cuda")


def test_segment_instances_one_task(tomo):
    t, _, value_range = tomo
    points = [t.particles[0] + (0, 2, 0), t.particles[0]]
    out = segment_instances(lambda r: t.volume[r], t.volume.shape, points, E2E, config="sam2.1_hiera_t",
                            checkpoint=None, image_size=SIZE, device="cpu", batch=4, value_range=value_range)
    assert [tuple(o.point) for o in out] == [tuple(map(float, p)) for p in points]  # input order
    for inst in out:
        assert isinstance(inst, Instance) and inst[1].dtype == bool
    union = np.zeros(t.volume.shape, bool)
    for box, mask in out:
        union[box] |= mask
    assert (semantic_mask(out, t.volume.shape) == union).all()


def test_negative_clicks_reach_the_slices_within_half_a_diameter():
    """A negative click joins the point prompt of each slice within half a diameter of it, as
    (row, col) of that slice; slices farther away are decoded as before (no ``negatives``)."""

    class Negatives(Known):
        def decode(self, view, index, point_rc, mask_input, multimask=True, negatives=()):
            self.negatives = getattr(self, "negatives", []) + [(index, list(negatives))]
            return super().decode(view, index, point_rc, mask_input, multimask)

    table = {("z", z): [(box_mask(4, 8, 4, 8), 0.9, (6, 6))] for z in range(N)}
    decoder = Negatives(table)
    self_prompt(decoder, (N, N, N), (6, 6, 6), SelfPromptParams(views=("z",), max_area=N * N, diameter_voxels=4),
                negatives=[(9.0, 2.0, 3.0)])
    seen = dict(decoder.negatives)
    assert seen[9] == seen[7] == seen[10] == [(2.0, 3.0)] and seen[6] == [] and seen[4] == []


class _Reader:
    """A picklable reader of a numpy volume, values clipped to [0, 1]."""

    def __init__(self, volume):
        self.volume = volume

    def __call__(self, region):
        return np.clip(self.volume[region], 0, 1)


def test_a_kept_cache_serves_the_next_click_on_the_same_volume():
    """``keep_cache=True``: the next call on the same volume and model encodes no slice again
    (a person's refining click); another volume gets a cache of its own."""
    pytest.importorskip("sam2")
    from cryodask.prompting import selfprompt
    from cryodask.prompting.selfprompt import segment_instances

    volume = np.random.default_rng(0).random((8, 24, 24)).astype(np.float32)
    kwargs = dict(config="sam2.1_hiera_t", checkpoint=None, image_size=128, device="cpu", keep_cache=True)
    params = SelfPromptParams(max_extent=1)
    segment_instances(_Reader(volume), volume.shape, [(4, 12, 12)], params, **kwargs)
    (cache,) = selfprompt._KEPT.values()
    encoded, hits, misses = len(cache), cache.hits, cache.misses
    segment_instances(_Reader(volume), volume.shape, [(4, 12, 12)], params, negatives=[(4, 3, 3)], **kwargs)
    assert len(cache) == encoded > 0 and cache.hits > hits and cache.misses == misses
    segment_instances(_Reader(volume + 0.5), volume.shape, [(4, 12, 12)], params, **kwargs)
    assert next(iter(selfprompt._KEPT.values())) is not cache
