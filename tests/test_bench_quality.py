"""``benchmarks/quality.py --quick``: the quality matrix's smallest run, its scores checked independently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _run(tmp_path, name):
    out = tmp_path / name
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"),
                    "--keep", str(out / "cells")], check=True, timeout=300)
    return out, json.loads((out / "quality.json").read_text())


def _f1(pred: np.ndarray, truth: np.ndarray, radius: float) -> tuple[int, int, int]:
    """tp, fp, fn of one-to-one matching within ``radius`` (Hungarian, written here from scipy)."""
    if not len(pred) or not len(truth):
        return 0, len(pred), len(truth)
    d = cdist(pred, truth)
    rows, cols = linear_sum_assignment(np.where(d <= radius, d, 1e6))
    tp = int((d[rows, cols] <= radius).sum())
    return tp, len(pred) - tp, len(truth) - tp


def test_quick_matrix_scores_what_the_cli_wrote_and_reuses_the_cache(tmp_path):
    out, result = _run(tmp_path, "first")
    cells = result["cells"]
    assert [(c["simulator"], c["polarity"]) for c in cells] == [("simple", "dark"), ("projection", "bright")]
    for cell in cells:
        assert "error" not in cell, cell["error"]
        assert cell["seconds"]["simulate"] > 0 and cell["seconds"]["membranes"] > 0 and cell["seconds"]["pick"] > 0
        folder = Path(cell["tomogram"]).parents[1]
        dark, bright = (mrcfile.read(folder / p / "tomo.mrc") for p in ("dark", "bright"))
        assert mrcfile.validate(str(cell["tomogram"]))
        np.testing.assert_array_equal(bright, -dark)  # bright is the same volume negated
        with mrcfile.open(cell["tomogram"]) as mrc:
            assert np.isclose(float(mrc.voxel_size.x), cell["voxel_size"])  # what the CLI reads it from
            assert list(mrc.data.shape) == cell["shape"]

        # Dice, recomputed from the mask the CLI wrote and the truth
        kept = out / "cells" / (f"{cell['simulator']}_vs{cell['voxel_size']:g}_snr{cell['snr']:g}_"
                                f"{cell['polarity']}_seed0")
        mask = mrcfile.read(next((kept / "membranes").glob("*_classical_predicted_mask.mrc"))) != 0
        truth = mrcfile.read(folder / cell["polarity"] / "truth" / "tomo_membranes.mrc") != 0
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert np.isclose(cell["dice"], dice, atol=1e-6)

        # F1 of class 1, recomputed from the picks' CSV (voxels) and the truth STAR, radius = half the diameter
        picks = pd.read_csv(next((kept / "pick").glob("*_log_picks.csv")))[["x", "y", "z"]].to_numpy()
        table = starfile.read(folder / cell["polarity"] / "truth" / "tomo_particles.star")
        table = table[table["rlnClassNumber"] == 1]
        assert len(table) == cell["particles"] > 0
        truth_xyz = table[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
        tp, fp, fn = _f1(picks, truth_xyz, cell["diameter_A"] / 2 / cell["voxel_size"])
        assert (cell["tp"], cell["fp"], cell["fn"]) == (tp, fp, fn)
        assert np.isclose(cell["f1"], 2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        passed = cell["dice"] >= result["targets"]["dice"] and cell["f1"] >= result["targets"]["f1"]
        assert cell["verdict"] == ("PASS" if passed else "MISS")
        assert cell["polarity_decided"] in ("dark", "bright", "dark?", "n/a", "dark/n/a", "bright/n/a", "dark?/n/a")

    table = (out / "quality.md").read_text()
    assert table.startswith("| simulator | voxel Å | shape | SNR 0.3 dark | SNR 0.3 bright |")
    assert f"| simple | 28 | 32×64×64 | {cells[0]['dice']:.2f} / {cells[0]['f1']:.2f}" in table
    assert "--quick" in result["command"] and "--quick" in table

    _, rerun = _run(tmp_path, "second")  # the same cells from the cache: no simulation, the same scores
    for before, after in zip(cells, rerun["cells"]):
        assert after["seconds"]["simulate"] == 0
        assert (after["dice"], after["f1"]) == (before["dice"], before["f1"])
