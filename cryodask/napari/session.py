"""What the click-to-cluster widget drives, without Qt: one client, one open tomogram of a
collection, the clicks' instance, the accepted instances, the detections and the membrane scores.

Every method that computes returns a :class:`Job` at once: a thread of this process that
orchestrates the work as Dask futures on the cluster, so the viewer's thread never waits.
``cancel`` cancels the jobs and every future of the session's own client; a lost scheduler
ends them with one message (:meth:`Session.lost`). The steps are the command line's own
functions (``click_instance`` / ``segment_instances``, ``find_similar`` / ``match``,
``membranes.segment``, ``picking.pipeline.write_outputs``), so what the widget exports is
what ``cryodask pick`` would write.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CryodaskError, InputError

LOST = "lost the scheduler at {address}: the work in flight is gone; connect again"


class Cancelled(CryodaskError):
    """A job stopped by :meth:`Session.cancel`."""


@dataclasses.dataclass
class Job:
    """One piece of widget work: ``future`` (a ``concurrent.futures.Future``) resolves to its result;
    ``done``/``total`` count its parts (0 total: one part, no count); ``partial`` collects results
    as they arrive (a collection's tomograms)."""

    name: str
    future: concurrent.futures.Future = None
    done: int = 0
    total: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    partial: list = dataclasses.field(default_factory=list)
    futures: list = dataclasses.field(default_factory=list)  # the Dask futures it waits on
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def check(self) -> None:
        if self.stop.is_set():
            raise Cancelled(f"{self.name}: cancelled")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def union(instances):
    """One instance from several (the positive clicks of one object): the union of their masks."""
    from ..prompting.selfprompt import Instance

    full = [i for i in instances if np.asarray(i[1]).size and np.asarray(i[1]).any()]
    if not full:
        return instances[0]
    lo = [min(i[0][a].start for i in full) for a in range(3)]
    hi = [max(i[0][a].stop for i in full) for a in range(3)]
    mask = np.zeros([b - a for a, b in zip(lo, hi)], bool)
    for box, m in full:
        mask[tuple(slice(s.start - a, s.stop - a) for s, a in zip(box, lo))] |= np.asarray(m, bool)
    return Instance(tuple(slice(a, b) for a, b in zip(lo, hi)), mask, getattr(full[0], "point", None),
                    float(np.mean([getattr(i, "score", 0.0) for i in full])))


def open_dark(path):
    """``(volume, polarity, read)``: a tomogram, its polarity (``auto``) and its reader of dark density."""
    from ..io.volumes import open_volume
    from ..polarity import dark_reader, resolve_polarity

    volume = open_volume(path, dtype="float32")
    polarity = resolve_polarity("auto", volume, volume.shape, volume.voxel_size)
    return volume, polarity, dark_reader(volume, polarity)


class Session:
    """The widget's state and work. ``params``: ``CryosamParams`` with checkpoints resolved (SAM2
    and DINOv2), or None for the weight-free path (``prompting.classical`` and the LoG picker);
    ``diameter`` (Å) sizes both; ``out`` is where features, membranes and exports go."""

    def __init__(self, client=None, *, cluster=None, params=None, diameter: float = 250.0, out=None,
                 device: str = "auto"):
        self.client, self.cluster = client, cluster
        self.params, self.diameter, self.device = params, float(diameter), device
        self.out = Path(out) if out is not None else None
        self.items: list = []
        self.volume = self.read = self.polarity = None
        self.positives: list = []
        self.negatives: list = []
        self.instance = None  # the current object, from the clicks
        self.accepted: list = []
        self.detections = pd.DataFrame(columns=["z", "y", "x", "score"])
        self.query = None  # the accepted instances' mean feature (DINOv2) or template (classical)
        self.logits = None  # the membrane scores' MRC, once membranes ran
        self.jobs: list[Job] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cryodask-widget")
        self._value_range = self._sam_worker = None

    # ------------------------------------------------------------------ connecting and opening

    def connect(self, spec: str = "local", *, config=None, workers: int | None = None,
                threads_per_worker: int | None = None) -> Session:
        """Work on a new client: ``local``, a scheduler address, or a batch system with a profile of
        ``deploy/`` (``config="deploy/slurm/cluster.yaml:gpu"``), as ``--cluster``; the session's
        earlier client and cluster are closed. ``local`` defaults to one worker with every core:
        a click is one task, and SAM2 in it then uses the whole machine."""
        import os

        from distributed import Client

        from ..engine.cluster import make_cluster

        if spec == "local" and workers is None and threads_per_worker is None:
            workers, threads_per_worker = 1, os.cpu_count() or 1
        cluster = make_cluster(spec, workers=workers, threads_per_worker=threads_per_worker, config=config)
        try:
            client = Client(cluster) if cluster is not None else Client(spec, timeout="10s")
        except OSError as exc:
            if cluster is not None:
                cluster.close()
            raise InputError(f"cannot reach the scheduler {spec} ({exc})") from None
        self._disconnect()
        self.client, self.cluster = client, cluster
        return self

    def _disconnect(self) -> None:
        if self.client is not None:
            self.cancel()
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    @property
    def method(self) -> str:
        """The name outputs carry: ``cryosam`` with weights, else ``classical``."""
        return "cryosam" if self.params is not None else "classical"

    def open(self, inputs, index: int = 0):
        """Open a tomogram (MRC, OME-Zarr, a copick run) or a collection (a folder, glob, STAR
        listing or copick config: its ``index``-th tomogram is shown); returns its ``Volume``."""
        from ..engine.collection import find_items

        items = find_items([inputs] if isinstance(inputs, (str, Path)) else inputs)
        self.items = items
        return self.show(index)

    def show(self, index: int):
        """Make the ``index``-th tomogram of the collection the open one (clicks and results reset)."""
        item = self.items[index]
        self.volume, self.polarity, self.read = open_dark(item.path)
        self.item = item
        self.positives, self.negatives, self.instance, self.accepted = [], [], None, []
        self.detections = self.detections.iloc[0:0]
        self.query = self.logits = self._value_range = self._sam_worker = None
        return self.volume

    def _folder(self) -> Path:
        from ..io.folders import check_output_dir

        if self.out is None:
            raise InputError("choose an output folder first")
        return check_output_dir(self.out).resolve()

    # ------------------------------------------------------------------ jobs

    def _ready(self) -> None:
        """A one-line error unless a tomogram is open and the scheduler is there."""
        if self.volume is None:
            raise InputError("open a tomogram first")
        if self.client is None:
            raise InputError("connect to a cluster first")
        lost = self.lost()
        if lost:
            raise InputError(lost)

    def _start(self, name: str, fn, *args) -> Job:
        self._ready()
        return self.background(name, fn, *args)

    def background(self, name: str, fn, *args) -> Job:
        """``fn(job, *args)`` in a thread of this session, as a :class:`Job` (no cluster needed)."""
        job = Job(name)
        job.future = self._pool.submit(self._guard, job, fn, *args)
        self.jobs.append(job)
        return job

    def _guard(self, job: Job, fn, *args):
        try:
            return fn(job, *args)
        except Exception as exc:
            lost = self.lost()
            if lost:
                raise InputError(lost) from None
            if job.stop.is_set() and not isinstance(exc, Cancelled):
                raise Cancelled(f"{job.name}: cancelled") from None
            raise

    def busy(self) -> list[Job]:
        self.jobs = [j for j in self.jobs if not j.future.done()]
        return self.jobs

    def cancel(self) -> int:
        """Stop every job and cancel every future of this session's client; returns how many jobs."""
        from distributed import Future

        jobs = self.busy()
        for job in jobs:
            job.stop.set()
        if self.client is not None and self.client.status == "running":
            keys = list(getattr(self.client, "futures", {}))
            if keys:
                self.client.cancel([Future(k, self.client) for k in keys], force=True)
        return len(jobs)

    def lost(self) -> str | None:
        """One line when the scheduler is gone, else None."""
        if self.client is None or self.client.status in ("running", "newly-created"):
            return None
        return LOST.format(address=getattr(self.client.scheduler, "address", None) or "?")

    def close(self) -> None:
        self._disconnect()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _resources(self):
        from ..engine.cluster import gpu_resources

        return gpu_resources(self.client, self.device)

    def _wait(self, job: Job, futures):
        """The futures' results, checking for a cancel between them."""
        job.futures.extend(futures)
        out = []
        for f in futures:
            while True:
                job.check()
                try:
                    out.append(f.result(timeout=0.2))
                    break
                except TimeoutError:
                    continue
            job.done += 1
        return out

    # ------------------------------------------------------------------ click -> instance

    def segment(self, positives, negatives=()) -> Job:
        """Segment the object the clicks describe (z, y, x voxels): Cross-Plane Self-Prompting
        from each positive click (SAM2), or the classical blob (no weights), negatives left out;
        the object is the union. Replaces a segmentation still in flight."""
        from ..prompting.selfprompt import check_point

        self._ready()
        shape = self.volume.shape
        positives = [check_point(p, shape) for p in np.asarray(positives, np.float64).reshape(-1, 3)]
        negatives = [check_point(p, shape) for p in np.asarray(negatives, np.float64).reshape(-1, 3)]
        for job in self.busy():
            if job.name == "instance":  # the clicks changed: the object they described is not wanted
                job.stop.set()
                self.client.cancel(job.futures)
        self.positives, self.negatives = positives, negatives
        return self._start("instance", self._segment, positives, negatives)

    def _segment(self, job: Job, positives, negatives):
        if not positives:
            self.instance = None
            return None
        job.total = 1
        if self.params is None:
            from ..prompting.classical import click_instance

            futures = [self.client.submit(click_instance, self.read, self.volume.shape, self.volume.voxel_size, p,
                                          self.diameter, negatives=negatives, pure=False) for p in positives]
            job.total = len(futures)
            instances = self._wait(job, futures)
        else:
            from ..prompting.selfprompt import segment_instances

            params = self.params
            # the worker of the last click keeps this tomogram's encoded slices: go there when it is free
            where = {"workers": self._sam_worker, "allow_other_workers": True} if self._sam_worker else {}
            future = self.client.submit(
                segment_instances, self.read, self.volume.shape, positives,
                params.self_prompt(self.volume.voxel_size[2]), config=params.config, checkpoint=params.sam_checkpoint,
                image_size=params.image_size, device=self.device, batch=params.batch, seed=params.seed,
                value_range=self.value_range(), negatives=negatives, keep_cache=True, pure=False,
                resources=self._resources(), **where)
            instances = self._wait(job, [future])[0]
            self._sam_worker = sorted(self.client.who_has([future]).get(future.key, ()))[:1] or None
        job.check()
        self.instance = union(instances)
        return self.instance

    def value_range(self):
        from ..io.normalize import robust_range

        if self._value_range is None:
            self._value_range = robust_range(self.read, self.volume.shape)
        return self._value_range

    def accept(self) -> int:
        """Keep the current object and clear the clicks; returns how many are accepted."""
        if self.instance is not None and np.asarray(self.instance[1]).any():
            self.accepted.append(self.instance)
        self.instance, self.positives, self.negatives = None, [], []
        return len(self.accepted)

    # ------------------------------------------------------------------ find all

    def find_all(self, collection: bool = False, *, floor: float | None = None) -> Job:
        """Every particle like the accepted ones in the open tomogram (``collection``: then in
        every tomogram of the collection, each written as ``cryodask pick`` writes it under
        ``out``). Detections above ``floor`` come back with their scores, for a slider."""
        self._ready()
        if not self.accepted:
            raise InputError("accept at least one instance first")
        if collection:
            self._folder()
        return self._start("find all", self._find_all, collection, floor)

    def _find_all(self, job: Job, collection: bool, floor):
        here = self._find_here(job, floor)
        self.detections = here
        if not collection:
            return here
        job.done, job.total = 1, len(self.items)
        job.partial.append((self.item.name, len(here)))
        from ..engine.collection import run_collection

        others = [item for item in self.items if item != self.item]
        report = run_collection(others, lambda item: self._find_in(job, item, floor), command="find all",
                                client=self.client, echo=None, show_progress=False)
        failed = [o.message for o in report.failed]
        if failed and not job.stop.is_set():
            raise InputError(failed[0])
        job.check()
        return here

    def _find_here(self, job: Job, floor) -> pd.DataFrame:
        if self.params is None:
            from ..prompting.classical import find_similar, template_from_instances

            self.query = template_from_instances(self.read, self.volume.shape, self.volume.voxel_size, self.accepted,
                                                 self.diameter)
            job.check()
            found = find_similar(self.read, self.volume.shape, self.volume.voxel_size, self.query, self.diameter,
                                 client=self.client)
            return found if floor is None else found[found["score"] >= floor].reset_index(drop=True)
        from ..prompting.matching import match, query_from_instances

        features = self._features()
        job.check()
        self.query = query_from_instances(features, min(features), self.accepted, at=self.params.query_at)
        params = self.params.match()
        if floor is not None:
            params = dataclasses.replace(params, sim_threshold=floor)
        return match(features, self.query, params, client=self.client).reset_index(drop=True)

    def _features(self):
        from ..picking.pipeline import store_of
        from ..prompting.features import FeatureParams, extract_features, open_features

        out = self._folder()
        store = store_of(self.volume, out, self.client)
        features = out / f"{self.item.name}_features.zarr"
        extract_features(store, features, FeatureParams(checkpoint=self.params.dinov2_checkpoint,
                                                        image_size=self.params.feature_image_size),
                         client=self.client, device=self.device, polarity=self.polarity)
        return open_features(features)

    def _find_in(self, job: Job, item, floor):
        """One other tomogram of the collection, its picks written under ``out``."""
        from ..engine.collection import Outcome

        if job.stop.is_set():
            return Outcome(item, "skipped", "cancelled")
        out = self._folder()
        if self.params is None:
            from ..picking.pipeline import write_outputs
            from ..prompting.classical import find_similar

            volume, _, read = open_dark(item.path)
            found = find_similar(read, volume.shape, volume.voxel_size, self.query, self.diameter, client=self.client)
            if floor is not None:
                found = found[found["score"] >= floor]
            write_outputs(out, item.name, self.method, found, volume.voxel_size[2], "particle", shape=volume.shape)
        else:
            from ..picking.pipeline import pick

            found = pick(item.path, out, self.params, client=self.client, device=self.device, query=self.query,
                         name=item.name).picks
        job.done += 1
        job.partial.append((item.name, len(found)))
        return Outcome(item, value=len(found))

    # ------------------------------------------------------------------ membranes

    def membranes(self, weights=None) -> Job:
        """Membranes of the open tomogram (ETSAM when its weights are in ``weights``, else the
        classical filter), their scores kept (``logits``) for a threshold slider."""
        from ..membranes.params import membrane_params

        params = membrane_params("auto", weights, store_logits=True)
        self._folder()
        return self._start("membranes", self._membranes, params)

    def _membranes(self, job: Job, params):
        from ..membranes.pipeline import segment

        out = self._folder()
        report = segment([self.item.path], out, params, client=self.client, device=self.device,
                         voxel_size=self.volume.voxel_size)
        result = report.results[0]
        if result.status == "failed":
            raise InputError(result.message)
        job.check()
        files = [Path(f) for f in result.files]
        self.logits = next(f for f in files if f.name.endswith("_logits.mrc"))
        mask = next(f for f in files if f.name.endswith("_mask.mrc"))
        return {"logits": self.logits, "mask": mask, "method": params.method_name,
                "threshold": default_threshold(self.logits, mask, params)}

    # ------------------------------------------------------------------ export

    def picks(self, threshold: float | None = None) -> pd.DataFrame:
        """What export writes: the accepted instances (score 1, their centres) then the detections
        scoring ``threshold`` or more that are not already among them."""
        from ..prompting.instances import centre

        accepted = np.array([centre(i) for i in self.accepted]).reshape(-1, 3)
        rows = pd.DataFrame({"z": accepted[:, 0], "y": accepted[:, 1], "x": accepted[:, 2],
                             "score": np.ones(len(accepted))})
        found = self.detections if threshold is None else self.detections[self.detections["score"] >= threshold]
        if len(found) and len(accepted):
            radius = self.diameter / 2 / self.volume.voxel_size[2]
            d = np.linalg.norm(found[["z", "y", "x"]].to_numpy(np.float64)[:, None] - accepted[None], axis=2)
            found = found[d.min(1) > radius]
        return pd.concat([rows, found[["z", "y", "x", "score"]]], ignore_index=True)

    def export(self, threshold: float | None = None) -> Job:
        """Write the picks as STAR (+ tomograms.star), CSV and copick, and the accepted instances as
        OME-Zarr labels ``<method>_instances`` and ``<method>_semantic``: the CLI's writers."""
        self._folder()
        return self._start("export", self._export, threshold)

    def _export(self, job: Job, threshold):
        from ..picking.pipeline import store_of, write_instance_labels, write_outputs

        out = self._folder()
        picks = self.picks(threshold)
        vs, shape = self.volume.voxel_size, self.volume.shape
        files = write_outputs(out, self.item.name, self.method, picks, vs[2], "particle", shape=shape)
        if self.accepted:
            store = store_of(self.volume, out, self.client)
            scores = np.arange(len(self.accepted), 0, -1, dtype=np.float64)  # ids in the order accepted
            files += write_instance_labels(store, self.accepted, scores, name=self.method)
        return files


def default_threshold(logits: Path, mask: Path, params) -> float:
    """The slider's start: ETSAM's logit threshold; for the classical filter (whose mask comes from
    hysteresis, not one cut) the score above which as many voxels lie as the mask holds."""
    import mrcfile

    from ..membranes.params import EtsamParams

    if isinstance(params.method, EtsamParams):
        return float(params.logit_threshold)
    with mrcfile.mmap(logits, mode="r") as a, mrcfile.mmap(mask, mode="r") as m:
        step = max(1, a.data.shape[0] // 32)
        scores, inside = np.asarray(a.data[::step], np.float32), np.asarray(m.data[::step]) > 0
    fraction = float(inside.mean())
    if fraction <= 0:
        return float(scores.max())
    return float(np.quantile(scores, 1 - fraction))
