"""``cryodask demo``: the README's first command, end to end, and resumable."""

from __future__ import annotations

from cryodask.cli import main
from cryodask.demo import run_demo


def test_demo_end_to_end_and_rerun(tmp_path, client):
    result = run_demo(tmp_path, tomograms=2, shape=(48, 96, 96), client=client)
    assert [row["convert"] for row in result.rows] == ["converted", "converted"]
    assert all(row["level-0 exact"] is True and row["labels dice"] == 1.0 for row in result.rows)
    assert all(0 < row["membrane %"] < 50 for row in result.rows)
    # the classical membrane filter and the LoG picker, scored against the truth
    assert all(row["membranes dice"] > 0.5 and row["post-processed dice"] > 0.5 for row in result.rows), result.rows
    assert all(row["LoG picks"] > 0 and row["picks F1"] > 0.5 for row in result.rows), result.rows
    # the micrograph methods, trained on three synthetic micrographs, scored on a fourth
    methods = {row["method"]: row for row in result.micrograph_rows}
    assert list(methods) == ["Autopick-BC", "CRISP U-Net + Dice", "CRISP + dense CRF"]
    assert methods["Autopick-BC"]["test accuracy"] > 0.75 and methods["Autopick-BC"]["pick F1"] > 0.5, methods
    for crisp in ("CRISP U-Net + Dice", "CRISP + dense CRF"):  # measured 0.77 / 0.70 IoU, F1 1.0 / 0.97
        assert methods[crisp]["particle IoU"] > 0.5 and methods[crisp]["pick F1"] > 0.7, methods
    previews = sorted(p.name for p in (tmp_path / "previews").glob("*.png"))
    assert previews == ["micrograph.png", "tomo_00.png", "tomo_01.png"]
    assert all((tmp_path / "previews" / p).stat().st_size > 10_000 for p in previews)
    again = run_demo(tmp_path, tomograms=2, shape=(48, 96, 96), client=client)
    assert [row["convert"] for row in again.rows] == ["skipped", "skipped"]


def test_demo_command(tmp_path, capsys, client):
    code = main(["demo", "--out", str(tmp_path), "--tomograms", "1", "--shape", "32,64,64",
                 "--cluster", client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 0
    header, row = out.splitlines()[1:3]
    assert header.split()[:2] == ["tomogram", "shape"] and row.split()[:2] == ["tomo_00", "32x64x64"]
    assert "True" in row and "1.0" in row
    assert "micrographs: trained on m0-m2, scored on m3" in out and "CRISP + dense CRF" in out
