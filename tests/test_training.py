"""Single-process training through launch/train.py: method hooks and state, resume, corrupt checkpoints, NaN."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_config, train_main, write_config
from safetensors.torch import load_file
from transformers import TrainerCallback

from workbench.checkpoints import MANIFEST, newest_complete_checkpoint, verify_checkpoint
from workbench.errors import CheckpointError
from workbench.io import read_jsonl
from workbench.methods import METHODS, Method, register


@dataclasses.dataclass
class CounterConfig:
    scale: float = 1.0
    nan_at_step: int = -1
    crash_at_step: int = -1


class _CountSteps(TrainerCallback):
    def __init__(self, method):
        self.method = method

    def on_step_end(self, args, state, control, **kwargs):
        self.method.steps_seen += 1
        self.method.history.append(state.global_step)
        if state.global_step == self.method.config.crash_at_step:
            raise RuntimeError("simulated crash")


@pytest.fixture
def counter_method():
    """A method that uses every hook and keeps state; registered for the test only."""

    @register("test_counter")
    class Counter(Method):
        Config = CounterConfig
        instances: list = []

        def __init__(self, config=None):
            super().__init__(config)
            self.steps_seen, self.history, self.calls = 0, [], set()
            Counter.instances.append(self)

        def prepare_model(self, model):
            self.calls.add("prepare_model")
            return model

        def wrap_collator(self, collator):
            self.calls.add("wrap_collator")
            return collator

        def callbacks(self):
            return [_CountSteps(self)]

        def loss(self, model, inputs, outputs, loss):
            self.calls.add("loss")
            if self.steps_seen + 1 == self.config.nan_at_step:
                return loss * float("nan")
            return loss * self.config.scale

        def param_groups(self, model, groups):
            self.calls.add("param_groups")
            return groups

        def state_dict(self):
            return {"steps_seen": self.steps_seen, "history": torch.tensor(self.history)}

        def load_state_dict(self, state):
            self.steps_seen, self.history = state["steps_seen"], state["history"].tolist()

    yield Counter
    METHODS.pop("test_counter")


def test_method_hooks_run_and_state_survives_resume(tmp_path, counter_method):
    cfg = tiny_config(tmp_path, methods={"test_counter": {"scale": 1.0}})
    path = write_config(tmp_path, cfg)
    assert train_main([str(path)]) == 0
    first = counter_method.instances[-1]
    assert first.calls == {"prepare_model", "wrap_collator", "loss", "param_groups"}
    assert first.steps_seen == 8
    state = torch.load(tmp_path / "runs/tiny/checkpoint-4/workbench_methods_rank0.pt", weights_only=True)
    assert state["test_counter"]["steps_seen"] == 4
    assert train_main([str(path), "--resume", "--set", "training.max_steps=12"]) == 0
    resumed = counter_method.instances[-1]
    assert resumed.steps_seen == 12 and resumed.history == list(range(1, 13))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, counter_method, capsys):
    cfg = tiny_config(tmp_path, methods={"test_counter": {"nan_at_step": 6}})
    assert train_main([str(write_config(tmp_path, cfg))]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss is nan at step 6") and "last good checkpoint" in err
    run = tmp_path / "runs" / "tiny"
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-4"]
    verify_checkpoint(run / "checkpoint-4")
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r)


def test_metrics_jsonl_and_outputs(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, training={"report_to": ["tensorboard"]}))
    assert train_main([str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert any("eval_loss" in r for r in records)
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for step in (4, 8):
        verify_checkpoint(run / f"checkpoint-{step}")


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4}))
    assert train_main([str(path)]) == 0
    assert train_main([str(path)]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    assert train_main([str(path), "--overwrite"]) == 0


@pytest.mark.parametrize("damage", ["truncate", "no_manifest", "bad_json"])
def test_broken_newest_checkpoint_falls_back_to_previous(tmp_path, capsys, damage):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert train_main([str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    newest = run / "checkpoint-8"
    if damage == "truncate":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no_manifest":
        (newest / MANIFEST).unlink()
    else:
        (newest / "trainer_state.json").write_text('{"global_step": 8, ')
    with pytest.raises(CheckpointError):
        verify_checkpoint(newest)
    reports = []
    assert newest_complete_checkpoint(run, report=reports.append) == run / "checkpoint-4"
    assert len(reports) == 1 and "checkpoint-8" in reports[0]
    capsys.readouterr()
    assert train_main([str(path), "--resume", "--set", "training.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "resuming from" in out and "checkpoint-4" in out
    state = json.loads((run / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10


def test_resume_single_process_is_bit_equal(tmp_path, counter_method):
    """Without DeepSpeed: crash after step 7 (checkpoint at 5), resume, compare with a straight run."""
    steps = {"max_steps": 10, "save_steps": 5}
    base = tiny_config(tmp_path, name="straight", training=steps, methods={"test_counter": {}})
    assert train_main([str(write_config(tmp_path, base, "a.yaml"))]) == 0
    split = tiny_config(tmp_path, name="split", training=steps, methods={"test_counter": {"crash_at_step": 7}})
    path = write_config(tmp_path, split, "b.yaml")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_main([str(path)])
    assert train_main([str(path), "--resume", "--set", "methods.test_counter.crash_at_step=-1"]) == 0
    a = load_file(tmp_path / "runs/straight/checkpoint-10/model.safetensors")
    b = load_file(tmp_path / "runs/split/checkpoint-10/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_token_accuracy_matches_a_hand_written_loop(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    path = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 4}))
    assert train_main([str(path)]) == 0
    record = [r for r in read_jsonl(tmp_path / "runs/tiny/metrics.jsonl") if "eval_token_accuracy" in r][-1]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/tiny/checkpoint-4").eval()
    (blocks_dir,) = (tmp_path / "cache" / "blocks").iterdir()
    validation = load_from_disk(str(blocks_dir))["validation"]
    hits = total = 0
    nll = 0.0
    with torch.no_grad():
        for row in validation:
            ids = torch.tensor([row["input_ids"]])
            logits = model(ids).logits[0].double()
            hits += int((logits[:-1].argmax(-1) == ids[0, 1:]).sum())
            nll -= float(torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).sum())
            total += ids.shape[1] - 1
    assert record["eval_token_accuracy"] == pytest.approx(hits / total, abs=1e-9)
    assert record["eval_loss"] == pytest.approx(nll / total, abs=1e-5)
