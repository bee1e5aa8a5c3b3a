"""``cryodask features``: CryoSAM's DINOv2 tri-view features of a tomogram, stored as patch maps.

CryoSAM keeps every slice's patch map (37×37 tokens at 518²) of the three views and looks a
voxel's feature up by bilinear ``grid_sample`` in each. The store keeps those maps, for the
slices on the finest grid, and samples on read, so its size does not grow with the grid::

    <out>.zarr/maps/<view>   (P, A, B, C) float16, view in z, y, x: plane p is the slice at
        voxel p*base along the view's axis (base = the smallest ratio); A, B are the other two
        axes in z, y, x order, each the model's L patches, or, where the finest grid has fewer
        points than L along it, the map already sampled at those points (smaller, and exact)
    <out>.zarr/gram/<view>   (P, A, B, 5) float32: each stored token's inner products with
        itself and its right, lower, lower-right neighbours, and right·lower: the norm of any
        bilinear sample, so matching scores a point from scalars (:class:`Projection`)
    attrs["cryodask"]["features"]: key, complete, layout 2, params, model, source, normalisation

:func:`open_features` gives the pyramid levels, grid point (i, j, k) of ratio r at voxel
(i*r, j*r, k*r), as lazy arrays. Why this layout: docs/architecture.md, "CryoSAM".
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..engine.blocks import DoneMarks, plan_blocks
from ..engine.runner import run_blocks
from ..errors import InputError, where
from ..params import params_hash
from .params import FeatureParams

STEP = "features"
LAYOUT = 2  # 1 (cryodask <= 0.x): float16 grids per ratio; 2: patch maps sampled on read
SLAB = "slab"  # the done-mark of a slab task: <marks>/slab/<view>/<index>
VIEWS = ("z", "y", "x")
GRAM = ("self", "right", "down", "diagonal", "anti")  # <t,t> <t,t(b+1)> <t,t(a+1)> <t,t(a+1,b+1)> <t(b+1),t(a+1)>
STATS_BLOCK_VOXELS = 8 * 2**20  # 32 MB of float32 per block of the mean/std pass
PROJECT_PLANES = 16  # planes per projection task
DINOV2_CPU_BATCH = 8  # slices per DINOv2 call on the CPU (on CUDA: from the free memory, models/batching.py)


# ------------------------------------------------------------------ the tomogram on workers

@dataclass(frozen=True)
class Tomogram:
    """A validated input volume that workers re-open to read only the slices they need."""

    path: str
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    chunks: tuple[int, int, int]
    source: object = None  # the cryodask.io.volumes.Volume read (float32)
    sign: float = 1.0  # -1 for a bright tomogram: every slice is read with dense matter dark
    polarity: dict | None = None  # how that was decided (cryodask.polarity.Polarity.metadata)

    def read(self, region) -> np.ndarray:
        """One region as float32; NaN or Inf is an ``InputError`` naming the file."""
        data = np.asarray(self.source.read(region), dtype=np.float32)
        return data if self.sign > 0 else -data

    def slices(self, axis: int, indices) -> np.ndarray:
        """Slices ``indices`` (sorted) across ``axis`` as a (k, a, b) float32 stack.

        z- and y-slices of an MRC file are whole rows: read one by one. Otherwise (x-slices,
        chunked zarr) the bounding box of the batch is read once and the slices taken from it.
        """
        def index(i):
            return tuple(i if a == axis else slice(None) for a in range(3))

        if self.source.format == "mrc" and axis < 2:
            return np.stack([self.read(index(int(i))) for i in indices])
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        box = self.read(index(slice(lo, hi)))
        return np.moveaxis(np.take(box, [int(i) - lo for i in indices], axis=axis), axis, 0)


def open_tomogram(path, voxel_size=None) -> Tomogram:
    """Validate an MRC/TIFF file or an OME-Zarr image (level 0) before any cluster starts
    (``open_volume``); statistics read a file in slabs of whole planes, a zarr in its chunks."""
    from ..io.volumes import open_volume

    source = open_volume(path, voxel_size, dtype="float32")
    plane = source.shape[1] * source.shape[2]
    chunks = source.chunks if source.format == "zarr" else \
        (max(1, min(source.shape[0], STATS_BLOCK_VOXELS // plane)), source.shape[1], source.shape[2])
    return Tomogram(source.path, source.shape, source.voxel_size, chunks, source=source)


# ------------------------------------------------------------------ the geometry of a store

def grid_shape(shape, ratio: int) -> tuple[int, ...]:
    """Grid points per axis at ``ratio``: point i sits at voxel i*ratio."""
    return tuple(math.ceil(n / ratio) for n in shape)


@dataclass(frozen=True)
class Geometry:
    """Where a store's stored values sit: the volume, the plane spacing, the patch grid, and per
    view whether each in-plane axis holds patches or the finest grid's points."""

    shape: tuple[int, int, int]
    base: int
    patches: int
    kinds: dict  # view -> (kind of A, kind of B), "patches" or "grid"

    @classmethod
    def plan(cls, shape, base: int, patches: int) -> Geometry:
        kinds = {}
        for view in VIEWS:
            kinds[view] = tuple("grid" if math.ceil(shape[a] / base) < patches else "patches"
                                for a in inplane(view))
        return cls(tuple(int(n) for n in shape), int(base), int(patches), kinds)

    def stored(self, view: str) -> tuple[int, int, int]:
        """(P, A, B) of a view's maps."""
        a, b = inplane(view)
        return (math.ceil(self.shape[VIEWS.index(view)] / self.base),
                *(self._size(axis, kind) for axis, kind in zip((a, b), self.kinds[view])))

    def _size(self, axis: int, kind: str) -> int:
        return math.ceil(self.shape[axis] / self.base) if kind == "grid" else self.patches

    def index(self, axis: int, kind: str, ratio: int, points) -> tuple[np.ndarray, np.ndarray]:
        """For grid points ``points`` of ``ratio`` along voxel axis ``axis``: the stored index
        below each and the fraction towards the next (bilinear, ``align_corners=True``: voxel 0
        at the first patch centre and voxel n-1 at the last, as CryoSAM's ``utils.sample``)."""
        points = np.asarray(points, np.int64)
        if kind == "grid":
            return points * ratio // self.base, np.zeros(len(points), np.float32)
        n, last = self.shape[axis], self.patches - 1
        u = points * ratio * last / max(n - 1, 1)
        i0 = np.clip(np.floor(u).astype(np.int64), 0, last)
        return i0, np.clip(u - i0, 0, 1).astype(np.float32)

    def weights(self, axis: int, kind: str, ratio: int, points, lo: int, size: int) -> np.ndarray:
        """Dense bilinear weights (len(points), size) over stored indices lo .. lo+size-1."""
        i0, frac = self.index(axis, kind, ratio, points)
        last = self._size(axis, kind) - 1
        out = np.zeros((len(i0), size), np.float32)
        rows = np.arange(len(i0))
        np.add.at(out, (rows, i0 - lo), 1 - frac)
        np.add.at(out, (rows, np.minimum(i0 + 1, last) - lo), frac)
        return out

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "base": self.base, "patches": self.patches,
                "kinds": {v: list(k) for v, k in self.kinds.items()}}

    @classmethod
    def from_dict(cls, d) -> Geometry:
        return cls(tuple(d["shape"]), int(d["base"]), int(d["patches"]), {v: tuple(k) for v, k in d["kinds"].items()})


def inplane(view: str) -> tuple[int, int]:
    """The voxel axes of a view's slice, in z, y, x order (rows, columns)."""
    axis = VIEWS.index(view)
    return tuple(a for a in range(3) if a != axis)


def gram(tokens: np.ndarray) -> np.ndarray:
    """(P, A, B, 5) float32 inner products of each token with its neighbours (``GRAM``; 0 past
    the edge) from (P, A, B, C) tokens."""
    t = np.asarray(tokens, np.float32)
    out = np.zeros((*t.shape[:3], 5), np.float32)
    out[..., 0] = np.einsum("pabc,pabc->pab", t, t)
    out[:, :, :-1, 1] = np.einsum("pabc,pabc->pab", t[:, :, :-1], t[:, :, 1:])
    out[:, :-1, :, 2] = np.einsum("pabc,pabc->pab", t[:, :-1], t[:, 1:])
    out[:, :-1, :-1, 3] = np.einsum("pabc,pabc->pab", t[:, :-1, :-1], t[:, 1:, 1:])
    out[:, :-1, :-1, 4] = np.einsum("pabc,pabc->pab", t[:, :-1, 1:], t[:, 1:, :-1])
    return out


# ------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class SlabTask:
    """Voxels [start, stop) along the slice axis of one view, and the slices the model sees."""

    view: str
    index: int
    start: int
    stop: int
    slices: tuple[int, ...] = field(repr=False)

    @property
    def axis(self) -> int:
        return VIEWS.index(self.view)

    @property
    def name(self) -> str:
        return f"{self.view}/{self.index}"


def plan_tasks(shape, params: FeatureParams) -> list[SlabTask]:
    """One task per (view, slab); its slices are the planes of the finest grid in the slab.

    >>> [(t.name, t.slices) for t in plan_tasks((20, 8, 8), FeatureParams(slab=16))][:2]
    [('z/0', (0, 4, 8, 12)), ('z/1', (16,))]
    """
    base = min(params.ratios)
    tasks = []
    for axis, view in enumerate(VIEWS):
        n = shape[axis]
        for index, start in enumerate(range(0, n, params.slab)):
            stop = min(start + params.slab, n)
            tasks.append(SlabTask(view, index, start, stop, tuple(range(start, stop, base))))
    return tasks


# ------------------------------------------------------------------ tasks

def _moments_kernel(region, tomo: Tomogram) -> tuple[int, float, float]:
    """Count, mean and sum of squared deviations of one block (float64)."""
    data = tomo.read(region.write).astype(np.float64)
    if not data.size:
        return 0, 0.0, 0.0
    mean = float(data.mean())
    return int(data.size), mean, float(np.square(data - mean).sum())


def combine_moments(parts) -> tuple[float, float]:
    """The volume's mean and (population) standard deviation from per-block moments (Chan et al.)."""
    n, mean, m2 = 0, 0.0, 0.0
    for nb, mb, m2b in parts:
        if nb:
            delta, total = mb - mean, n + nb
            mean += delta * nb / total
            m2 += m2b + delta * delta * n * nb / total
            n = total
    return mean, math.sqrt(m2 / n) if n else 0.0


def write_planes(store, geometry: Geometry, view: str, start: int, tokens, dtype: str = "float16") -> int:
    """Write a view's planes ``start ..`` from their (S, A, B, C) tokens (already in the stored
    representation) with their Gram maps; returns the bytes written. The store's one writer:
    ``cryodask features`` and the matching benchmark's synthetic stores."""
    import zarr

    stored = np.asarray(tokens).astype(dtype)
    grams = gram(stored)  # of the values as stored, so a norm from them is the stored vector's
    planes = slice(start, start + len(stored))
    zarr.open_array(f"{store}/maps/{view}", mode="r+")[planes] = stored
    zarr.open_array(f"{store}/gram/{view}", mode="r+")[planes] = grams
    return stored.nbytes + grams.nbytes


def _slab_kernel(region, tomo: Tomogram, model_path: str, mean: float, std: float, params: FeatureParams,
                 geometry: Geometry, device: str, store: str) -> None:
    """Patch maps of the slab's slices, sampled along the in-plane axes stored as grid points,
    written with their Gram maps (the runner marks the slab done after)."""
    import torch

    from ..models.batching import batch_for
    from ..models.dinov2 import load_dinov2, patch_maps
    from ..report import stage

    task: SlabTask = region.block
    model = load_dinov2(model_path, device, compile=params.compile)
    dev = next(model.parameters()).device
    plane = [tomo.shape[a] for a in inplane(task.view)]
    size = batch_for(lambda: patch_maps(model, np.zeros((1, *plane), np.float32), image_size=params.image_size),
                     device=dev.type, key=("dinov2", model_path, params.image_size, params.compile),
                     requested=params.batch, cpu_default=DINOV2_CPU_BATCH)
    with torch.inference_mode():
        maps = []
        for b in range(0, len(task.slices), size):
            batch = task.slices[b:b + size]
            with stage("read", block=task.name) as read:
                slices = tomo.slices(task.axis, batch)
                read.bytes_read = slices.nbytes
            with stage("infer", block=task.name):
                maps.append(patch_maps(model, (slices - np.float32(mean)) / np.float32(std),
                                       image_size=params.image_size))
        maps = torch.cat(maps).permute(0, 2, 3, 1)  # (S, L, L, C): rows, columns follow the in-plane axes
        with stage("write", block=task.name) as written:
            for position, (axis, kind) in enumerate(zip(inplane(task.view), geometry.kinds[task.view])):
                if kind == "grid":  # sampled at the finest grid's points along this axis
                    points = range(math.ceil(tomo.shape[axis] / geometry.base))
                    w = torch.as_tensor(geometry.weights(axis, "patches", geometry.base, points, 0,
                                                         geometry.patches), device=dev)
                    maps = torch.movedim(torch.tensordot(w, torch.movedim(maps, 1 + position, 0), dims=1),
                                         0, 1 + position)
            written.bytes_written += write_planes(store, geometry, task.view, task.start // geometry.base,
                                                  maps.cpu().numpy(), params.dtype)


# ------------------------------------------------------------------ the step

def extract_features(tomogram, out, params: FeatureParams = FeatureParams(), *, client=None, device: str = "auto",
                     polarity: str = "auto") -> Path:
    """DINOv2 tri-view features of a tomogram at CryoSAM's grid ratios, as a zarr store.

    Parameters
    ----------
    tomogram : MRC/TIFF file or OME-Zarr image (level 0 is used), or a ``Volume``
        (``io.volumes.open_volume``: its voxel size overrides the file's)
    out : the ``.zarr`` store to write (see the module docstring for its layout)
    params : :class:`FeatureParams` (the DINOv2 folder, image size, ratios, batch, slab, dtype)
    client : a ``distributed.Client``; default: the current one, else a local cluster
    device : "auto" (GPU where a worker has one), "cpu" or "cuda"
    polarity : "auto", "dark", "bright" or a decided ``cryodask.polarity.Polarity``: a bright
        tomogram is read negated, so features of tomograms of either polarity compare

    Returns
    -------
    The store's path; read it with :func:`open_features`. A rerun skips slabs already
    done-marked under ``<out parent>/.cryodask/<out name>``; changed parameters redo them.

    Examples
    --------
    >>> extract_features("tomo.mrc", "tomo_features.zarr", FeatureParams(checkpoint="dinov2-large"))  # doctest: +SKIP
    >>> open_features("tomo_features.zarr")[16][0:2, 0:2, 0:2].shape  # doctest: +SKIP
    (2, 2, 2, 3072)
    """
    from ..io.folders import check_output_dir
    from ..models.dinov2 import describe_dinov2, resolve_dinov2

    if not isinstance(params, FeatureParams):
        raise TypeError(f"params must be FeatureParams, got {type(params).__name__}")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device}")
    out = Path(out)
    if out.suffix.lower() != ".zarr":
        raise where(out, "output must end in .zarr")
    from ..polarity import resolve_polarity

    tomo = open_tomogram(tomogram)
    model = describe_dinov2(resolve_dinov2(params.checkpoint).resolve())
    if params.image_size % model.patch_size:
        raise InputError(f"--image-size {params.image_size} is not a multiple of the model's patch size "
                         f"{model.patch_size}")
    check_output_dir(out.parent)
    contrast = resolve_polarity(polarity, tomo.read, tomo.shape, tomo.voxel_size)
    tomo = replace(tomo, sign=1.0 if contrast.dark else -1.0, polarity=contrast.metadata())
    key = params_hash({**asdict(params), "checkpoint": None,  # the model's identity is "model"
                       "tomogram": str(Path(tomo.path).resolve()), "shape": tomo.shape, "layout": LAYOUT,
                       "voxel_size": tomo.voxel_size, "model": model.as_dict(), "polarity": contrast.polarity})
    marks = DoneMarks(out.parent / ".cryodask" / out.name, STEP, key)
    state = _existing(out)
    if state is None or state.get("key") != key:
        marks.clear_step()
        state = None
    tasks = [t for t in plan_tasks(tomo.shape, params) if state is None or not marks.done(f"{SLAB}/{t.name}")]
    if state is not None and not tasks:
        if not state.get("complete"):
            set_complete(out, True)
        return out
    from ..engine.cluster import current_client

    client = client or current_client()
    if client is None:
        from ..engine.cluster import connect

        with connect("local") as local_client:
            return _run(tomo, model, params, out, key, marks, state, tasks, local_client, device)
    return _run(tomo, model, params, out, key, marks, state, tasks, client, device)


def feature_key(store) -> str | None:
    """The key a finished store was written with (its parameters, tomogram and model): what work
    done with its features depends on."""
    state = _existing(Path(store))
    return state.get("key") if state else None


def _existing(out: Path) -> dict | None:
    """The features attrs of an existing store; refuses to overwrite anything else."""
    if not out.exists():
        return None
    import zarr

    try:
        attrs = zarr.open_group(str(out), mode="r").attrs.get("cryodask", {}).get(STEP)
    except Exception:  # noqa: BLE001  (not a zarr group at all)
        attrs = None
    if not isinstance(attrs, dict):
        raise where(out, "exists and is not a cryodask features store; remove it or choose another output")
    return attrs


def set_complete(out: Path, complete: bool) -> None:
    import zarr

    group = zarr.open_group(str(out), mode="r+")
    attrs = group.attrs.get("cryodask", {})
    attrs[STEP] = {**attrs.get(STEP, {}), "complete": complete}
    group.attrs["cryodask"] = attrs


def create_store(out: Path, geometry: Geometry, channels: int, *, planes: int, dtype: str = "float16",
                 ratios=(4, 8, 16), attrs: dict | None = None) -> None:
    """An empty store of ``geometry``, marked incomplete: a crash from here on is resumable.

    Maps are one plane per chunk, the Gram maps ``planes`` planes per chunk: one writer's
    planes (a slab task's), so no two writers share a chunk."""
    import zarr

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)  # a features store of other parameters (checked by _existing)
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    group.attrs["cryodask"] = {STEP: {"complete": False, **(attrs or {})}}
    for view in VIEWS:
        stored = geometry.stored(view)
        group.require_group("maps").create_array(
            view, shape=(*stored, channels), chunks=(1, *stored[1:], channels), dtype=dtype, fill_value=0,
            dimension_names=("plane", "a", "b", "c"), compressors=None)
        group.require_group("gram").create_array(
            view, shape=(*stored, len(GRAM)), chunks=(min(planes, stored[0]), *stored[1:], len(GRAM)),
            dtype="float32", fill_value=0, dimension_names=("plane", "a", "b", "pair"))
    group.attrs["cryodask"] = {STEP: {
        "complete": False, **(attrs or {}), "layout": LAYOUT, "ratios": sorted(int(r) for r in ratios),
        "views": list(VIEWS), "geometry": geometry.as_dict(), "channels": int(channels), "gram": list(GRAM),
        "description": "maps/<view>[p]: the patch map of the slice at voxel p*base along the view's axis; "
                       "in-plane axes in z, y, x order, 'patches' (bilinear, align_corners) or 'grid' "
                       "(the finest grid's points); grid point (i, j, k) of ratio r at voxel (i*r, j*r, k*r)",
    }}


def _run(tomo, model, params, out, key, marks, state, tasks, client, device) -> Path:
    from ..engine.cluster import gpu_resources
    geometry = Geometry.plan(tomo.shape, min(params.ratios), params.image_size // model.patch_size)
    if state is None:
        blocks = plan_blocks(tomo.shape, tomo.chunks, itemsize=4, max_bytes=4 * STATS_BLOCK_VOXELS)
        mean, std = combine_moments(run_blocks(client, _moments_kernel, blocks, step="stats", key=key, args=(tomo,),
                                               stage=None, name="features-stats", fault=False))
        if not std > 0:
            raise where(tomo.path, "the volume is constant (standard deviation 0); nothing to normalise")
        create_store(out, geometry, model.hidden_size, planes=params.slab // geometry.base, dtype=params.dtype,
                     ratios=params.ratios, attrs={
            "key": key, "params": asdict(params), "model": model.as_dict(),
            "source": {"path": tomo.path, "shape": list(tomo.shape), "voxel_size": list(tomo.voxel_size),
                       "polarity": tomo.polarity},
            "normalisation": {"mean": mean, "std": std}})
    else:
        mean, std = state["normalisation"]["mean"], state["normalisation"]["std"]
        if state.get("complete"):
            set_complete(out, False)  # some done-marks are gone: not complete until redone
    marks.folder.mkdir(parents=True, exist_ok=True)
    resources = gpu_resources(client, device)
    run_blocks(client, _slab_kernel, tasks, step=SLAB, key=key,
               args=(tomo, model.path, mean, std, params, geometry, device, str(out)), marks=marks, stage=None,
               label=STEP, name="features", resources=resources)
    set_complete(out, True)
    return out


# ------------------------------------------------------------------ reading

class FeatureLevel:
    """The tri-view features of one ratio, sampled from the stored maps on read.

    ``level[z0:z1, y0:y1, x0:x1]`` -> float32 (..., 3C): the z-, y- and x-view features
    concatenated; basic indexing (slices with step 1, integers, ``...``) on the three grid axes
    and optionally the channel axis. Picklable: workers re-open the arrays.
    """

    ndim = 4
    dtype = np.dtype(np.float32)
    chunks_hint = 8  # grid points per axis of a read worth its fixed cost

    def __init__(self, store, ratio: int, geometry: Geometry, channels: int):
        self.store = str(store)
        self.ratio = int(ratio)
        self.geometry = geometry
        self.channels = int(channels)
        self.shape = (*grid_shape(geometry.shape, ratio), 3 * self.channels)
        self._arrays = None

    def maps(self, view: str):
        """The stored zarr array of one view's maps, (P, A, B, C)."""
        import zarr

        if self._arrays is None:
            self._arrays = {v: zarr.open_array(f"{self.store}/maps/{v}", mode="r") for v in VIEWS}
        return self._arrays[view]

    @property
    def chunks(self) -> tuple[int, ...]:
        return (*(min(self.chunks_hint, n) for n in self.shape[:3]), self.shape[3])

    def sample(self, view: str, ranges) -> np.ndarray:
        """One view's features at the grid points ``ranges`` (three ``range`` s): (z, y, x, C) float32."""
        g, r = self.geometry, self.ratio
        axis = VIEWS.index(view)
        planes = np.asarray(ranges[axis]) * r // g.base
        a_axis, b_axis = inplane(view)
        boxes, weights = [], []
        for ax, kind in zip((a_axis, b_axis), g.kinds[view]):
            i0, _ = g.index(ax, kind, r, ranges[ax])
            size = g.stored(view)[1 + (ax == b_axis)]
            lo, hi = int(i0.min()), min(int(i0.max()) + 2, size)
            boxes.append(slice(lo, hi))
            weights.append(g.weights(ax, kind, r, ranges[ax], lo, hi - lo))
        data = np.asarray(self.maps(view)[(slice(int(planes.min()), int(planes.max()) + 1), *boxes)], np.float32)
        data = data[planes - planes.min()]  # (p, a, b, C)
        data = np.tensordot(weights[0], data, axes=([1], [1]))  # (a', p, b, C)
        data = np.tensordot(weights[1], data, axes=([1], [2]))  # (b', a', p, C)
        order = {"z": (2, 1, 0), "y": (1, 2, 0), "x": (1, 0, 2)}[view]  # to (z, y, x) grid order
        return np.ascontiguousarray(np.transpose(data, (*order, 3)))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(n for n, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (4 - len(key) + 1) + key[i + 1:]
        if len(key) > 4:
            raise IndexError(f"too many indices for features of shape {self.shape}")
        key = key + (slice(None),) * (4 - len(key))
        ranges, squeeze = [], []
        for axis, (k, n) in enumerate(zip(key[:3], self.shape[:3])):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("feature levels take slices with step 1")
                ranges.append(range(start, stop))
            else:
                i = int(k) + n if int(k) < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for axis {axis} with size {n}")
                ranges.append(range(i, i + 1))
                squeeze.append(axis)
        if any(len(r) == 0 for r in ranges):
            out = np.zeros((*(len(r) for r in ranges), self.shape[3]), np.float32)
        else:
            out = np.concatenate([self.sample(v, ranges) for v in VIEWS], axis=-1)
        return out[..., key[3]].squeeze(axis=tuple(squeeze)) if squeeze else out[..., key[3]]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state):
        self.__dict__.update(state, _arrays=None)

    def __repr__(self) -> str:
        return f"FeatureLevel({self.store!r}, ratio={self.ratio}, shape={self.shape})"


class FeatureStore(Mapping):
    """A finished features store: a mapping ratio -> :class:`FeatureLevel` (coarsest first),
    plus :meth:`project`, which makes matching score points from scalars."""

    def __init__(self, store, attrs: dict):
        self.store = str(store)
        self.geometry = Geometry.from_dict(attrs["geometry"])
        self.channels = int(attrs["channels"])
        self.levels = {r: FeatureLevel(store, r, self.geometry, self.channels)
                       for r in sorted(attrs["ratios"], reverse=True)}

    def __getitem__(self, ratio):
        return self.levels[ratio]

    def __iter__(self):
        return iter(self.levels)

    def __len__(self):
        return len(self.levels)

    def project(self, query, *, client=None) -> Projection:
        """The query's inner product with every stored token, and the Gram maps: (P, A, B) per
        view, a few MB; a point's similarity is then bilinear sums of them (:class:`Projection`)."""
        import zarr

        q = np.asarray(query, np.float32).reshape(3, self.channels)
        tasks = []
        for v, view in enumerate(VIEWS):
            planes = self.geometry.stored(view)[0]
            tasks += [_Planes(view, start, min(start + PROJECT_PLANES, planes))
                      for start in range(0, planes, PROJECT_PLANES)]
        if client is None:  # in this process: reading one task's planes overlaps projecting another's
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                parts = list(pool.map(lambda task: _project(self.store, task, q), tasks))
        else:
            parts = run_blocks(client, _project_kernel, tasks, step="project", args=(self.store, q),
                               name="cryosam-match-project", report="cryosam-match", fault=False)
        dots = {v: np.concatenate([p for t, p in zip(tasks, parts) if t.view == v]) for v in VIEWS}
        grams = {v: np.asarray(zarr.open_array(f"{self.store}/gram/{v}", mode="r")[...]) for v in VIEWS}
        return Projection(self.geometry, dots, grams)


@dataclass(frozen=True)
class _Planes:
    view: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.view}/{self.start}"


def _project_kernel(region, store: str, q: np.ndarray) -> np.ndarray:
    return _project(store, region.block, q)


def _project(store: str, task: _Planes, q: np.ndarray) -> np.ndarray:
    """The query's inner product with every token of the task's planes: (planes, A, B) float32."""
    import torch
    import zarr

    maps = np.asarray(zarr.open_array(f"{store}/maps/{task.view}", mode="r")[task.start:task.stop])
    tokens = torch.from_numpy(maps).reshape(-1, maps.shape[-1])
    qv = torch.from_numpy(np.ascontiguousarray(q[VIEWS.index(task.view)]))
    rows = max(64, 2**20 // maps.shape[-1])  # converted to float32 a cache-sized slice at a time: 6x faster
    with torch.inference_mode():
        dots = torch.cat([tokens[i:i + rows].float() @ qv for i in range(0, len(tokens), rows)])
    return dots.numpy().reshape(maps.shape[:3])


@dataclass(frozen=True)
class Projection:
    """A query projected on a store: the exact cosine similarity of any grid point from scalars.

    A point's feature in a view is a bilinear sum of four stored tokens, ``f = Σ w t``, so
    ``f·q = Σ w (t·q)`` and ``|f|² = Σ w w' (t·t')``: the dots and the Gram maps give the
    tri-view cosine without reading the C channels again."""

    geometry: Geometry
    dots: dict
    grams: dict

    def level(self, ratio: int) -> ProjectedLevel:
        return ProjectedLevel(self, int(ratio), (*grid_shape(self.geometry.shape, ratio), 1))

    def similarity(self, ratio: int, region) -> np.ndarray:
        """Cosine similarity (float32) of every grid point of ``ratio`` in ``region`` (slices)."""
        shape = tuple(s.stop - s.start for s in region)
        grids = np.meshgrid(*(np.arange(s.start, s.stop) for s in region), indexing="ij")
        return self.at(ratio, [g.ravel() for g in grids]).reshape(shape)

    def at(self, ratio: int, points) -> np.ndarray:
        """Cosine similarity (float32) of the grid points ``points`` (z, y, x index arrays) of ``ratio``."""
        dot, norm2 = 0.0, 0.0
        for view in VIEWS:
            d, n2 = self._view(view, ratio, [np.asarray(p, np.int64) for p in points])
            dot, norm2 = dot + d, norm2 + n2
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(norm2 > 0, dot / np.sqrt(np.maximum(norm2, 0)), 0.0)
        return np.clip(sim, -1, 1).astype(np.float32)

    def _view(self, view, ratio, points):
        g = self.geometry
        plane = points[VIEWS.index(view)] * ratio // g.base
        (a_axis, b_axis), (a_kind, b_kind) = inplane(view), g.kinds[view]
        a0, fa = g.index(a_axis, a_kind, ratio, points[a_axis])
        b0, fb = g.index(b_axis, b_kind, ratio, points[b_axis])
        _, na, nb = g.stored(view)
        t00 = (plane * na + a0) * nb + b0  # flat token indices of the four corners
        t01 = t00 + (b0 + 1 < nb)
        t10 = t00 + nb * (a0 + 1 < na)
        t11 = t10 + (b0 + 1 < nb)
        w00, w01, w10, w11 = (1 - fa) * (1 - fb), (1 - fa) * fb, fa * (1 - fb), fa * fb  # float32
        dots, gr = self.dots[view].reshape(-1), self.grams[view].reshape(-1, len(GRAM))
        dot = w00 * dots[t00] + w01 * dots[t01] + w10 * dots[t10] + w11 * dots[t11]
        g00, s = gr[t00], gr[:, 0]  # (N, 5): self, right, down, diagonal, anti at t00
        norm2 = (w00 * w00 * g00[:, 0] + w01 * w01 * s[t01] + w10 * w10 * s[t10] + w11 * w11 * s[t11]
                 + 2 * (w00 * w01 * g00[:, 1] + w10 * w11 * gr[t10, 1] + w00 * w10 * g00[:, 2]
                        + w01 * w11 * gr[t01, 2] + w00 * w11 * g00[:, 3] + w01 * w10 * g00[:, 4]))
        return dot.astype(np.float64), norm2.astype(np.float64)


@dataclass(frozen=True)
class ProjectedLevel:
    """One ratio of a :class:`Projection`, scored block by block by the matcher."""

    projection: Projection
    ratio: int
    shape: tuple
    dtype = np.dtype(np.float32)

    def score(self, region, cand: np.ndarray) -> np.ndarray:
        """Similarities of a block's candidates: float32 of the block's shape, NaN elsewhere."""
        out = np.full(cand.shape, np.nan, np.float32)
        local = np.nonzero(cand)
        if len(local[0]):
            out[local] = self.projection.at(self.ratio, [i + s.start for i, s in zip(local, region)])
        return out


def open_features(store) -> FeatureStore:
    """The finished feature pyramid of a store, keyed by ratio (coarsest first).

    >>> features = open_features("tomo_features.zarr")  # doctest: +SKIP
    >>> features[16].shape  # (ceil(Z/16), ceil(Y/16), ceil(X/16), 3C)  # doctest: +SKIP
    (19, 58, 58, 3072)
    """
    import zarr

    store = Path(store)
    try:
        attrs = zarr.open_group(str(store), mode="r").attrs.get("cryodask", {}).get(STEP)
    except Exception:  # noqa: BLE001
        attrs = None
    if not isinstance(attrs, dict):
        raise where(store, "not a cryodask features store")
    if not attrs.get("complete"):
        raise where(store, "the features store is incomplete; rerun `cryodask features` to finish it")
    if attrs.get("layout") != LAYOUT:
        raise where(store, "was written by an older cryodask (per-ratio grids); rerun `cryodask features` to "
                           "rewrite it as patch maps")
    return FeatureStore(store, attrs)
