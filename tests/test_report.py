"""Run reports: stages measured inside real worker processes, summed, printed and written."""

from __future__ import annotations

import json
import os
import time
import timeit

import numpy as np

from conftest import write_raw_mrc
from cryodask.cli import main
from cryodask.report import stages
from cryodask.report.stages import stage


def rows_of(report: dict) -> dict:
    return {(r["step"], r["stage"]): r for r in report["stages"]}


def test_stages_cost_microseconds_and_nested_ones_are_exclusive():
    stages.activate("unit", "test")
    try:
        def one():
            with stage("read", block="b") as s:
                s.bytes_read = 1

        n = 20000
        per_stage = timeit.timeit(one, number=n) / n
        with stage("infer", block="B"):
            time.sleep(0.05)
            with stage("read", bytes_read=7):
                time.sleep(0.1)
    finally:
        records = stages.collect("unit")
    assert per_stage < 50e-6  # ~5 µs on an idle core; generous for a loaded CI machine
    assert len(records) == n + 2
    infer, read = next(r for r in records if r["stage"] == "infer"), records[-2]
    assert (read["stage"], read["block"], read["bytes_read"]) == ("read", "B", 7)  # the block is inherited
    assert 0.09 < read["wall"] < 0.5 and 0.04 < infer["wall"] < 0.09  # infer leaves out its nested read
    assert not stages.active()
    with stage("read") as s:  # inactive: nothing recorded, nothing fails
        s.bytes_read = 3
    assert stages.collect() == []


def test_convert_report_from_worker_processes(tmp_path, capsys, client):
    data = np.random.default_rng(0).normal(size=(32, 64, 64)).astype(np.float32)
    src = write_raw_mrc(tmp_path / "tomo.mrc", data)
    report = tmp_path / "report"
    code = main(["convert", str(src), "--out", str(tmp_path / "out"), "--chunks", "8,16,16", "--levels", "3",
                 "--cluster", client.scheduler.address, "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((report / "report.json").read_text())
    rows = rows_of(summary)
    read, write = rows["convert", "read"], rows["convert", "write"]
    assert read["bytes_read"] == data.nbytes  # level 0 reads every voxel of the input once
    assert read["blocks"] == 4 and rows["convert", "preprocess"]["blocks"] >= 4
    assert write["bytes_written"] == data.nbytes + data.nbytes // 8  # levels 0 and 1, from the same read
    assert rows["pyramid", "read"]["bytes_read"] == data.nbytes // 8  # level 2 reads level 1
    for r in summary["records"]:
        assert r["wall"] > 0 and r["cpu"] >= 0 and r["peak_rss"] > 0
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in summary["records"]}
    assert os.getpid() not in pids  # measured in the worker processes, collected back
    assert "<title>Dask Performance Report</title>" in (report / "dask-report.html").read_text()
    assert (report / "report.png").read_bytes()[:4] == b"\x89PNG"
    jsonl = (report / "stages.jsonl").read_text().splitlines()
    assert len(jsonl) == len(summary["records"])
    table = out[out.index("run report: convert"):]
    for name in ("read", "preprocess", "write", "pyramid"):
        assert name in table


def test_postprocess_report_and_no_files_without_report(tmp_path, capsys, client):
    mask = (np.random.default_rng(1).random((16, 48, 48)) < 0.3).astype(np.int8)
    src = write_raw_mrc(tmp_path / "mask.mrc", mask)
    report = tmp_path / "report"
    code = main(["postprocess", str(src), "--out", str(tmp_path / "a" / "post.mrc"), "--chunks", "8,24,24",
                 "--min-slices", "3", "--cluster", client.scheduler.address, "--report", str(report)])
    assert code == 0
    rows = rows_of(json.loads((report / "report.json").read_text()))
    assert rows["label", "read"]["bytes_read"] == mask.nbytes and rows["label", "read"]["blocks"] == 4
    assert rows["relabel", "write"]["bytes_written"] == mask.nbytes
    assert rows["label", "post-process"]["wall_s"] > 0
    capsys.readouterr()

    before = set(tmp_path.rglob("*"))
    code = main(["postprocess", str(src), "--out", str(tmp_path / "b" / "post.mrc"), "--chunks", "8,24,24",
                 "--min-slices", "3", "--cluster", client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 0
    assert "run report: postprocess" in out and "post-process" in out
    new = {p.relative_to(tmp_path).as_posix() for p in set(tmp_path.rglob("*")) - before}
    assert new == {"b"} | {f"b/{p.relative_to(tmp_path / 'a').as_posix()}" for p in (tmp_path / "a").rglob("*")}
    assert "post.mrc" in {p.name for p in (tmp_path / "b").iterdir()}  # what a run writes, and nothing else
