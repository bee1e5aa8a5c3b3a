"""Autopick-BC re-picking throughput: micrographs per second and peak RSS, 1 and 2 workers,
against the reference loop a user would otherwise write.

The reference is Autopick-BC's ``gen_picks.py`` scoring, ported as directly as it goes: one
process, the micrographs one after another, every window of the same grid cut in memory (no
RELION extraction, which would only add to its cost), the network as trained (BatchNorm
separate, torch's ``MaxPool2d``), batches of 32 (``gen_picks.py``'s), torch's default threads.

Each run is ``cryodask.micrographs.autopick.repick.repick`` over the same micrographs on a
fresh ``LocalCluster`` of N one-thread workers, in its own process (``measure.run_child``
samples the RSS of the whole process tree: client, scheduler, nanny and workers). Seconds
count the re-picking alone (the cluster's start-up is reported apart), median of
``--repeat`` interleaved runs.

Input: the EMPIAR-10017 micrographs (https://www.ebi.ac.uk/empiar/EMPIAR-10017/, 4096² JPEG as filtered by
CryoSegNet; by default from a data folder beside the checkout) or
``--micrographs`` of your own. The model is the one given with ``--model``, else a seeded
random Autopick-BC network for box 216 / bin 4 (54 px windows): the weights do not change
the cost of scoring a window. Default stride box/4 = 54 px: 5776 windows per 4096² micrograph.

    nice -n 10 python benchmarks/micrographs.py --repeat 3

Writes ``benchmarks/results/micrographs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from measure import run_child as run_measured

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATA = HERE.parents[1] / "shared" / "data" / "empiar10017" / "micrographs"


def random_model(folder: Path, box_size: int, bin_factor: int, seed: int = 0) -> Path:
    import torch

    from cryodask.micrographs.autopick.network import AutopickNet
    from cryodask.micrographs.autopick.score import ModelConfig, save_model
    from cryodask.micrographs.autopick.windows import window_size

    torch.manual_seed(seed)
    window = window_size(box_size, bin_factor)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, AutopickNet(window), ModelConfig(box_size=box_size, bin=bin_factor, window=window))
    return folder


def run_child(micrographs: str, model: str, out: str, workers: int, stride: float | None) -> dict:
    import logging

    from distributed import Client, LocalCluster

    from cryodask.micrographs.autopick.repick import RepickParams, repick

    clock = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        startup = time.perf_counter() - clock
        clock = time.perf_counter()
        report = repick(micrographs, model, out, params=RepickParams(stride=stride), overwrite=True, client=client)
        seconds = time.perf_counter() - clock
    picked = report.picked
    return {"seconds": seconds, "startup_seconds": startup, "micrographs": len(picked),
            "windows": sum(r["windows"] for r in picked), "true_picks": sum(r["true"] for r in picked)}


def run_reference(micrographs: str, model: str, stride: float | None) -> dict:
    """The plain loop: read, bin, cut, score every micrograph in this process."""
    from torch import nn

    from cryodask.io.micrographs import find_micrographs
    from cryodask.micrographs.autopick.network import MaxPool2
    from cryodask.micrographs.autopick.score import load_model, score_windows
    from cryodask.micrographs.autopick.windows import WindowCutter, binned_micrograph, grid_centres

    clock = time.perf_counter()
    net, config = load_model(model)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, MaxPool2):
                setattr(module, name, nn.MaxPool2d(2))
    stride = stride or config.box_size / 4
    startup = time.perf_counter() - clock
    clock = time.perf_counter()
    micrographs_done, windows, true = 0, 0, 0
    for path in find_micrographs(micrographs):
        _, binned = binned_micrograph(path, config.bin)
        centres = grid_centres(binned.shape, stride / config.bin)
        scores = score_windows(net, WindowCutter(binned, config.window).cut(centres), batch=32)
        micrographs_done, windows, true = micrographs_done + 1, windows + len(scores), true + int((scores >= 0.5).sum())
    return {"seconds": time.perf_counter() - clock, "startup_seconds": startup, "micrographs": micrographs_done,
            "windows": windows, "true_picks": true}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micrographs", default=str(DATA))
    parser.add_argument("--model", default=None, help="a trained model folder (default: random weights)")
    parser.add_argument("--box-size", type=int, default=216)
    parser.add_argument("--bin", type=int, default=4)
    parser.add_argument("--stride", type=float, default=None)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results", default=str(HERE / "results" / "micrographs.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        print(json.dumps(run_reference(args.micrographs, args.model, args.stride)))
        return
    if args.child:
        print(json.dumps(run_child(args.micrographs, args.model, args.output, args.child, args.stride)))
        return

    from cryodask.micrographs.autopick.inputs import micrograph_set

    mics = micrograph_set(args.micrographs)
    shapes = sorted(set(mics.shapes.values()))
    counts = [int(w) for w in args.workers.split(",")]
    runs = {w: [] for w in [0, *counts]}  # 0: the reference loop
    with tempfile.TemporaryDirectory(dir=os.environ.get("CRYODASK_BENCH_DIR")) as tmp:
        model = args.model or str(random_model(Path(tmp) / "model", args.box_size, args.bin))
        for i in range(args.repeat):  # interleaved, so drifts in machine load hit both alike
            for w in [0, *counts]:
                cmd = [sys.executable, __file__, *(["--reference"] if w == 0 else ["--child", str(w)]),
                       "--micrographs", args.micrographs, "--model", model, "--output", str(Path(tmp) / f"out{w}")]
                if args.stride:
                    cmd += ["--stride", str(args.stride)]
                runs[w].append(run_measured(cmd, f"repick x{w}" if w else "reference loop"))
                r = runs[w][-1]
                print(f"  {f'{w} worker(s)' if w else 'reference loop'} run {i + 1}: {r['seconds']:.1f} s, "
                      f"{r['micrographs'] / r['seconds']:.3f} micrographs/s, peak {r['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
    rows = {}
    for w, rs in runs.items():
        seconds = sorted(r["seconds"] for r in rs)
        median = seconds[len(seconds) // 2]
        rows[f"{w}_workers" if w else "reference_loop"] = {"workers": w or "1 process, torch threads",
                                                           "seconds_median": median, "seconds_min": seconds[0],
                                "seconds_max": seconds[-1], "micrographs_per_s": rs[0]["micrographs"] / median,
                                "windows_per_s": rs[0]["windows"] / median,
                                "startup_seconds_median": sorted(r["startup_seconds"] for r in rs)[len(rs) // 2],
                                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "micrographs": rs[0]["micrographs"],
                                "windows": rs[0]["windows"]}
    base = rows["reference_loop"]["seconds_median"]
    for row in rows.values():
        row["speedup_vs_reference"] = base / row["seconds_median"]
    summary = {"input": {"micrographs": args.micrographs, "n": len(mics.names), "shapes": shapes,
                         "model": args.model or "random weights", "box_size": args.box_size, "bin": args.bin,
                         "stride": args.stride or args.box_size / 4, "cpus": os.cpu_count(), "repeat": args.repeat},
               "runs": rows}
    print(f"{len(mics.names)} micrographs {shapes}, {os.cpu_count()} cores, median of {args.repeat}")
    for name, r in rows.items():
        print(f"{name:<10} {r['seconds_median']:6.1f} s ({r['seconds_min']:.1f}-{r['seconds_max']:.1f})  "
              f"{r['micrographs_per_s']:.3f} micrographs/s  {r['windows_per_s']:.0f} windows/s  "
              f"peak {r['peak_rss_mb']:.0f} MB" + f"  {r['speedup_vs_reference']:.2f}x the reference loop")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
