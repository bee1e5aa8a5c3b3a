"""Quality matrix: what the weight-free methods score with their defaults, on data they were not tuned on.

Each cell is one synthetic tomogram, made by a simulator at a voxel size, SNR and contrast
polarity, and run through exactly what a user runs, with defaults only (no per-case tuning, no
``--polarity``: the default decides):
  membranes   ``cryodask membranes --method classical tomo.mrc --out D``  → Dice vs the true mask
  picks       ``cryodask pick --method log --diameter <class 1's diameter> tomo.mrc --out D``
              → precision/recall/F1 for class 1 (Hungarian matching within half the diameter,
              ``cryodask.evaluate.evaluate_picks(..., class_number=1)``, as ``evaluate picks --class 1``)
The only facts given are the ones a user has: the voxel size (in the MRC header), the particle
diameter and the membrane thickness default. The CLI runs in-process on a LocalCluster that this
script starts once per process (``--cluster tcp://...``: the same code path, without a cluster
start per command).

Matrix: simulator {simple = ``synth_tomogram``, projection = ``synth_projection_tomogram``}
× voxel size {7, 14, 28, 40 Å} × SNR {0.05, 0.1, 0.3} × polarity {dark, bright (negated)};
volume per cell: the larger of 64×128×128 voxels and a 640×1280×1280 Å box. Targets at SNR ≥ 0.1:
Dice ≥ 0.75 and F1 ≥ 0.8. Also two real bright crops (microtubule tomograms
from cylindra's tests, github.com/hanjinliu/cylindra, 1.052 nm voxels; read from the data folder when present): the
polarity the default decided and the fraction of voxels the classical filter marks.

    python benchmarks/quality.py                                       # the whole matrix (48 cells)
    python benchmarks/quality.py --quick                               # 2 small cells (the test)
    python benchmarks/quality.py --simulators projection --voxel-sizes 7,40 --snrs 0.1 --workers 2

Synthetic volumes are cached under ``--cache`` in a folder named by the cell and a hash of the
simulators' source, so reruns skip simulation until a simulator changes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REAL = ROOT.parent / "shared" / "data" / "tomograms"
SIMULATORS = ("simple", "projection")
VOXEL_SIZES = (7.0, 14.0, 28.0, 40.0)
SNRS = (0.05, 0.1, 0.3)
POLARITIES = ("dark", "bright")
MIN_SHAPE = (64, 128, 128)  # voxels
BOX_A = (640.0, 1280.0, 1280.0)  # Å
QUICK_SHAPE = (32, 64, 64)
QUICK_CELLS = (("simple", 28.0, 0.3, "dark"), ("projection", 28.0, 0.3, "bright"))
TARGET_DICE, TARGET_F1, TARGET_SNR = 0.75, 0.8, 0.1
PICK_CLASS = 1


def cell_shape(voxel_size: float, quick: bool = False) -> tuple[int, int, int]:
    """The larger of 64×128×128 voxels and a 640×1280×1280 Å box (so the physical scene does not
    shrink at fine sampling); ``quick`` keeps every cell small."""
    if quick:
        return QUICK_SHAPE
    return tuple(max(m, math.ceil(a / voxel_size - 1e-9)) for m, a in zip(MIN_SHAPE, BOX_A))


def simulator_hash() -> str:
    """Hash of the simulators' source: a cached volume is reused only while it is what they make now."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "cryodask" / "synth").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def simulate(simulator: str, voxel_size: float, snr: float, seed: int, shape, cache: Path) -> tuple[Path, float]:
    """Both polarities of one simulated tomogram (bright = the dark volume negated, as ``synth --polarity
    bright`` writes it), with the truth; returns the folder and the seconds spent (0 when cached)."""
    from cryodask.synth import synth_projection_tomogram, synth_tomogram, write_tomogram

    folder = cache / (f"{simulator}_vs{voxel_size:g}_snr{snr:g}_seed{seed}_{'x'.join(map(str, shape))}"
                      f"_{simulator_hash()}")
    if (folder / "meta.json").exists():
        return folder, 0.0
    start = time.perf_counter()
    make = synth_projection_tomogram if simulator == "projection" else synth_tomogram
    synth = make(tuple(shape), voxel_size=voxel_size, seed=seed, snr=snr)
    seconds = time.perf_counter() - start
    for polarity in POLARITIES:
        (folder / polarity).mkdir(parents=True, exist_ok=True)
        if polarity == "bright":
            synth.volume = -synth.volume
        write_tomogram(folder / polarity / "tomo.mrc", synth)
    meta = {"diameters_A": {str(k): v for k, v in synth.diameters_A.items()}, "simulate_seconds": seconds,
            "particles": {str(k): int((synth.kinds == k).sum()) for k in synth.diameters_A}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
    return folder, seconds


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``cryodask <argv>`` in this process (``cryodask.cli.main``, as the console script); returns the
    exit code and what it printed."""
    from cryodask.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def decided_polarity(text: str) -> str:
    """The polarity a command says it used (``polarity bright (auto: ...)``); "dark?" where auto could not
    tell and took dark; "n/a" where the command says none (before ``--polarity`` existed)."""
    found = re.search(r"\bpolarity (dark|bright) \((auto could not tell)?", text)
    return "n/a" if found is None else found.group(1) + ("?" if found.group(2) else "")


def _one(folder: Path, pattern: str, text: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} in {folder}, found {len(found)}; the command said:\n{text[-2000:]}")
    return found[0]


def cell_name(cell: dict) -> str:
    return (f"{cell['simulator']}_vs{cell['voxel_size']:g}_snr{cell['snr']:g}_{cell['polarity']}"
            f"_seed{cell['seed']}")


def run_cell(cell: dict, cache: Path, scheduler: str, work: Path, keep: Path | None = None) -> dict:
    """One cell: simulate (or reuse), segment and pick with defaults, score against the truth;
    ``keep``: a folder where the commands' outputs stay (else they are deleted)."""
    from cryodask.evaluate import evaluate_membranes, evaluate_picks

    shape = tuple(cell["shape"])
    folder, sim_seconds = simulate(cell["simulator"], cell["voxel_size"], cell["snr"], cell["seed"], shape, cache)
    meta = json.loads((folder / "meta.json").read_text())
    tomo = folder / cell["polarity"] / "tomo.mrc"
    truth_mask, truth_picks = folder / cell["polarity"] / "truth" / "tomo_membranes.mrc", \
        folder / cell["polarity"] / "truth" / "tomo_particles.star"
    diameter = float(meta["diameters_A"][str(PICK_CLASS)])
    out = keep / cell_name(cell) if keep is not None else Path(tempfile.mkdtemp(prefix="cell-", dir=work))
    row = {**cell, "shape": list(shape), "diameter_A": diameter, "particles": meta["particles"][str(PICK_CLASS)],
           "seconds": {"simulate": round(sim_seconds, 2)}, "tomogram": str(tomo)}
    if keep is not None:
        shutil.rmtree(out, ignore_errors=True)  # the commands refuse an output folder of another run
    try:
        start = time.perf_counter()
        code, said = run_cli(["membranes", "--method", "classical", str(tomo), "--out", str(out / "membranes"),
                              "--cluster", scheduler])
        row["seconds"]["membranes"] = round(time.perf_counter() - start, 2)
        if code:
            raise RuntimeError(f"cryodask membranes exited {code}: {said[-2000:]}")
        row["polarity_decided_membranes"] = decided_polarity(said)
        mask = _one(out / "membranes", "*_classical_predicted_mask.mrc", said)
        seg = evaluate_membranes(mask, truth_mask)
        row.update(dice=seg["dice"], membrane_precision=seg["precision"], membrane_recall=seg["recall"],
                   marked_fraction=(seg["tp"] + seg["fp"]) / float(np.prod(shape)),
                   true_fraction=(seg["tp"] + seg["fn"]) / float(np.prod(shape)))

        start = time.perf_counter()
        code, said = run_cli(["pick", "--method", "log", "--diameter", f"{diameter:g}", str(tomo),
                              "--out", str(out / "pick"), "--cluster", scheduler])
        row["seconds"]["pick"] = round(time.perf_counter() - start, 2)
        if code:
            raise RuntimeError(f"cryodask pick exited {code}: {said[-2000:]}")
        row["polarity_decided_pick"] = decided_polarity(said)
        star = _one(out / "pick", "*_log_picks.star", said)
        picks = evaluate_picks(star, truth_picks, radius=diameter / 2, unit="angstrom", class_number=PICK_CLASS)
        row.update({k: picks[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")})
        row["picks"] = picks["tp"] + picks["fp"]
    except Exception as exc:  # noqa: BLE001  (a failed cell is reported, the matrix goes on)
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
    row["seconds"]["total"] = round(sum(row["seconds"].values()), 2)
    decided = {row.get("polarity_decided_membranes"), row.get("polarity_decided_pick")} - {None}
    row["polarity_decided"] = decided.pop() if len(decided) == 1 else "/".join(sorted(decided)) or "n/a"
    row["verdict"] = verdict(row)
    return row


def verdict(row: dict) -> str:
    """PASS/MISS against the targets (SNR ≥ 0.1 only); "-" below that SNR, ERROR if the cell failed."""
    if "error" in row:
        return "ERROR"
    if row["snr"] < TARGET_SNR - 1e-9:
        return "-"
    return "PASS" if row["dice"] >= TARGET_DICE and row["f1"] >= TARGET_F1 else "MISS"


def run_real(path: Path, scheduler: str, work: Path, keep: Path | None = None) -> dict:
    """A real crop through ``cryodask membranes --method classical`` with defaults: the polarity
    decided and the fraction of voxels marked (the voxel size comes from the TIFF's metadata)."""
    import mrcfile

    out = keep / f"real_{path.stem}" if keep is not None else Path(tempfile.mkdtemp(prefix="real-", dir=work))
    shutil.rmtree(out, ignore_errors=True)
    row = {"tomogram": path.name}
    try:
        start = time.perf_counter()
        code, said = run_cli(["membranes", "--method", "classical", str(path), "--out", str(out),
                              "--cluster", scheduler])
        row["seconds"] = round(time.perf_counter() - start, 2)
        if code:
            raise RuntimeError(f"cryodask membranes exited {code}: {said[-2000:]}")
        with mrcfile.open(_one(out, "*_classical_predicted_mask.mrc", said), permissive=True) as mrc:
            mask = np.asarray(mrc.data)
            row["voxel_size_A"] = float(mrc.voxel_size.x)
        row.update(shape=list(mask.shape), marked_fraction=float((mask != 0).mean()),
                   polarity_decided=decided_polarity(said))
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
    return row


@contextlib.contextmanager
def local_cluster(workers: int):
    """One LocalCluster per process, as ``--cluster local`` starts one (processes, 1 thread each)."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, silence_logs=logging.CRITICAL,
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def run_cells(cells: list[dict], cache: Path, cluster_workers: int, real: list[Path], keep: Path | None = None,
              progress: bool = True):
    work = Path(tempfile.mkdtemp(prefix="cryodask-quality-"))
    rows, reals = [], []
    try:
        with local_cluster(cluster_workers) as scheduler:
            for cell in cells:
                rows.append(run_cell(cell, cache, scheduler, work, keep))
                if progress:
                    print(line(rows[-1]), flush=True)
            for path in real:
                reals.append(run_real(path, scheduler, work, keep))
                if progress:
                    print(real_line(reals[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, reals


def line(row: dict) -> str:
    head = f"{row['simulator']:>10} {row['voxel_size']:>4g} Å  SNR {row['snr']:<4g} {row['polarity']:<6}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:200]}"
    return (f"{head} Dice {row['dice']:.3f}  P {row['precision']:.2f} R {row['recall']:.2f} F1 {row['f1']:.3f}"
            f"  ({row['picks']} picks / {row['particles']})  auto→{row['polarity_decided']}"
            f"  {row['seconds']['total']:.0f} s  {row['verdict']}")


def real_line(row: dict) -> str:
    if "error" in row:
        return f"{row['tomogram']}: ERROR {row['error'][:200]}"
    return (f"{row['tomogram']}: polarity decided {row['polarity_decided']}, classical marks "
            f"{100 * row['marked_fraction']:.2f} % of voxels ({row['seconds']:.0f} s)")


def markdown(rows: list[dict], reals: list[dict], command: str) -> str:
    """Rows simulator × voxel size, columns SNR × polarity, "Dice / F1" in each cell (✗: a target missed)."""
    snrs = sorted({r["snr"] for r in rows})
    pols = [p for p in POLARITIES if any(r["polarity"] == p for r in rows)]
    cols = [(s, p) for s in snrs for p in pols]
    index = {(r["simulator"], r["voxel_size"], r["snr"], r["polarity"]): r for r in rows}
    keys = sorted({(r["simulator"], r["voxel_size"]) for r in rows}, key=lambda k: (SIMULATORS.index(k[0]), k[1]))
    out = ["| simulator | voxel Å | shape | " + " | ".join(f"SNR {s:g} {p}" for s, p in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
    for sim, vs in keys:
        cells, shape = [], ""
        for s, p in cols:
            r = index.get((sim, vs, s, p))
            if r is None:
                cells.append("")
                continue
            shape = "×".join(map(str, r["shape"]))
            if "error" in r:
                cells.append("error")
                continue
            mark = " ✗" if r["verdict"] == "MISS" else ""
            cells.append(f"{r['dice']:.2f} / {r['f1']:.2f}{mark}")
        out.append(f"| {sim} | {vs:g} | {shape} | " + " | ".join(cells) + " |")
    passed = sum(r["verdict"] == "PASS" for r in rows)
    scored = sum(r["verdict"] in ("PASS", "MISS") for r in rows)
    out += ["", (f"Dice (classical membranes) / F1 (LoG, class 1); ✗: below Dice {TARGET_DICE} or F1 {TARGET_F1} "
                 f"at SNR ≥ {TARGET_SNR:g} ({passed}/{scored} cells pass). Made by `{command}`.")]
    if reals:
        out += ["", "| real crop | polarity decided | classical marks |", "|---|---|---|"]
        for r in reals:
            out.append(f"| {r['tomogram']} | {r.get('polarity_decided', 'error')} | "
                       + (f"{100 * r['marked_fraction']:.2f} % |" if "marked_fraction" in r else "error |"))
    return "\n".join(out) + "\n"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 small cells (32×64×64) and no real crops: the test")
    parser.add_argument("--simulators", default=",".join(SIMULATORS))
    parser.add_argument("--voxel-sizes", default=",".join(f"{v:g}" for v in VOXEL_SIZES), help="Å")
    parser.add_argument("--snrs", default=",".join(f"{v:g}" for v in SNRS))
    parser.add_argument("--polarities", default=",".join(POLARITIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="cells in parallel processes")
    parser.add_argument("--no-real", action="store_true", help="skip the real bright crops")
    parser.add_argument("--cache", default=os.environ.get("CRYODASK_QUALITY_CACHE",
                                                          str(Path.home() / ".cache" / "cryodask" / "quality")))
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for quality.json and quality.md")
    parser.add_argument("--keep",
                        help="keep each cell's outputs (mask, picks, previews) in KEEP/<cell>/{membranes,pick} "
                        "and the real crops' in KEEP/real_<stem>")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a JSON job file: cells run by one worker process
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1

    if args.child:
        job = json.loads(Path(args.child).read_text())
        rows, reals = run_cells(job["cells"], cache, job["cluster_workers"], [Path(p) for p in job["real"]],
                                job["keep"] and Path(job["keep"]))
        Path(job["result"]).write_text(json.dumps({"rows": rows, "real": reals}))
        return 0

    sims = [s for s in args.simulators.split(",") if s.strip()]
    pols = [p for p in args.polarities.split(",") if p.strip()]
    bad = [s for s in sims if s not in SIMULATORS] + [p for p in pols if p not in POLARITIES]
    if bad or args.workers < 1:
        parser.error(f"unknown {', '.join(bad)}" if bad else "--workers must be at least 1")
    if args.quick:
        combos = [c for c in QUICK_CELLS if c[0] in sims and c[3] in pols]
    else:
        combos = list(itertools.product(sims, _floats(args.voxel_sizes), _floats(args.snrs), pols))
    cells = [{"simulator": s, "voxel_size": v, "snr": n, "polarity": p, "seed": args.seed,
              "shape": list(cell_shape(v, args.quick))} for s, v, n, p in combos]
    real = [] if args.quick or args.no_real else sorted(REAL.glob("*.tif"))
    command = "python benchmarks/quality.py" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None
                                                                                        else sys.argv[1:]))
    print(f"{len(cells)} cells, {len(real)} real crops, {args.workers} worker process(es), cache {cache}", flush=True)

    keep = Path(args.keep) if args.keep else None
    start = time.perf_counter()
    workers = max(1, min(args.workers, len(cells)))
    per_cluster = max(1, cores // workers)
    if workers == 1:
        rows, reals = run_cells(cells, cache, per_cluster, real, keep)
    else:  # each worker process its own share of the cells (and cluster); the results merged in matrix order
        jobs = Path(tempfile.mkdtemp(prefix="cryodask-quality-jobs-"))
        procs = []
        for i in range(workers):
            job = {"cells": cells[i::workers], "real": [str(p) for p in real[i::workers]],
                   "cluster_workers": per_cluster, "result": str(jobs / f"result-{i}.json"), "keep": args.keep}
            (jobs / f"job-{i}.json").write_text(json.dumps(job))
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", str(jobs / f"job-{i}.json"),
                                           "--cache", str(cache)]))
        if any(p.wait() for p in procs):
            print("a worker process failed", file=sys.stderr)
            return 1
        parts = [json.loads((jobs / f"result-{i}.json").read_text()) for i in range(workers)]
        shutil.rmtree(jobs, ignore_errors=True)
        order = {json.dumps(c, sort_keys=True): i for i, c in enumerate(cells)}
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: order[json.dumps(
            {k: r[k] for k in ("simulator", "voxel_size", "snr", "polarity", "seed", "shape")}, sort_keys=True)])
        reals = sorted((r for p in parts for r in p["real"]), key=lambda r: r["tomogram"])
    wall = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"command": command, "quick": args.quick, "seed": args.seed, "wall_seconds": round(wall, 1),
               "targets": {"dice": TARGET_DICE, "f1": TARGET_F1, "at_snr_at_least": TARGET_SNR},
               "machine": {"cores": cores, "python": platform.python_version(), "platform": platform.platform()},
               "simulator_hash": simulator_hash(), "cells": rows, "real": reals}
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    (out / "quality.md").write_text(markdown(rows, reals, command))
    print()
    for row in rows:
        print(line(row))
    for r in reals:
        print(real_line(r))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("PASS", "MISS", "-", "ERROR")}
    print(f"{counts['PASS']} PASS, {counts['MISS']} MISS, {counts['-']} below SNR {TARGET_SNR:g}, "
          f"{counts['ERROR']} ERROR; {wall:.0f} s; wrote {out / 'quality.json'} and {out / 'quality.md'}")
    return 1 if counts["ERROR"] or any("error" in r for r in reals) else 0


if __name__ == "__main__":
    sys.exit(main())
