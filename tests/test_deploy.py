"""deploy/: the shipped cluster configurations render the job scripts they promise, without a
scheduler and without submitting; bad configurations are one-line errors before anything starts;
the dask-cuda recipe parses; the node environment pins what pyproject pins."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time

import dask
import psutil
import pytest
import yaml
from conftest import ROOT

from cryodask.cli import main
from cryodask.engine.cluster import (job_script, jobqueue_cluster, load_config, make_cluster, replace_retired_jobs,
                              requested_gpus, walltime_seconds)
from cryodask.errors import InputError

DEPLOY = ROOT / "deploy"
SHIPPED = [(kind, profile) for kind in ("slurm", "pbs") for profile in ("gpu", "cpu")]


def listening_ports() -> set:
    return {c.laddr for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("kind,profile", SHIPPED)
def test_every_shipped_profile_loads_and_renders(kind, profile):
    config = load_config(DEPLOY / kind / "cluster.yaml", profile)
    script = job_script(kind, config[kind])
    assert config["jobs"] >= 1 and script.startswith("#!/usr/bin/env bash")
    walltime = "#SBATCH -t 04:00:00" if kind == "slurm" else "#PBS -l walltime=04:00:00"
    assert "--lifetime 230m --lifetime-stagger 5m" in script and walltime in script.splitlines()
    assert "--local-directory ${TMPDIR:-/tmp}" in script
    if profile == "cpu":  # post-processing workers: no GPU asked for, none advertised
        assert "GPU" not in script and "gres" not in script and "ngpus" not in script


def test_slurm_gpu_job_script():
    script = job_script("slurm", load_config(f"{DEPLOY}/slurm/cluster.yaml:gpu")["slurm"])
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH -t 04:00:00", "#SBATCH --mem=60G", "#SBATCH --cpus-per-task=8",
                 "#SBATCH -p gpu"):
        assert line in script.splitlines()
    worker = shlex.split(script.splitlines()[-1])
    assert worker[worker.index("--resources") + 1] == "GPU=1"
    assert worker[worker.index("--lifetime") + 1] == "230m" and worker[worker.index("--lifetime-stagger") + 1] == "5m"
    assert worker[worker.index("--memory-limit") + 1] == "59.60GiB" and "--nworkers" not in worker


def test_pbs_gpu_job_script():
    script = job_script("pbs", load_config(DEPLOY / "pbs" / "cluster.yaml")["pbs"])  # gpu is the default
    lines = script.splitlines()
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=64GB" in lines and "#PBS -l walltime=04:00:00" in lines
    assert "cd $PBS_O_WORKDIR" in lines and "--resources GPU=1" in lines[-1]


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_jobqueue_yaml_matches_the_cluster_profiles(kind):
    """The dask-config file and the cryodask profiles describe the same jobs."""
    profiles = {p: job_script(kind, load_config(DEPLOY / kind / "cluster.yaml", p)[kind]) for p in ("gpu", "cpu")}
    sections = yaml.safe_load((DEPLOY / kind / "jobqueue.yaml").read_text())["jobqueue"]
    assert set(sections) == {kind, f"{kind}-cpu"}
    with dask.config.set({f"jobqueue.{name}": section for name, section in sections.items()}):
        assert job_script(kind, {}) == profiles["gpu"]
        assert job_script(kind, {"config_name": f"{kind}-cpu"}) == profiles["cpu"]


def test_rendering_equals_dask_jobqueue_and_leaves_nothing_running():
    options = load_config(DEPLOY / "slurm" / "cluster.yaml", "gpu")["slurm"]
    before = listening_ports()
    mine = job_script("slurm", options)
    assert listening_ports() == before
    cluster = jobqueue_cluster("slurm", {**options, "scheduler_options": {"dashboard_address": ":0"}})
    try:
        address = cluster.scheduler.address
        assert cluster.job_script() == job_script("slurm", options, scheduler=address)
    finally:
        cluster.close()
    assert mine == cluster.job_script().replace(address, "tcp://<scheduler-address>:8786")


def test_jobscript_command_submits_nothing(tmp_path, monkeypatch, capsys):
    """A fake sbatch on PATH would leave a mark if called; no scheduler, port or process outlives the call."""
    from distributed import Scheduler

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for submit in ("sbatch", "qsub"):
        (bin_dir / submit).write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\n")
        (bin_dir / submit).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    before = (listening_ports(), len(psutil.Process().children(recursive=True)), len(Scheduler._instances))
    code = main(["jobscript", "--cluster", "slurm", "--cluster-config", f"{DEPLOY}/slurm/cluster.yaml:gpu",
                 "--scheduler", "tcp://login1:8786"])
    captured = capsys.readouterr()
    assert code == 0 and "#SBATCH --gres=gpu:1" in captured.out
    assert "tcp://login1:8786 --name gpu-${SLURM_JOB_ID}" in captured.out  # unique per job: submit it many times
    assert "8 job(s)" in captured.err and "nothing submitted" in captured.err
    assert main(["jobscript", "--cluster", "pbs", "--cluster-config", str(DEPLOY / "pbs" / "cluster.yaml"),
                 "--profile", "cpu"]) == 0
    assert "#PBS -l select=1:ncpus=8:mem=32GB" in capsys.readouterr().out
    assert not (tmp_path / "submitted").exists()
    assert (listening_ports(), len(psutil.Process().children(recursive=True)), len(Scheduler._instances)) == before


def test_a_slurm_run_submits_the_profile_jobs_and_keeps_them(tmp_path, monkeypatch):
    """``--cluster slurm --cluster-config deploy/slurm/cluster.yaml:gpu --workers 2`` through a fake
    sbatch that keeps the scripts it is given: two GPU jobs, and the job count is kept."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job-$$.sh\necho "Submitted batch job $$"\n')
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/cancelled\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cluster = make_cluster("slurm", workers=2, config=f"{DEPLOY}/slurm/cluster.yaml:gpu")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(tmp_path.glob("job-*.sh"))) < 2:
            time.sleep(0.1)
        assert "cryodask-replace-retired-jobs" in cluster.periodic_callbacks
    finally:
        cluster.close()
    scripts = [path.read_text() for path in tmp_path.glob("job-*.sh")]
    assert len(scripts) == 2
    assert all("#SBATCH --gres=gpu:1" in text and "--resources GPU=1 --lifetime 230m" in text for text in scripts)
    assert len((tmp_path / "cancelled").read_text().split()) == 2  # closing the run cancels its jobs


GPU = "cores: 8, memory: 32GB, walltime: '04:00:00', job_extra_directives: ['--gres=gpu:1']"
BAD = {
    "not a mapping": ("- slurm\n- pbs\n", "must be a mapping"),
    "unknown job option": ("slurm: {cores: 8, memory: 8GB, gres: 'gpu:1'}\n", "unknown option 'gres' for SLURMCluster"),
    "hyphenated option": ("slurm: {cores: 8, memory: 8GB, job-extra-directives: []}\n",
                          "did you mean job_extra_directives"),
    "unknown top-level key": ("slurn: {cores: 8}\n", "unknown key(s) slurn"),
    "lifetime past walltime": (f"slurm: {{{GPU}, walltime: '01:00:00', worker_extra_args: ['--resources', 'GPU=1', "
                               "'--lifetime', '58m', '--lifetime-stagger', '5m']}\n",
                               "does not end before the walltime 01:00:00"),
    "lifetime dask cannot read": (f"slurm: {{{GPU}, worker_extra_args: ['--resources', 'GPU=1', '--lifetime', "
                                  f"'3h50m']}}\n", "'3h50m' is not a duration"),
    "restart under a walltime": (f"slurm: {{{GPU}, worker_extra_args: ['--resources', 'GPU=1', '--lifetime', '60m', "
                                 "'--lifetime-restart']}\n", "--lifetime-restart restarts the worker"),
    "GPU job without the resource": (f"slurm: {{{GPU}}}\n", "requests a GPU but its worker has no '--resources GPU=1'"),
    "resource without a GPU": ("slurm: {cores: 8, memory: 8GB, worker_extra_args: ['--resources', 'GPU=1']}\n",
                               "advertises GPU=1 but the job requests no GPU"),
    "two GPUs per job": ("slurm: {cores: 8, memory: 8GB, job_extra_directives: ['--gres=gpu:2'], "
                         "worker_extra_args: ['--resources', 'GPU=1']}\n", "one GPU per job"),
    "GPU shared by processes": (f"slurm: {{{GPU}, processes: 2, worker_extra_args: ['--resources', 'GPU=1']}}\n",
                                "one worker process"),
    "string instead of a list": ("slurm: {cores: 8, memory: 8GB, worker_extra_args: '--lifetime 60m'}\n",
                                 "must be a list"),
    "no cores": ("slurm: {memory: 8GB}\n", "cores and memory per job are required"),
    "cores not a number": ("slurm: {cores: eight, memory: 8GB}\n", "cores must be a positive integer"),
    "memory not a size": ("slurm: {cores: 8, memory: lots}\n", "memory 'lots' is not a size"),
    "GPU job split into processes by default": ("slurm: {cores: 8, memory: 8GB, job_extra_directives: "
                                                "['--gres=gpu:1'], worker_extra_args: ['--resources', 'GPU=1']}\n",
                                                "one worker process"),
    "missing config section": ("slurm: {cores: 8, memory: 8GB, config_name: slurm-gpu}\n",
                               "no jobqueue.slurm-gpu section"),
    "GPU profile without the resource": ("default: gpu\nprofiles:\n  gpu:\n    slurm: {cores: 8, memory: 8GB}\n",
                                         "profile gpu): slurm workers have no '--resources GPU=1'"),
    "unknown profile": ("profiles:\n  gpu: {jobs: 2}\n  cpu: {jobs: 4}\ndefault: tpu\n",
                        "unknown profile 'tpu' (profiles: gpu, cpu)"),
    "no profile chosen": ("profiles:\n  gpu: {jobs: 2}\n  cpu: {jobs: 4}\n", "choose a profile"),
    "bad jobs": ("jobs: 0\nslurm: {cores: 8, memory: 8GB}\n", "jobs must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_configurations_are_one_line_errors(case, tmp_path, capsys):
    text, words = BAD[case]
    (tmp_path / "c.yaml").write_text(text)
    code = main(["jobscript", "--cluster", "slurm", "--cluster-config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and words in err, err


@pytest.mark.parametrize("case", ["lifetime past walltime", "GPU job without the resource", "unknown profile"])
def test_a_run_stops_before_any_scheduler_starts(case, tmp_path):
    from distributed import Scheduler

    (tmp_path / "c.yaml").write_text(BAD[case][0])
    schedulers, ports = len(Scheduler._instances), listening_ports()
    with pytest.raises(InputError, match=re.escape(BAD[case][1])):
        make_cluster("slurm", config=tmp_path / "c.yaml")
    assert len(Scheduler._instances) == schedulers and listening_ports() == ports


def test_a_profile_suffix_and_a_plain_file(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("jobs: 3\nslurm: {cores: 2, memory: 4GB}\n")
    assert load_config(plain)["jobs"] == 3
    with pytest.raises(InputError, match="has no profiles"):
        load_config(f"{plain}:gpu")
    assert load_config(f"{DEPLOY}/slurm/cluster.yaml:cpu")["jobs"] == 16
    with pytest.raises(InputError, match="two profiles"):
        load_config(f"{DEPLOY}/slurm/cluster.yaml:cpu", "gpu")


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_the_example_config_still_renders(kind):
    script = job_script(kind, load_config(DEPLOY / "cluster.example.yaml")[kind])
    assert "--resources GPU=1" in script and "--lifetime 230m" in script


@pytest.mark.parametrize("text,count", [("--gres=gpu:1", 1), ("--gres=gpu:a100:2", 2), ("--gpus-per-node=1", 1),
                                        ("select=1:ncpus=8:ngpus=1:mem=64GB", 1), ("-l gpu=1", 1), ('-gpu "num=2"', 2),
                                        ("--partition=gpu", 0), ("-q gpu --mem=4G", 0)])
def test_gpu_requests_are_read_from_the_directives(text, count):
    assert requested_gpus(text) == count


@pytest.mark.parametrize("kind,text,seconds", [("slurm", "04:00:00", 14400), ("slurm", "1-12:00:00", 129600),
                                               ("slurm", "30", 1800), ("slurm", "30:00", 1800), ("lsf", "04:00", 14400),
                                               ("pbs", "3600", 3600), ("pbs", "four hours", None)])
def test_walltimes(kind, text, seconds):
    assert walltime_seconds(kind, text) == seconds


@pytest.mark.parametrize("processes", [1, 2])
def test_retired_workers_are_replaced_by_new_jobs(processes):
    """dask-jobqueue does not resubmit a job whose worker retired at --lifetime (#691); cryodask does.
    Jobs here are dask-jobqueue's local ones (a bash process per job), with a 2 s lifetime. With two
    worker processes per job (the shipped ``cpu`` profile), distributed forgets each lost worker by
    its own name (``<job>-0``), never the job: cryodask forgets the job once all its workers are gone."""
    from dask_jobqueue.local import LocalCluster
    from distributed import Client

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.2s"}):
        cluster = LocalCluster(cores=processes, memory=f"{500 * processes}MB", processes=processes,
                               worker_extra_args=["--lifetime", "2s"], scheduler_options={"dashboard_address": ":0"})
        try:
            cluster.scale(jobs=1)
            replace_retired_jobs(cluster, 1, interval=0.5)
            seen = set()
            with Client(cluster) as client:
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and len(seen) < 2 * processes:
                    seen |= set(client.scheduler_info()["workers"])
                    time.sleep(0.2)
        finally:
            cluster.close()
    assert len(seen) == 2 * processes  # the first job's workers retired and a new job's took their place


def test_local_multigpu_recipe_parses_and_asks_for_one_gpu_per_worker():
    recipe = DEPLOY / "local-multigpu.sh"
    assert subprocess.run(["bash", "-n", str(recipe)], capture_output=True).returncode == 0
    text = recipe.read_text()
    assert '--resources "GPU=1"' in text and "dask cuda worker" in text and '--cluster "$address"' in text
    assert "CUDA_VISIBLE_DEVICES" in text and "--rmm-pool-size" in text


def test_environment_pins_match_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {}
    for spec in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(spec)
        pinned.setdefault(req.name, set()).add(str(req.specifier))
    env = yaml.safe_load((DEPLOY / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert Requirement(f"x{project['requires-python']}").specifier.contains(python.split("=")[1] + ".0")
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    editable = [line for line in pip if line.startswith("-e ")]
    assert len(editable) == 1 and (DEPLOY / editable[0][3:].split("[")[0] / "pyproject.toml").exists()
    extras = editable[0].split("[")[1].rstrip("]").split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and "jobqueue" in extras and "gpu" in extras
    for line in pip:
        if not line.startswith("-"):
            req = Requirement(line)
            assert str(req.specifier) in pinned[req.name], \
                f"{line} is not pinned like pyproject: {pinned.get(req.name)}"
    install = (DEPLOY / "install.sh").read_text()
    assert "torch==2.13.0" in pip and '"${pip[@]}" torch==2.13.0' in install
    sam2 = re.search(r"sam2==([\d.]+)", (DEPLOY / "environment.yml").read_text()).group(1)
    assert f"sam2=={sam2}" in install


def test_documented_deploy_files_exist_and_commands_take_their_options(capsys):
    """Every deploy/ path named in the docs exists; every --option of a cryodask command line in
    deploy/README.md is one that command has."""
    readme = (DEPLOY / "README.md").read_text()
    for doc in (readme, (ROOT / "README.md").read_text()):
        for path in set(re.findall(r"deploy/[\w./-]+\w", doc)):
            assert (ROOT / path.split(":")[0]).exists(), path
    commands = re.findall(r"^\s*(?:\S+=\S+ )*(?:deploy/local-multigpu\.sh|cryodask) ([a-z]+)((?:.*\\\n)*.*)$", readme,
                          re.M)
    assert len(commands) >= 5
    for name, rest in commands:
        assert main([name, "--help"]) == 0
        help_text = capsys.readouterr().out
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)):
            assert option in help_text, f"cryodask {name} has no {option}"
