"""``run_report``: what a compute command wraps around its work to get the run report.

Recording is switched on in every worker (a ``WorkerPlugin``, so workers that join later record
too) and in the client process; at the end the records are collected from the workers
(``client.run``), the one-table summary is printed, and with a report folder written there:
``report.json`` (summary and every record), ``report.png`` and Dask's ``dask-report.html``
(``distributed.performance_report``: task stream, worker profiles, bandwidth). With a folder,
each process also appends its records to ``stages.jsonl`` as they happen, so a killed run
leaves what it measured. Without one, nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path

from distributed import performance_report
from distributed.diagnostics.plugin import WorkerPlugin

from . import stages
from .summary import summarize, table

PLUGIN = "cryodask-report"


class ReportPlugin(WorkerPlugin):
    """Starts recording ``run`` in each worker process (``stages.activate``); stops on teardown."""

    name = PLUGIN

    def __init__(self, run: str, step: str, jsonl: str | None):
        self.run, self.step, self.jsonl = run, step, jsonl

    def setup(self, worker):
        stages.activate(self.run, self.step, self.jsonl)

    def teardown(self, worker):
        stages.collect(self.run)


class RunReport:
    """The live report of one run; ``summary`` is filled when the ``with`` block ends."""

    def __init__(self, command: str, folder: Path | None):
        self.command, self.folder = command, folder
        self.run = uuid.uuid4().hex[:12]
        self.summary: dict | None = None
        self.files: list[Path] = []


@contextlib.contextmanager
def run_report(report_dir=None, client=None, *, command: str, echo=print):
    """Record the stages of the block tasks run inside the block; print the table at the end.

    ``report_dir``: also write ``report.json``, ``report.png`` and ``dask-report.html`` there.
    ``client``: the ``distributed.Client`` the work runs on (None: only this process records).
    ``echo``: where the table goes (None: not printed; ``summary`` still holds it).

    >>> with run_report("report/", client, command="convert") as report:   # doctest: +SKIP
    ...     run_conversion(plan, client)
    >>> report.summary["stages"][0]["stage"]                                # doctest: +SKIP
    'read'
    """
    folder = Path(report_dir) if report_dir else None
    report = RunReport(command, folder)
    jsonl, scratch = None, None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        jsonl = str((folder / "stages.jsonl").resolve())
        Path(jsonl).unlink(missing_ok=True)
    elif client is None or _all_local(client):  # records on disk as they happen: a killed worker's stay
        import tempfile

        scratch = tempfile.mkdtemp(prefix="cryodask-report-")
        jsonl = str(Path(scratch) / "stages.jsonl")
    plugin = ReportPlugin(report.run, command, jsonl)
    if client is not None:
        client.register_plugin(plugin, name=PLUGIN)
    stages.activate(report.run, command, jsonl)
    workers = len(client.scheduler_info().get("workers", {})) if client is not None else None
    performance = contextlib.nullcontext()
    if folder is not None and client is not None:
        performance = performance_report(filename=str(folder / "dask-report.html"))
    start = time.perf_counter()
    try:
        with performance:
            yield report
    finally:
        wall = time.perf_counter() - start
        records = stages.collect(report.run)
        if client is not None:
            with contextlib.suppress(Exception):  # a dead cluster: keep what the client has
                for worker_records in client.run(stages.collect, report.run).values():
                    records += worker_records
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(PLUGIN)
        if jsonl is not None and Path(jsonl).exists():  # every process's records, a dead worker's too
            records = _read_jsonl(jsonl, report.run) or records
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        report.summary = summarize(records, command=command, wall_s=wall, workers=workers)
        if folder is not None:
            from .plots import report_png

            (folder / "report.json").write_text(json.dumps(report.summary, indent=1))
            report.files = [folder / "report.json", report_png(report.summary, folder / "report.png")]
            if (folder / "dask-report.html").exists():
                report.files.append(folder / "dask-report.html")
        if echo is not None:
            echo(table(report.summary))


def _all_local(client) -> bool:
    """Every worker on this machine (a LocalCluster): they can append to a file of the client's."""
    import socket

    try:
        hosts = {w.get("host") for w in client.scheduler_info().get("workers", {}).values()}
    except Exception:  # noqa: BLE001
        return False
    here = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        here.add(socket.gethostbyname(socket.gethostname()))
    return bool(hosts) and hosts <= here


def _read_jsonl(path: str, run: str) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):  # a line cut short by a kill
                record = json.loads(line)
                if record.get("run") == run:
                    records.append(record)
    return records
