"""``cryodask run``: a pipeline per tomogram over a collection on one cluster, resumed step by step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import yaml

from conftest import cli_error
from cryodask.cli import main
from cryodask.synth.tomogram import synth_tomogram, write_tomogram

PIPELINE = {
    "convert": {"chunks": [32, 64, 64], "levels": 2},
    "membranes": {"method": "classical"},
    "postprocess": {"min_slices": 5},
    "pick": {"method": "log", "diameter": 100},
    "evaluate": {"membranes": "{truth}/{{name}}_membranes.mrc", "picks": "{truth}/{{name}}_particles.star",
                 "radius": 5},
}


def _collection(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        paths = write_tomogram(folder / f"t{i}.mrc", synth_tomogram((32, 64, 64), voxel_size=10.0, seed=i, snr=0.5))
        assert Path(paths["membranes"]).parent == folder / "truth"
    return folder


def _pipeline(tmp_path: Path, truth: Path, steps=None) -> Path:
    steps = steps or PIPELINE
    text = yaml.safe_dump({k: ({kk: (vv.format(truth=truth) if isinstance(vv, str) else vv) for kk, vv in v.items()}
                               if k == "evaluate" else v) for k, v in steps.items()})
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def _outputs(out: Path) -> dict[str, object]:
    """Every MRC's data and every STAR's table, by name: what must not change on a rerun."""
    found = {}
    for path in sorted(out.glob("*.mrc")):
        with mrcfile.open(path) as m:
            found[path.name] = m.data.copy()
    for path in sorted(out.glob("*.star")):  # paths into the output folder named the same
        found[path.name] = {name: table.map(lambda v: v.replace(str(out), "OUT") if isinstance(v, str) else v)
                            for name, table in starfile.read(path, always_dict=True).items()}
    return found


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".mrc"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            for block in a[name]:
                pd.testing.assert_frame_equal(a[name][block], b[name][block], obj=f"{name} {block}")


def test_example_is_a_valid_pipeline_of_every_step(capsys):
    from cryodask.pipeline import ORDER, load_pipeline

    assert main(["run", "--example"]) == 0
    text = capsys.readouterr().out
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"example-{os.getpid()}.yaml"
    path.write_text(text)
    try:
        assert tuple(load_pipeline(path).steps) == ORDER
    finally:
        path.unlink()


@pytest.mark.parametrize("steps, match", [
    ({"membrane": {}}, "unknown step 'membrane' (did you mean membranes?)"),
    ({"membranes": {"thicknes": 40}}, "membranes: unknown option 'thicknes' (did you mean thickness?)"),
    ({"membranes": {"thickness": -40}}, "thickness"),
    ({"postprocess": {"min_slices": 3}}, "postprocess works on the masks of membranes"),
    ({"pick": {"method": "log"}}, "diameter"),
    ({"membranes": {}, "evaluate": {"picks": "x/{name}.star", "radius": 3}}, "evaluate: picks needs a pick step"),
])
def test_a_bad_pipeline_is_one_line_before_any_cluster(tmp_path, capsys, monkeypatch, steps, match):
    import cryodask.engine.cluster as cluster

    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("a cluster was started"))
    tomos = _collection(tmp_path / "tomos", 1)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(steps))
    err = cli_error(capsys, ["run", str(path), str(tomos), "--out", str(tmp_path / "out")])
    assert str(path) in err and match in err, err


def test_a_collection_runs_every_step_names_its_bad_file_and_resumes(tmp_path, capsys, client):
    tomos = _collection(tmp_path / "tomos")
    good = (tomos / "t0.mrc").read_bytes()
    (tomos / "broken.mrc").write_bytes(good[: len(good) // 2])  # a truncated MRC among them
    pipeline = _pipeline(tmp_path, tomos / "truth")
    out = tmp_path / "out"
    args = ["run", str(pipeline), str(tomos), "--out", str(out), "--cluster", client.scheduler.address]
    assert main(args) == 2
    stdout, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.mrc" in errors[0] and "Traceback" not in err, err
    assert "run: 4 tomograms: 3 done, 1 failed" in stdout
    assert "steps: 15 run, 0 skipped" in stdout  # 5 steps x 3 tomograms
    for i in range(3):
        assert (out / f"t{i}_classical_predicted_post_processed_mask.mrc").is_file()
        assert mrcfile.validate(str(out / f"t{i}_classical_predicted_mask.mrc"), print_file=open(os.devnull, "w"))
        particles = starfile.read(out / f"t{i}_log_picks.star", always_dict=True)["particles"]
        assert set(particles["rlnTomoName"]) == {f"t{i}"}
    scores = pd.read_csv(out / "evaluate.csv")
    assert list(scores["tomogram"]) == ["t0", "t1", "t2", "mean"]
    assert scores["membranes_dice"].iloc[:3].between(0.3, 1).all(), scores  # really scored, not zeros
    tomograms = starfile.read(out / "tomograms.star")  # one tomograms.star shared by the three
    assert sorted(tomograms["rlnTomoName"]) == ["t0", "t1", "t2"]
    before = _outputs(out)

    (tomos / "broken.mrc").unlink()
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "steps: 0 run, 15 skipped" in stdout and "3 skipped (already done)" not in stdout
    _same(before, _outputs(out))

    steps = dict(PIPELINE, pick={"method": "log", "diameter": 120})  # a changed step redoes it and what follows
    assert main(["run", str(_pipeline(tmp_path, tomos / "truth", steps)), *args[2:]]) == 0
    assert "steps: 6 run, 9 skipped" in capsys.readouterr().out


def test_a_killed_run_resumes_to_the_same_outputs(tmp_path, client):
    tomos = _collection(tmp_path / "tomos", 4)
    steps = {k: v for k, v in PIPELINE.items() if k != "evaluate"}
    pipeline = _pipeline(tmp_path, tomos / "truth", steps)
    reference = tmp_path / "reference"
    assert main(["run", str(pipeline), str(tomos), "--out", str(reference), "--cluster",
                 client.scheduler.address]) == 0

    out = tmp_path / "out"
    command = [sys.executable, "-c", "import sys; from cryodask.cli import main; sys.exit(main(sys.argv[1:]))",
               "run", str(pipeline), str(tomos), "--out", str(out), "--cluster", client.scheduler.address,
               "--in-flight", "1"]
    env = dict(os.environ, CRYODASK_BLOCK_DELAY="0.3")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    marks = out / ".cryodask" / "run"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(marks.glob("*/*.json"))) < 5:  # mid-way through the second
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(marks.glob("*/*.json")))
    assert 5 <= finished < 16, finished

    result = subprocess.run(command[:-2], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"steps: {16 - finished} run, {finished} skipped" in result.stdout, result.stdout
    _same(_outputs(reference), _outputs(out))
    assert not list(out.rglob("*.partial"))
