"""Autopick-BC on real β-galactosidase micrographs (EMPIAR-10017, https://www.ebi.ac.uk/empiar/EMPIAR-10017/;
``--data``: the CryoSegNet JPEGs and Autopick-BC's box labels, by default in a data folder beside the checkout).

Fixed split of the 14 micrographs: the 4 in ``TEST`` are held out, the other 10 train.
Good = ``boxes/pos``, bad = ``boxes/neg`` (autopick-bc's manual labels: 216 px EMAN boxes
with y from the bottom, so ``flip_y``), bin 4 → 54 px windows.

1. ``train`` on the 10 training micrographs: the command's own shuffled test split
   (accuracy / precision / recall / AUC), as Autopick-BC reports it.
2. ``classify`` the held-out micrographs' pos and neg boxes: accuracy / precision / recall
   on micrographs the model never saw (Autopick-BC reports 0.936 / 0.929 / 0.982 on its
   own test split of this protein).
3. ``repick`` the held-out micrographs (sliding window, NMS) and match the true picks
   (Hungarian, within 54 px = the particle radius) to the positive boxes (sparse labels:
   recall is the meaningful number) and to the 629 dense CryoPPP centres of
   Falcon_2012_06_12-14_33_35_0 (no flip: they are in array space).

    nice -n 10 python benchmarks/autopick_empiar10017.py

Writes ``benchmarks/results/autopick_empiar10017.json`` (and keeps the model and picks under
``--work``, default a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATA = HERE.parents[1] / "shared" / "data" / "empiar10017"
TEST = ["Falcon_2012_06_12-14_33_35_0", "Falcon_2012_06_12-15_53_09_0", "Falcon_2012_06_12-16_51_03_0",
        "Falcon_2012_06_12-17_02_43_0"]
DENSE = "Falcon_2012_06_12-14_33_35_0"
BOX, BIN, RADIUS = 216, 4, 54.0


def _linked(folder: Path, files) -> Path:
    """A folder of symbolic links: the readers take folders, and each split is a subset."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())
    return folder


def _layout(work: Path, data: Path) -> dict[str, Path]:
    mics = sorted((data / "micrographs").glob("*.jpg"))
    train = [m for m in mics if m.stem not in TEST]
    test = [m for m in mics if m.stem in TEST]
    assert len(train) == 10 and len(test) == 4, (len(train), len(test))
    out = {}
    for split, chosen in (("train", train), ("test", test)):
        names = {m.stem for m in chosen}
        out[f"{split}_mics"] = _linked(work / split / "micrographs", chosen)
        for kind in ("pos", "neg"):
            boxes = [b for b in sorted((data / "boxes" / kind).glob("*.box")) if b.stem in names]
            out[f"{split}_{kind}"] = _linked(work / split / kind, boxes)
    return out


def _scores(star: Path) -> np.ndarray:
    import starfile

    tables = starfile.read(star, always_dict=True).values()
    return next(t for t in tables if "rlnAutopickFigureOfMerit" in t.columns)["rlnAutopickFigureOfMerit"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--work", default=None, help="keep the model and picks here (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--shift", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride", type=float, default=None, help="repick stride (default box/4)")
    parser.add_argument("--radius", type=float, default=None, help="repick NMS distance (default box/2)")
    parser.add_argument("--results", default=str(HERE / "results" / "autopick_empiar10017.json"))
    args = parser.parse_args()

    from cryodask.engine.cluster import connect
    from cryodask.io.particles import read_particles
    from cryodask.metrics.picking import match_picks
    from cryodask.micrographs.autopick.classify import classify
    from cryodask.micrographs.autopick.metrics import classification_scores
    from cryodask.micrographs.autopick.repick import RepickParams, repick
    from cryodask.micrographs.autopick.train import TrainParams, train

    start = time.perf_counter()
    data = Path(args.data)
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        paths = _layout(work / "inputs", data)
        params = TrainParams(box_size=BOX, bin=BIN, epochs=args.epochs, lr=args.lr, patience=args.patience,
                             shift=args.shift, seed=args.seed)
        summary = {"input": {"data": str(data), "test_micrographs": TEST, "box": BOX, "bin": BIN,
                             "match_radius_px": RADIUS, "workers": args.workers, "cpus": os.cpu_count(),
                             "training": asdict(params)}}
        with connect("local", workers=args.workers) as client:
            clock = time.perf_counter()
            trained = train(paths["train_mics"], paths["train_pos"], paths["train_neg"], work / "model",
                            params=params, flip_y=True, client=client, log=lambda m: print(m, file=sys.stderr))
            summary["train"] = {"test_split": trained.test, "counts": trained.counts, "epochs": len(trained.history),
                                "seconds": time.perf_counter() - clock, "phases": trained.seconds}
            print(f"train: {trained.test}", file=sys.stderr)

            clock = time.perf_counter()
            labels, scores = [], []
            for kind, label in (("pos", True), ("neg", False)):
                result = classify(paths["test_mics"], work / "model", paths[f"test_{kind}"], work / f"classify_{kind}",
                                  flip_y=True, client=client)
                values = np.concatenate([result.scores[n] for n in TEST])
                labels.append(np.full(len(values), label))
                scores.append(values)
            summary["classify_held_out"] = {**classification_scores(np.concatenate(labels), np.concatenate(scores)),
                                            "seconds": time.perf_counter() - clock,
                                            "reference_autopick_bc": {"accuracy": 0.936, "precision": 0.929,
                                                                      "recall": 0.982}}
            print(f"classify: {summary['classify_held_out']}", file=sys.stderr)

            clock = time.perf_counter()
            rp = RepickParams(stride=args.stride, radius=args.radius)
            report = repick(paths["test_mics"], work / "model", work / "repick", params=rp, client=client,
                            overwrite=True)
            summary["repick"] = {"params": asdict(rp.resolved(BOX)), "seconds": time.perf_counter() - clock,
                                 "micrographs": report.results}
        names = TEST
        shapes = {n: (4096, 4096) for n in names}
        picks = {n: read_particles(work / "repick" / f"{n}_true.star", [n])[n] for n in names}
        pick_scores = {n: _scores(work / "repick" / f"{n}_true.star") for n in names}
        positives = read_particles(paths["test_pos"], names, shapes=shapes, flip_y=True)
        per_mic, tp, n_pred, n_truth = {}, 0, 0, 0
        for n in names:
            m = match_picks(picks[n], positives[n], RADIUS)
            per_mic[n] = m.scores()
            tp, n_pred, n_truth = tp + m.tp, n_pred + m.n_pred, n_truth + m.n_truth
        summary["repick"]["vs_positive_boxes"] = {
            "recall": tp / n_truth, "precision_lower_bound": tp / n_pred, "tp": tp, "picks": n_pred,
            "positives": n_truth, "per_micrograph": per_mic,
            "note": "the positive boxes are sparse labels (about 130 of ~630 particles per micrograph): "
                    "precision against them is a lower bound, recall is the meaningful number"}
        dense = read_particles(data / "cryoppp" / f"{DENSE}.csv", [DENSE])[DENSE]
        sweep = []
        for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
            keep = pick_scores[DENSE] >= t
            sweep.append({"threshold": t, "picks": int(keep.sum()),
                          **match_picks(picks[DENSE][keep], dense, RADIUS).scores()})
        summary["repick"]["vs_cryoppp_dense"] = {"micrograph": DENSE, "truth": len(dense),
                                                 **match_picks(picks[DENSE], dense, RADIUS).scores(),
                                                 "threshold_sweep": sweep}
        summary["wall_seconds"] = time.perf_counter() - start
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(summary, indent=2, default=float))
    t, c = summary["train"]["test_split"], summary["classify_held_out"]
    v, d = summary["repick"]["vs_positive_boxes"], summary["repick"]["vs_cryoppp_dense"]
    print(f"train test split  : acc {t['accuracy']:.3f} P {t['precision']:.3f} R {t['recall']:.3f} (n {t['n']})")
    print(f"held-out classify : acc {c['accuracy']:.3f} P {c['precision']:.3f} R {c['recall']:.3f} (n {c['n']})")
    print(f"repick vs pos     : R {v['recall']:.3f} ({v['tp']}/{v['positives']}), {v['picks']} picks")
    print(f"repick vs CryoPPP : P {d['precision']:.3f} R {d['recall']:.3f} F1 {d['f1']:.3f} ({d['tp']}/{d['truth']})")
    print(f"wall {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
