"""``cryodask doctor`` on this install: what is there, what is missing, and what to do."""

from __future__ import annotations

from cryodask.cli import main
from cryodask.doctor import check_cluster, check_weights, diagnose


def test_doctor_reports_the_install_and_a_reachable_cluster(tmp_path, capsys, client):
    (tmp_path / "etsam_stage1_v1.pt").write_bytes(b"x")
    code = main(["doctor", "--weights", str(tmp_path), "--cluster", client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok    python" in out and "0 problem(s)" in out
    assert "etsam_stage1_v1.pt" in out and "found" in out
    assert "etsam_stage2_v1.pt" in out and "zenodo.org/records/17571925" in out
    assert f"{client.scheduler.address}: 2 worker(s)" in out


def test_doctor_fails_on_an_unreachable_scheduler_and_a_missing_folder(tmp_path, capsys):
    [cluster] = check_cluster("tcp://127.0.0.1:9", timeout=1)
    assert cluster.status == "fail" and "reachable" in cluster.advice
    [weights] = check_weights(tmp_path / "absent")
    assert weights.status == "fail" and "does not exist" in weights.detail
    code = main(["doctor", "--weights", str(tmp_path / "absent"), "--cluster", "nonsense"])
    out = capsys.readouterr().out
    assert code == 1 and "2 problem(s)" in out and "FAIL  cluster" in out


def test_batch_system_is_checked_by_rendering_its_job_script(tmp_path):
    (tmp_path / "c.yaml").write_text("slurm: {cores: 2, memory: 4GB, queue: short, walltime: '01:00:00'}\n")
    [slurm] = check_cluster("slurm", tmp_path / "c.yaml")
    assert slurm.status in ("ok", "warn") and "job script renders" in slurm.detail
    names = [c.name for c in diagnose(cluster="slurm", cluster_config=tmp_path / "c.yaml")]
    assert names[0] == "python" and "torch" in names and names[-1] == "cluster"
