"""benchmarks/gpu.py, the one GPU check, in its CPU dry run: every step runs and reports numbers,
so the script works before a GPU machine is lent (its full run needs one)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and set(result["steps"]) == {"sam2", "dinov2", "components", "cluster"}
    sam2 = result["steps"]["sam2"]
    assert sam2["cryodask"]["slices_per_s"] > 0 and sam2["etsam_loop"]["slices_per_s"] > 0 and sam2["speedup"] > 0
    assert sam2["max_abs_logit_diff"] < 1e-3 and sam2["mask_agreement"] > 0.999  # float32 on CPU: the same logits
    dinov2 = result["steps"]["dinov2"]
    assert dinov2["slices"] == 4 + 16 + 16 and dinov2["slices_per_s"] > 0  # every 4th slice of 16x64x64, 3 views
    components = result["steps"]["components"]
    assert components["blocks"] == 2 * 2 * 2 and components["cpu_seconds"] > 0
    assert components.get("identical_partitions", True) and ("speedup" in components or
                                                             components["gpu"].startswith("skipped"))
    cluster = result["steps"]["cluster"]
    assert cluster["exit_code"] == 0, cluster["stderr_tail"]
    assert cluster["masks"] == ["t0_etsam_predicted_mask.mrc", "t1_etsam_predicted_mask.mrc"]
