"""Particle coordinates on micrographs (STAR 3.0/3.1, EMAN .box, .coords, CSV) and RELION 5 tomography picks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial import cKDTree

from conftest import one_line_error
from cryodask.io.particles import (match_name, note_skipped, read_box, read_particles, write_box, write_coords,
                                   write_csv, write_particles_star)
from cryodask.io.picks import read_picks

FALCON = "Falcon_2012_06_12-14_33_35_0"


def random_centres(seed, n, size=500):
    return np.random.default_rng(seed).uniform(10, size - 10, (n, 2)).round(3)


@pytest.mark.parametrize("pixel_size", [None, 1.77], ids=["relion3.0", "relion3.1"])
def test_star_round_trip(tmp_path, pixel_size):
    coords = {"mic_a": random_centres(0, 7), "mic_b": random_centres(1, 3), "mic_c": np.empty((0, 2))}
    scores = {name: np.linspace(0, 1, len(c)) for name, c in coords.items()}
    path = write_particles_star(tmp_path / "p.star", coords, scores=scores, pixel_size=pixel_size)
    blocks = starfile.read(path, always_dict=True)
    assert ("optics" in blocks) == (pixel_size is not None) and not (tmp_path / "p.star.partial").exists()
    if pixel_size:
        assert blocks["optics"]["rlnMicrographPixelSize"][0] == pixel_size
    table = blocks["particles" if pixel_size else ""]
    assert list(table.columns[:4]) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                       "rlnAutopickFigureOfMerit"]
    np.testing.assert_allclose(table["rlnCoordinateX"][:7], coords["mic_a"][:, 1])  # x is the column

    # names given as micrograph paths match the STAR's names
    back = read_particles(path, ["Movies/mic_a.mrc", "mic_b", "mic_c", "mic_d"])
    assert sorted(back) == ["mic_a", "mic_b", "mic_c", "mic_d"] and back["mic_d"].shape == (0, 2)
    for name, centres in coords.items():
        np.testing.assert_allclose(back[name], centres, atol=1e-6)

    shapes = {"mic_a": (500, 500), "mic_b": (600, 500), "mic_c": (500, 500)}
    write_particles_star(tmp_path / "f.star", coords, shapes=shapes, flip_y=True)
    flipped = starfile.read(tmp_path / "f.star")
    np.testing.assert_allclose(flipped["rlnCoordinateY"][7:], 600 - coords["mic_b"][:, 0])
    back = read_particles(tmp_path / "f.star", list(coords), shapes=shapes, flip_y=True)
    np.testing.assert_allclose(back["mic_b"], coords["mic_b"], atol=1e-6)


def test_box_coords_and_csv_round_trips(tmp_path):
    centres = random_centres(2, 11)
    centres[0] = (100, 200)
    write_box(tmp_path / "m1_pos.box", centres, 64)
    assert (tmp_path / "m1_pos.box").read_text().splitlines()[0] == "168\t68\t64\t64"  # x, y of the corner
    read, sizes = read_box(tmp_path / "m1_pos.box")
    np.testing.assert_allclose(read, centres, atol=1e-9)
    assert (sizes == 64).all()
    write_coords(tmp_path / "m2.coords", centres)
    assert (tmp_path / "m2.coords").read_text().splitlines()[0] == "200 100"
    write_csv(tmp_path / "m3_particles.csv", centres)
    names = ["m1", "m2", "m3", "m4"]
    for file, name in (("m1_pos.box", "m1"), ("m2.coords", "m2"), ("m3_particles.csv", "m3")):
        np.testing.assert_allclose(read_particles(tmp_path / file, names)[name], centres, atol=1e-9)
    folder = read_particles(tmp_path, names, shapes={n: (500, 500) for n in names})  # one folder, mixed formats
    assert [len(folder[n]) for n in names] == [11, 11, 11, 0]
    glob = read_particles(str(tmp_path / "m[12]*"), names)
    assert [len(glob[n]) for n in names] == [11, 11, 0, 0]

    (tmp_path / "z.coords").write_text("# x y z\n10 20 3\n\n11.5 21 4\n")  # IMOD / napari-boxmanager, with z
    np.testing.assert_allclose(read_particles(tmp_path / "z.coords", ["z"])["z"], [[20, 10], [21, 11.5]])
    (tmp_path / "u.csv").write_text("X-Coordinate,Y-Coordinate,Diameter\n5,6,108\n")  # CryoPPP
    np.testing.assert_allclose(read_particles(tmp_path / "u.csv", ["u"])["u"], [[6, 5]])


def test_names_match_by_stem_and_suffix_word():
    names = ["a", "a_b", "mic_1"]
    assert match_name("a", names) == "a"
    assert match_name("a_autopick", names) == "a"
    assert match_name("a_b_manualpick", names) == "a_b"  # the longest name wins
    assert match_name("a_b", names) == "a_b"
    assert match_name("mic_1_true", names) == "mic_1"
    assert match_name("mic_1_2", names) is None  # another micrograph's number, not a suffix word
    assert match_name("mic_10", names) is None and match_name("b", names) is None


def test_real_starfile_corpus(data_dir):
    star = data_dir / "star" / "starfile"
    one_loop = read_particles(star / "one_loop.star", ["tomo_ts01.mrc_15.00Apx"])["tomo_ts01.mrc_15.00Apx"]
    assert one_loop.shape == (16, 2)
    np.testing.assert_allclose(one_loop[0], [1084.5, 1572.444])
    for name in ("rln3.1_data_style.star", "single_line_end_of_multiblock.star"):
        both = read_particles(star / name, ["0001_sum", "0002_sum"])
        np.testing.assert_allclose(both["0001_sum"], [[1268, 587]])
        np.testing.assert_allclose(both["0002_sum"], [[1268, 685]])
    middle = read_particles(star / "single_line_middle_of_multiblock.star", ["0001_sum", "0002_sum"])
    assert len(middle["0001_sum"]) == 1 and len(middle["0002_sum"]) == 0
    one_line_error(lambda: read_particles(star / "empty_loop.star", ["x"]), star / "empty_loop.star", "no table with")
    one_line_error(lambda: read_particles(star / "postprocess.star", ["x"]), star / "postprocess.star", "no table with")


def test_cryoppp_star_and_csv_agree(data_dir):
    folder = data_dir / "empiar10017" / "cryoppp"
    star = read_particles(folder / f"{FALCON}.star", [FALCON])[FALCON]
    csv = read_particles(folder / f"{FALCON}.csv", [FALCON])[FALCON]
    assert star.shape == (629, 2)
    np.testing.assert_allclose(star, csv)
    one_line_error(lambda: read_particles(folder, [FALCON]), folder, "which .* has too")  # two files, one micrograph


def test_eman_box_convention_against_cryoppp(data_dir):
    """autopick-bc's boxes count y from the bottom of the JPEG: flipped, they sit on CryoPPP's particles."""
    root = data_dir / "empiar10017"
    names = sorted(p.stem for p in (root / "micrographs").glob("*.jpg"))
    shapes = {name: (4096, 4096) for name in names}
    truth = cKDTree(read_particles(root / "cryoppp" / f"{FALCON}.star", [FALCON])[FALCON])

    def near(kind, flip):
        centres = read_particles(root / "boxes" / kind, names, shapes=shapes, flip_y=flip)
        assert sum(len(c) > 0 for c in centres.values()) == len(names)
        distance, _ = truth.query(centres[FALCON])
        return (distance <= 20).mean()

    assert near("pos", True) >= 0.65
    assert near("pos", False) <= 0.15
    assert near("neg", True) <= 0.02


def test_bad_coordinate_inputs_are_one_line_errors(tmp_path, capsys):
    write_box(tmp_path / "other_pos.box", random_centres(3, 4), 50)
    message = one_line_error(lambda: read_particles(tmp_path / "other_pos.box", ["mic_1", "mic_2"]),
                             tmp_path / "other_pos.box", "matches no micrograph")
    assert "mic_1, mic_2" in message

    # coordinates of micrographs not given are skipped and said; a source matching none is an error
    write_particles_star(tmp_path / "p.star", {"mic_1": random_centres(4, 3), "stranger": random_centres(5, 2)})
    read = read_particles(tmp_path / "p.star", ["mic_1", "mic_2"])
    assert [len(read["mic_1"]), len(read["mic_2"])] == [3, 0] and read.skipped == [f"{tmp_path / 'p.star'}: stranger"]
    write_particles_star(tmp_path / "q.star", {"stranger": random_centres(5, 2)})
    message = one_line_error(lambda: read_particles(tmp_path / "q.star", ["mic_1", "mic_2"]), tmp_path / "q.star",
                             "lists micrograph stranger")
    assert "mic_1, mic_2" in message
    (tmp_path / "boxes").mkdir()
    write_box(tmp_path / "boxes" / "mic_1.box", random_centres(3, 5), 50)
    write_box(tmp_path / "boxes" / "mic_9.box", random_centres(3, 6), 50)
    read = read_particles(tmp_path / "boxes", ["mic_1"])
    assert len(read["mic_1"]) == 5 and read.skipped == [f"{tmp_path / 'boxes' / 'mic_9.box'}: mic_9"]
    note_skipped(read)
    assert capsys.readouterr().err.strip().startswith("note: coordinates of 1 micrograph(s) not given were skipped")
    one_line_error(lambda: read_particles(tmp_path / "boxes", ["mic_5"]), tmp_path / "boxes",
                   "each of its 2 coordinate files matches no micrograph given")

    write_box(tmp_path / "mic_1.box", [[100, 450], [30, 20]], 50)
    message = one_line_error(lambda: read_particles(tmp_path / "mic_1.box", ["mic_1"], shapes={"mic_1": (400, 400)}),
                             tmp_path / "mic_1.box", "1 of 2 centres of micrograph mic_1 lie outside")
    assert "flip_y" in message
    assert len(read_particles(tmp_path / "mic_1.box", ["mic_1"], shapes={"mic_1": (500, 500)})["mic_1"]) == 2
    one_line_error(lambda: read_particles(tmp_path / "mic_1.box", ["mic_1"], flip_y=True), tmp_path / "mic_1.box",
                   "flip_y needs the image height")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "mic_1.box").write_text("")
    (tmp_path / "empty" / "mic_2.coords").write_text("# nothing picked\n")
    one_line_error(lambda: read_particles(tmp_path / "empty", ["mic_1", "mic_2"]), tmp_path / "empty", "no coordinates")

    for text, problem in (("10 20 30\n", "line 1 has 3 columns"), ("1 2 3 4\n1 2 x 4\n", "line 2 is not numbers"),
                          ("\x00\xff\xfe garbage", "not"), ("1 2 -5 -5\n", "must be positive")):
        (tmp_path / "mic_2.box").write_bytes(text.encode("latin-1"))
        one_line_error(lambda: read_particles(tmp_path / "mic_2.box", ["mic_2"]), tmp_path / "mic_2.box", problem)
    (tmp_path / "mic_2.coords").write_text("1\n")
    one_line_error(lambda: read_particles(tmp_path / "mic_2.coords", ["mic_2"]), tmp_path / "mic_2.coords", "1 columns")
    (tmp_path / "mic_2.csv").write_text("a,b\n1,2\n")
    one_line_error(lambda: read_particles(tmp_path / "mic_2.csv", ["mic_2"]), tmp_path / "mic_2.csv", "columns x and y")
    (tmp_path / "mic_2.star").write_text("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 abc\n")
    one_line_error(lambda: read_particles(tmp_path / "mic_2.star", ["mic_2"]), tmp_path / "mic_2.star", "not numbers")
    one_line_error(lambda: read_particles(tmp_path / "mic_2.txt", ["mic_2"]), tmp_path / "mic_2.txt", "no such file")
    (tmp_path / "mic_2.txt").write_text("1 2\n")
    one_line_error(lambda: read_particles(tmp_path / "mic_2.txt", ["mic_2"]), tmp_path / "mic_2.txt",
                   "not a coordinate file")


def test_relion_listing_of_per_micrograph_files(tmp_path):
    """RELION's autopick.star names one coordinate file per micrograph."""
    job = tmp_path / "AutoPick" / "job006"
    (job / "Movies").mkdir(parents=True)
    write_particles_star(job / "Movies" / "a_autopick.star", {"a": [[10, 20], [30, 40]]})
    write_box(job / "Movies" / "b.box", [[50, 60]], 20)
    listing = pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/Movies/a.mrc", "MotionCorr/job002/Movies/b.mrc"],
                            "rlnMicrographCoordinates": ["Movies/a_autopick.star", "Movies/b.box"]})
    starfile.write({"coordinate_files": listing}, job / "autopick.star")
    picks = read_particles(job / "autopick.star", ["a", "b", "c"])
    np.testing.assert_allclose(picks["a"], [[10, 20], [30, 40]])
    np.testing.assert_allclose(picks["b"], [[50, 60]])
    assert picks["c"].shape == (0, 2)


# ---------------------------------------------------------------- RELION 4/5 tomography (read_picks)

CYLINDRA = ("star", "relion-tomo-cylindra")


def test_relion5_centred_picks_become_tomogram_pixels(data_dir, tmp_path):
    project = data_dir.joinpath(*CYLINDRA)
    particles = project / "Picks" / "job_picks" / "particles.star"
    picks = read_picks(particles)  # its tomograms.star is named by optimisation_set.star beside it
    # TS_01: 84 x 136 x 44 px at 10.52 Å, binning 1; first pick at (-176.94, 765.48, 11.16) Å from the centre
    np.testing.assert_allclose(picks.coords[0], [11.16 / 10.52 + 22, 765.48005 / 10.52 + 68, -176.94 / 10.52 + 42])
    assert picks.coords.shape == (5, 3) and picks.pixel_size == pytest.approx(10.52)
    refined = read_picks(project / "Refine3D" / "job_refine" / "run_it050_data.star")
    assert refined.coords.shape == (5, 3) and np.isfinite(refined.coords).all()
    class3d = read_picks(project / "Class3D" / "job_class3d" / "run_it025_data.star")
    assert class3d.coords.shape == (10, 3)

    # binned tomograms: sizes are in tilt-series pixels, the result in pixels of the binned tomogram
    tomos = starfile.read(project / "Tomograms" / "job_tomo" / "tomograms.star")
    tomos["rlnTomoTomogramBinning"] = 4.0
    tomos["rlnTomoSizeX"] = 336
    starfile.write({"global": tomos}, tmp_path / "tomograms.star")
    alone = tmp_path / "elsewhere" / "particles.star"
    alone.parent.mkdir()
    alone.write_bytes(particles.read_bytes())
    binned = read_picks(alone, tomograms=tmp_path / "tomograms.star")
    np.testing.assert_allclose(binned.coords[0], [(11.16 / 10.52 + 22) / 4, (765.48005 / 10.52 + 68) / 4,
                                                  (-176.94 / 10.52 + 168) / 4])
    assert binned.pixel_size == pytest.approx(42.08)
    # found above
    assert read_picks(tmp_path / "elsewhere" / ".." / "elsewhere" / "particles.star").coords.shape == (5, 3)

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "particles.star").write_bytes(particles.read_bytes())
    one_line_error(lambda: read_picks(lonely / "particles.star", tomograms=tmp_path / "none.star"),
                   tmp_path / "none.star",
                   "no such file")
    tomos.loc[0, "rlnTomoName"] = "TS_99"
    starfile.write({"global": tomos}, lonely / "tomograms.star")
    one_line_error(lambda: read_picks(lonely / "particles.star"), lonely / "particles.star", "names tomogram TS_01")


def test_relion5_without_tomograms_star_is_refused(data_dir, tmp_path):
    alone = tmp_path / "a" / "b" / "c" / "d" / "particles.star"
    alone.parent.mkdir(parents=True)
    alone.write_bytes(data_dir.joinpath(*CYLINDRA, "Picks", "job_picks", "particles.star").read_bytes())
    (tmp_path / "tomograms.star").write_text("data_\n")  # four levels up, out of the project's reach
    one_line_error(lambda: read_picks(alone), alone, "RELION 5 centred coordinates")


def test_relion4_tomography_pixels_read_as_written(tmp_path):
    table = pd.DataFrame({"rlnTomoName": ["TS_01", "TS_02"], "rlnCoordinateX": [10.0, 20.0],
                          "rlnCoordinateY": [30.0, 40.0], "rlnCoordinateZ": [5.0, 6.0]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnTomoTiltSeriesPixelSize": [1.35]})
    starfile.write({"optics": optics, "particles": table}, tmp_path / "r4.star")
    picks = read_picks(tmp_path / "r4.star")
    np.testing.assert_allclose(picks.coords, [[5, 30, 10], [6, 40, 20]])
    assert picks.pixel_size == 1.35 and list(picks.table["rlnTomoName"]) == ["TS_01", "TS_02"]
