"""RELION 5 tomography STAR out and in: centred Å picks with a ``tomograms.star``, checked with
``starfile`` and against a real RELION 5 project (``data_dir / "star/relion-tomo-cylindra"``: cylindra's test
project, github.com/hanjinliu/cylindra, BSD-3)
(its column names, its ``# version 50001`` lines, its picks placed through its tomograms.star)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import one_line_error
from cryodask.cli import main
from cryodask.evaluate import evaluate_picks
from cryodask.io.picks import CENTRED_AXES, read_picks, tomogram_row, write_picks, write_relion5
from cryodask.picking.pipeline import load_prompts
from cryodask.synth.tomogram import synth_tomogram, write_tomogram

CYLINDRA = ("star", "relion-tomo-cylindra")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def version_lines(path) -> list[bool]:
    """For each ``data_`` line of a STAR file: is the closest non-blank line above it RELION's version line?"""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [i > 0 and lines[i - 1] == "# version 50001" for i, line in enumerate(lines) if line.startswith("data_")]


def project_file(data_dir, *parts):
    return data_dir.joinpath(*CYLINDRA, *parts)


def test_written_star_has_relion5_columns_and_version_lines(data_dir, tmp_path):
    coords = np.random.default_rng(0).uniform(0, 40, (12, 3))
    scores = np.linspace(1, 0, 12)
    path = write_relion5(tmp_path / "t_log_picks.star", coords, tomogram_row("t", (48, 96, 96), 10.0, 2.5),
                         {"rlnAutopickFigureOfMerit": scores})
    blocks = starfile.read(path, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    ours, optics = blocks["particles"], blocks["optics"]
    assert len(ours) == 12 and (ours["rlnTomoName"] == "t").all() and (ours["rlnOpticsGroup"] == 1).all()
    np.testing.assert_allclose(ours["rlnAutopickFigureOfMerit"], scores, atol=1e-6)

    reference = starfile.read(project_file(data_dir, "Refine3D", "job_refine", "run_it050_data.star"), always_dict=True)
    picks = starfile.read(project_file(data_dir, "Picks", "job_picks", "particles.star"))
    # every particle column but the score is one RELION 5 writes; the picks' own columns all present
    assert set(ours.columns) - {"rlnAutopickFigureOfMerit"} <= set(reference["particles"].columns)
    assert set(picks.columns) <= set(ours.columns)
    assert list(ours.columns[:4]) == list(picks.columns) == ["rlnTomoName", *CENTRED_AXES.values()]
    assert set(optics.columns) <= set(reference["optics"].columns)
    assert {"rlnTomoTiltSeriesPixelSize", "rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage"} - set(optics.columns) \
        == {"rlnVoltage"}  # the microscope is only written when known (StarStyle gives it)
    assert optics["rlnTomoTiltSeriesPixelSize"].iloc[0] == 2.5 and optics["rlnOpticsGroupName"].iloc[0] == "t"

    tomograms = starfile.read(tmp_path / "tomograms.star", always_dict=True)
    ref_tomograms = starfile.read(project_file(data_dir, "Tomograms", "job_tomo", "tomograms.star"), always_dict=True)
    assert list(tomograms) == list(ref_tomograms) == ["global"]
    assert set(tomograms["global"].columns) <= set(ref_tomograms["global"].columns)
    row = tomograms["global"].iloc[0]
    assert (row["rlnTomoSizeX"], row["rlnTomoSizeY"], row["rlnTomoSizeZ"]) == (384, 384, 192)  # tilt-series pixels
    assert row["rlnTomoTomogramBinning"] == 4.0 and row["rlnTomoTiltSeriesPixelSize"] == 2.5
    # the version line before every block, as in RELION 5's own files
    for star in (path, tmp_path / "tomograms.star",
                 project_file(data_dir, "Refine3D", "job_refine", "run_it050_data.star"),
                 project_file(data_dir, "Tomograms", "job_tomo", "tomograms.star")):
        assert all(version_lines(star)) and version_lines(star), star


@pytest.mark.parametrize("voxel, tilt_series, shape", [(10.0, None, (48, 96, 96)), (10.0, 2.5, (48, 96, 96)),
                                                       (10.52, 3.105, (45, 97, 95))],
                         ids=["unbinned", "binned-4", "binned-3.39"])
def test_round_trip_gives_the_same_coordinates(tmp_path, voxel, tilt_series, shape):
    coords = np.random.default_rng(1).uniform(0, 1, (200, 3)) * (np.array(shape) - 1)
    coords[0] = [0, 0, 0]
    row = tomogram_row("tomo", shape, voxel, tilt_series)
    write_relion5(tmp_path / "p.star", coords, row)
    back = read_picks(tmp_path / "p.star")
    error = np.abs(back.coords - coords).max()
    assert error < 1e-6, error  # %.6f Å printing: at most 5e-7 Å / tilt-series pixel
    assert back.pixel_size == pytest.approx(voxel, rel=1e-9)
    # voxel (0, 0, 0) is half a tomogram from the centre, in Å, whatever the binning
    first = starfile.read(tmp_path / "p.star")["particles"].iloc[0]
    ts = voxel if tilt_series is None else tilt_series
    expected = [-row[f"rlnTomoSize{a}"] / 2 * ts for a in "XYZ"]
    np.testing.assert_allclose([first[CENTRED_AXES[a]] for a in "xyz"], expected, atol=1e-6)
    assert [row[f"rlnTomoSize{a}"] for a in "ZYX"] == [round(n * voxel / ts) for n in shape]


def test_reference_coordinates_written_back_as_relion_wrote_them(data_dir, tmp_path):
    """The real picks → tomogram pixels → our writer, with our row for TS_01 (84 × 136 × 44 at
    10.52 Å): the centred Å are RELION's to the printed digit, and our row its sizes."""
    particles = project_file(data_dir, "Picks", "job_picks", "particles.star")
    ts01 = read_picks(particles, tomo_name="TS_01")
    assert len(ts01.coords) == 3 and set(ts01.table["rlnTomoName"]) == {"TS_01"}
    row = tomogram_row("TS_01", (44, 136, 84), 10.52)
    write_relion5(tmp_path / "again.star", ts01.coords, row)
    again = starfile.read(tmp_path / "again.star")["particles"]
    original = starfile.read(particles).iloc[:3]
    for column in CENTRED_AXES.values():
        np.testing.assert_allclose(again[column], original[column], atol=1e-5)
    ours = starfile.read(tmp_path / "tomograms.star").iloc[0]
    theirs = starfile.read(project_file(data_dir, "Tomograms", "job_tomo", "tomograms.star")).iloc[0]
    for column in ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ", "rlnTomoTiltSeriesPixelSize",
                   "rlnTomoTomogramBinning"):
        assert ours[column] == pytest.approx(theirs[column]), column


def test_reference_picks_filtered_to_the_tomogram_at_hand(data_dir, tmp_path):
    particles = project_file(data_dir, "Picks", "job_picks", "particles.star")
    everything = read_picks(particles)
    assert everything.coords.shape == (5, 3)
    ts02 = read_picks(particles, tomo_name="TS_02")
    np.testing.assert_allclose(ts02.coords, everything.coords[3:])
    # the tomogram's file stem matches through rlnTomoReconstructedTomogram (…/14pf_MT.mrc)
    np.testing.assert_allclose(read_picks(particles, tomo_name="14pf_MT").coords, ts02.coords)
    # TS_02 is 84 × 136 × 44 px at 10.52 Å: its first pick at (-58.030014, 386.650021, 9.08) Å from the centre
    np.testing.assert_allclose(ts02.coords[0], [9.08 / 10.52 + 22, 386.650021 / 10.52 + 68, -58.030014 / 10.52 + 42])
    one_line_error(lambda: read_picks(particles, tomo_name="tomo"), particles, "names 2 tomograms .*none is tomo")
    # --tomograms FILE: the project's tomograms.star given for a copy kept elsewhere
    alone = tmp_path / "a" / "b" / "c" / "d" / "particles.star"
    alone.parent.mkdir(parents=True)
    alone.write_bytes(particles.read_bytes())
    given = read_picks(alone, tomograms=project_file(data_dir, "Tomograms", "job_tomo", "tomograms.star"),
                       tomo_name="TS_01")
    np.testing.assert_allclose(given.coords, everything.coords[:3])
    # prompts for a tomogram at hand binned 2× (21.04 Å): the same places, in its voxels
    prompts = load_prompts(None, particles, shape=(22, 68, 42), voxel_size=21.04, tomo_name="14pf_MT")
    np.testing.assert_allclose(prompts, everything.coords[3:] / 2)


def test_several_tomograms_share_one_tomograms_star(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 40, (4, 3)), rng.uniform(0, 40, (6, 3))
    write_relion5(tmp_path / "a_log_picks.star", a, tomogram_row("a", (48, 96, 96), 10.0))
    write_relion5(tmp_path / "b_log_picks.star", b, tomogram_row("b", (64, 128, 128), 20.0, 5.0))
    write_relion5(tmp_path / "a_log_picks.star", a, tomogram_row("a", (48, 96, 96), 10.0))  # rerun: row replaced
    table = starfile.read(tmp_path / "tomograms.star")
    assert sorted(table["rlnTomoName"]) == ["a", "b"]
    assert table.set_index("rlnTomoName").loc["b", "rlnTomoSizeX"] == 512
    np.testing.assert_allclose(read_picks(tmp_path / "a_log_picks.star").coords, a, atol=1e-6)
    np.testing.assert_allclose(read_picks(tmp_path / "b_log_picks.star").coords, b, atol=1e-6)
    assert read_picks(tmp_path / "b_log_picks.star").pixel_size == pytest.approx(20.0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tomograms.star").write_text("data_x\n\nloop_\n_rlnFoo #1\n1\n")
    one_line_error(lambda: write_relion5(tmp_path / "bad" / "c.star", a, tomogram_row("c", (8, 8, 8), 1.0)),
                   tmp_path / "bad" / "tomograms.star", "no table with rlnTomoName")


def test_a_collection_star_is_laid_out_as_relions_own_multi_tomogram_file(data_dir, tmp_path):
    """``pick`` over a collection merges the tomograms' STARs into one: its blocks, columns, version
    lines and one optics group per tomogram (named after it) as in RELION 5's own Refine3D output of
    two tomograms; read back through RELION's tomograms.star rules, each tomogram's picks are its own."""
    from cryodask.io.picks import merge_particle_stars

    rng = np.random.default_rng(3)
    coords = {"TS_01": rng.uniform(0, 40, (5, 3)), "TS_02": rng.uniform(0, 60, (3, 3))}
    rows = {"TS_01": tomogram_row("TS_01", (48, 96, 96), 12.42, 3.105),
            "TS_02": tomogram_row("TS_02", (64, 128, 128), 12.42, 3.105)}
    parts = [write_relion5(tmp_path / f"{name}_log_picks.star", xyz, rows[name],
                           {"rlnAutopickFigureOfMerit": np.ones(len(xyz))}) for name, xyz in coords.items()]
    merged = merge_particle_stars(parts, tmp_path / "log_picks.star")

    ours = starfile.read(merged, always_dict=True)
    reference = starfile.read(project_file(data_dir, "Refine3D", "job_refine", "run_it050_data.star"),
                              always_dict=True)
    assert list(ours) == list(reference) == ["optics", "particles"]
    assert all(version_lines(merged)) and len(version_lines(merged)) == 2
    assert set(ours["optics"].columns) <= set(reference["optics"].columns)
    assert set(ours["particles"].columns) - {"rlnAutopickFigureOfMerit"} <= set(reference["particles"].columns)
    # as RELION's: groups 1..n, one per tomogram, each named after its tomogram
    assert list(ours["optics"]["rlnOpticsGroup"]) == list(reference["optics"]["rlnOpticsGroup"]) == [1, 2]
    assert list(ours["optics"]["rlnOpticsGroupName"]) == list(reference["optics"]["rlnOpticsGroupName"])
    groups = dict(zip(ours["optics"]["rlnOpticsGroup"], ours["optics"]["rlnOpticsGroupName"]))
    assert all(groups[g] == t for g, t in zip(ours["particles"]["rlnOpticsGroup"], ours["particles"]["rlnTomoName"]))
    for name, xyz in coords.items():
        back = read_picks(merged, tomograms=tmp_path / "tomograms.star", tomo_name=name)
        np.testing.assert_allclose(back.coords, xyz, atol=1e-6)


def test_evaluate_relion5_against_multi_tomogram_truth(data_dir, tmp_path, capsys):
    particles = project_file(data_dir, "Picks", "job_picks", "particles.star")
    ts01 = read_picks(particles, tomo_name="TS_01").coords
    (tmp_path / "pred").mkdir()
    pred = write_relion5(tmp_path / "pred" / "TS_01_log_picks.star", ts01[:2],
                         tomogram_row("TS_01", (44, 136, 84), 10.52))
    scores = evaluate_picks(pred, particles, radius=1.0)  # truth kept to TS_01, the one tomogram pred names
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 0, 1)
    csv = write_picks(tmp_path / "pred.csv", ts01)
    one_line_error(lambda: evaluate_picks(csv, particles, radius=1.0), particles, "holds picks of 2 tomograms")
    code, out, err = run(capsys, "evaluate", "picks", csv, particles, "--radius", "10", "--unit", "angstrom",
                         "--tomo", "13pf_MT", "--out", tmp_path / "eval")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "eval" / "picks_metrics.csv")["f1"].iloc[0] == 1.0
    alone = tmp_path / "elsewhere" / "x" / "y" / "z" / "truth.star"
    alone.parent.mkdir(parents=True)
    alone.write_bytes(particles.read_bytes())
    code, out, err = run(capsys, "evaluate", "picks", csv, alone, "--radius", "1", "--tomo", "TS_01", "--out",
                         tmp_path / "eval2", "--tomograms",
                         project_file(data_dir, "Tomograms", "job_tomo", "tomograms.star"))
    assert code == 0 and "f1                 1.0000" in out, out + err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return write_tomogram(folder / "tomo.mrc", synth_tomogram((48, 96, 96), voxel_size=10.0, seed=2, snr=0.5))


def test_pick_cli_writes_relion5_by_default_and_relion4_on_request(synthetic, tmp_path, capsys, client):
    common = ["--method", "log", "--diameter", "250", "--cluster", client.scheduler.address]
    code, out, err = run(capsys, "pick", synthetic["tomogram"], "--out", tmp_path / "r5", *common,
                         "--tilt-series-pixel-size", "2.5")
    assert code == 0, err
    star = tmp_path / "r5" / "tomo_log_picks.star"
    assert f"wrote {tmp_path / 'r5' / 'tomograms.star'}" in out
    blocks = starfile.read(star, always_dict=True)
    particles = blocks["particles"]
    assert (list(particles.columns[:4]) == ["rlnTomoName", *CENTRED_AXES.values()]
            and (particles["rlnTomoName"] == "tomo").all())
    assert "rlnAutopickFigureOfMerit" in particles.columns and "rlnCoordinateX" not in particles.columns
    assert blocks["optics"]["rlnTomoTiltSeriesPixelSize"].iloc[0] == 2.5
    tomo_row = starfile.read(tmp_path / "r5" / "tomograms.star").iloc[0]
    assert (tomo_row["rlnTomoName"], tomo_row["rlnTomoTomogramBinning"], tomo_row["rlnTomoSizeX"],
            tomo_row["rlnTomoSizeZ"]) == ("tomo", 4.0, 384, 192)
    assert tomo_row["rlnTomoReconstructedTomogram"] == str(synthetic["tomogram"].resolve())
    picked = pd.read_csv(tmp_path / "r5" / "tomo_log_picks.csv")[["z", "y", "x"]].to_numpy()
    assert len(picked) > 0
    relion5 = read_picks(star)
    np.testing.assert_allclose(relion5.coords, picked, atol=1e-5)
    assert relion5.pixel_size == pytest.approx(10.0)

    code, out, err = run(capsys, "pick", synthetic["tomogram"], "--out", tmp_path / "r4", *common, "--star", "relion4")
    assert code == 0, err
    old = starfile.read(tmp_path / "r4" / "tomo_log_picks.star", always_dict=True)
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ",
            "rlnAutopickFigureOfMerit"} <= set(old["particles"].columns)
    assert (old["optics"]["rlnTomoTiltSeriesPixelSize"].iloc[0] == 10.0
            and not (tmp_path / "r4" / "tomograms.star").exists())
    np.testing.assert_allclose(read_picks(tmp_path / "r4" / "tomo_log_picks.star").coords, picked, atol=1e-5)

    # copick's own RELION reader places both files at the same Å (corner origin) as the CSV's pixels × 10 Å
    from conftest import import_copick

    formats = import_copick("copick.util.formats")
    particles, optics = formats.read_star_particles_with_optics(str(star))
    tomograms = formats.read_relion_tomograms(str(tmp_path / "r5" / "tomograms.star"))
    angstrom = formats.relion_coordinates_to_angstrom(particles, tomograms=tomograms, optics=optics,
                                                      relion_version="relion5")
    np.testing.assert_allclose(angstrom, picked[:, ::-1] * 10.0, atol=1e-4)
    particles, optics = formats.read_star_particles_with_optics(str(tmp_path / "r4" / "tomo_log_picks.star"))
    angstrom = formats.relion_coordinates_to_angstrom(particles, optics=optics, relion_version="relion4")
    np.testing.assert_allclose(angstrom, picked[:, ::-1] * 10.0, atol=1e-4)


def test_pick_cli_refuses_bad_star_options(synthetic, data_dir, tmp_path, capsys):
    for args, match in ((["--star", "relion3"], "--star must be relion5 or relion4"),
                        (["--tilt-series-pixel-size", "20"], "larger than the tomogram's voxel size"),
                        (["--tilt-series-pixel-size", "-1"], "must be a positive"),
                        (["--voltage", "0"], "--voltage must be positive")):
        code, out, err = run(capsys, "pick", synthetic["tomogram"], "--out", tmp_path / "x", "--method", "log",
                             "--diameter", "250", *args)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1, (args, err)
    # RELION 5 prompts for a tomogram they do not name: refused before any model or cluster is needed
    particles = project_file(data_dir, "Picks", "job_picks", "particles.star")
    code, out, err = run(capsys, "pick", synthetic["tomogram"], "--out", tmp_path / "y", "--method", "cryosam",
                         "--prompts", particles)
    assert code != 0 and err.strip().startswith(f"error: {particles}: names 2 tomograms") and "none is tomo" in err, err
