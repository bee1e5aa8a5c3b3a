"""Exact connected components of a mask of any size, block by block on a cluster.

Equal to ``scipy.ndimage.label`` + ``find_objects`` on the whole array (ETSAM's
post-processing) without ever holding it: label blocks with block-index ids, pair ids across
block faces, one union-find on the client, relabel each block with its own slice of the map.
Not dask-image's ``label``, which chains block offsets serially and ships the whole relabel
vector to every block. The four passes: docs/architecture.md, "Post-processing".
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from .. import validate
from ..engine.blocks import Block, plan_blocks

CONNECTIVITY = (6, 18, 26)


def check_connectivity(connectivity: int) -> int:
    return validate.choice("connectivity", connectivity, CONNECTIVITY)


def structure(connectivity: int) -> np.ndarray:
    """The scipy structuring element of a 3D connectivity (6: faces, 18: +edges, 26: +corners)."""
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, CONNECTIVITY.index(connectivity) + 1)


def label_block(block: np.ndarray, connectivity: int, device: str = "cpu") -> tuple[np.ndarray, int]:
    """Local labels (uint32, 0 = background) of one block, and how many there are."""
    if device == "cuda":
        from .gpu import label_block_gpu

        return label_block_gpu(block, connectivity)
    binary = np.asarray(block) != 0
    if min(binary.shape) == 1 or binary.size < 4096:
        # cc3d 4.1 fails on degenerate shapes such as (1, 1, 6); scipy is as fast on tiny blocks
        from scipy import ndimage

        labels, n = ndimage.label(binary, structure(connectivity))
        return labels.astype(np.uint32), int(n)
    import cc3d

    labels, n = cc3d.connected_components(binary, connectivity=connectivity, return_N=True, out_dtype=np.uint32)
    return labels, int(n)


# ------------------------------------------------------------------ pass 1: label, statistics, faces

@dataclass(frozen=True)
class BlockLabels:
    """What pass 1 keeps of a block: statistics per label and its six boundary planes."""

    ids: np.ndarray        # global ids (uint64), one per local label 1..n
    count: np.ndarray      # voxels
    zmin: np.ndarray
    zmax: np.ndarray
    first: np.ndarray      # global raster index of the first voxel
    faces: dict            # (axis, "lo"|"hi") -> plane of global ids (0 = background)


def block_id_offset(index: tuple[int, ...], grid: tuple[int, ...]) -> np.uint64:
    """Global ids of a block start at ``linear block index << 32``: computable from the index alone."""
    return np.uint64(np.ravel_multi_index(index, grid)) << np.uint64(32)


def label_pass(read, block: Block, grid, shape, connectivity: int,
               device: str = "cpu") -> tuple[BlockLabels, np.ndarray]:
    """Label one block; return its label statistics and boundary planes in global ids, and
    its local labels."""
    labels, n = label_block(read(block.region), connectivity, device)
    offset = block_id_offset(block.index, grid)
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    local = flat[where]
    count = np.bincount(local, minlength=n + 1)[1:]
    first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, local, where)
    z = where // (labels.shape[1] * labels.shape[2])
    zmin = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
    zmax = np.full(n + 1, -1, np.int64)
    np.minimum.at(zmin, local, z)
    np.maximum.at(zmax, local, z)
    origin = [s.start for s in block.region]
    first_zyx = np.unravel_index(first[1:], labels.shape) if n else (np.empty(0, np.int64),) * 3
    first_global = (np.ravel_multi_index(tuple(c + o for c, o in zip(first_zyx, origin)), shape) if n
                    else np.empty(0, np.int64))
    ids = np.concatenate([[0], offset + np.arange(1, n + 1, dtype=np.uint64)]).astype(np.uint64)
    faces = {}
    for axis in range(3):
        for side, index in (("lo", 0), ("hi", -1)):
            faces[axis, side] = ids[np.take(labels, index, axis=axis)]
    return BlockLabels(ids[1:], count.astype(np.int64), zmin[1:] + origin[0], zmax[1:] + origin[0],
                       first_global.astype(np.int64), faces), labels


# ------------------------------------------------------------------ pass 2: equivalences at boundaries

def in_plane_offsets(connectivity: int) -> list[tuple[int, int]]:
    """Offsets (du, dv) within a boundary plane that are neighbours across it."""
    near = [(du, dv) for du in (-1, 0, 1) for dv in (-1, 0, 1)]
    limit = {6: 0, 18: 1, 26: 2}[connectivity]
    return [(du, dv) for du, dv in near if abs(du) + abs(dv) <= limit]


def boundary_pairs(low: np.ndarray, high: np.ndarray, connectivity: int) -> np.ndarray:
    """Pairs of ids (k, 2) that touch across a boundary: ``low`` is the last plane before it,
    ``high`` the first plane after it (both full cross-sections, global ids).

    Works from the foreground voxels of ``low`` only (a few percent of a membrane mask)."""
    nu, nv = low.shape
    u, v = np.nonzero(low)
    a = low[u, v]
    pairs = []
    for du, dv in in_plane_offsets(connectivity):
        uu, vv = u + du, v + dv
        inside = (uu >= 0) & (uu < nu) & (vv >= 0) & (vv < nv)
        b = high[uu[inside], vv[inside]]
        touching = b != 0
        pairs.append(np.stack([a[inside][touching], b[touching]], axis=1))
    return unique_pairs(np.concatenate(pairs) if pairs else np.empty((0, 2), np.uint64))


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Distinct rows of a (k, 2) array (a lexsort: ``np.unique(axis=0)`` is 20x slower here)."""
    if len(pairs) < 2:
        return pairs
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    distinct = np.ones(len(pairs), bool)
    distinct[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    return pairs[distinct]


def _assemble_plane(parts: list[tuple[Block, np.ndarray]], axis: int, shape) -> np.ndarray:
    """Put the boundary planes of the blocks along one boundary into one full cross-section."""
    plane_shape = tuple(s for i, s in enumerate(shape) if i != axis)
    plane = np.zeros(plane_shape, np.uint64)
    for block, face in parts:
        region = tuple(r for i, r in enumerate(block.region) if i != axis)
        plane[region] = face
    return plane


def equivalence_pass(lows: list[tuple[Block, np.ndarray]], highs: list[tuple[Block, np.ndarray]], axis: int,
                     shape, connectivity: int) -> np.ndarray:
    return boundary_pairs(_assemble_plane(lows, axis, shape), _assemble_plane(highs, axis, shape), connectivity)


# ------------------------------------------------------------------ pass 3: union-find, filter, numbering

@dataclass
class Components:
    """Every component of the mask with its merged statistics, and the final numbering."""

    ids: np.ndarray           # all global block-label ids
    component: np.ndarray     # component index of each id
    count: np.ndarray         # per component
    zmin: np.ndarray
    zmax: np.ndarray
    first: np.ndarray
    final: np.ndarray         # per component: 0 (removed) or its label 1..n_kept in raster order

    @property
    def n_components(self) -> int:
        return len(self.count)

    @property
    def n_kept(self) -> int:
        return int(self.final.max(initial=0))

    def table(self, ids: np.ndarray) -> np.ndarray:
        """Final labels of the given ids (one block's slice of the map)."""
        if not len(ids):
            return np.zeros(0, np.uint64)
        return self.final[self.component[np.searchsorted(self.ids, ids)]]


def merge(stats: list[BlockLabels], pairs: list[np.ndarray], *, min_slices: int = 0, min_voxels: int = 0) -> Components:
    """Union-find over the boundary pairs, statistics per component, filter, raster-order numbering."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids = np.concatenate([s.ids for s in stats]) if stats else np.zeros(0, np.uint64)
    order = np.argsort(ids)
    ids = ids[order]
    gather = lambda name: np.concatenate([getattr(s, name) for s in stats])[order] if stats else np.zeros(0, np.int64)  # noqa: E731
    count, zmin, zmax, first = gather("count"), gather("zmin"), gather("zmax"), gather("first")
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)
    n = len(ids)
    if len(edges):
        a, b = np.searchsorted(ids, edges[:, 0]), np.searchsorted(ids, edges[:, 1])
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        n_comp, component = connected_components(graph, directed=False)
    else:
        n_comp, component = n, np.arange(n)
    c_count = np.bincount(component, weights=count, minlength=n_comp).astype(np.int64)
    c_zmin = np.full(n_comp, np.iinfo(np.int64).max, np.int64)
    c_zmax = np.full(n_comp, -1, np.int64)
    c_first = np.full(n_comp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(c_zmin, component, zmin)
    np.maximum.at(c_zmax, component, zmax)
    np.minimum.at(c_first, component, first)
    keep = (c_zmax - c_zmin + 1 >= min_slices) & (c_count >= min_voxels)
    final = np.zeros(n_comp, np.uint64)
    kept = np.flatnonzero(keep)
    final[kept[np.argsort(c_first[kept])]] = np.arange(1, len(kept) + 1, dtype=np.uint64)
    return Components(ids, component, c_count, c_zmin, c_zmax, c_first, final)


# ------------------------------------------------------------------ the whole computation on arrays

BLOCK_BYTES = 32 * 2**20  # of uint32 labels: 8 M voxels, about 80 MB of working memory per task


def plan(shape, chunks, max_bytes: int | None = BLOCK_BYTES) -> tuple[list[Block], tuple[int, ...]]:
    """Blocks and the block grid: whole chunks, merged along x up to ``max_bytes`` of labels,
    so reads and writes of row-major files are long runs (full rows where they fit)."""
    blocks = plan_blocks(shape, chunks, itemsize=4, max_bytes=max_bytes)
    grid = tuple(max((b.index[i] for b in blocks), default=-1) + 1 for i in range(len(shape)))
    return blocks, grid


def boundaries(blocks: list[Block], shape) -> list[tuple[int, list[Block], list[Block]]]:
    """For each internal block boundary: its axis, the blocks ending there and those starting there."""
    found = {}
    for block in blocks:
        for axis, r in enumerate(block.region):
            if r.stop < shape[axis]:
                found.setdefault((axis, r.stop), ([], []))[0].append(block)
            if r.start > 0:
                found.setdefault((axis, r.start), ([], []))[1].append(block)
    return [(axis, lows, highs) for (axis, _), (lows, highs) in sorted(found.items())]


def components(mask: np.ndarray, chunks, connectivity: int = 26, *, min_slices: int = 0, min_voxels: int = 0,
               device: str = "cpu") -> tuple[np.ndarray, Components]:
    """In-memory, single-process version of the blockwise algorithm (the reference for tests
    and small arrays): returns the final labels (0 = background or removed) and the components."""
    mask = np.asarray(mask)
    shape = mask.shape
    blocks, grid = plan(shape, chunks, max_bytes=None)
    passes = {b.name: label_pass(lambda region: mask[region], b, grid, shape, connectivity, device) for b in blocks}
    stats = {name: p[0] for name, p in passes.items()}
    pairs = [equivalence_pass([(b, stats[b.name].faces[axis, "hi"]) for b in lows],
                              [(b, stats[b.name].faces[axis, "lo"]) for b in highs], axis, shape, connectivity)
             for axis, lows, highs in boundaries(blocks, shape)]
    comps = merge(list(stats.values()), pairs, min_slices=min_slices, min_voxels=min_voxels)
    out = np.zeros(shape, np.uint64)
    for b in blocks:
        out[b.region] = block_table(comps, stats[b.name])[passes[b.name][1]]
    return out, comps


def block_table(comps: Components, labelled: BlockLabels, dtype=np.uint64) -> np.ndarray:
    """Local label -> final label for one block (index 0 = background)."""
    return np.concatenate([[0], comps.table(labelled.ids)]).astype(dtype)
