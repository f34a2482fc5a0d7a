"""Running a study's grid as a job array through submitit (Slurm, or its local executor for testing), each run
one job with the resources the study asks for (`resources:` in the study YAML, or the command line)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.study.plan import RunSpec, StudyConfig


def job_parameters(study: StudyConfig, executor: str, partition: str | None = None) -> dict[str, Any]:
    """What `submitit.AutoExecutor.update_parameters` gets for one run's job: one task on one node with the
    study's `gpus_per_run` GPUs (none asked for CPU runs), `resources.cpus_per_run` cores and `mem_gb` memory
    where set (else the cluster's defaults) and `time_min` minutes; under Slurm, the partition (`partition`
    over `resources.partition`)."""
    resources = study.resources
    params: dict[str, Any] = {"name": study.study, "nodes": 1, "tasks_per_node": 1, "timeout_min": resources.time_min}
    gpus = study.gpus_per_run()
    if gpus:
        params["gpus_per_node"] = gpus
    if resources.cpus_per_run:
        params["cpus_per_task"] = resources.cpus_per_run
    if resources.mem_gb:
        params["mem_gb"] = resources.mem_gb
    partition = partition or resources.partition
    if executor == "slurm" and partition:
        params["slurm_partition"] = partition
    return params


def submit(study: StudyConfig, runs: list[RunSpec], execute: Callable[[StudyConfig, RunSpec], dict],
           executor: str, partition: str | None = None) -> list[dict]:
    """One array task per run, each `execute(study, run)` (the runner's `workbench.study.runner.execute`, which
    calls this: it is given, not imported) with `job_parameters`; waits for all and returns their statuses."""
    import submitit

    params = job_parameters(study, executor, partition)  # checked before anything is submitted
    folder = Path(study.runs_dir) / study.study / "submitit"
    cluster = "local" if executor == "submitit-local" else "slurm"
    pool = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    pool.update_parameters(**params)
    jobs = pool.map_array(execute, [study] * len(runs), runs)
    return [job.result() for job in jobs]
