"""``cryodask bench`` and the scaling study: real benchmark runs at small shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cryodask.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_quick_gives_medians_with_min_max_and_ratios(tmp_path, capsys):
    code = main(["bench", "--quick", "--only", "matching", "--repeat", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["repeat"] == 3 and summary["quick"] and summary["machine"]["cores"] >= 1
    entry = summary["benchmarks"]["matching"]
    assert set(entry["methods"]) >= {"hierarchical", "naive"}
    for method in entry["methods"].values():
        s = method["seconds"]
        assert s["runs"] == 3 and 0 < s["min"] <= s["median"] <= s["max"]
        assert method["peak_rss_mb"] > 0
    speedup = entry["ratios"]["hierarchical speed-up vs naive"]
    assert 0 < speedup["min"] <= speedup["median"] <= speedup["max"]
    assert entry["ratios"]["hierarchical recall vs naive"]["min"] >= 0.9  # the same picks as naive matching
    assert len(list((tmp_path / "raw").glob("matching-*/matching.json"))) == 3
    for png in ("ratios-matching.png", "memory.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "hierarchical speed-up vs naive" in out


def test_scaling_study_measures_efficiency_and_never_fakes_gpu_rows(tmp_path):
    shape = (16, 48, 48)
    subprocess.run([sys.executable, str(BENCHMARKS / "scaling.py"), "--workers", "1,2", "--repeat", "1",
                    "--tomograms", "2", "--shape", "16,48,48", "--gpu-workers", "1", "--results", str(tmp_path)],
                   check=True, timeout=300)
    result = json.loads((tmp_path / "scaling.json").read_text())
    cpu = {r["workers"]: r for r in result["rows"] if r["kind"] == "cpu"}
    assert set(cpu) == {1, 2}
    assert cpu[1]["efficiency"]["median"] == 1.0
    t1, t2 = cpu[1]["seconds"]["median"], cpu[2]["seconds"]["median"]
    assert np.isclose(cpu[2]["efficiency"]["median"], t1 / (2 * t2))
    stages = {s["stage"]: s for s in cpu[2]["stages"]}
    assert stages["read"]["bytes_read"] == 2 * np.prod(shape) * 4 and stages["infer"]["blocks"] == 2
    assert result["machine"]["cores"] and result["machine"]["memory_gb"] > 0
    gpu = [r for r in result["rows"] if r["kind"] == "gpu"]
    assert gpu or "not run" in result["skipped"]["gpu"]  # measured on a GPU, or said to be missing
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_without_a_source_checkout_says_so(tmp_path, capsys, monkeypatch):
    from cryodask.cli import bench

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "cryodask" / "cli" / "bench.py"))
    code = main(["bench", "--quick", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "benchmarks/ not found" in err
    assert not (tmp_path / "out").exists()
