"""The command line on bad input: one line per problem, exit code 2, never a traceback,
and the good tomograms of the batch still converted."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from conftest import write_raw_mrc
from cryodask.cli import main
from cryodask.io.omezarr import open_image


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def make_bad_inputs(folder, data_dir=None):
    """Each bad file and the words its error must contain."""
    good = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    cases = {}
    write_raw_mrc(folder / "truncated.mrc", good)
    with open(folder / "truncated.mrc", "r+b") as f:
        f.truncate(1024 + 1000)
    cases["truncated.mrc"] = "truncated"
    (folder / "garbage.mrc").write_bytes(b"not an mrc file" * 10)
    cases["garbage.mrc"] = "not a readable MRC"
    write_raw_mrc(folder / "flat.mrc", good[0])
    cases["flat.mrc"] = "not a 3D volume"
    nan = good.copy()
    nan[5, 2, 2] = np.inf
    write_raw_mrc(folder / "inf.mrc", nan)
    cases["inf.mrc"] = "NaN or Inf"
    write_raw_mrc(folder / "novoxel.mrc", good, voxel_size=0.0)
    cases["novoxel.mrc"] = "voxel size"
    (folder / "notes.map").write_bytes(b"")
    cases["notes.map"] = "not a readable MRC"
    return good, cases


def test_bad_inputs_each_fail_in_one_line_and_good_ones_convert(tmp_path, capsys, client):
    good, cases = make_bad_inputs(tmp_path)
    write_raw_mrc(tmp_path / "good.mrc", good)
    code, out, err = run(capsys, "convert", tmp_path, "--out", tmp_path / "out", "--chunks", "4,8,8",
                         "--levels", "2", "--cluster", client.scheduler.address)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == len(cases)
    for name, words in cases.items():
        line = next(line for line in lines if name in line)
        assert words in line, line
    assert "converted" in next(line for line in out.splitlines() if "good.mrc" in line)
    assert f"1 of {len(cases) + 1} tomograms ready" in out
    np.testing.assert_array_equal(open_image(tmp_path / "out" / "good.zarr")[1][0][:], good)


@pytest.mark.parametrize("args,words", [
    (["missing.mrc"], "no such file"),
    (["x.txt"], "unsupported format"),
    (["nothing*.mrc"], "matches no file"),
    (["good.mrc", "--chunks", "4,0,8"], "--chunks"),
    (["good.mrc", "--ngff", "0.3"], "--ngff"),
    (["good.mrc", "--levels", "0"], "--levels"),
    (["good.mrc", "--dtype", "int64"], "--dtype"),
    (["good.mrc", "--voxel-size", "-1"], "--voxel-size"),
    (["good.mrc", "--cluster", "kubernetes"], "--cluster"),
])
def test_option_and_path_errors_stop_before_any_cluster(tmp_path, capsys, monkeypatch, args, words):
    import cryodask.engine.cluster

    monkeypatch.setattr(cryodask.engine.cluster, "make_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    write_raw_mrc(tmp_path / "good.mrc", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "x.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "convert", *args, "--out", tmp_path / "out")
    assert code == 2
    assert len(error_lines(err)) == 1 and words in error_lines(err)[0], err


def test_voxel_size_option_fixes_a_missing_header_value(tmp_path, capsys, client):
    write_raw_mrc(tmp_path / "novoxel.mrc", np.ones((4, 8, 8), np.float32), voxel_size=0.0)
    code, _, err = run(capsys, "convert", tmp_path / "novoxel.mrc", "--out", tmp_path / "out", "--voxel-size", "13.5",
                       "--cluster", client.scheduler.address)
    assert code == 0, err
    assert open_image(tmp_path / "out" / "novoxel.zarr")[2] == (13.5, 13.5, 13.5)


def test_unwritable_output(tmp_path, capsys):
    write_raw_mrc(tmp_path / "good.mrc", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "file").write_text("a file, not a folder")
    code, _, err = run(capsys, "convert", tmp_path / "good.mrc", "--out", tmp_path / "file" / "out")
    assert code == 2 and "not writable" in error_lines(err)[0]


def test_console_script_exit_code_and_one_line(tmp_path):
    (tmp_path / "broken.mrc").write_bytes(b"\0" * 100)
    result = subprocess.run([sys.executable, "-m", "cryodask", "convert", str(tmp_path / "broken.mrc"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [f"error: {tmp_path / 'broken.mrc'}: not a readable MRC file (Couldn't read "
                                          "enough bytes for MRC header)"]


def test_export_round_trip_and_errors(tmp_path, capsys, client):
    data = np.random.default_rng(5).integers(-100, 100, size=(9, 20, 30)).astype(np.int16)
    write_raw_mrc(tmp_path / "t.mrc", data, voxel_size=7.0)
    assert run(capsys, "convert", tmp_path / "t.mrc", "--out", tmp_path, "--chunks", "4,8,8",
               "--cluster", client.scheduler.address)[0] == 0
    store = tmp_path / "t.zarr"
    assert run(capsys, "export", store, "--out", tmp_path / "back.mrc")[0] == 0
    with mrcfile.open(tmp_path / "back.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        assert mrc.voxel_size.x == pytest.approx(7.0)
        assert mrc.header.dmax == data.max() and mrc.header.dmin == data.min()
    assert run(capsys, "export", store, "--out", tmp_path / "l1.mrc", "--level", "1")[0] == 0
    with mrcfile.open(tmp_path / "l1.mrc") as mrc:
        assert mrc.data.shape == (5, 10, 15) and mrc.voxel_size.z == pytest.approx(14.0)
    for args, words in ([store, "--out", tmp_path / "x.mrc", "--level", "3"], "levels 0..2"), \
                       ([store, "--out", tmp_path / "x.mrc", "--labels", "nope"], "no label image"), \
                       ([tmp_path / "t.mrc", "--out", tmp_path / "x.mrc"], "not an OME-Zarr"):
        code, _, err = run(capsys, "export", *args)
        assert code == 2 and words in error_lines(err)[0], err
    shutil.rmtree(store)
