"""Record what ETSAM's own ``etsam.py`` writes for a tiny tomogram, for ``tests/test_etsam_dropin.py``.

Run once by hand (it needs ETSAM's repository, which the tests do not):

    python tests/data/etsam/record.py /path/to/ETSAM tests/data/etsam

It writes ``tomo.mrc`` (a synthetic 6x48x48 tomogram), two random SAM2.1 hiera-b+ checkpoints
made by :func:`checkpoints` (seeded, object-score bias made positive: random weights otherwise
call every slice empty; the test rebuilds the same files), runs ETSAM's ``etsam.py`` unchanged on
them with each command line of ``RUNS`` (on CPU: ``build_sam2_video_predictor`` is given
``device="cpu"``, the only change, made from outside the script), and keeps ETSAM's output MRC
files under ``recorded/<run>/`` with ``recorded.json`` (ETSAM's commit, the commands).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

RUNS = {  # name: ETSAM's flags (checked against cryodask membranes with the same flags)
    "default_post": ["--post-process", "--store-logits"],
    "split_thin": ["--split-processing", "--postprocess-remove-thin-noise", "--post-process-min-slices", "3"],
}
SHIM = """import runpy, sys
import sam2.build_sam as b
build = b.build_sam2_video_predictor
b.build_sam2_video_predictor = lambda *a, **k: build(*a, **{**k, "device": "cpu"})
sys.argv = ["etsam.py", *sys.argv[1:]]
runpy.run_path("etsam.py", run_name="__main__")
"""


def tomogram(path: Path) -> Path:
    import mrcfile
    import numpy as np

    from cryodask.synth.tomogram import synth_tomogram

    volume = synth_tomogram((16, 48, 48), voxel_size=10.0, seed=3, snr=2.0).volume[5:11].astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = 10.0
    return path


def checkpoints(folder: Path) -> tuple[Path, Path]:
    """ETSAM's two checkpoint files, from seeded random hiera-b+ weights (seed 1 and 2)."""
    import torch

    from cryodask.models.sam2 import build_predictor

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stage in (1, 2):
        torch.manual_seed(stage)
        state = build_predictor("sam2.1_hiera_b+").state_dict()
        state["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] = torch.full_like(
            state["sam_mask_decoder.pred_obj_score_head.layers.2.bias"], 10.0)
        paths.append(folder / f"etsam_stage{stage}_v1.pt")
        torch.save({"model": state}, paths[-1])
    return tuple(paths)


def main(etsam: Path, out: Path) -> None:
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    repo = work / "ETSAM"
    shutil.copytree(etsam, repo, ignore=shutil.ignore_patterns(".git", "docs", "data", "assets", "evaluation"))
    checkpoints(repo / "checkpoints")
    source = tomogram(out / "tomo.mrc")
    commit = subprocess.run(["git", "-C", str(etsam), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    runs = {}
    for name, flags in RUNS.items():
        target = out / "recorded" / name
        shutil.rmtree(target, ignore_errors=True)
        command = [sys.executable, "-c", SHIM, str(source.resolve()), "--output-dir", str(target.resolve()), *flags]
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                              env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "HOME": str(work)})
        if done.returncode != 0:
            raise SystemExit(f"etsam.py {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
        runs[name] = {"flags": flags, "files": sorted(p.name for p in target.glob("*.mrc"))}
    (out / "recorded" / "recorded.json").write_text(json.dumps({"etsam_commit": commit.strip(), "runs": runs},
                                                              indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
