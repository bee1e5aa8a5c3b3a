"""The one collection runner: inputs → tomograms → one worker thread of the client each, a bounded
window of them in flight, one line per tomogram, a summary and an exit status.

Every tomogram command goes through :func:`find_items` and :func:`run_collection`. A tomogram's
work is a plain function of one :class:`Item` that submits its blocks to the shared client and
waits for them; running several such functions in client threads keeps the cluster busy with a
few tomograms at once while no step waits for the whole collection: the first tomogram reaches
its last step while later ones are not yet started. A tomogram that fails is named in one line
and the others go on.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CryodaskError, InputError, where
from ..io.volumes import stem
from . import progress

STATUSES = ("done", "skipped", "failed")


@dataclass(frozen=True)
class Item:
    """One tomogram of a collection: where it is and the name its outputs carry."""

    path: Path
    name: str
    run: str | None = None  # its copick run, when it came from a copick project


@dataclass
class Outcome:
    """What happened to one tomogram; ``value`` is the step's own result (files, counts)."""

    item: Item
    status: str = "done"
    message: str = ""
    value: Any = None
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)  # what the command prints for it


@dataclass
class CollectionReport:
    command: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def summary(self) -> str:
        """One line: how many tomograms were done, skipped (already done) and failed."""
        parts = [f"{self.count('done')} done"]
        if self.count("skipped"):
            parts.append(f"{self.count('skipped')} skipped (already done)")
        if self.count("failed"):
            parts.append(f"{self.count('failed')} failed")
        took = f" in {self.seconds:.1f} s" if self.seconds else ""
        return f"{self.command}: {len(self.outcomes)} tomograms: " + ", ".join(parts) + took


# ------------------------------------------------------------------ inputs

def _star_items(path: Path) -> list[Path]:
    """Tomograms a STAR file lists: RELION 5's ``tomograms.star`` (``rlnTomoReconstructedTomogram``,
    relative to the project folder) or any table of ``rlnTomoName`` (files of that name beside it)."""
    import starfile

    from ..io.volumes import SUFFIXES, is_zarr

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001  (starfile raises many kinds on a bad file)
        raise where(path, f"is not a readable STAR file ({type(exc).__name__}: {exc})") from None
    table = next((t for t in blocks.values() if hasattr(t, "columns") and "rlnTomoName" in t.columns), None)
    if table is None:
        raise where(path, "lists no tomograms: no table with rlnTomoName")
    if "rlnTomoReconstructedTomogram" in table.columns:
        found = []
        for text in table["rlnTomoReconstructedTomogram"]:
            rel = Path(str(text))
            # RELION writes paths relative to its project folder: the first parent that holds it
            hits = ([p / rel for p in [path.parent, *path.parents] if (p / rel).exists()]
                    if not rel.is_absolute() else [rel])
            if not hits:
                raise where(path, f"lists {rel}, which is not found relative to {path.parent} or any folder above")
            found.append(hits[0])
        return found
    found = []
    for name in table["rlnTomoName"].astype(str):
        hits = [p for folder in (path.parent, path.parent / "tomograms") if folder.is_dir()
                for p in sorted(folder.glob(f"{name}.*")) if is_zarr(p) or p.suffix.lower() in SUFFIXES]
        if not hits:
            raise where(path, f"names tomogram {name}, but no {name}.mrc/.rec/.zarr lies beside it")
        found.append(hits[0])
    return found


def find_items(inputs, *, copick_type: str | None = None, copick_spacing: float | None = None,
               stores: bool = True) -> list[Item]:
    """Files, folders, globs, OME-Zarr stores, STAR listings and copick configs → items with
    unique names (two inputs whose outputs would collide are an error, before any work)."""
    from ..io.copick import expand_inputs, run_of
    from ..io.volumes import find_volumes

    expanded: list[str] = []
    for text in map(str, inputs):
        if text.lower().endswith(".star") and Path(text).is_file():
            expanded += [str(p) for p in _star_items(Path(text))]
        else:
            expanded.append(text)
    if copick_type or copick_spacing:
        expanded = expand_inputs(expanded, tomo_type=copick_type, voxel_spacing=copick_spacing)
    paths = find_volumes(expanded, stores=stores)
    if not paths:
        raise InputError(f"no tomogram found in {', '.join(map(str, inputs))}")
    items, names = [], {}
    for path in paths:
        run = (run_of(path) or run_of(Path(path).resolve())) if stores else None  # a copick input is a link to its run
        item = Item(Path(path), run or stem(path), run)
        if item.name in names:
            raise where(path, f"has the same name as {names[item.name]} ({item.name}): their outputs would collide")
        names[item.name] = path
        items.append(item)
    return items


def check_items(items: list[Item], check: Callable[[Item], Any]) -> tuple[list[Item], list[Outcome]]:
    """Run a cheap check (a header read) on every item before any cluster starts: the good ones,
    and a failed outcome for each bad one."""
    good, bad = [], []
    for item in items:
        try:
            check(item)
            good.append(item)
        except CryodaskError as exc:
            bad.append(Outcome(item, "failed", _named(item, exc)))
    return good, bad


# ------------------------------------------------------------------ running

def default_window(client) -> int:
    """Tomograms in flight: two per worker thread, at least 2 — enough to keep every worker
    busy while one tomogram waits on its last block, few enough that the first finishes early."""
    if client is None:
        return 2
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001  (a scheduler that does not answer: start small)
        threads = 1
    return max(2, 2 * threads)


def _named(item: Item, exc: BaseException) -> str:
    if isinstance(exc, CryodaskError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.errno is not None:
        text = f"cannot read or write its files: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if str(item.path) in text else f"{item.path}: {text}"


def run_collection(items: list[Item], work: Callable[[Item], Outcome | Any], *, command: str, client=None,
                   window: int | None = None, echo: Callable[[str], None] | None = print,
                   failed: list[Outcome] | None = None, show_progress: bool = True) -> CollectionReport:
    """Run ``work(item)`` for every item, ``window`` at a time, in client threads.

    ``work`` returns an :class:`Outcome` (or any value: then the tomogram is ``done`` with it) or
    raises; a ``CryodaskError``/``OSError`` becomes one line naming the tomogram, and the others
    go on. ``failed`` are items already found bad by :func:`check_items` (counted, not run).
    Each finished tomogram's lines are echoed as it finishes; the report holds the outcomes in
    input order.
    """
    report = CollectionReport(command)
    started = time.perf_counter()
    window = window or default_window(client)
    outcomes: dict[Item, Outcome] = {o.item: o for o in failed or []}
    if echo is not None:
        for o in failed or []:
            echo(f"error: {o.message}")
    print_lock = threading.Lock()
    debug = bool(os.environ.get("CRYODASK_DEBUG"))

    def one(item: Item) -> Outcome:
        clock = time.perf_counter()
        progress.take_resumed()
        try:
            value = work(item)
            outcome = value if isinstance(value, Outcome) else Outcome(item, "done", value=value)
            resumed = progress.take_resumed()
            if resumed and outcome.status == "done":
                outcome.lines.insert(min(1, len(outcome.lines)),
                                     f"  resumed: {resumed} blocks already done were not redone")
        except (CryodaskError, OSError) as exc:
            outcome = Outcome(item, "failed", _named(item, exc))
        except Exception as exc:  # noqa: BLE001  (a bug, or a worker's error: named, the rest go on)
            if debug:
                import traceback

                traceback.print_exc()
            outcome = Outcome(item, "failed", _named(item, exc))
        outcome.seconds = outcome.seconds or time.perf_counter() - clock
        return outcome

    total = len(items) + len(failed or [])
    with progress.Progress(command, total, enabled=show_progress and total > 1) as bar:
        for _ in failed or []:
            bar.finished_one("failed")
        with ThreadPoolExecutor(max_workers=max(1, min(window, len(items) or 1)),
                                thread_name_prefix=f"cryodask-{command}") as pool:
            futures = [pool.submit(one, item) for item in items]
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.item] = outcome
                bar.finished_one(outcome.status)
                if echo is not None:
                    with print_lock:
                        if bar.enabled and bar._tty:
                            bar.stream.write("\r\033[K")
                        for line in ([f"error: {outcome.message}"] if outcome.status == "failed" else outcome.lines):
                            echo(line)
    order = {item: i for i, item in enumerate([o.item for o in failed or []] + list(items))}
    report.outcomes = sorted(outcomes.values(), key=lambda o: order[o.item])
    report.seconds = time.perf_counter() - started
    return report
