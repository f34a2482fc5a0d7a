"""Single-process training through launch/train.py: method hooks and state, resume, corrupt checkpoints, NaN."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

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

        def loss(self, model, inputs, outputs, loss, num_items_in_batch=None):
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


def _hand_written_metrics(run: Path, cache: Path, checkpoint: str) -> tuple[float, float, float]:
    """Next-token accuracy, mean NLL and mean uniform-smoothing term over the validation blocks, by a plain loop."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / checkpoint).eval()
    (blocks_dir,) = (cache / "blocks").iterdir()
    hits = total = 0
    nll = smooth = 0.0
    with torch.no_grad():
        for row in load_from_disk(str(blocks_dir))["validation"]:
            ids = torch.tensor([row["input_ids"]])
            log_probs = torch.log_softmax(model(ids).logits[0].double()[:-1], -1)
            hits += int((log_probs.argmax(-1) == ids[0, 1:]).sum())
            nll -= float(log_probs.gather(1, ids[0, 1:, None]).sum())
            smooth -= float(log_probs.mean(-1).sum())
            total += ids.shape[1] - 1
    return hits / total, nll / total, smooth / total


def test_validation_token_accuracy_matches_a_hand_written_loop(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 4}))
    assert train_main([str(path)]) == 0
    record = [r for r in read_jsonl(tmp_path / "runs/tiny/metrics.jsonl") if "eval_token_accuracy" in r][-1]
    accuracy, nll, _ = _hand_written_metrics(tmp_path / "runs/tiny", tmp_path / "cache", "checkpoint-4")
    assert record["eval_token_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert record["eval_loss"] == pytest.approx(nll, abs=1e-5)
    assert record["eval_nll"] == pytest.approx(nll, abs=1e-5)


def test_eval_nll_ignores_label_smoothing(tmp_path):
    """With label smoothing eps the Trainer's eval_loss is (1 - eps) NLL + eps * smoothing term; eval_nll is the NLL."""
    path = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 4,
                                                                 "label_smoothing_factor": 0.3}))
    assert train_main([str(path)]) == 0
    record = [r for r in read_jsonl(tmp_path / "runs/tiny/metrics.jsonl") if "eval_nll" in r][-1]
    _, nll, smooth = _hand_written_metrics(tmp_path / "runs/tiny", tmp_path / "cache", "checkpoint-4")
    assert record["eval_nll"] == pytest.approx(nll, abs=1e-5)
    assert record["eval_loss"] == pytest.approx(0.7 * nll + 0.3 * smooth, abs=1e-5)
    assert abs(smooth - nll) > 1e-3  # the two differ, so the test can tell them apart


def test_span_corruption_on_t5_trains_and_its_metrics_match_a_hand_written_loop(tmp_path):
    """t5-tiny picks span corruption (data.objective auto); eval_nll and eval_token_accuracy count the masked-out
    tokens only, and equal a loop over the validation set with the same collator."""
    from datasets import load_from_disk
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from workbench.data.span_corruption import VALIDATION_OFFSET, SpanCorruptionCollator, SpanCorruptionConfig

    t5 = {"preset": "t5-tiny", "overrides": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16}}
    path = write_config(tmp_path, tiny_config(tmp_path, model=t5, training={"max_steps": 4, "save_steps": 4}))
    assert train_main([str(path)]) == 0
    record = [r for r in read_jsonl(tmp_path / "runs/tiny/metrics.jsonl") if "eval_nll" in r][-1]
    run = tmp_path / "runs/tiny"
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert sentinels == list(range(len(tokenizer) - 100, len(tokenizer)))
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "checkpoint-4").eval()
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    collate = SpanCorruptionCollator(SpanCorruptionConfig(), sentinels, tokenizer.eos_token_id, tokenizer.pad_token_id)
    (blocks_dir,) = (tmp_path / "cache" / "blocks").iterdir()
    validation = load_from_disk(str(blocks_dir))["validation"]
    hits = total = 0
    nll = 0.0
    with torch.no_grad():
        for i, row in enumerate(validation):
            batch = collate([{"input_ids": row["input_ids"], "example_index": VALIDATION_OFFSET + i}])
            labels = batch.pop("labels")[0]
            logits = model(**batch).logits[0].double()
            keep = (labels < sentinels[0]) & (labels != tokenizer.eos_token_id)
            hits += int((logits.argmax(-1)[keep] == labels[keep]).sum())
            nll -= float(torch.log_softmax(logits, -1)[keep].gather(1, labels[keep, None]).sum())
            total += int(keep.sum())
    assert record["eval_token_accuracy"] == pytest.approx(hits / total, abs=1e-9)
    assert record["eval_nll"] == pytest.approx(nll / total, abs=1e-5)


def test_metrics_jsonl_skips_a_repeated_evaluation():
    """A final evaluate() at the step of the last in-training evaluation logs the same metrics again."""
    import tempfile
    from types import SimpleNamespace

    from workbench.callbacks import MetricsJsonlCallback

    with tempfile.TemporaryDirectory() as folder:
        callback = MetricsJsonlCallback(Path(folder) / "metrics.jsonl")
        state = SimpleNamespace(is_world_process_zero=True, global_step=8, epoch=1.0)
        log = lambda **logs: callback.on_log(None, state, None, logs=logs)  # noqa: E731
        log(eval_loss=2.5, eval_token_accuracy=0.25, eval_runtime=0.1, eval_samples_per_second=10.0)
        log(eval_loss=2.5, eval_token_accuracy=0.25, eval_runtime=0.2, eval_samples_per_second=5.0)  # repeated
        log(loss=2.4, learning_rate=1e-3)
        log(eval_loss=2.6, eval_token_accuracy=0.25, eval_runtime=0.1)  # different metrics: kept
        state.global_step = 9
        log(eval_loss=2.6, eval_token_accuracy=0.25, eval_runtime=0.1)  # a later step: kept
        records = read_jsonl(Path(folder) / "metrics.jsonl")
    assert [(r["step"], r.get("eval_loss"), r.get("loss")) for r in records] == [
        (8, 2.5, None), (8, None, 2.4), (8, 2.6, None), (9, 2.6, None)]


def test_final_evaluation_is_not_logged_twice_and_integers_stay_integers(tmp_path):
    training = {"eval_strategy": "steps", "eval_steps": 4, "warmup_steps": 2, "max_steps": 8}
    path = write_config(tmp_path, tiny_config(tmp_path, training=training))
    assert train_main([str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r] == [4, 8]
    text = (run / "config.yaml").read_text()
    assert "\n  warmup_steps: 2\n" in text and "\n  eval_steps: 4\n" in text


def test_final_evaluation_reuses_the_evaluation_the_trainer_ran_at_the_last_step():
    from types import SimpleNamespace

    from workbench.run import final_evaluation

    class Trainer:
        def __init__(self, history, step, best_at_end=False):
            self.state = SimpleNamespace(log_history=history, global_step=step)
            self.args = SimpleNamespace(load_best_model_at_end=best_at_end)
            self.evaluated = 0

        def evaluate(self):
            self.evaluated += 1
            return {"eval_loss": 9.0}

    history = [{"loss": 3.0, "step": 8}, {"eval_loss": 2.5, "eval_runtime": 0.1, "epoch": 1.0, "step": 8},
               {"eval_other_loss": 2.7, "step": 8}, {"train_runtime": 5.0, "step": 8}]
    trainer = Trainer(history, 8)
    assert final_evaluation(trainer) == {"eval_loss": 2.5, "eval_runtime": 0.1, "eval_other_loss": 2.7}
    assert trainer.evaluated == 0
    for stale in (Trainer(history, 10), Trainer(history, 8, best_at_end=True), Trainer([], 8)):
        assert final_evaluation(stale) == {"eval_loss": 9.0} and stale.evaluated == 1
