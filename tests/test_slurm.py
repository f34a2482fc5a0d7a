"""Launching under Slurm: `srun python -m workbench_cli.train cfg.yaml` maps each task's Slurm variables to the
ranks and rendezvous torch.distributed reads (`workbench.distributed_launch.slurm_environment`), never over a
launcher's own, and a task it cannot map is one line and exit code 2 with nothing written."""

from __future__ import annotations

import os

import pytest
from conftest import tiny_config, write_config

from workbench.distributed_launch import expand_nodelist, slurm_environment, slurm_port
from workbench.errors import ConfigError
from workbench_cli import train

# what srun sets for task 5 of a step of 8 tasks, 4 on each of two nodes
TWO_NODES = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NODELIST": "gpu[07-09]"}
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
                  "PMI_SIZE", "PMIX_RANK")


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("gpu-a[009-010],cpu-b3", ["gpu-a009", "gpu-a010", "cpu-b3"]),
    ("a1,b[2,4],c", ["a1", "b2", "b4", "c"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("host.example.org", ["host.example.org"]),
])
def test_nodelists_expand_as_scontrol_show_hostnames_does(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node01-04]", "node[4-1]", "node[a-b]", "", "a,,b"])
def test_an_unreadable_nodelist_is_a_value_error(nodelist):
    with pytest.raises(ValueError):
        expand_nodelist(nodelist)


def test_a_task_of_a_two_node_step_gets_its_rank_and_the_first_node_as_rendezvous():
    env = slurm_environment(TWO_NODES)
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(slurm_port("4242", "0"))}


def test_the_port_is_the_same_in_every_task_and_differs_between_steps_and_jobs():
    ports = {slurm_port("4242", "0"), slurm_port("4242", "1"), slurm_port("4243", "0")}
    assert len(ports) == 3 and all(15000 <= port < 35000 for port in ports)
    other_task = {**TWO_NODES, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert slurm_environment(other_task)["MASTER_PORT"] == slurm_environment(TWO_NODES)["MASTER_PORT"]


def test_one_node_meets_on_loopback_and_a_given_rendezvous_is_kept():
    one_node = {**TWO_NODES, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "gpu07"}
    assert slurm_environment(one_node)["MASTER_ADDR"] == "127.0.0.1"
    given = slurm_environment({**TWO_NODES, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})
    assert "MASTER_ADDR" not in given and "MASTER_PORT" not in given


def test_the_job_nodelist_serves_where_the_step_has_none():
    env = {k: v for k, v in TWO_NODES.items() if not k.startswith("SLURM_STEP_NUM") and k != "SLURM_STEP_NODELIST"}
    assert slurm_environment({**env, "SLURM_JOB_NODELIST": "n[3,1]"})["MASTER_ADDR"] == "n3"


@pytest.mark.parametrize("environ", [
    {},  # no Slurm
    {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"},  # one task
    {**TWO_NODES, "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8"},  # the deepspeed launcher under srun
    {**TWO_NODES, "LOCAL_RANK": "0"},  # a launcher that set only some
])
def test_nothing_is_mapped_without_a_multi_task_step_or_under_a_launcher(environ):
    assert slurm_environment(environ) == {}


@pytest.mark.parametrize(("change", "named"), [
    ({"SLURM_PROCID": None}, "SLURM_PROCID"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID"),
    ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID"),
    ({"SLURM_STEP_NODELIST": "gpu[07-"}, "SLURM_STEP_NODELIST"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "SLURM_NODELIST"),
])
def test_a_variable_it_cannot_map_is_named(change, named):
    environ = {k: v for k, v in {**TWO_NODES, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=rf"Slurm variable {named}\b"):
        slurm_environment(environ)


@pytest.fixture
def srun_task(monkeypatch):
    """This process as task 5 of a two-node srun step (no launcher variables of its own)."""
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so the values the train command sets are undone afterwards
        monkeypatch.delenv(name)
    for name, value in TWO_NODES.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_the_train_command_takes_its_rank_from_srun(tmp_path, srun_task):
    cfg = train.load_config(str(write_config(tmp_path, tiny_config(tmp_path))), [])
    note = train.launch_environment(cfg)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")
    assert os.environ["MASTER_ADDR"] == "gpu07" and "8 ranks, rendezvous at gpu07:" in note


def test_an_srun_task_it_cannot_map_is_one_line_exit_2_and_writes_nothing(tmp_path, srun_task, capsys):
    srun_task.setenv("SLURM_LOCALID", "")
    path = write_config(tmp_path, tiny_config(tmp_path))
    before = sorted(tmp_path.rglob("*"))
    assert train.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Slurm variable SLURM_LOCALID:") and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before and "RANK" not in os.environ


def test_release_shared_memory_unlinks_only_this_ranks_buffer(tmp_path, monkeypatch):
    import workbench.distributed_launch as launch

    monkeypatch.setattr(launch, "SHARED_MEMORY", tmp_path)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1"}
    mine = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_1"
    other_rank = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_0"
    other_run = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29501_1"
    for path in (mine, other_rank, other_run):
        path.write_bytes(b"x")
    assert launch.release_shared_memory(env) is True
    assert not mine.exists() and other_rank.exists() and other_run.exists()
    assert launch.release_shared_memory(env) is False  # gone already
    assert launch.release_shared_memory({"RANK": "0"}) is False  # no rendezvous: not a DeepSpeed CPU run
