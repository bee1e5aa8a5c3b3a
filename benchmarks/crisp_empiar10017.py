"""CRISP on real micrographs: EMPIAR-10017 β-galactosidase (https://www.ebi.ac.uk/empiar/EMPIAR-10017/).

The 14 micrographs as the CryoSegNet project filtered them (4096² JPEG, 1.77 Å/px) with its particle
masks and CryoPPP centres, read from ``DATA`` (a data folder beside the checkout).

Fixed split: TEST = the four micrographs below, TRAIN = the other ten. For each ``--configs``
entry (``network:loss``) a model is trained from the masks (``masks/<name>_mask.jpg`` > 127,
disks of 108 px around the CryoPPP centres) at ``--bin`` (8: 512² images, particle diameter
13.5 px) with ``cryodask.micrographs.crisp.train``, unless ``<work>/<network>_<loss>_bin<N>``
already holds one. Then ``cryodask.micrographs.crisp.predict`` segments the four test
micrographs on a LocalCluster and scores, with and without the dense CRF:

- pixel accuracy, precision, recall, IoU, F1 of the particle class against the truth masks,
  computed at FULL resolution (the predicted binned mask repeated ``bin``×``bin``), pooled
  over the four micrographs;
- picking precision/recall/F1 (Hungarian matching within the particle radius, 54 px) of the
  particles extracted from each mask against the manual positive boxes (``boxes/pos``,
  flip_y; sparse labels, so recall is the meaningful number) and against the 629 CryoPPP
  centres of Falcon_2012_06_12-14_33_35_0 (dense truth).

The CRF parameters used on the test set are the ones ``crisp train`` chose on (up to four of)
its TRAIN micrographs (a small grid, best pooled IoU; ``config.json["crf"]``), never on the test
set, with its decision (``apply``: what ``crisp predict --crf auto`` does); CRISP's default
parameters are reported too.

    nice -n 10 python benchmarks/crisp_empiar10017.py --bin 8 --epochs 30 --configs unet:dice

Scratch (models, predictions) goes to ``--work`` (default ``$CRYODASK_BENCH_DIR`` or /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATA = HERE.parent.parent / "shared" / "data" / "empiar10017"
TEST = ["Falcon_2012_06_12-14_33_35_0", "Falcon_2012_06_12-15_53_09_0", "Falcon_2012_06_12-16_51_03_0",
        "Falcon_2012_06_12-17_02_43_0"]
CRYOPPP = "Falcon_2012_06_12-14_33_35_0"
DIAMETER = 108.0


def split():
    mics = sorted((DATA / "micrographs").glob("*.jpg"))
    return [p for p in mics if p.stem not in TEST], [p for p in mics if p.stem in TEST]


def train_model(work: Path, network: str, loss: str, args) -> tuple[Path, dict]:
    from cryodask.micrographs.crisp.train import TrainParams, train

    model = work / (f"{network}_{loss}_bin{args.bin}" + ("_w" + "-".join(map(str, args.widths)) if args.widths else ""))
    fresh = not (model / "model.pt").exists()
    if fresh:
        train_paths, _ = split()
        params = TrainParams(model=network, loss=loss, widths=args.widths, bin=args.bin, epochs=args.epochs,
                             crop=args.crop, batch_size=args.batch_size, lr=args.lr, seed=0)
        clock = time.time()
        train(train_paths, model, masks=DATA / "masks", params=params,
              log=lambda line: print(f"{network}+{loss} {line} ({time.time() - clock:.0f} s)", flush=True))
    history = json.loads((model / "training_log.json").read_text())
    config = json.loads((model / "config.json").read_text())
    return model, {"trained_this_run": fresh, "seconds": history[-1]["seconds"], "epochs": len(history),
                   "final_loss": history[-1]["loss"],
                   "first_loss": history[0]["loss"], "params": config["train"], "diameter": config["diameter"]}


def stored_crf(model: Path) -> dict:
    """The CRF choice ``crisp train`` stored with the model (settings, both training IoUs, decision)."""
    crf = json.loads((model / "config.json").read_text()).get("crf")
    if crf is None:
        raise SystemExit(f"{model} was trained before crisp train chose a CRF: delete it or use another --work")
    return crf


def evaluate(model: Path, out: Path, crf_params, extract: str, client) -> dict:
    from cryodask.micrographs.crisp.predict import PredictParams, predict

    _, test_paths = split()
    boxes = out.parent / "test_boxes"
    boxes.mkdir(parents=True, exist_ok=True)
    for name in TEST:
        link = boxes / f"{name}.box"
        if not link.exists():
            link.symlink_to(DATA / "boxes" / "pos" / f"{name}.box")
    params = PredictParams(crf=True, crf_params=crf_params, extract=extract, diameter=DIAMETER)
    for folder in (out, out.with_name(out.name + "_cryoppp")):
        shutil.rmtree(folder, ignore_errors=True)  # predict afresh: a resumed run would time nothing
    clock = time.time()
    report = predict(test_paths, model, out, params=params, truth_masks=DATA / "masks", truth_particles=boxes,
                     truth_flip_y=True, client=client)
    seconds = time.time() - clock
    dense = predict([DATA / "micrographs" / f"{CRYOPPP}.jpg"], model, out.with_name(out.name + "_cryoppp"),
                    params=params, truth_particles=DATA / "cryoppp" / f"{CRYOPPP}.star", client=client)
    result = {"predict_wall_seconds_4_micrographs": seconds,
              "task_seconds_per_micrograph": {r["name"]: r["seconds"] for r in report.results},
              "failed": report.failed + dense.failed}
    for variant in ("nocrf", "crf"):
        pooled = report.summary[variant]["pooled"]
        row = dense.results[0]["metrics"][variant]
        result[variant] = {
            "pixels_full_resolution": {k: pooled[k] for k in ("pixel_accuracy", "precision", "recall", "iou", "f1")},
            "pixels_per_micrograph_iou": {r["name"]: r["metrics"][variant]["iou"] for r in report.results},
            "picking_vs_positive_boxes": {k.removeprefix("pick_"): pooled[k] for k in
                                          ("pick_precision", "pick_recall", "pick_f1", "pick_tp", "pick_fp",
                                           "pick_fn")},
            "picking_vs_cryoppp_14_33_35": {k.removeprefix("pick_"): row[k] for k in
                                            ("pick_precision", "pick_recall", "pick_f1", "pick_tp", "pick_fp",
                                             "pick_fn")}
            | {"n_picks": row["n_picks"], "n_truth": row["n_truth"]},
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--widths", type=lambda t: tuple(int(v) for v in t.split(",")), default=None,
                        help="network channels per level (default: the network's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--configs", nargs="+", default=["unet:dice"], help="network:loss pairs")
    parser.add_argument("--extract", nargs="+", default=["peaks", "components"], help="particle extraction methods")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("CRYODASK_BENCH_DIR", "/tmp")) / "crisp_bench")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "crisp_empiar10017.json")
    args = parser.parse_args()

    import torch
    from distributed import Client, LocalCluster

    torch.set_num_threads(args.threads)

    from cryodask.micrographs.crisp.crf import CRFParams

    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"data": "EMPIAR-10017, 14 JPEG micrographs 4096², 1.77 Å/px, particle diameter 108 px",
               "split": {"test": TEST, "train": [p.stem for p in split()[0]]},
               "bin": args.bin, "command": "python " + " ".join(sys.argv),
               "machine": f"{os.cpu_count()} CPU cores, no GPU",
               "notes": ["pixel scores at full resolution (binned masks repeated bin x bin) against masks > 127, "
                         "pooled over the 4 test micrographs",
                         "picking: Hungarian matching within 54 px (the radius) of the particles extracted from "
                         "each mask; positive boxes are sparse labels (precision is not meaningful against them)",
                         "CRF parameters 'chosen' by crisp train on its TRAIN micrographs (crf_chosen_on_train, "
                         "from config.json); 'default' = CRFParams()",
                         "training seconds from training_log.json (the run that trained the model); shared 2-core "
                         "machine under load from other jobs, so times vary up to ~3x"],
               "configs": {}}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for entry in args.configs:
            network, loss = entry.split(":")
            model, training = train_model(args.work, network, loss, args)
            crf_choice = stored_crf(model)
            best = crf_choice["params"]
            config = {"training": training, "crf_chosen_on_train": crf_choice}
            print(f"{entry}: CRF chosen on {crf_choice['micrographs']}: train IoU {crf_choice['iou_nocrf']:.4f} "
                  f"without, {crf_choice['iou_crf']:.4f} with; applied by default: {crf_choice['apply']}", flush=True)
            for label, crf_params in (("crf_default", CRFParams()), ("crf_chosen", CRFParams(**best))):
                for extract in args.extract:
                    key = f"{label}_{extract}"
                    config[key] = evaluate(model, args.work / f"pred_{model.name}_{key}", crf_params, extract,
                                           client)
                    config[key]["crf_params"] = asdict(crf_params)
                    print(key, json.dumps({v: config[key][v]["pixels_full_resolution"]["iou"]
                                           for v in ("nocrf", "crf")}), flush=True)
            results["configs"][entry] = config
    results["wall_seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
