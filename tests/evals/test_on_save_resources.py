"""Evaluation on save beside training: the evaluated model is freed after each evaluation, random states (the
accelerators' included) are left as they were, and the other ranks wait at an explicit barrier with its own
timeout instead of timing out in training's next collective. On CPU, with two tiny saved checkpoints."""

from __future__ import annotations

import contextlib
import gc
import random
import socket
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, subprocess_env

import workbench_eval.evaluator
import workbench_eval.on_save
from workbench.config import ModelConfig
from workbench.models import build_model, train_bpe_tokenizer
from workbench_eval.config import EvalConfig, EvalTask
from workbench_eval.on_save import EvalOnSaveCallback, rng_devices
from workbench_eval.results import read_results

WORLD = {"num_entities": 40, "seed": 1}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TEXTS = [f"Question: Where was Velmora Tash {i} born?\nAnswer: Ostrel, in the country of Daravia." for i in range(60)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as training leaves it: its tokenizer and full-model checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("onsave") / "run"
    tokenizer = train_bpe_tokenizer(TEXTS, 320)
    tokenizer.save_pretrained(run / "tokenizer")
    for step in (1, 2):
        torch.manual_seed(step)
        build_model(ModelConfig(preset="pythia-tiny", overrides=SMALL), tokenizer).save_pretrained(
            run / f"checkpoint-{step}")
    return run


def callback(run: Path, tasks: list[EvalTask], **fields) -> EvalOnSaveCallback:
    cfg = EvalConfig(tasks=tasks, bootstrap=0, **fields)
    return EvalOnSaveCallback(cfg, run, run / "tokenizer", WORLD, limit=2)


def saved(cb: EvalOnSaveCallback, step: int) -> None:
    """What the Trainer does on rank 0 of a single-process run once checkpoint-`step` is written."""
    cb.on_save(None, SimpleNamespace(is_world_process_zero=True, global_step=step), None)


def test_no_model_of_an_evaluation_outlives_it(run_dir, monkeypatch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    loaded: list[weakref.ref] = []
    load = workbench_eval.evaluator.load_checkpoint_model

    def recording(path, dtype="auto"):
        model = load(path, dtype)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(workbench_eval.evaluator, "load_checkpoint_model", recording)
    cb = callback(run, [EvalTask(task="factworld_mc", styles=["zero_shot"])])
    saved(cb, 1)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None  # neither the sweep nor lm-eval's HFLM kept it
    saved(cb, 2)
    gc.collect()
    assert len(loaded) == 2 and all(ref() is None for ref in loaded)
    assert {r["checkpoint"] for r in read_results(run / "eval" / "results.jsonl")} == {"checkpoint-1", "checkpoint-2"}


def _random_states() -> tuple:
    """Python's, numpy's and torch's CPU generator states, comparable with ==."""
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_a_sampling_evaluation_leaves_the_random_states_as_they_were(run_dir, tmp_path, monkeypatch):
    import shutil

    from workbench_eval.sweep import Target, sweep

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    evaluate = workbench_eval.evaluator.Evaluator.evaluate

    def sampling(self, model, cells=None):  # an evaluation that samples from the global generators
        torch.multinomial(torch.ones(8), 4)
        random.random()
        np.random.rand()
        return evaluate(self, model, cells)

    monkeypatch.setattr(workbench_eval.evaluator.Evaluator, "evaluate", sampling)
    cb = callback(run, [EvalTask(task="factworld_mc", styles=["zero_shot"])])
    torch.manual_seed(5)
    before = _random_states()
    saved(cb, 1)
    assert _random_states() == before
    target = Target("run", tmp_path / "plain.jsonl", [run / "checkpoint-2"], str(run / "tokenizer"), WORLD)
    sweep(target, cb.eval_cfg, 2, progress=False)  # the same evaluation unguarded moves every generator
    assert all(a != b for a, b in zip(_random_states(), before, strict=True))


def test_every_device_of_an_initialised_accelerator_is_forked(run_dir, monkeypatch):
    assert rng_devices() == (None, [])  # this CPU-only machine: only the CPU state
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert rng_devices() == ("cuda", [])  # forking would initialise CUDA for nothing
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert rng_devices() == ("cuda", [0, 1])
    forked = []

    @contextlib.contextmanager
    def fork_rng(devices=None, device_type=None, **_):
        forked.append((device_type, list(devices)))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(workbench_eval.on_save, "Evaluator", lambda *args: SimpleNamespace())
    monkeypatch.setattr(workbench_eval.on_save, "sweep", lambda *args, **kwargs: 0)
    saved(callback(run_dir, [EvalTask(task="factworld_mc", styles=["zero_shot"])]), 1)
    assert forked == [("cuda", [0, 1])]


RANK_SCRIPT = """
import sys, time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from workbench_eval.config import EvalConfig
from workbench_eval.on_save import EvalOnSaveCallback

rank, port, run = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=2))  # training's timeout
cb = EvalOnSaveCallback(EvalConfig(on_save_timeout=120), run, run + "/tokenizer", {}, 1)
cb._evaluate = lambda checkpoint: time.sleep(5)  # rank 0's evaluation: longer than training's timeout
cb.on_train_begin(None, None, None)
cb.on_save(None, SimpleNamespace(is_world_process_zero=rank == 0, global_step=1), None)
total = torch.ones(1)
dist.all_reduce(total)  # training's next collective
print(f"rank {rank} total {int(total.item())}")
dist.destroy_process_group()
"""


def test_other_ranks_wait_for_the_evaluation_at_a_barrier_with_its_own_timeout(run_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(port), str(run_dir)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [process.communicate(timeout=300)[0] for process in ranks]
    for rank, (process, output) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0 and f"rank {rank} total 2" in output, output[-2000:]
