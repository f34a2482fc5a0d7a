"""What each run of a study gets: the study's `resources:` section (or the command line) -> the parameters of
its Slurm job, and locally each `--parallel` slot's own GPUs (CUDA_VISIBLE_DEVICES). Nothing is trained or
submitted; GPUs are faked."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
import yaml

from workbench.errors import ConfigError
from workbench.study import runner
from workbench.study.plan import StudyConfig, plan
from workbench.study.submitit import job_parameters
from workbench_cli import study as study_cli


def _study(**fields) -> StudyConfig:
    return StudyConfig(study="s", base="base.yaml", **fields)


def test_slurm_jobs_ask_for_what_the_study_says():
    study = _study(resources={"gpus_per_run": 1, "cpus_per_run": 8, "mem_gb": 64, "time_min": 90,
                              "partition": "a100"})
    assert job_parameters(study, "slurm") == {"name": "s", "nodes": 1, "tasks_per_node": 1, "timeout_min": 90,
                                              "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64,
                                              "slurm_partition": "a100"}
    assert job_parameters(study, "slurm", partition="h100")["slurm_partition"] == "h100"  # --partition wins
    assert "slurm_partition" not in job_parameters(study, "submitit-local")


def test_gpus_default_to_the_launchers_ranks_and_cpu_runs_ask_for_none():
    assert job_parameters(_study(), "slurm") == {"name": "s", "nodes": 1, "tasks_per_node": 1, "timeout_min": 240,
                                                 "gpus_per_node": 1}
    deepspeed = {"kind": "deepspeed", "num_gpus": 4}
    assert job_parameters(_study(launcher=deepspeed), "slurm")["gpus_per_node"] == 4
    assert "gpus_per_node" not in job_parameters(_study(resources={"gpus_per_run": 0}), "slurm")


def test_the_parameters_are_ones_submitit_accepts():
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder="unused", cluster="debug")
    valid = executor._valid_parameters() | {"slurm_partition"}
    assert set(job_parameters(_study(resources={"cpus_per_run": 2, "mem_gb": 8}), "slurm")) <= valid


@pytest.mark.parametrize(("fields", "named"), [
    ({"resources": {"gpus_per_run": 2}}, "resources.gpus_per_run"),  # a one-process run on two GPUs
    ({"launcher": {"kind": "deepspeed", "num_gpus": 2}, "resources": {"gpus_per_run": 4}}, "resources.gpus_per_run"),
])
def test_gpus_per_run_that_the_launcher_cannot_use_are_a_config_error(fields, named):
    with pytest.raises(ConfigError, match=rf"field '{named}'"):
        job_parameters(_study(**fields), "slurm")


def test_the_command_line_and_profiles_change_the_resources():
    study = _study(resources={"mem_gb": 16}, profiles={"scale": {"resources": {"time_min": 600}}})
    changed = study.with_resources({"gpus_per_run": 0, "partition": "cpu"})
    assert (changed.resources.mem_gb, changed.resources.gpus_per_run, changed.resources.partition) == (16, 0, "cpu")
    assert study.with_profile("scale").resources.time_min == 600 and study.with_profile("scale").resources.mem_gb == 16
    with pytest.raises(ConfigError, match=r"field 'resources.time_min'"):
        study.with_resources({"time_min": 0})
    with pytest.raises(ConfigError, match=r"profile 'bad': field 'resources.gpus'"):
        _study(profiles={"bad": {"resources": {"gpus": 1}}}).with_profile("bad")


@pytest.mark.parametrize(("gpus", "parallel", "per_run", "groups"), [
    (["0", "1", "2", "3"], 4, 1, [("0",), ("1",), ("2",), ("3",)]),
    (["0", "1", "2", "3"], 2, 2, [("0", "1"), ("2", "3")]),
    (["4", "6", "7"], 2, 1, [("4",), ("6",)]),  # the ids CUDA_VISIBLE_DEVICES gave this process
    (["0", "1"], 1, 1, [("0",)]),
    ([], 3, 1, [(), (), ()]),  # a CPU machine: no GPUs to hand out
    (["0", "1"], 2, 0, [(), ()]),  # CPU runs
])
def test_each_slot_gets_gpus_of_its_own(gpus, parallel, per_run, groups):
    assert runner.device_groups(gpus, parallel, per_run) == groups


def test_more_gpus_than_the_machine_has_is_a_config_error():
    with pytest.raises(ConfigError, match=r"field 'resources.gpus_per_run': 4 GPUs per run.* has 2"):
        runner.device_groups(["0", "1"], 1, 4)
    with pytest.raises(ConfigError, match=r"--parallel 3: .* need 6.* use --parallel 2"):
        runner.device_groups(["0", "1", "2", "3"], 3, 2)


def test_visible_gpus_come_from_cuda_visible_devices_else_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner.visible_gpus() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert runner.visible_gpus() == ["5", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runner.visible_gpus() == []


def test_parallel_runs_each_hold_their_own_gpu_while_they_run(tmp_path, monkeypatch):
    """Two slots over four runs: no two runs at the same time see the same GPU, and each gets it as
    CUDA_VISIBLE_DEVICES (the run itself is faked)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    study = _study(runs_dir=str(tmp_path), axes={"arm": {"a": {}, "b": {}, "c": {}, "d": {}}})
    holding: dict[str, str] = {}
    clashes: list[str] = []
    lock = threading.Lock()

    def fake_train(args, log, threads, env):
        device = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            clashes.extend(name for name, held in holding.items() if held == device)
            holding[log.parent.name] = device
        time.sleep(0.05)
        with lock:
            del holding[log.parent.name]
        return 0

    monkeypatch.setattr(runner, "train_process", fake_train)
    assert runner.run_all(study, plan(study), parallel=2, progress=lambda line: None)
    assert clashes == []


def test_a_deepspeed_run_in_a_slot_takes_its_ranks_from_the_slots_gpus():
    study = _study(launcher={"kind": "deepspeed", "num_gpus": 2})
    run = plan(study)[0]
    assert "--num_gpus" in runner.train_command(study, run)  # CPU ranks, or every GPU
    assert "--num_gpus" not in runner.train_command(study, run, devices=("2", "3"))  # CUDA_VISIBLE_DEVICES
    assert runner.Slot(4, ("2", "3")).env() == {"CUDA_VISIBLE_DEVICES": "2,3"} and runner.Slot(4).env() == {}


def test_the_study_command_refuses_more_gpus_than_the_machine_has(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "base": "configs/quickstart.yaml", "runs_dir": str(tmp_path / "r"),
                                    "launcher": {"kind": "deepspeed", "num_gpus": 2}}))
    monkeypatch.setattr(sys, "argv", ["workbench study"])
    assert study_cli.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: field 'resources.gpus_per_run': 2 GPUs per run, and this machine has 1 (0)"), err
    assert not (tmp_path / "r").exists()


def test_the_command_lines_resource_options_are_checked_and_override_the_study(tmp_path, capsys):
    args = study_cli.argparse.Namespace(gpus_per_run=0, cpus_per_run=None, mem_gb=12.5, time_min=30, partition="cpu")
    assert study_cli.resource_options(args) == {"gpus_per_run": 0, "mem_gb": 12.5, "time_min": 30, "partition": "cpu"}
    with pytest.raises(SystemExit) as exit_:
        study_cli.main([str(tmp_path / "study.yaml"), "--time-min", "0"])
    assert exit_.value.code == 2 and "argument --time-min: 0 is below 1" in capsys.readouterr().err
