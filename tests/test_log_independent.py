"""The LoG picker's defaults on data it was not tuned on (issue 14): an independent generator
(``log_generator``: soft spheres, a Fourier missing wedge, planes and vesicles), membranes
rejected, particles under a 60° wedge kept, what each rule removed reported, and the shape
tests switched from the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from log_generator import scipy_baseline, soft_spheres

from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.io.mrc import write_mrc
from cryodask.metrics import picking_scores
from cryodask.picking.log import LogParams, describe, log_pick


def f1(picks, truth, radius):
    return picking_scores(picks[["z", "y", "x"]].to_numpy(), truth, radius)["f1"]


@pytest.fixture(scope="module")
def crowded():
    """12 particles of 220 Å at 10 Å/voxel, SNR 0.1, ±60° wedge, a plane and a vesicle as distractors."""
    return soft_spheres((48, 128, 128), n=12, snr=0.1, planes=1, vesicles=1, seed=11)


def test_f1_on_the_independent_generator_beats_the_scipy_baseline(crowded):
    """Measured: defaults 1.0, the issue's ten lines of scipy 1.0; the old shape-test defaults
    (0.08, 0.45), tuned on one generator, reject every particle (F1 0)."""
    volume, centres, _ = crowded
    picks = log_pick(volume, volume.shape, 10.0, LogParams(diameter=220), chunks=(24, 64, 64))
    ours = f1(picks, centres, 11)
    baseline = picking_scores(scipy_baseline(volume, 10.0, 220), centres, 11)["f1"]
    assert ours >= 0.9 and ours >= baseline, (ours, baseline)
    # the bound can fail: the old defaults, tuned on one generator, lose these particles
    old = log_pick(volume, volume.shape, 10.0, LogParams(diameter=220, min_roundness=0.08, max_scale_ratio=0.45))
    assert f1(old, centres, 11) < 0.5


def test_membranes_are_rejected_and_the_reason_counted():
    """A dark plane and a vesicle shell, no particle: the LoG fires on them, roundness removes it."""
    volume, centres, membranes = soft_spheres((48, 128, 128), n=0, snr=0.5, planes=1, vesicles=1, seed=3)
    assert len(centres) == 0 and membranes.any()
    loose = log_pick(volume, volume.shape, 10.0, LogParams(diameter=220, min_roundness=None))
    assert len(loose) >= 3  # without the test: picks on the membranes
    params = LogParams(diameter=220)
    picks = log_pick(volume, volume.shape, 10.0, params)
    counts = picks.attrs["log"]["counts"]
    assert len(picks) <= 1 and counts["roundness"] >= len(loose) - 1, (len(picks), counts)
    line = describe(picks, params)
    assert f"{counts['roundness']} not round" in line and "\n" not in line


@pytest.mark.parametrize("wedge", [60, 45])
def test_particles_under_a_missing_wedge_are_kept(wedge):
    """Tilts to ±60° and ±45°: stretched along z, still round in y, x and of the asked size
    (the old roundness, smallest eigenvalue / trace, lost 1-2 of 10 at ±45°)."""
    volume, centres, _ = soft_spheres((48, 128, 128), n=10, snr=0.3, wedge=wedge, seed=5)
    picks = log_pick(volume, volume.shape, 10.0, LogParams(diameter=220))
    assert picking_scores(picks[["z", "y", "x"]].to_numpy(), centres, 11)["recall"] == 1.0
    assert picks.attrs["log"]["counts"]["roundness"] + picks.attrs["log"]["counts"]["scale ratio"] <= 1


def test_larger_particles_fail_the_scale_test():
    """Balls 1.5x the asked diameter answer more at 1.5σ than at σ: the scale test drops them."""
    volume, centres, _ = soft_spheres((48, 128, 128), diameter=330, n=6, snr=0.3, seed=6)
    picks = log_pick(volume, volume.shape, 10.0, LogParams(diameter=220))
    assert picking_scores(picks[["z", "y", "x"]].to_numpy(), centres, 11)["tp"] == 0
    assert picks.attrs["log"]["counts"]["scale ratio"] >= 4
    loose = log_pick(volume, volume.shape, 10.0, LogParams(diameter=220, max_scale_ratio=None))
    assert picking_scores(loose[["z", "y", "x"]].to_numpy(), centres, 11)["tp"] >= 4


def test_counts_do_not_depend_on_the_block_grid(crowded):
    volume = crowded[0]
    params = LogParams(diameter=220, threshold=2.0)
    whole = log_pick(volume, volume.shape, 10.0, params, chunks=volume.shape)
    blocked = log_pick(volume, volume.shape, 10.0, params, chunks=(16, 40, 48))
    assert whole.attrs["log"]["counts"] == blocked.attrs["log"]["counts"]
    np.testing.assert_allclose(whole[["z", "y", "x", "score"]].to_numpy(), blocked[["z", "y", "x", "score"]].to_numpy())
    c = whole.attrs["log"]["counts"]
    assert c["maxima"] == c["threshold"] + c["roundness"] + c["scale ratio"] + c["suppression"] + c["picks"]


def test_pick_command_prints_the_rule_counts_and_takes_none(crowded, tmp_path, capsys, client):
    volume = crowded[0]
    path = write_mrc(tmp_path / "indep.mrc", volume, voxel_size=10.0)
    base = ["pick", str(path), "--method", "log", "--diameter", "220", "--cluster", client.scheduler.address]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.lstrip().startswith("LoG:"))
    assert "under the threshold" in line and "not round (roundness < 0.2)" in line and "scale ratio > 0.85" in line
    picks = int(line.rsplit("; ", 1)[1].split()[0])
    assert f"{picks} picks (log)" in out

    assert main([*base, "--out", str(tmp_path / "b"), "--min-roundness", "none", "--max-scale-ratio", "None"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.lstrip().startswith("LoG:"))
    assert "not round" not in line and "scale ratio" not in line

    for option, value in (("--min-roundness", "round"), ("--max-scale-ratio", "0"), ("--min-roundness", "0.5")):
        code = main([*base, "--out", str(tmp_path / "c"), option, value])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and option in lines[0], (option, value, err)


def test_number_or_none_refuses_words():
    from cryodask.picking.pipeline import pick_params
    from cryodask.validate import cli_message

    params = pick_params("log", diameter=220, min_roundness="none", max_scale_ratio="0.5")
    assert (params.min_roundness, params.max_scale_ratio) == (None, 0.5)
    assert params.threshold == LogParams.threshold  # what is not given keeps its one default
    with pytest.raises(InputError) as info:
        pick_params("log", diameter=220, max_scale_ratio="big")
    assert cli_message(info.value) == "--max-scale-ratio must be a number or none, got 'big'"


def test_a_flat_volume_says_why_it_has_no_picks():
    params = LogParams(diameter=60)
    picks = log_pick(np.full((16, 24, 24), 3.0, np.float32), (16, 24, 24), 10.0, params)
    assert picks.empty
    assert describe(picks, params) == "LoG: the volume (or its response) is constant: nothing to pick; 0 picks"
