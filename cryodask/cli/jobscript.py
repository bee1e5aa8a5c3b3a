"""``cryodask jobscript``: print the batch script a ``--cluster slurm|pbs|sge|lsf`` run would submit.

Rendered from the same configuration a run reads, without a scheduler and without submitting
anything, so a user can check directives, memory, walltime and worker arguments on the login
node first, or submit worker jobs by hand to a scheduler they started (``--scheduler``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def jobscript(
    cluster: str = typer.Option(..., "--cluster", help="slurm | pbs | sge | lsf"),
    cluster_config: Path = typer.Option(None, "--cluster-config",
                                        help="cryodask cluster YAML (FILE or FILE:PROFILE); default: the jobqueue "
                                             "config only."),
    profile: str = typer.Option(None, "--profile", help="Profile of the cluster YAML (default: its 'default:')."),
    scheduler: str = typer.Option(None, "--scheduler",
                                  help="Scheduler the workers join, e.g. tcp://login1:8786; each worker is then "
                                       "named after its job id, so the script can be submitted many times."),
):
    """Print the batch job script for one worker job; nothing is started or submitted."""
    from ..engine.cluster import JOB_ID, JOBQUEUE, SUBMIT, job_script, read_config
    from ..errors import InputError

    if cluster not in JOBQUEUE:
        raise InputError(f"--cluster {cluster}: jobscript renders batch jobs: expected one of {', '.join(JOBQUEUE)}")
    if scheduler is not None and "://" not in scheduler:
        raise InputError(f"--scheduler {scheduler}: expected an address like tcp://host:8786")
    if profile and cluster_config is None:
        raise InputError("--profile needs --cluster-config")
    options, source, jobs, origin = {}, None, 1, "the jobqueue config"
    if cluster_config is not None:
        source, profile, loaded = read_config(cluster_config, profile)
        origin = f"{source}" + (f", profile {profile}" if profile else "")
        options, jobs = loaded.get(cluster, {}), loaded.get("jobs", 1)
        if not options:
            raise InputError(f"{origin}: no {cluster} section")
    name = f"{profile or 'cryodask'}-{JOB_ID[cluster]}" if scheduler else None
    typer.echo(job_script(cluster, options, scheduler=scheduler, name=name, source=source), nl=False)
    how = f"submit it with {SUBMIT[cluster]}" if scheduler else "pass --scheduler to submit it by hand"
    typer.echo(f"# --cluster {cluster} ({origin}): {jobs} job(s) like this one; rendered only, nothing submitted "
               f"({how})", err=True)
