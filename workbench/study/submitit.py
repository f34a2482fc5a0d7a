"""Running a study's grid as a job array through submitit (Slurm, or its local executor for testing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.study.plan import RunSpec, StudyConfig


def submit(study: StudyConfig, runs: list[RunSpec], execute: Callable[[StudyConfig, RunSpec], dict],
           executor: str, partition: str | None = None, timeout_min: int = 240) -> list[dict]:
    """One array task per run, each `execute(study, run)` (the runner's `workbench.study.runner.execute`, which
    calls this: it is given, not imported); waits for all and returns their statuses."""
    import submitit

    folder = Path(study.runs_dir) / study.study / "submitit"
    cluster = "local" if executor == "submitit-local" else "slurm"
    pool = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": timeout_min}
    if cluster == "slurm" and partition:
        params["slurm_partition"] = partition
    pool.update_parameters(**params)
    jobs = pool.map_array(execute, [study] * len(runs), runs)
    return [job.result() for job in jobs]
