"""Studies: a grid of training runs from one base config (optionally after a pretrain run they all start
from), run resumably, collected into one table, report and plots. `launch/study.py` is the command line.

| module | what it is |
|---|---|
| `plan` | the study YAML (`StudyConfig`) and the grid of runs (`grid`, `plan`, `RunSpec`) |
| `load` | reading a study YAML and checking everything it refers to before any run (`load_study`) |
| `checks` | the axes, values and columns that `compare`, `plots`, `claims`, `primary` and `same_as` name, checked before any run |
| `metrics` | which metric names a run logs, to check `collect` before any run starts |
| `runner` | one run through `launch/train.py --resume` (`execute`), its status, the whole plan (`run_all`) |
| `collect` | rows and the table over seeds; runs launched by hand as a study (`hand_study`) |
| `report` | runs.csv, results.csv, analysis.json, report.md and the plots (`write_results`) |
| `analysis` | `compare:` paired deltas and best-x agreement (Kendall's tau, cost) |
| `claims` | `claims:` a paper's claims, each a paired test with its MDE and a verdict by a fixed rule |
| `selection` | `select:` checkpoint choice by a task metric, the test set scored there; `noise:` the sampling noise floor |
| `submitit` | the runs as a submitit job array (Slurm, or its local executor) |
"""

from workbench.study.collect import aggregate, collect_run, final_eval_scores, hand_study
from workbench.study.load import load_study
from workbench.study.plan import (
    AgreementSpec,
    DeltaSpec,
    PlotSpec,
    PretrainSpec,
    RunSpec,
    StudyConfig,
    collected,
    grid,
    plan,
    pretrain_for,
    pretrain_runs,
)
from workbench.study.report import write_results
from workbench.study.runner import STATUS, execute, run_all, run_status, train_command

__all__ = [
    "STATUS", "AgreementSpec", "DeltaSpec", "PlotSpec", "PretrainSpec", "RunSpec", "StudyConfig", "aggregate",
    "collect_run", "collected", "execute", "final_eval_scores", "grid", "hand_study", "load_study", "plan",
    "pretrain_for", "pretrain_runs", "run_all", "run_status", "train_command", "write_results",
]
