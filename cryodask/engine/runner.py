"""The one block runner: how every blockwise step sends its blocks to the cluster (or runs them here).

A step keeps only its per-block kernel and its halo rule; :func:`run_blocks` does the rest, the
same way for every step, in the spirit of daisy (a block carries its read and write regions;
completion belongs to the task):

* **done-mark**: a block marked done for this step and key is skipped, and what its kernel
  returned comes back from the mark (:class:`~cryodask.engine.blocks.DoneMarks` payloads), so a
  resumed run sees the results of every block, not only of those it ran;
* **fault injection**: :func:`~cryodask.engine.blocks.fault_injection_delay` before the work;
* **halo**: the read region is the block grown by ``halo`` voxels, clipped to the volume;
  :attr:`Region.inner` trims a result back to the block;
* **read** under stage timing (``report/stages``), the kernel under its own stage, the
  ``write`` under "write", then the **mark** (after the data, never before);
* **submission**: one task per block, keyed ``<step>-<key[:8]>-<block>`` (unique per run,
  readable on the dashboard), retried ``retries`` times; the task's state (reader, arrays,
  parameters) travels once, as a task of its own, not pickled into every block's task;
* **first error**: :func:`raise_first_error` stops at the first failed block, cancels the rest
  and re-raises it, naming the block;
* **progress**: ``blocks_planned(n)`` once and ``blocks_done(1)`` per finished block.

With ``client=None`` the same shell runs here, block after block (a notebook, a test, a step
that is itself inside a task).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CryodaskError, InputError
from ..report.stages import stage
from . import progress
from .blocks import Block, DoneMarks, fault_injection_delay


def grow(region, margin, shape) -> tuple[slice, ...]:
    """``region`` grown by ``margin`` voxels per axis, clipped to the volume's ``shape``."""
    return tuple(slice(max(0, r.start - m), min(n, r.stop + m)) for r, m, n in zip(region, margin, shape))


def within(inner, outer) -> tuple[slice, ...]:
    """Where ``inner`` lies inside ``outer``, as slices of an array that holds ``outer``."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


@dataclass(frozen=True)
class Region:
    """One block as its kernel sees it: the region it writes and the (larger) region it reads."""

    block: Block
    read: tuple[slice, ...]

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def write(self) -> tuple[slice, ...]:
        return self.block.region

    @property
    def inner(self) -> tuple[slice, ...]:
        """The written region inside an array that holds the read region (trims the halo)."""
        return within(self.block.region, self.read)


@dataclass
class BlockTask:
    """The task shell around a step's kernel; picklable, sent once per :func:`run_blocks`.

    ``kernel(region, data, *args)`` with a ``read``; ``kernel(region, *args)`` without (the
    kernel reads for itself). ``write(region, result)`` stores the output and returns what the
    block hands back (default: the result). ``keep(value)`` makes that a mark payload (an array,
    a number or a dict of arrays; default: the value itself, ``None`` = an empty mark) and
    ``restore(payload)`` makes it a value again when the block is found done.
    """

    kernel: Callable
    step: str
    args: tuple = ()
    marks: DoneMarks | None = None
    shape: tuple | None = None
    halo: tuple | None = None
    read: Callable | None = None
    write: Callable | None = None
    keep: Callable | None = None
    restore: Callable | None = None
    stage: str | None = "infer"  # None: the kernel times its own stages
    label: str = ""
    report: str | None = None  # the step's name in run reports
    fault: bool = True  # whether the fault-injection hook runs (block tasks; not passes over their faces)

    def region(self, block) -> Region:
        if self.halo is None or self.shape is None or not isinstance(block, Block):
            return Region(block, getattr(block, "region", ()))
        return Region(block, grow(block.region, self.halo, self.shape))

    def __call__(self, block) -> Any:
        name = f"{self.step}/{block.name}"
        if self.marks is not None and self.marks.done(name):
            try:
                payload = self.marks.payload(name)
            except (OSError, ValueError, EOFError):  # an empty mark: the block returned nothing
                payload = None
            return self.restore(payload) if self.restore is not None else payload
        if self.fault:
            fault_injection_delay(f"{self.label} {name}".strip())
        region = self.region(block)
        step = self.report or self.step
        timed = stage(self.stage, block=block.name, step=step) if self.stage else nullcontext()
        with timed:  # the kernel's own stages nest in this one and count apart
            if self.read is not None:
                with stage("read") as s:
                    data = self.read(region.read)
                    s.bytes_read = sum(getattr(d, "nbytes", 0) for d in (data if isinstance(data, tuple) else (data,)))
                result = self.kernel(region, data, *self.args)
            else:
                result = self.kernel(region, *self.args)
        if self.write is not None:
            with stage("write", block=block.name, step=step):
                result = self.write(region, result)
        if self.marks is not None:
            self.marks.mark(name, self.keep(result) if self.keep is not None else result)
        return result


def _call(task: BlockTask, block):
    return task(block)


def _same(task: BlockTask) -> BlockTask:
    return task


def run_blocks(client, kernel, blocks, *, step: str, key: str | None = None, args=(), marks: DoneMarks | None = None,
               shape=None, halo=None, read=None, write=None, keep=None, restore=None, stage: str | None = "infer",
               label: str = "", name: str | None = None, report: str | None = None, fault: bool = True,
               retries: int = 1, resources: dict | None = None, priority: int = 0) -> list:
    """``kernel`` over every block through the one task shell (:class:`BlockTask`); the results
    in block order.

    ``blocks`` are :class:`Block` s (or any objects with a ``name``, for passes over other
    items, such as the faces between blocks). Tasks are named ``<name>-<key[:8]>-<token>-<block>``
    (``name`` defaults to ``step``; ``key``, e.g. a parameter hash, ties them to the done-marks;
    the random token keeps two runs on one cluster apart); ``report`` names the step in run
    reports (default ``name``); ``label`` starts the fault-injection line of each block.
    """
    task = BlockTask(kernel, step, tuple(args), marks, None if shape is None else tuple(shape),
                     None if halo is None else tuple(halo), read, write, keep, restore, stage, label,
                     report or name, fault)
    blocks = list(blocks)
    progress.blocks_planned(len(blocks))
    if marks is not None:  # said once per tomogram: "resumed: N blocks already done"
        progress.blocks_resumed(sum(marks.done(f"{step}/{b.name}") for b in blocks))
    if client is None:
        results = []
        for block in blocks:
            try:
                results.append(task(block))
            except Exception as exc:  # noqa: BLE001  (re-raised, its block named)
                raise _named(exc, step, block.name) from None
            progress.blocks_done(1)
        return results
    if not blocks:
        return []
    prefix = "-".join([name or step.replace("/", "-")] + ([key[:8]] if key else []) + [uuid.uuid4().hex[:8]])
    # a task of its own, not scattered data: the scheduler keeps the recipe, so a worker that dies
    # holding it costs a recompute, not the run; for one or two blocks it travels inside them
    # (a task of its own costs ~10 ms, which a collection of small tomograms pays per step)
    shared = client.submit(_same, task, key=f"state-{prefix}", pure=False, retries=retries) if len(blocks) > 2 else task
    futures = [client.submit(_call, shared, block, key=f"{prefix}-{block.name}",
                             retries=retries, resources=resources, priority=priority, pure=False)
               for block in blocks]
    for f in futures:
        f.add_done_callback(_count)
    try:
        raise_first_error(futures, [b.name for b in blocks], step)
        return client.gather(futures)
    finally:
        client.cancel(futures + ([shared] if shared is not task else []))


def _count(future) -> None:
    if future.status == "finished":
        progress.blocks_done(1)


def raise_first_error(futures, names=None, step: str = "") -> None:
    """Wait for ``futures`` until one fails; then cancel the others and raise its error: a
    :class:`CryodaskError` as itself (its message already says what to fix), others with the
    block named in a note (their type kept, so ``OSError`` handlers still see a full disk)."""
    from distributed import as_completed

    names = dict(zip(futures, names)) if names is not None else {}
    if not futures:
        return
    for future in as_completed(futures, loop=futures[0].client.loop):  # this client's loop, not the default's
        if future.status == "finished":
            continue
        for other in futures:
            if not other.done():
                other.cancel()
        name = names.get(future, future.key)
        if future.status == "error":
            raise _named(future.exception(), step, name)
        raise CryodaskError(f"{step} block {name} was {future.status}")


def _named(exc: BaseException, step: str, name: str) -> BaseException:
    if not isinstance(exc, CryodaskError) and hasattr(exc, "add_note"):
        note = f"in block {name} of {step}"
        if note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
    return exc


def as_payload(value):
    """A value as a mark payload: numbers and tuples become arrays (``restore`` with ``tuple``)."""
    return None if value is None else (value if isinstance(value, dict) else np.asarray(value))


def lazy(fn, array, depth, *, dtype=np.float32, **kwargs):
    """``fn(block, **kwargs)`` over a dask array's chunks, each read with ``depth`` voxels of its
    neighbours (none past the volume's edge, as the runner's clipped halo) and trimmed back: the
    dask-image pattern (validate, depth, ``map_overlap``) for a step's kernel. A numpy array is
    taken as one chunk. Lazy: nothing runs until the result is computed."""
    import dask.array as da

    array = da.asarray(array)
    depth = tuple(int(d) for d in depth)
    if len(depth) != array.ndim:
        raise CryodaskError(f"a depth per axis is needed: {array.ndim} axes, got {depth}")
    return array.map_overlap(fn, depth=dict(enumerate(depth)), boundary="none", dtype=dtype, meta=np.array((), dtype),
                             **kwargs)


def volume_input(array, mean=None, std=None, *, what: str = "a tomogram"):
    """A lazy step's input: a 3D dask array, and the mean and standard deviation that normalise it
    (without them, the array is standardised by its own lazy statistics: 0 and 1 then)."""
    import dask.array as da

    array = da.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{what} must be 3D (z, y, x), got shape {array.shape}")
    if mean is None or std is None:
        array = array.astype(np.float32)
        array, mean, std = (array - array.mean()) / array.std(), 0.0, 1.0
    return array, mean, std
