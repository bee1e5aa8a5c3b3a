"""Block plans and done-marks: the block is the unit of scheduling, retry and resume.

A block is a chunk-aligned region of one array, so every write covers whole zarr chunks and
no two tasks ever write the same chunk. A done-mark is an empty file written *after* the
block's data; it lives under a folder keyed by step and parameter hash, so a rerun skips
finished blocks and a changed parameter redoes them.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path


@dataclass(frozen=True)
class Block:
    """A chunk-aligned write region of an array, named by its index in the block grid."""

    index: tuple[int, ...]
    region: tuple[slice, ...]

    @property
    def name(self) -> str:
        return ".".join(map(str, self.index))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.region)


def plan_blocks(shape, chunks, *, itemsize: int = 4, max_bytes: int | None = None) -> list[Block]:
    """Split ``shape`` into chunk-aligned blocks.

    Blocks are whole chunks; along the last (fastest, contiguous on disk) axis, neighbouring
    chunks are merged while a block stays under ``max_bytes``, so reads from row-major files
    are long and the number of tasks stays small.

    >>> [b.name for b in plan_blocks((4, 4), (2, 4))]
    ['0.0', '1.0']
    """
    chunks = tuple(min(c, s) if s else c for c, s in zip(chunks, shape))
    per_block = [1] * len(shape)
    if max_bytes and shape:
        chunk_bytes = math.prod(chunks) * itemsize
        n_last = math.ceil(shape[-1] / chunks[-1])
        per_block[-1] = max(1, min(n_last, max_bytes // max(chunk_bytes, 1)))
    step = [c * k for c, k in zip(chunks, per_block)]
    grid = [range(math.ceil(s / st)) if s else range(0) for s, st in zip(shape, step)]
    return [
        Block(idx, tuple(slice(i * st, min((i + 1) * st, s)) for i, st, s in zip(idx, step, shape)))
        for idx in product(*grid)
    ]


class DoneMarks:
    """Files ``<root>/<step>-<key>/<block>`` that say a block's output is complete: empty, or
    holding a small array the step needs once every block is done (convert's value sketches)."""

    def __init__(self, root, step: str, key: str):
        self.root = Path(root)
        self.step = step
        self.folder = self.root / f"{step}-{key}"

    def done(self, name: str) -> bool:
        return (self.folder / name).exists()

    def mark(self, name: str, payload=None) -> None:
        """Mark a block done; a ``payload`` (an array, or a dict of arrays) is written whole,
        then renamed (never half a mark): what the block's task returned, for a rerun."""
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if payload is None:
            path.touch()
            return
        import numpy as np

        from ..io.folders import atomic_write

        with atomic_write(path) as partial, open(partial, "wb") as f:
            if isinstance(payload, dict):
                np.savez(f, **{k: np.asarray(v) for k, v in payload.items()})
            else:
                np.save(f, np.asarray(payload))

    def payload(self, name: str):
        """The array (or dict of arrays) kept in a mark by :meth:`mark` (``OSError``/``ValueError``
        when there is none)."""
        import numpy as np

        loaded = np.load(self.folder / name)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return dict(loaded)
        return loaded

    def count(self) -> int:
        return sum(1 for p in self.folder.rglob("*") if p.is_file())

    def clear_step(self) -> None:
        """Forget every mark of this step, whatever its parameters (the output is redone)."""
        for folder in self.root.glob(f"{self.step}-*"):
            shutil.rmtree(folder, ignore_errors=True)


def fault_injection_delay(label: str = "") -> None:
    """``CRYODASK_BLOCK_DELAY`` seconds of sleep per block task: lets crash tests kill a run
    mid-way at a predictable point. With ``CRYODASK_BLOCK_LOG`` set to a file, each call first
    appends one line, ``label``, to it, so tests can count the block tasks a run executed."""
    log = os.environ.get("CRYODASK_BLOCK_LOG")
    if log:
        with open(log, "a") as f:  # one short append per call: atomic between processes
            f.write(f"{label}\n")
    delay = float(os.environ.get("CRYODASK_BLOCK_DELAY", 0) or 0)
    if delay:
        time.sleep(delay)


def overlap(region, other) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where two boxes (tuples of step-1 slices in one volume) meet: the common part as an index
    into ``region`` and as an index into ``other``; ``None`` when they do not meet."""
    lo = [max(a.start, b.start) for a, b in zip(region, other)]
    hi = [min(a.stop, b.stop) for a, b in zip(region, other)]
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return (tuple(slice(low - a.start, h - a.start) for low, h, a in zip(lo, hi, region)),
            tuple(slice(low - b.start, h - b.start) for low, h, b in zip(lo, hi, other)))
