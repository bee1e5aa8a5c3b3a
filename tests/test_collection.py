"""The one collection runner: every input kind becomes named tomograms, a bounded window runs,
a bad tomogram is one line while the others go on, and every tomogram command takes a collection."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import write_raw_mrc
from cryodask.cli import main
from cryodask.engine.collection import Item, find_items, run_collection, stem
from cryodask.errors import InputError
from cryodask.synth.tomogram import synth_tomogram, write_tomogram


def _tomograms(folder: Path, n: int = 2, shape=(32, 64, 64)) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tomogram(folder / f"t{i}.mrc", synth_tomogram(shape, voxel_size=10.0, seed=i, snr=0.5))
            for i in range(n)]


def test_the_stem_rule_is_one_rule():
    assert stem("a/TS_01.rec") == stem("b/TS_01.zarr") == stem("TS_01.mrc.gz") == "TS_01"
    assert stem("x/TS_01.zarr/labels/membranes") == "TS_01_membranes"


def test_a_relion5_tomograms_star_lists_its_tomograms(tmp_path):
    project = tmp_path / "project"
    job = project / "Tomograms" / "job_tomo"
    (job / "tomograms").mkdir(parents=True)
    for name in ("TS_01", "TS_02"):
        write_raw_mrc(job / "tomograms" / f"{name}.mrc", np.zeros((4, 8, 8), np.float32))
    table = pd.DataFrame({"rlnTomoName": ["TS_01", "TS_02"],
                          "rlnTomoReconstructedTomogram": [f"Tomograms/job_tomo/tomograms/{n}.mrc"
                                                           for n in ("TS_01", "TS_02")]})
    starfile.write({"global": table}, job / "tomograms.star")
    items = find_items([job / "tomograms.star"])
    assert [(i.name, i.path.resolve()) for i in items] == [
        (n, (job / "tomograms" / f"{n}.mrc").resolve()) for n in ("TS_01", "TS_02")]

    names_only = tmp_path / "list"
    names_only.mkdir()
    write_raw_mrc(names_only / "a.mrc", np.zeros((4, 8, 8), np.float32))
    starfile.write(pd.DataFrame({"rlnTomoName": ["a"]}), names_only / "list.star")
    assert [i.name for i in find_items([names_only / "list.star"])] == ["a"]
    starfile.write(pd.DataFrame({"rlnTomoName": ["a", "missing"]}), names_only / "list.star")
    with pytest.raises(InputError, match="names tomogram missing"):
        find_items([names_only / "list.star"])


def test_a_copick_project_is_a_collection_of_its_runs(tmp_path, client):
    from cryodask.io.copick import convert_into, open_project

    _tomograms(tmp_path / "tomos")
    project = open_project(tmp_path / "copick.json", create=True)
    convert_into(project, [tmp_path / "tomos" / "t0.mrc", tmp_path / "tomos" / "t1.mrc"], client=client)
    items = find_items([tmp_path / "copick.json"])
    assert [(i.name, i.run) for i in items] == [("t0", "t0"), ("t1", "t1")]
    assert all(i.path.resolve().name == "wbp.zarr" for i in items)


def test_two_inputs_of_one_name_are_refused_before_any_work(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_raw_mrc(tmp_path / folder / "TS_1.mrc", np.zeros((4, 8, 8), np.float32))
    with pytest.raises(InputError, match="same name"):
        find_items([tmp_path / "a" / "TS_1.mrc", tmp_path / "b" / "TS_1.mrc"])


def test_the_window_bounds_tomograms_in_flight_and_a_failure_is_one_line():
    running, most, lock = [0], [0], threading.Lock()

    def work(item: Item):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        if item.name == "bad":
            raise InputError(f"{item.path}: broken header")
        return item.name

    items = [Item(Path(f"{n}.mrc"), n) for n in ("a", "b", "bad", "c", "d", "e")]
    lines = []
    report = run_collection(items, work, command="test", window=2, echo=lines.append, show_progress=False)
    assert most[0] == 2
    assert [o.status for o in report.outcomes] == ["done", "done", "failed", "done", "done", "done"]
    assert lines == ["error: bad.mrc: broken header"]
    assert report.summary().startswith("test: 6 tomograms: 5 done, 1 failed")


def test_pick_over_a_collection_writes_each_and_one_star_for_all(tmp_path, capsys, client):
    _tomograms(tmp_path / "tomos")
    out = tmp_path / "picks"
    assert main(["pick", str(tmp_path / "tomos"), "--out", str(out), "--diameter", "100",
                 "--cluster", client.scheduler.address]) == 0
    stdout = capsys.readouterr().out
    assert "pick: 2 tomograms: 2 done" in stdout
    every = starfile.read(out / "log_picks.star", always_dict=True)
    parts = [starfile.read(out / f"t{i}_log_picks.star", always_dict=True)["particles"] for i in range(2)]
    assert len(every["particles"]) == sum(len(p) for p in parts) > 0
    assert list(every["optics"]["rlnOpticsGroupName"]) == ["t0", "t1"]
    by_tomogram = every["particles"].groupby("rlnTomoName")["rlnOpticsGroup"].unique()
    assert {k: list(v) for k, v in by_tomogram.items()} == {"t0": [1], "t1": [2]}
    # a rerun of the same collection is the same: nothing appended twice
    assert main(["pick", str(tmp_path / "tomos"), "--out", str(out), "--diameter", "100",
                 "--cluster", client.scheduler.address]) == 0
    capsys.readouterr()
    assert len(starfile.read(out / "log_picks.star", always_dict=True)["particles"]) == len(every["particles"])


def test_postprocess_evaluate_and_export_take_a_collection(tmp_path, capsys, client):
    truths = _tomograms(tmp_path / "tomos")
    masks = tmp_path / "masks"
    assert main(["membranes", str(tmp_path / "tomos"), "--out", str(masks), "--method", "classical",
                 "--cluster", client.scheduler.address]) == 0
    assert "membranes: 2 tomograms: 2 done" in capsys.readouterr().out

    post = tmp_path / "post"
    assert main(["postprocess", *map(str, sorted(masks.glob("*_predicted_mask.mrc"))), "--out", str(post),
                 "--min-slices", "5", "--cluster", client.scheduler.address]) == 0
    capsys.readouterr()
    outputs = sorted(post.glob("*.mrc"))
    assert [p.name for p in outputs] == [f"t{i}_classical_predicted_mask_post_processed.mrc" for i in range(2)]
    for path in outputs:
        assert mrcfile.validate(str(path), print_file=open(os.devnull, "w"))

    scores = tmp_path / "scores"
    truth = str(Path(truths[0]["membranes"]).parent / "{name}_membranes.mrc")
    assert main(["evaluate", "membranes", str(masks / "*_predicted_mask.mrc"), "--truth", truth, "--out", str(scores),
                 "--cluster", client.scheduler.address]) == 0
    capsys.readouterr()
    table = pd.read_csv(scores / "evaluate_membranes.csv")
    assert list(table["tomogram"]) == ["t0", "t1", "mean"]
    assert (table["dice"].iloc[:2].between(0.3, 1).all()
            and np.isclose(table["dice"].iloc[2], table["dice"].iloc[:2].mean()))

    exported = tmp_path / "exported"
    assert main(["export", str(masks), "--out", str(exported), "--labels", "classical_predicted_mask"]) == 0
    capsys.readouterr()
    for i in range(2):
        with mrcfile.open(exported / f"t{i}_classical_predicted_mask.mrc") as m, \
                mrcfile.open(masks / f"t{i}_classical_predicted_mask.mrc") as ref:
            np.testing.assert_array_equal(m.data, ref.data)


def test_a_collection_with_a_truncated_mrc_finishes_the_rest(tmp_path, capsys, client):
    _tomograms(tmp_path / "tomos")
    good = (tmp_path / "tomos" / "t0.mrc").read_bytes()
    (tmp_path / "tomos" / "cut.mrc").write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    code = main(["pick", str(tmp_path / "tomos"), "--out", str(out), "--diameter", "100",
                 "--cluster", client.scheduler.address])
    stdout, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cut.mrc" in errors[0], err
    assert "3 tomograms: 2 done, 1 failed" in stdout
    assert sorted(p.name for p in out.glob("t*_log_picks.star")) == ["t0_log_picks.star", "t1_log_picks.star"]


def test_a_resumed_tomogram_says_how_many_blocks_were_already_done(tmp_path, client):
    from cryodask.engine.blocks import DoneMarks, plan_blocks
    from cryodask.engine.collection import Outcome
    from cryodask.engine.runner import run_blocks

    blocks = plan_blocks((4, 8, 8), (2, 4, 4))  # 8 blocks

    def work(item):
        marks = DoneMarks(tmp_path / item.name, "test", "k")
        if item.name == "half":
            for block in blocks[:3]:
                marks.mark(f"double/{block.name}", np.float64(2 * block.index[0]))
        values = run_blocks(client, lambda region: float(2 * region.block.index[0]), blocks, step="double",
                            marks=marks)
        return Outcome(item, "done", value=values, lines=[f"{item.name}:"])

    lines = []
    report = run_collection([Item(tmp_path / "fresh", "fresh"), Item(tmp_path / "half", "half")], work,
                            command="test", client=client, echo=lines.append, show_progress=False)
    assert [o.value for o in report.outcomes] == [[float(2 * b.index[0]) for b in blocks]] * 2
    assert lines.count("  resumed: 3 blocks already done were not redone") == 1
    assert lines.index("half:") + 1 == lines.index("  resumed: 3 blocks already done were not redone")
