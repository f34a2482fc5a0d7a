"""How runs start on a machine with CUDA devices (`workbench.processes`): never forked from the warm server (a
CUDA context does not survive a fork), without the CPU tuning (tcmalloc, thread caps); on CPU as before.
CUDA is faked through torch.cuda.device_count: this machine has no GPU."""

from __future__ import annotations

import ctypes.util
import multiprocessing
import os
import subprocess

import pytest
import torch

from workbench import processes


def _hello() -> None:
    print("hello from a new interpreter")


@pytest.fixture
def cpu_machine(monkeypatch):
    """A CPU machine with tcmalloc, warm starts allowed."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    for name in ("LD_PRELOAD", "WORKBENCH_MALLOC", "WORKBENCH_COLD_START"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def cuda_machine(cpu_machine):
    """The same machine with two CUDA devices."""
    cpu_machine.setattr(torch.cuda, "device_count", lambda: 2)
    return cpu_machine


def test_a_cpu_machine_keeps_tcmalloc_the_thread_cap_and_warm_starts(cpu_machine):
    assert not processes.cuda_machine()
    assert processes.cpu_tuning_env(3) == {**processes.allocator_env(), "OMP_NUM_THREADS": "3"}
    assert processes.allocator_env()["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert processes.cold_start() == ("forkserver" not in multiprocessing.get_all_start_methods())


def test_a_cuda_machine_has_no_cpu_tuning_and_starts_new_interpreters(cuda_machine):
    assert processes.cuda_machine()
    assert processes.allocator_env() == {} and processes.thread_env(3) == {} and processes.cpu_tuning_env(3) == {}
    assert processes.cold_start()


def test_a_run_on_a_cuda_machine_is_a_new_interpreter_with_its_gpus_and_no_cap(cuda_machine, tmp_path):
    started = []
    cuda_machine.setattr(subprocess, "run", lambda command, env, **kw: started.append((command, env))
                         or subprocess.CompletedProcess(command, 0))
    code = processes.train_process(["cfg.yaml"], tmp_path / "train.log", threads=4,
                                   env={"CUDA_VISIBLE_DEVICES": "1"})
    (command, env), = started
    assert code == 0 and command[1:3] == ["-m", processes.TRAIN_MODULE]
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and "LD_PRELOAD" not in env
    assert env.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")  # no cap of the runner's


def test_a_warm_process_on_a_cuda_machine_is_spawned_not_forked(cuda_machine, tmp_path):
    methods = []
    real = multiprocessing.get_context
    cuda_machine.setattr(multiprocessing, "get_context", lambda method=None: methods.append(method) or real(method))
    log = tmp_path / "hello.log"
    assert processes.warm_process(_hello, (), log, threads=2) == 0
    assert methods == ["spawn"] and log.read_text().strip() == "hello from a new interpreter"


def test_a_fork_of_a_process_that_initialised_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(RuntimeError, match="initialised CUDA"):
        processes._refuse_forked_cuda()
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    processes._refuse_forked_cuda()
