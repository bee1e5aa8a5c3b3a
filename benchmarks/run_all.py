"""The benchmark suite behind ``cryodask bench``: every benchmark, several runs, one summary.

Each benchmark script is run ``--repeat`` times as its own process with one run per method
(``--repeat 1``; the scaling study does its repeats itself), so every ratio against a baseline
is taken within one run, on the same input, and the summary gives its median, min and max
over the runs. Baselines, as each benchmark names them:

  convert      raw-copy (plain sequential I/O: the disk's limit) and ome-zarr-py's write_image
  components   scipy.ndimage.label + find_objects on the whole array (ETSAM's post-processing)
  matching     naive matching (every ratio-4 point's vector sampled from the store)
  membranes    ETSAM's frame-by-frame reference loop (same SAM2 weights)
  scaling      T1 / (N · TN) on 1, 2, 4, ... workers (target >= 0.8)

Writes ``<out>/bench.json``, ``ratios-<benchmark>.png``, ``scaling.png``, ``memory.png`` and
``throughput.png`` (per-stage throughput of the scaling step), and each run's own JSON and log
under ``<out>/raw/``. ``--quick`` uses small shapes (40 s for all of it, 3 repeats, on 2 idle cores; the
membranes benchmark is left out unless named in ``--only``: one run of it took 95 s under load
at 16×64×64): quick numbers check that the suite works, they are overhead-dominated and not
the project's figures (those are in ``results/README.md``).

    python benchmarks/run_all.py --quick --repeat 3 --out bench/
    python benchmarks/run_all.py --only convert,components --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.append(str(HERE))  # sibling modules (plots.py), also when ``cryodask bench`` loads this file by path


def _powers_of_two(limit: int) -> str:
    counts, n = [], 1
    while n <= limit:
        counts.append(n)
        n *= 2
    return ",".join(map(str, counts))


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "runs": len(values)}


# ------------------------------------------------------------------ what each benchmark's JSON says

def _convert(j: dict) -> tuple[dict, dict]:
    methods = {k: (v["seconds_median"], v["peak_rss_mb"]) for k, v in j["methods"].items()}
    return methods, {"cryodask share of raw-copy bandwidth": j["cryodask_vs_bandwidth_limit"],
                     "cryodask speed-up vs ome-zarr": j["cryodask_speedup_vs_ome_zarr"],
                     "cryodask memory vs ome-zarr": j["cryodask_peak_memory_vs_ome_zarr"]}


def _components(j: dict) -> tuple[dict, dict]:
    methods = {k: (v["seconds_median"], v["peak_rss_mb"]) for k, v in j["methods"].items()}
    ratios = {}
    for name, v in j["methods"].items():
        if name.startswith("cryodask"):
            ratios[f"{name} speed-up vs scipy"] = v["speedup_vs_scipy"]
            ratios[f"{name} worker memory vs scipy"] = v["worker_peak_vs_scipy_peak"]
    return methods, ratios


def _matching(j: dict) -> tuple[dict, dict]:
    methods = {k: (v["seconds_median"], v["peak_rss_mb"]) for k, v in j["methods"].items()}
    h = j["methods"]["hierarchical"]
    return methods, {"hierarchical speed-up vs naive": h["speedup_vs_naive"],
                     "hierarchical recall vs naive": h["recall_vs_naive"]}


def _membranes(j: dict) -> tuple[dict, dict]:
    methods = {r["method"]: (r["seconds"], r["peak_rss_mb"]) for r in j["rows"]}
    return methods, {"cryodask speed-up vs ETSAM loop": j["speedup"], "cryodask memory vs ETSAM loop": j["rss_ratio"]}


@dataclass
class Benchmark:
    name: str
    full: list[str]
    quick: list[str]
    extract: object = None  # json -> (methods {name: (seconds, peak MB)}, ratios {name: value})
    options: list[str] = field(default_factory=lambda: ["--repeat", "1"])


SUITE = {
    "convert": Benchmark("convert", ["--shape", "256,1024,1024"],
                         ["--shape", "32,256,256", "--chunks", "32,128,128", "--workers", "2"], _convert),
    "components": Benchmark("components", ["--shape", "512,1024,1024"],
                            ["--shape", "64,256,256", "--chunks", "32,128,128"], _components),
    "matching": Benchmark("matching", [], ["--shape", "64,128,128", "--dim", "96", "--particles", "10",
                                           "--decoys", "6"], _matching),
    "membranes": Benchmark("membranes", ["--shape", "32,192,192", "--image-size", "256", "--batch", "8"],
                           ["--shape", "16,64,64", "--image-size", "128", "--batch", "4"], _membranes, options=[]),
    "scaling": Benchmark("scaling", ["--workers", _powers_of_two(os.cpu_count() or 1), "--tomograms", "32"],
                         ["--workers", "1,2", "--tomograms", "4", "--shape", "16,64,64"]),
}
QUICK_SKIPS = {"membranes": "left out of --quick (one run took 95 s at 16x64x64 on a loaded 2-core machine); "
                             "name it in --only"}


def _run(bench: Benchmark, args: list[str], raw: Path, tag: str) -> dict:
    """One run of one benchmark script; its JSON, kept as ``raw/<name>-<tag>.json``."""
    folder = raw / f"{bench.name}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    target = ["--out", str(folder / f"{bench.name}.json")] if bench.name == "membranes" else ["--results", str(folder)]
    cmd = [sys.executable, str(HERE / f"{bench.name}.py"), *args, *target]
    with open(folder / "log.txt", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
    if done.returncode:
        tail = (folder / "log.txt").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"{bench.name} exited with {done.returncode}: {tail[0] if tail else ''} "
                           f"(log: {folder / 'log.txt'})")
    return json.loads((folder / f"{bench.name}.json").read_text())


def run_benchmark(bench: Benchmark, quick: bool, repeat: int, raw: Path) -> dict:
    args = bench.quick if quick else bench.full
    entry = {"command": f"python benchmarks/{bench.name}.py " + " ".join(args + bench.options)}
    if bench.name == "scaling":
        data = _run(bench, [*args, "--repeat", str(repeat)], raw, "all")
        entry["command"] = f"python benchmarks/scaling.py {' '.join(args)} --repeat {repeat}"
        entry["machine"] = data["machine"]
        entry["rows"] = data["rows"]
        entry["skipped"] = data.get("skipped", {})
        entry["methods"] = {f"{r['kind']} x{r['workers']}": {
            "seconds": {**r["seconds"], "runs": len(r["runs"])},
            "peak_rss_mb": max((s["peak_rss_mb"] for s in r["stages"] or []), default=0.0)} for r in data["rows"]}
        entry["ratios"] = {f"efficiency {r['kind']} x{r['workers']}": {**r["efficiency"], "runs": len(r["runs"])}
                           for r in data["rows"]}
        return entry
    methods, ratios = {}, {}
    for i in range(repeat):
        start = time.perf_counter()
        ms, rs = bench.extract(_run(bench, args + bench.options, raw, str(i)))
        print(f"  {bench.name} run {i + 1}/{repeat}: {time.perf_counter() - start:.0f} s; "
              + ", ".join(f"{k} {v:.2f}" for k, v in rs.items()), file=sys.stderr)
        for name, (seconds, peak) in ms.items():
            methods.setdefault(name, ([], []))
            methods[name][0].append(seconds)
            methods[name][1].append(peak)
        for name, value in rs.items():
            ratios.setdefault(name, []).append(value)
    entry["methods"] = {k: {"seconds": _spread(s), "peak_rss_mb": max(p)} for k, (s, p) in methods.items()}
    entry["ratios"] = {k: _spread(v) for k, v in ratios.items()}
    return entry


def plots(summary: dict, out: Path) -> list[Path]:
    from plots import memory_png, ratio_png, scaling_png, throughput_png

    files = []
    benches = summary["benchmarks"]
    for name, entry in benches.items():
        if entry.get("ratios") and name != "scaling":
            files.append(ratio_png(name, entry["ratios"], out / f"ratios-{name}.png"))
    if "scaling" in benches and "rows" in benches["scaling"]:
        files.append(scaling_png(benches["scaling"]["rows"], out / "scaling.png"))
        files.append(throughput_png(benches["scaling"]["rows"], out / "throughput.png"))
    peaks = {name: {m: v["peak_rss_mb"] for m, v in entry["methods"].items()}
             for name, entry in benches.items() if entry.get("methods")}
    if peaks:
        files.append(memory_png(peaks, out / "memory.png"))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the suite, not the figures")
    parser.add_argument("--repeat", type=int, default=3, help="runs per benchmark (median, min, max)")
    parser.add_argument("--out", default="bench", help="folder for bench.json, the PNGs and raw/")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SUITE)}")
    args = parser.parse_args(argv)
    from cryodask.report.summary import machine

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown or args.repeat < 1:
        print(f"error: {'unknown benchmark ' + ', '.join(unknown) if unknown else '--repeat must be >= 1'} "
              f"(benchmarks: {', '.join(SUITE)})", file=sys.stderr)
        return 2
    skipped = {n: QUICK_SKIPS[n] for n in names if args.quick and not args.only and n in QUICK_SKIPS}
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    summary = {"quick": args.quick, "repeat": args.repeat, "machine": machine(), "benchmarks": {},
               "failed": {}, "skipped": skipped}
    start = time.perf_counter()
    for name in names:
        if name in skipped:
            print(f"{name}: skipped, {skipped[name]}", file=sys.stderr)
            continue
        print(f"{name}: {args.repeat} run(s){' (quick)' if args.quick else ''}", file=sys.stderr)
        try:
            summary["benchmarks"][name] = run_benchmark(SUITE[name], args.quick, args.repeat, raw)
        except (RuntimeError, KeyError, ValueError) as exc:
            summary["failed"][name] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
    summary["seconds"] = time.perf_counter() - start
    summary["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    summary["files"] = [str(p) for p in [out / "bench.json", *plots(summary, out)]]
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return 1 if summary["failed"] else 0


def table(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"{m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB; load {m['load_average'][0]:.1f} before, "
             f"{m['load_average_after'][0]:.1f} after; {summary['repeat']} run(s) each, {summary['seconds']:.0f} s"
             f"{'; QUICK shapes: overhead-dominated, not the project figures' if summary['quick'] else ''}",
             f"{'benchmark':<11} {'ratio':<44} {'median':>8} {'min':>8} {'max':>8}"]
    for name, entry in summary["benchmarks"].items():
        for ratio, v in entry["ratios"].items():
            lines.append(f"{name:<11} {ratio[:44]:<44} {v['median']:>8.2f} {v['min']:>8.2f} {v['max']:>8.2f}")
    for name, reason in {**summary["skipped"], **summary["failed"]}.items():
        lines.append(f"{name:<11} {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
