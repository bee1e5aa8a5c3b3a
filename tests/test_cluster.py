"""``--cluster``: local, an existing scheduler, batch systems (rendered, not submitted), errors."""

from __future__ import annotations

import pytest

from cryodask.engine.cluster import check_spec, connect, jobqueue_cluster, load_config, make_cluster
from cryodask.errors import InputError


def test_existing_scheduler_address(client):
    with connect(client.scheduler.address) as other:
        assert other.submit(sum, [1, 2, 3]).result() == 6
        assert len(other.scheduler_info()["workers"]) == 2


def test_local_cluster_options():
    with connect("local", workers=1, threads_per_worker=2, memory_limit="1GB") as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [2]
        assert [w["memory_limit"] for w in workers] == [10**9]
        assert client.dashboard_link.startswith("http")


def test_slurm_job_script_from_a_cryodask_config(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("jobs: 4\nslurm:\n  cores: 8\n  processes: 1\n  memory: 32GB\n  walltime: '02:00:00'\n"
                      "  job_extra_directives: ['--gres=gpu:1']\n  worker_extra_args: ['--resources', 'GPU=1']\n")
    options = load_config(config)
    assert options["jobs"] == 4
    cluster = jobqueue_cluster("slurm", options["slurm"])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -t 02:00:00" in script and "--resources GPU=1" in script
    assert "--nthreads" in script and "#SBATCH --mem=30G" in script


def test_pbs_job_script():
    cluster = jobqueue_cluster("pbs", {"cores": 4, "memory": "8GB", "resource_spec": "select=1:ncpus=4:mem=8GB"})
    try:
        assert "#PBS -l select=1:ncpus=4:mem=8GB" in cluster.job_script()
    finally:
        cluster.close()


@pytest.mark.parametrize("make,words", [
    (lambda tmp: check_spec("kubernetes"), "expected one of"),
    (lambda tmp: jobqueue_cluster("slurm", {"cores": 2, "memory": "1GB", "no_such_option": 1}),
     "invalid configuration"),
    (lambda tmp: load_config(tmp / "missing.yaml"), "cannot read cluster config"),
    (lambda tmp: (tmp / "bad.yaml").write_text("- a\n- b\n") and load_config(tmp / "bad.yaml"), "must be a mapping"),
])
def test_invalid_configurations_are_clear_errors(tmp_path, make, words):
    with pytest.raises(InputError, match=words):
        make(tmp_path)


def test_cuda_without_dask_cuda_is_a_clear_error():
    pytest.importorskip("distributed")
    try:
        import dask_cuda  # noqa: F401
        pytest.skip("dask-cuda is installed here")
    except ImportError:
        pass
    with pytest.raises(InputError, match="dask-cuda"):
        make_cluster("cuda")


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(InputError, match="cannot reach"):
        with connect("tcp://127.0.0.1:9", timeout="1s"):
            pass


@pytest.mark.parametrize("kind,expected",
                         [("slurm", "#SBATCH --gres=gpu:1"), ("pbs", "#PBS -l select=1:ncpus=8:ngpus=1:mem=64GB")])
def test_the_shipped_example_config_renders(kind, expected):
    from conftest import ROOT

    options = load_config(ROOT / "deploy" / "cluster.example.yaml")
    cluster = jobqueue_cluster(kind, options[kind])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert expected in script and "--resources GPU=1" in script and "--lifetime 230m" in script
    assert "--local-directory $TMPDIR" in script
