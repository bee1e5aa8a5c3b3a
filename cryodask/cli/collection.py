"""How every tomogram command runs over a collection: inputs checked before any cluster starts,
one cluster, the collection runner, one line per tomogram, a summary, exit 2 if any failed."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import typer

from ..engine.collection import CollectionReport, Item, Outcome, check_items, find_items, run_collection
from .options import cluster_session

IN_FLIGHT = typer.Option(None, "--in-flight", help="Tomograms in flight at once (default: two per worker thread).")


def output_for(out: Path, items: list[Item], suffix: str) -> Callable[[Item], Path]:
    """Where one tomogram's single output goes: ``--out`` itself for one input given as a file
    name ending in ``suffix``; otherwise ``<out>/<name><suffix>`` (``--out`` is a folder)."""
    if len(items) == 1 and out.name.lower().endswith(suffix.lower()):
        return lambda item: out
    return lambda item: out / f"{item.name}{suffix}"


def over_collection(command: str, inputs, work: Callable[[Item, object], Outcome | object], *,
                    check: Callable[[Item], object] | None = None, cluster: str = "local", workers=None,
                    threads_per_worker=None, memory_limit="auto", cluster_config=None, report_dir=None,
                    lock_folder: Path | None = None, in_flight: int | None = None, needs_cluster: bool = True,
                    items: list[Item] | None = None, finish_later: bool = False, prepare=None,
                    **find) -> CollectionReport:
    """Find the tomograms, check each (``check(item)`` raises for a bad one), start one cluster,
    run ``work(item, client)`` over the good ones, print the summary; exit 2 if any failed
    (``finish_later``: the caller adds collection-wide outputs first, then calls :func:`finish`;
    ``prepare(client, good_items)``: work the whole collection needs first, on the same cluster)."""
    from ..engine.lock import output_lock
    from ..report import run_report

    items = items if items is not None else find_items(inputs, **find)
    good, bad = check_items(items, check) if check else (items, [])
    if not good:  # every input was bad: each gets its line, and no cluster starts
        for outcome in bad:
            typer.echo(f"error: {outcome.message}", err=True)
        raise typer.Exit(2)
    lock = output_lock(lock_folder, command) if lock_folder is not None else nullcontext()
    session = (cluster_session(cluster, workers, threads_per_worker, memory_limit, cluster_config)
               if needs_cluster else nullcontext(None))
    with lock, session as client, run_report(report_dir, client, command=command, echo=typer.echo):
        if prepare is not None:
            prepare(client, good)
        report = run_collection(good, lambda item: work(item, client), command=command, client=client,
                                window=in_flight, echo=_echo, failed=bad)
    if not finish_later:
        finish(report, several=len(items) > 1)
    return report


def _echo(line: str) -> None:
    typer.echo(line, err=line.startswith("error: "))


def finish(report: CollectionReport, *, several: bool = True) -> None:
    """The summary line (for a collection), and exit 2 when any tomogram failed."""
    if several:
        typer.echo(report.summary())
    elif report.count("skipped") == len(report.outcomes):
        typer.echo(f"{report.command}: nothing to do, already done with these parameters")
    if report.failed:
        raise typer.Exit(2)
