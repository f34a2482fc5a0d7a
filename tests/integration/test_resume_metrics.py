"""kill -9 and `--resume` on 2 DeepSpeed ranks log what an uninterrupted run logs: every metrics.jsonl record
(loss, TRL's `num_tokens`, entropy, accuracy, grad norm, learning rate, evaluation) and the final `train_loss`,
for pretraining (plain `Trainer`) and LoRA fine-tuning (TRL's `SFTTrainer`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    TRAIN,
    deepspeed_command,
    deepspeed_train,
    kill_when_step_reached,
    shared_memory_left,
    tiny_config,
    train_main,
    write_config,
    zero_json,
)

from workbench.io import read_jsonl

TIMINGS = ("_runtime", "_per_second")  # what two identical runs log differently
DROPOUT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "hidden_dropout": 0.1, "attention_dropout": 0.1}
# logged every 2 steps, saved every 3: a checkpoint at an odd step holds a loss not yet logged
STEPS = {"max_steps": 12, "save_steps": 3, "logging_steps": 2, "lr_scheduler_type": "linear"}


def measured(metrics: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in record.items() if not k.endswith(TIMINGS)} for record in read_jsonl(metrics)]


def killed_and_resumed_metrics(tmp_path: Path, config, port: int) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl of an uninterrupted run and of one killed with -9 after step 4 was logged and resumed."""
    deepspeed_train(config("reference"), 2, port)
    killed = config("killed")
    run_dir = tmp_path / "runs" / "killed"
    kill_when_step_reached(deepspeed_command(TRAIN, str(killed), ranks=2, port=port + 1), run_dir / "metrics.jsonl", 4)
    assert not (run_dir / "checkpoint-12").exists()
    assert "resuming from" in deepspeed_train(killed, 2, port + 2, "--resume")
    assert [name for p in range(port, port + 3) for name in shared_memory_left(p)] == []  # the killed run's too
    return measured(tmp_path / "runs" / "reference" / "metrics.jsonl"), measured(run_dir / "metrics.jsonl")


def assert_same_logs(want: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got if "loss" in r] == [2, 4, 6, 8, 10, 12]  # no step lost or logged twice
    assert [r.get("num_tokens") for r in got] == [r.get("num_tokens") for r in want]
    assert [r["train_loss"] for r in got if "train_loss" in r] == [r["train_loss"] for r in want if "train_loss" in r]
    assert got == want


def test_pretraining_killed_and_resumed_logs_what_an_uninterrupted_run_logs(tmp_path):
    def config(name: str) -> Path:
        cfg = tiny_config(tmp_path, name=name, deepspeed=zero_json(tmp_path, 2), model={"overrides": DROPOUT},
                          data={"max_documents": 8}, training=STEPS)
        return write_config(tmp_path, cfg, f"{name}.yaml")

    want, got = killed_and_resumed_metrics(tmp_path, config, 29850)
    assert_same_logs(want, got)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny pretrained run (fact world, 8 steps) that the fine-tuning runs start from."""
    tmp = tmp_path_factory.mktemp("base")
    assert train_main([str(write_config(tmp, tiny_config(tmp, name="base"), "base.yaml"))]) == 0
    return tmp / "runs" / "base"


def test_lora_finetuning_killed_and_resumed_logs_what_an_uninterrupted_run_logs(tmp_path, base_run):
    """TRL keeps `num_tokens` (tokens trained on so far) in a trainer attribute: the resumed run goes on counting
    from the checkpoint's count, not from 0."""
    def config(name: str) -> Path:
        cfg = tiny_config(tmp_path, name=name, deepspeed=zero_json(tmp_path, 2),
                          data={"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2},
                                "block_size": 128},
                          training={**STEPS, "per_device_train_batch_size": 4, "learning_rate": 1e-2})
        cfg["model"] = {"preset": None, "name_or_path": str(base_run), "lora": {"r": 4, "lora_dropout": 0.1}}
        return write_config(tmp_path, cfg, f"{name}.yaml")

    want, got = killed_and_resumed_metrics(tmp_path, config, 29860)
    assert all(r["num_tokens"] > 0 for r in want if "loss" in r)
    assert_same_logs(want, got)
