"""Hierarchical Feature Matching (CryoSAM) at volume scale: exactness against whole-array
references, recall on planted particles, NMS/top-K semantics, zarr block skipping, and the
same answer on a real LocalCluster."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from cryodask.errors import InputError
from cryodask.metrics.picking import match_picks
from cryodask.prompting.matching import MatchParams, match, nms_top_k, query_from_instances, similarity
from cryodask.prompting.selfprompt import Instance

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from references import query_vector  # noqa: E402  (point-sampled query, outside the package)

SHAPE = (96, 128, 128)  # voxels
RATIOS = (16, 8, 4)


def smooth_features(shape=SHAPE, dim=64, centres=(), sigma=8.0, amplitude=4.0, noise=0.3, seed=0,
                    ratios=RATIOS, dtype=np.float16):
    """A feature pyramid like DINOv2's: smooth random background (random Fourier modes with a
    ~20-voxel correlation length, |f| ~ 1), white noise, and a Gaussian blob of one target
    vector at each centre (cosine ~0.97 at the centre, >= 0.5 out to ~2 sigma). Level r
    samples the same field at voxels i * r, as the protocol says."""
    rng = np.random.default_rng(seed)
    modes = 24
    k = rng.normal(0, 1 / 20, (modes, 3))
    phase = rng.uniform(0, 2 * np.pi, modes)
    mix = rng.normal(0, math.sqrt(2 / (modes * dim)), (modes, dim))
    target = rng.normal(size=dim)
    target /= np.linalg.norm(target)
    centres = np.asarray(centres, float).reshape(-1, 3)
    features = {}
    for r in ratios:
        grid = [math.ceil(n / r) for n in shape]
        points = np.stack(np.meshgrid(*[np.arange(g) * r for g in grid], indexing="ij"), -1).reshape(-1, 3)
        f = np.cos(points @ k.T + phase) @ mix + rng.normal(0, noise / math.sqrt(dim), (len(points), dim))
        for c in centres:
            f += amplitude * np.exp(-((points - c) ** 2).sum(1) / (2 * sigma**2))[:, None] * target
        features[r] = f.reshape(*grid, dim).astype(dtype)
    return features, target


def to_zarr(features, root, chunks=(4, 8, 8)):
    """The pyramid as float16 zarr arrays on disk, chunks (z, y, x, D)."""
    out = {}
    for r, a in features.items():
        z = zarr.create_array(str(root / f"r{r}.zarr"), shape=a.shape, chunks=(*chunks, a.shape[3]), dtype="float16")
        z[...] = a
        out[r] = z
    return out


def planted(n=10, shape=SHAPE, spacing=30, margin=12, seed=1):
    """Particle centres on the ratio-4 lattice, at least ``spacing`` voxels apart, at every
    offset from the coarse lattices (the worst case for the coarse levels included)."""
    rng = np.random.default_rng(seed)
    centres = []
    while len(centres) < n:
        c = rng.integers(margin // 4, (np.asarray(shape) - margin) // 4) * 4
        if all(np.linalg.norm(c - o) >= spacing for o in centres):
            centres.append(c)
    return np.asarray(centres)


def coords(df) -> set:
    return set(map(tuple, df[["z", "y", "x"]].to_numpy().tolist()))


def reference_match(features, query, params: MatchParams):
    """CryoSAM's ``match`` written densely on whole arrays (the semantics, without blocks)."""
    prob = keep = previous = None
    levels = params.levels
    for level, r in enumerate(levels):
        sim = similarity(features[r], query)
        shape = sim.shape
        if prob is None:
            cand, p = np.ones(shape, bool), np.zeros(shape, np.float32)
        else:
            cand = children(keep, shape, r, previous, params.children)
            p = prob
            for axis, n in enumerate(shape):
                pos = np.arange(n) * r / previous
                i0 = np.floor(pos).astype(int)
                i1 = np.minimum(i0 + 1, prob.shape[axis] - 1)
                t = (pos - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
                p = np.take(p, i0, axis=axis) * (1 - t) + np.take(p, i1, axis=axis) * t
        p = np.where(cand, sim, p).astype(np.float32)
        if level == len(levels) - 1:
            return nms_top_k(p, params.nms_window, params.top_k, mask=cand)
        keep, prob, previous = cand & (p >= params.sim_threshold), p, r


def children(keep, shape, ratio, parent_ratio, rule):
    """Candidates of a level from the survivors of the one above, by distances in voxels."""
    near = []
    for n, m in zip(shape, keep.shape):
        if rule == "cryosam":
            a = (np.arange(n)[:, None] * ratio) // parent_ratio == np.arange(m)[None]
        else:
            d = np.abs(np.arange(n)[:, None] * ratio - np.arange(m)[None] * parent_ratio)
            a = d == d.min(axis=1, keepdims=True)
        near.append(a.astype(np.int64))
    return np.einsum("ap,bq,cr,pqr->abc", *near, keep.astype(np.int64)) > 0


def assert_same(df, ref, ratio=4):
    grid, scores = ref
    assert df[["z", "y", "x"]].to_numpy().tolist() == (grid * ratio).tolist()
    np.testing.assert_array_equal(df["score"].to_numpy(), scores)


@pytest.fixture(scope="module")
def particles():
    centres = planted()
    features, _ = smooth_features(centres=centres)
    return features, centres


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("block", [(16, 64, 64), (3, 5, 7)])
def test_without_pruning_hierarchical_equals_naive(particles, block):
    features, centres = particles
    q = query_vector(features, 4, centres[:1])
    naive = match(features, q, MatchParams(matching="naive", top_k=0), block=block)
    hier = match(features, q, MatchParams(sim_threshold=-1, top_k=0), block=block)
    pd.testing.assert_frame_equal(hier, naive)
    assert len(naive) > 20  # background local maxima too: a real comparison
    assert hier.attrs["matching"]["levels"][-1]["candidates"] == math.prod(features[4].shape[:3])


@pytest.mark.parametrize("block", [(16, 64, 64), (4, 8, 8), (3, 5, 7)])
@pytest.mark.parametrize("window,top_k", [(5, 512), (3, 7), (1, 0)])
def test_blockwise_equals_whole_array_reference(particles, block, window, top_k):
    """Blocks, halos and per-block top-K give exactly the dense, whole-volume answer."""
    features, centres = particles
    q = query_vector(features, 4, centres[:2])
    for params in (MatchParams(nms_window=window, top_k=top_k), MatchParams(nms_window=window, top_k=top_k,
                                                                            children="nearest"),
                   MatchParams(matching="naive", nms_window=window, top_k=top_k)):
        df = match(features, q, params, block=block)
        assert_same(df, reference_match(features, q, params))
    naive = match(features, q, MatchParams(matching="naive", nms_window=window, top_k=top_k), block=block)
    assert_same(naive, nms_top_k(similarity(features[4], q), window, top_k))


def test_blockwise_nms_with_ties_equals_whole_array():
    """Features drawn from 4 vectors only: plateaus of equal scores everywhere."""
    rng = np.random.default_rng(3)
    palette = rng.normal(size=(4, 16)).astype(np.float32)
    features = {4: palette[rng.integers(0, 4, (13, 17, 19))]}
    q = palette[0] + 0.5 * palette[1]
    sim = similarity(features[4], q)
    assert len(np.unique(sim)) == 4
    for window, k in [(5, 0), (5, 10), (3, 50), (7, 3)]:
        ref = nms_top_k(sim, window, k)
        for block in [(13, 17, 19), (4, 4, 4), (2, 3, 5)]:
            df = match(features, q, MatchParams(ratios=(4,), nms_window=window, top_k=k), block=block)
            assert_same(df, ref)
        if k:
            assert len(ref[1]) == k


def test_zarr_equals_numpy_and_centre(particles, tmp_path):
    features, centres = particles
    stored = to_zarr(features, tmp_path)
    q = query_vector(features, 4, centres[:1])
    np.testing.assert_array_equal(q, query_vector(stored, 4, centres[:1]))
    for params in (MatchParams(), MatchParams(matching="naive")):
        pd.testing.assert_frame_equal(match(stored, q, params), match(features, q, params))
    plain = match(stored, q, MatchParams(top_k=20))
    centred = match(stored, q, MatchParams(top_k=20, centre=True))
    np.testing.assert_array_equal(centred[["z", "y", "x"]].to_numpy(), plain[["z", "y", "x"]].to_numpy() + 2)


# ------------------------------------------------------------------ quality


def test_planted_particles_found_and_agree_with_naive(particles):
    features, centres = particles
    q = query_vector(features, 4, centres[:1])  # a single prompt, as CryoSAM
    naive = match(features, q, MatchParams(matching="naive"))
    for children in ("cryosam", "nearest"):
        hier = match(features, q, MatchParams(children=children))
        # the best len(centres) detections are the particles (the background seen by the
        # prompt shifts some maxima by a grid point): recall 1.0
        for df in (hier, naive):
            assert match_picks(df[["z", "y", "x"]].to_numpy()[:len(centres)], centres, radius=8).recall == 1.0
        # hierarchical proposes only children of survivors; naive every local maximum
        assert len(hier) < len(naive)
        stats = hier.attrs["matching"]["levels"]
        assert [s["ratio"] for s in stats] == [16, 8, 4]
        assert stats[-1]["candidates"] < 0.5 * stats[-1]["grid_points"]
    # with children around every survivor, the detections at the particles are naive's own
    m = match_picks(naive[["z", "y", "x"]].to_numpy()[:len(centres)], hier[["z", "y", "x"]].to_numpy(), radius=0)
    assert m.tp == len(centres)
    pd.testing.assert_frame_equal(hier.head(len(centres)), naive.head(len(centres)))
    assert (naive["score"].head(len(centres)) > 0.9).all()


def test_hierarchical_reads_only_candidate_chunks(particles, tmp_path):
    """A block without candidates is never read; reads stay inside one block (no halo reads)
    and cover a small part of the level."""
    features, centres = particles
    stored = to_zarr(features, tmp_path, chunks=(2, 4, 4))

    class Counting:
        def __init__(self, array):
            self.array, self.reads = array, []
            self.shape, self.dtype, self.chunks = array.shape, array.dtype, array.chunks

        def __getitem__(self, box):
            self.reads.append(box)
            return self.array[box]

    counted = {r: Counting(a) for r, a in stored.items()}
    q = query_vector(features, 4, centres[:1])
    df = match(counted, q, MatchParams(), block=(4, 8, 8))
    pd.testing.assert_frame_equal(df, match(features, q, MatchParams()))
    levels = {s["ratio"]: s for s in df.attrs["matching"]["levels"]}
    assert levels[4]["blocks_read"] < levels[4]["blocks"]
    read = sum(math.prod(s.stop - s.start for s in box) for box in counted[4].reads)
    assert levels[4]["candidates"] <= read < 0.5 * levels[4]["grid_points"]
    # every read at ratio 4 lies in one block: no halo reads
    for box in counted[4].reads:
        assert all(s.start // b == (s.stop - 1) // b for s, b in zip(box, (4, 8, 8)))
    # ratio 16 is read whole (every point is scored)
    assert sum(math.prod(s.stop - s.start for s in box) for box in counted[16].reads) == levels[16]["grid_points"]


# ------------------------------------------------------------------ NMS and top-K semantics


def test_nms_top_k_window_ties_and_k():
    s = np.array([0.1, 0.6, 0.2, 0.8, 0.3, 0.2, 0.1, 0.7, 0.5], np.float32).reshape(1, 1, 9)
    # window 5: 0.6 is 2 points from 0.8 -> suppressed; window 3 keeps it
    assert nms_top_k(s, 5, 0)[1].tolist() == pytest.approx([0.8, 0.7])
    assert nms_top_k(s, 3, 0)[1].tolist() == pytest.approx([0.8, 0.7, 0.6])
    grid, scores = nms_top_k(s, 3, 2)
    assert grid.tolist() == [[0, 0, 3], [0, 0, 7]] and grid.dtype == np.int64
    # a plateau: every tied maximum is a peak; top-K breaks ties by position (z, y, x)
    t = np.array([-1, 0.5, 0.5, -1, -1, 0.5, 0.4], np.float32).reshape(1, 1, 7)
    grid, scores = nms_top_k(t, 3, 0)
    assert grid.tolist() == [[0, 0, 1], [0, 0, 2], [0, 0, 5]] and scores.tolist() == [0.5] * 3
    assert nms_top_k(t, 3, 2)[0].tolist() == [[0, 0, 1], [0, 0, 2]]
    # the volume is padded with -inf: a maximum on the border counts; window 1: every point
    edge = np.full((2, 2, 2), -0.2, np.float32)
    edge[0, 0, 0] = -0.1
    assert nms_top_k(edge, 5, 0)[0].tolist() == [[0, 0, 0]]
    assert len(nms_top_k(edge, 1, 0)[1]) == 8
    # mask: masked points are never peaks but still suppress their neighbours
    m = np.ones(s.shape, bool)
    m[0, 0, 3] = False
    assert nms_top_k(s, 3, 0, mask=m)[1].tolist() == pytest.approx([0.7, 0.6])


def test_top_k_truncates_exactly(particles):
    features, centres = particles
    q = query_vector(features, 4, centres[:1])
    full = match(features, q, MatchParams(matching="naive", top_k=0))
    for k in (1, 7, 100):
        top = match(features, q, MatchParams(matching="naive", top_k=k), block=(4, 8, 8))
        pd.testing.assert_frame_equal(top, full.head(k))
    assert full["score"].is_monotonic_decreasing


# ------------------------------------------------------------------ query


def test_query_from_instances_is_the_mean_inside_the_masks():
    rng = np.random.default_rng(2)
    r, shape = 4, (16, 20, 24)
    level = rng.normal(size=(4, 5, 6, 7)).astype(np.float32)
    features = {16: level[::4, ::4, ::4], r: level}
    instances, painted = [], []
    for lo, hi in [((1, 2, 3), (10, 13, 9)), ((5, 0, 8), (15, 9, 24))]:
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask = rng.random([b - a for a, b in zip(lo, hi)]) < 0.5
        instances.append((box, mask))
        vol = np.zeros(shape, bool)
        vol[box] = mask
        painted.append(vol)
    vectors = [level[i, j, k] for vol in painted for i, j, k in np.ndindex(level.shape[:3])
               if vol[i * r, j * r, k * r]]
    mean = np.mean(vectors, axis=0)
    np.testing.assert_allclose(query_from_instances(features, r, instances), mean / np.linalg.norm(mean), rtol=1e-5)
    # an empty mask falls back to the grid point nearest its prompt
    empty = Instance((slice(9, 9), slice(9, 9), slice(9, 9)), np.zeros((0, 0, 0), bool), (9.0, 13.9, 1.9))
    total = np.sum(vectors, axis=0) + level[2, 3, 0]
    np.testing.assert_allclose(query_from_instances(features, r, instances + [empty]),
                               total / np.linalg.norm(total), rtol=1e-5)
    with pytest.raises(InputError, match="no prompt point"):
        query_from_instances(features, r, [(empty[0], empty[1])])
    with pytest.raises(InputError, match="level 8"):
        query_from_instances(features, 8, instances)


def test_query_vector_interpolates_linearly():
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in (3, 4, 5)], indexing="ij"), -1)
    field = np.concatenate([grid, np.ones((3, 4, 5, 1))], -1).astype(np.float32)  # f = (z, y, x, 1) in grid units
    f = {4: field}
    p = np.array([3.0, 5.0, 9.0])  # voxels -> grid (0.75, 1.25, 2.25)
    expected = np.array([0.75, 1.25, 2.25, 1.0])
    np.testing.assert_allclose(query_vector(f, 4, p), expected / np.linalg.norm(expected), rtol=1e-6)
    nearest = np.array([1.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(query_vector(f, 4, p, interpolation="nearest"), nearest / np.linalg.norm(nearest),
                               rtol=1e-6)
    two = query_vector(f, 4, [[0, 0, 0], [8, 12, 16]])  # mean of (0,0,0,1) and (2,3,4,1)
    np.testing.assert_allclose(two, np.array([1, 1.5, 2, 1]) / np.linalg.norm([1, 1.5, 2, 1]), rtol=1e-6)
    # beyond the last grid point but inside the volume: clamped
    np.testing.assert_allclose(query_vector(f, 4, [[11, 15, 19]]), query_vector(f, 4, [[8, 12, 16]]))


def cryosam_query_at_centroids(level, ratio, instances):
    """CryoSAM's released query (``model.py``: the mask centroid, ``utils.sample``): each
    centroid's feature by ``grid_sample`` (trilinear, ``align_corners=True``) on the level's grid,
    the samples averaged, the mean L2-normalised."""
    import torch
    import torch.nn.functional as F

    volume = torch.as_tensor(np.moveaxis(np.asarray(level, np.float32), -1, 0))[None]  # (1, D, Z, Y, X)
    grid = np.asarray(level.shape[:3], float)
    samples = []
    for box, mask in instances:
        centroid = np.array([b.start + np.mean(c) for b, c in zip(box, np.nonzero(mask))]) / ratio
        normed = 2 * np.minimum(centroid, grid - 1) / (grid - 1) - 1  # z, y, x -> grid_sample's x, y, z
        at = torch.as_tensor(normed[::-1].copy(), dtype=torch.float32).reshape(1, 1, 1, 1, 3)
        samples.append(F.grid_sample(volume, at, mode="bilinear", align_corners=True).reshape(-1).numpy())
    mean = np.mean(samples, axis=0)
    return mean / np.linalg.norm(mean)


def test_preset_cryosam_matches_a_reimplementation_of_the_published_query_and_matching(particles):
    """``pick --preset cryosam``: the query sampled at the mask centroids and CryoSAM's matching
    give what a small re-implementation of CryoSAM's code gives on the same features."""
    from cryodask.picking.params import CryosamParams

    features, centres = particles
    params = CryosamParams(preset="cryosam")
    assert params.query_at == "centroids" and CryosamParams().query_at == "masks"
    rng = np.random.default_rng(4)
    instances = []
    for c in centres[:3]:  # a blob around each of three particles, lopsided so the centroid is off-centre
        box = tuple(slice(int(v) - 6, int(v) + 9) for v in c)
        mask = rng.random((15, 15, 15)) < np.linspace(0.2, 0.9, 15)[None, None, :]
        instances.append((box, mask))
    query = query_from_instances(features, 4, instances, at=params.query_at)
    np.testing.assert_allclose(query, cryosam_query_at_centroids(features[4], 4, instances), rtol=1e-5, atol=1e-6)
    assert not np.allclose(query, query_from_instances(features, 4, instances))  # the masks' mean differs
    assert_same(match(features, query, params.match()), reference_match(features, query, params.match()))
    found = match(features, query, params.match())
    assert match_picks(found[["z", "y", "x"]].to_numpy()[:len(centres)], centres, 8).recall == 1.0


# ------------------------------------------------------------------ distributed


def test_local_cluster_equals_in_process(particles, tmp_path, client):
    features, centres = particles
    stored = to_zarr(features, tmp_path)
    q = query_vector(stored, 4, centres[:1])
    for params in (MatchParams(), MatchParams(matching="naive", top_k=50)):
        here = match(stored, q, params, block=(4, 16, 16))
        pd.testing.assert_frame_equal(match(stored, q, params, client=client, block=(4, 16, 16)), here)
    # numpy features are scattered to the workers once per level
    pd.testing.assert_frame_equal(match(features, q, MatchParams(), client=client, block=(8, 16, 16)),
                                  match(features, q, MatchParams(), block=(8, 16, 16)))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs", [
    {"sim_threshold": 1.5}, {"sim_threshold": float("nan")}, {"sim_threshold": "0.5"},
    {"ratios": ()}, {"ratios": (4, 8)}, {"ratios": (16, 16, 4)}, {"ratios": (8, 0)}, {"ratios": (8.0, 4)},
    {"ratios": 4}, {"top_k": -1}, {"top_k": 2.5}, {"nms_window": 4}, {"nms_window": 0}, {"nms_window": True},
    {"matching": "fast"}, {"centre": "yes"}, {"children": "floor"},
])
def test_invalid_params_are_input_errors(kwargs):
    with pytest.raises(InputError) as err:
        MatchParams(**kwargs)
    assert "\n" not in str(err.value)


def test_invalid_inputs_are_input_errors(particles):
    features, centres = particles
    q = query_vector(features, 4, centres[:1])
    assert MatchParams(ratios=[8, 4]).ratios == (8, 4)
    bad = [
        lambda: match({16: features[16], 4: features[4]}, q),  # no ratio 8
        lambda: match([features[4]], q),
        lambda: match(features, q[:10]),
        lambda: match(features, np.zeros_like(q)),
        lambda: match(features, q, {"top_k": 5}),
        lambda: match(features, q, block=(0, 8, 8)),
        lambda: match(features, q, block=(8, 8)),
        lambda: match({**features, 8: features[8][:2]}, q),  # not the same volume
        lambda: match({**features, 8: features[8][..., :10]}, q),  # another feature size
        lambda: match({**features, 4: features[4][..., 0]}, q),  # not (Z, Y, X, D)
        lambda: match({**features, 4: features[4].astype(np.int8)}, q),
        lambda: query_vector(features, 4, [[0, 0, SHAPE[2]]]),  # outside the volume
        lambda: query_vector(features, 4, [[-1, 0, 0]]),
        lambda: query_vector(features, 4, np.zeros((0, 3))),
        lambda: query_vector(features, 4, [[0, 0]]),
        lambda: query_vector(features, 4, [[0, 0, 0]], interpolation="cubic"),
        lambda: query_vector({4: np.zeros((2, 2, 2, 3), np.float32)}, 4, [[0, 0, 0]]),
        lambda: nms_top_k(np.zeros((4, 4)), 3, 1),
        lambda: nms_top_k(np.zeros((4, 4, 4)), 2, 1),
    ]
    for call in bad:
        with pytest.raises(InputError) as err:
            call()
        assert "\n" not in str(err.value)
