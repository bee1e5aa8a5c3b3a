"""``cryodask bench``: the benchmark suite of a source checkout (``benchmarks/run_all.py``)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


def suite_script() -> Path:
    """``benchmarks/run_all.py`` next to the package; an installed wheel has no benchmarks."""
    from ..errors import InputError

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
    if not script.exists():
        raise InputError(f"benchmarks/ not found next to the package ({script.parent}): "
                         "cryodask bench runs from a source checkout, not an installed wheel")
    return script


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick",
                               help="Small shapes (40 s for 3 repeats on 2 idle cores): checks the suite, not the "
                                    "figures."),
    repeat: int = typer.Option(3, "--repeat", help="Runs per benchmark: median, min and max are reported."),
    out: Path = typer.Option(Path("bench"), "--out", help="Folder for bench.json, the PNGs and each run's raw JSON."),
    only: str = typer.Option("", "--only", help="Comma-separated benchmarks: "
                                                "convert,components,matching,membranes,scaling (default: all)."),
):
    """Run the benchmark suite; write bench.json and PNGs (ratios to the baselines, scaling, memory, stages)."""
    import importlib.util
    import sys

    script = suite_script()
    spec = importlib.util.spec_from_file_location("cryodask_benchmarks_run_all", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    argv = (["--repeat", str(repeat), "--out", str(out)] + (["--quick"] if quick else [])
            + (["--only", only] if only else []))
    code = module.main(argv)
    if code:
        raise typer.Exit(code)
