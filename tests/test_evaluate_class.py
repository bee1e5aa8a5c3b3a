"""``evaluate picks --class N``: one particle kind of the synthetic truth (rlnClassNumber 1 and 2)
scored on its own, through the CLI, against a prediction with and without classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from cryodask.cli import main
from cryodask.errors import InputError
from cryodask.evaluate import evaluate_picks
from cryodask.io.picks import write_picks

RADIUS = 4.0


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory):
    """A synthetic tomogram's truth STAR (written by ``cryodask synth tomogram``), its rows split by
    kind, and predictions: every class-1 particle found (jittered) and none of class 2, with no
    class column, and the same picks labelled class 1 plus decoys labelled class 2."""
    root = tmp_path_factory.mktemp("classes")
    assert main(["synth", "tomogram", "--out", str(root / "t.mrc"), "--shape", "48,128,128", "--seed", "4"]) == 0
    truth_star = root / "truth" / "t_particles.star"
    table = starfile.read(truth_star)
    coords = table[["rlnCoordinateZ", "rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float)
    kinds = table["rlnClassNumber"].to_numpy()
    assert set(kinds) == {1, 2} and (kinds == 1).sum() >= 2 and (kinds == 2).sum() >= 2
    rng = np.random.default_rng(0)
    found = coords[kinds == 1] + rng.uniform(-1, 1, coords[kinds == 1].shape)
    plain = write_picks(root / "pred.star", found)
    decoys = coords[kinds == 2][:2] + 40.0  # labelled class 2, far from any particle
    labelled = write_picks(root / "pred_classes.star", np.concatenate([found, decoys]),
                           {"rlnClassNumber": np.r_[np.ones(len(found), int), np.full(len(decoys), 2)]})
    return {"truth": truth_star, "plain": plain, "labelled": labelled, "n1": int((kinds == 1).sum()),
            "n2": int((kinds == 2).sum()), "root": root}


def _cli(args, capsys):
    code = main(["evaluate", "picks", *map(str, args), "--radius", str(RADIUS)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _value(out: str, name: str) -> float:
    line = next(line for line in out.splitlines() if line.split()[:1] == [name])
    return float(line.split()[1])


def test_class_filters_the_truth_rows_and_changes_recall(tomogram, capsys, tmp_path):
    n1, n2 = tomogram["n1"], tomogram["n2"]
    code, out, _ = _cli([tomogram["plain"], tomogram["truth"], "--out", tmp_path / "all"], capsys)
    assert code == 0
    assert _value(out, "tp") == n1 and _value(out, "fn") == n2  # both kinds pooled: class 2 is all missed
    assert _value(out, "recall") == pytest.approx(n1 / (n1 + n2), abs=1e-4)
    code, out, _ = _cli([tomogram["plain"], tomogram["truth"], "--class", "1", "--out", tmp_path / "one"], capsys)
    assert code == 0 and _value(out, "recall") == 1.0 and _value(out, "fn") == 0 and _value(out, "tp") == n1
    assert "note:" in out and "no rlnClassNumber" in out  # the prediction has no classes: said once
    row = pd.read_csv(tmp_path / "one" / "picks_metrics.csv").iloc[0]
    assert row["class"] == 1 and row["tp"] == n1
    code, out, _ = _cli([tomogram["plain"], tomogram["truth"], "--class", "2", "--out", tmp_path / "two"], capsys)
    assert code == 0 and _value(out, "recall") == 0.0 and _value(out, "fn") == n2 and _value(out, "fp") == n1


def test_class_filters_a_prediction_that_has_classes(tomogram):
    n1, n2 = tomogram["n1"], tomogram["n2"]
    one = evaluate_picks(tomogram["labelled"], tomogram["truth"], RADIUS, class_number=1)
    assert one["pred_has_classes"] and (one["tp"], one["fp"], one["fn"]) == (n1, 0, 0)
    two = evaluate_picks(tomogram["labelled"], tomogram["truth"], RADIUS, class_number=2)
    assert (two["tp"], two["fp"], two["fn"]) == (0, 2, n2)  # only the two class-2 decoys are scored
    whole = evaluate_picks(tomogram["labelled"], tomogram["truth"], RADIUS)
    assert "class" not in whole and (whole["tp"], whole["fp"], whole["fn"]) == (n1, 2, n2)


def test_class_errors_are_one_line(tomogram, capsys):
    code, _, err = _cli([tomogram["plain"], tomogram["truth"], "--class", "3"], capsys)
    assert code != 0 and err.startswith("error:") and "\n" not in err.strip()
    assert "no particle of class 3" in err and "1, 2" in err
    # truth without classes cannot be split by kind
    code, _, err = _cli([tomogram["labelled"], tomogram["plain"], "--class", "1"], capsys)
    assert code != 0 and "has no rlnClassNumber column" in err and str(tomogram["plain"]) in err
    with pytest.raises(InputError, match="no particle of class 7"):
        evaluate_picks(tomogram["plain"], tomogram["truth"], RADIUS, class_number=7)
