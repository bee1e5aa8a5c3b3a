"""``cryodask features``: CryoSAM's DINOv2 tri-view features of a tomogram as a zarr pyramid.

Computed once, at the grid points of every ratio, so the matcher reads features lazily instead
of holding every view's patch maps on a GPU as CryoSAM does. The store::

    <out>.zarr/<r>/<view>    r in ratios (4, 8, 16), view in z, y, x
        shape (ceil(Z/r), ceil(Y/r), ceil(X/r), C), float16; grid point (i, j, k) sits at
        voxel (i*r, j*r, k*r); <r>/z[i, j, k] is slice z=i*r's patch map sampled at (y, x)
    attrs["cryodask"]["features"]: key, complete, params, model, source, normalisation

:func:`open_features` joins the three views. Why this grid and these tasks:
docs/architecture.md, "CryoSAM".
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..engine.blocks import DoneMarks, plan_blocks
from ..engine.runner import run_blocks
from ..errors import InputError, where
from ..params import params_hash
from .params import FeatureParams

STEP = "features"
SLAB = "slab"  # the done-mark of a slab task: <marks>/slab/<view>/<index>
VIEWS = ("z", "y", "x")
STATS_BLOCK_VOXELS = 8 * 2**20  # 32 MB of float32 per block of the mean/std pass


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


# ------------------------------------------------------------------ the plan

def grid_shape(shape, ratio: int) -> tuple[int, ...]:
    """Grid points per axis at ``ratio``: point i sits at voxel i*ratio."""
    return tuple(math.ceil(n / ratio) for n in shape)


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

    def planes(self, ratio: int) -> range:
        """Grid plane indices of ``ratio`` inside the slab."""
        return range(self.start // ratio, math.ceil(self.stop / ratio))


def plan_tasks(shape, params: FeatureParams) -> list[SlabTask]:
    """One task per (view, slab); its slices are the grid planes of every ratio in the slab.

    >>> [(t.name, t.slices) for t in plan_tasks((20, 8, 8), FeatureParams(slab=16))][:2]
    [('z/0', (0, 4, 8, 12)), ('z/1', (16,))]
    """
    tasks = []
    for axis, view in enumerate(VIEWS):
        n = shape[axis]
        for index, start in enumerate(range(0, n, params.slab)):
            stop = min(start + params.slab, n)
            slices = sorted({p for r in params.ratios for p in range(start, stop, r)})
            tasks.append(SlabTask(view, index, start, stop, tuple(slices)))
    return tasks


def array_chunks(shape, ratio: int, axis: int, channels: int, params: FeatureParams) -> tuple[int, ...]:
    """Chunks of ``<ratio>/<view>``: ``slab/ratio`` planes along the view's axis (one task's
    planes), ``tile`` grid points in-plane, all channels."""
    grid = grid_shape(shape, ratio)
    chunks = [min(params.tile, n) for n in grid]
    chunks[axis] = min(params.slab // ratio, grid[axis])
    return (*chunks, channels)


def grid_weights(n: int, ratio: int, patches: int) -> np.ndarray:
    """Bilinear weights (``grid_sample``, ``align_corners=True``) of the ``patches`` patch
    centres for the grid points ``j*ratio`` of an axis of ``n`` voxels: (ceil(n/ratio), patches).

    Voxel 0 maps to the first patch centre and voxel n-1 to the last, as in CryoSAM's
    ``utils.sample`` (normalised coordinate ``2*p/(n-1) - 1``).
    """
    m = math.ceil(n / ratio)
    u = np.arange(m, dtype=np.float64) * ratio * (patches - 1) / max(n - 1, 1)
    i0 = np.clip(np.floor(u).astype(np.int64), 0, patches - 1)
    frac = u - i0
    weights = np.zeros((m, patches), np.float64)
    np.add.at(weights, (np.arange(m), i0), 1 - frac)
    np.add.at(weights, (np.arange(m), np.minimum(i0 + 1, patches - 1)), frac)
    return weights.astype(np.float32)


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


def _slab_kernel(region, tomo: Tomogram, model_path: str, mean: float, std: float, params: FeatureParams,
                 device: str, store: str) -> None:
    """Patch maps of the slab's slices, sampled at every ratio's grid points, written as
    whole chunks (the runner marks the slab done after)."""
    import torch
    import zarr

    from ..models.dinov2 import load_dinov2, patch_maps
    from ..report import stage

    task: SlabTask = region.block
    model = load_dinov2(model_path, device)
    dev = next(model.parameters()).device
    rows_axis, cols_axis = (a for a in range(3) if a != task.axis)
    out_dtype = getattr(torch, params.dtype)
    position = {s: i for i, s in enumerate(task.slices)}
    with torch.inference_mode():
        maps = []
        for b in range(0, len(task.slices), params.batch):
            batch = task.slices[b:b + params.batch]
            with stage("read", block=task.name) as read:
                slices = tomo.slices(task.axis, batch)
                read.bytes_read = slices.nbytes
            with stage("infer", block=task.name):
                maps.append(patch_maps(model, (slices - np.float32(mean)) / np.float32(std),
                                       image_size=params.image_size))
        maps = torch.cat(maps)  # (S, C, L, L): rows, columns follow the two in-plane axes in z, y, x order
        patches = maps.shape[-1]
        with stage("write", block=task.name) as written:  # sampling the grids and writing them
            for r in params.ratios:
                target = zarr.open_array(f"{store}/{r}/{task.view}", mode="r+")
                planes = task.planes(r)
                chosen = maps[[position[i * r] for i in planes]]
                rows = torch.as_tensor(grid_weights(tomo.shape[rows_axis], r, patches), device=dev)
                cols = torch.as_tensor(grid_weights(tomo.shape[cols_axis], r, patches), device=dev)
                for j0 in range(0, len(rows), params.tile):
                    part = torch.einsum("ja,pcab->pcjb", rows[j0:j0 + params.tile], chosen)
                    for k0 in range(0, len(cols), params.tile):
                        block = torch.einsum("pcjb,kb->pjkc", part, cols[k0:k0 + params.tile])
                        block = np.moveaxis(block.to(out_dtype).cpu().numpy(), 0, task.axis)
                        region = [slice(None)] * 3
                        region[task.axis] = slice(planes.start, planes.stop)
                        region[rows_axis] = slice(j0, j0 + block.shape[rows_axis])
                        region[cols_axis] = slice(k0, k0 + block.shape[cols_axis])
                        target[(*region, slice(None))] = block
                        written.bytes_written += block.nbytes


# ------------------------------------------------------------------ the step

def extract_features(tomogram, out, params: FeatureParams = FeatureParams(), *, client=None, device: str = "auto",
                     polarity: str = "auto") -> Path:
    """DINOv2 tri-view features of a tomogram at CryoSAM's grid ratios, as a zarr store.

    Parameters
    ----------
    tomogram : MRC/TIFF file or OME-Zarr image (level 0 is used), or a ``Volume``
        (``io.volumes.open_volume``: its voxel size overrides the file's)
    out : the ``.zarr`` store to write (see the module docstring for its layout)
    params : :class:`FeatureParams` (the DINOv2 folder, image size, ratios, batch, slab, tile, dtype)
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
                       "tomogram": str(Path(tomo.path).resolve()), "shape": tomo.shape,
                       "voxel_size": tomo.voxel_size, "model": model.as_dict(), "polarity": contrast.polarity})
    marks = DoneMarks(out.parent / ".cryodask" / out.name, STEP, key)
    state = _existing(out)
    if state is None or state.get("key") != key:
        marks.clear_step()
        state = None
    tasks = [t for t in plan_tasks(tomo.shape, params) if state is None or not marks.done(f"{SLAB}/{t.name}")]
    if state is not None and not tasks:
        if not state.get("complete"):
            _set_complete(out, True)
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


def _set_complete(out: Path, complete: bool) -> None:
    import zarr

    group = zarr.open_group(str(out), mode="r+")
    attrs = group.attrs.get("cryodask", {})
    attrs[STEP] = {**attrs.get(STEP, {}), "complete": complete}
    group.attrs["cryodask"] = attrs


def _create_store(out: Path, tomo: Tomogram, model, params: FeatureParams, key: str, mean: float, std: float) -> None:
    import zarr

    if out.exists():
        shutil.rmtree(out)  # a features store of other parameters (checked by _existing)
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    group.attrs["cryodask"] = {STEP: {"key": key, "complete": False}}  # a crash from here on is resumable
    for r in params.ratios:
        level = group.create_group(str(r))
        for axis, view in enumerate(VIEWS):
            level.create_array(view, shape=(*grid_shape(tomo.shape, r), model.hidden_size),
                               chunks=array_chunks(tomo.shape, r, axis, model.hidden_size, params),
                               dtype=params.dtype, fill_value=0, dimension_names=("z", "y", "x", "c"),
                               attributes={"ratio": r, "view": view,
                                           "voxel_size": [v * r for v in tomo.voxel_size]})
    group.attrs["cryodask"] = {STEP: {
        "key": key, "complete": False, "params": asdict(params), "model": model.as_dict(),
        "source": {"path": tomo.path, "shape": list(tomo.shape), "voxel_size": list(tomo.voxel_size),
                   "polarity": tomo.polarity},
        "normalisation": {"mean": mean, "std": std},
        "ratios": list(params.ratios), "views": list(VIEWS),
        "layout": "<ratio>/<view>: (ceil(Z/r), ceil(Y/r), ceil(X/r), C); "
                  "grid point (i, j, k) at voxel (i*r, j*r, k*r)",
    }}


def _run(tomo, model, params, out, key, marks, state, tasks, client, device) -> Path:
    from ..engine.cluster import gpu_resources

    if state is None:
        blocks = plan_blocks(tomo.shape, tomo.chunks, itemsize=4, max_bytes=4 * STATS_BLOCK_VOXELS)
        mean, std = combine_moments(run_blocks(client, _moments_kernel, blocks, step="stats", key=key, args=(tomo,),
                                               stage=None, name="features-stats", fault=False))
        if not std > 0:
            raise where(tomo.path, "the volume is constant (standard deviation 0); nothing to normalise")
        _create_store(out, tomo, model, params, key, mean, std)
    else:
        mean, std = state["normalisation"]["mean"], state["normalisation"]["std"]
        if state.get("complete"):
            _set_complete(out, False)  # some done-marks are gone: not complete until redone
    marks.folder.mkdir(parents=True, exist_ok=True)
    resources = gpu_resources(client) if device in ("auto", "cuda") else None
    run_blocks(client, _slab_kernel, tasks, step=SLAB, key=key,
               args=(tomo, model.path, mean, std, params, device, str(out)), marks=marks, stage=None, label=STEP,
               name="features", resources=resources)
    _set_complete(out, True)
    return out


# ------------------------------------------------------------------ reading

class FeatureLevel:
    """The tri-view features of one ratio, read lazily from the store.

    ``level[z0:z1, y0:y1, x0:x1]`` -> float32 (..., 3C): the z-, y- and x-view features
    concatenated; basic indexing (slices, integers, ``...``) on the three grid axes and
    optionally the channel axis. Picklable: workers re-open the arrays.
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, store, ratio: int):
        self.store = str(store)
        self.ratio = int(ratio)
        self._arrays = None
        z = self.view("z")
        self.channels = int(z.shape[3])
        self.shape = (*(int(s) for s in z.shape[:3]), 3 * self.channels)

    def view(self, name: str):
        """The stored zarr array of one view (``z``, ``y`` or ``x``), (Zr, Yr, Xr, C)."""
        import zarr

        if self._arrays is None:
            self._arrays = {v: zarr.open_array(f"{self.store}/{self.ratio}/{v}", mode="r") for v in VIEWS}
        return self._arrays[name]

    @property
    def chunks(self) -> tuple[int, ...]:
        """A read box aligned to these is whole chunks of all three views (per axis, the
        least common multiple of the views' chunk sizes, at most the grid's extent)."""
        per_view = [self.view(v).chunks for v in VIEWS]
        spatial = (min(math.lcm(*(c[axis] for c in per_view)), self.shape[axis]) for axis in range(3))
        return (*spatial, self.shape[3])

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(n for n, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (4 - len(key) + 1) + key[i + 1:]
        if len(key) > 4:
            raise IndexError(f"too many indices for features of shape {self.shape}")
        key = key + (slice(None),) * (4 - len(key))
        parts = [np.asarray(self.view(v)[(*key[:3], slice(None))], dtype=np.float32) for v in VIEWS]
        return np.concatenate(parts, axis=-1)[..., key[3]]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {"store": self.store, "ratio": self.ratio, "channels": self.channels, "shape": self.shape}

    def __setstate__(self, state):
        self.__dict__.update(state, _arrays=None)

    def __repr__(self) -> str:
        return f"FeatureLevel({self.store!r}, ratio={self.ratio}, shape={self.shape})"


def open_features(store) -> dict[int, FeatureLevel]:
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
    return {r: FeatureLevel(store, r) for r in sorted(attrs["ratios"], reverse=True)}
