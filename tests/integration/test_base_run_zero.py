"""Runs of this workbench as the base of others under DeepSpeed on 2 CPU ranks, and ZeRO-3 checkpoints saved as
DeepSpeed's shards only (`stage3_gather_16bit_weights_on_model_save: false`).

A tiny pretraining run saved sharded under ZeRO-3 is consolidated on load (same logits as the identical run
saved gathered) and resumed from. A LoRA run on it (ZeRO-3) then is the base of full fine-tuning and of LoRA
fine-tuning under ZeRO-3 and of full fine-tuning under ZeRO-2: its adapter is merged into the partitioned base
layer by layer, and full fine-tuning trains every parameter. All three runs start from the same merged weights,
so their first-step losses agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_train, tiny_config, write_config, zero_json

from workbench.checkpoints import is_zero_sharded_checkpoint, verify_checkpoint
from workbench.io import read_jsonl
from workbench.models import load_trained_model

ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}  # B != 0: the merge matters
STEPS = 3
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def _zero3(tmp: Path, gather: bool) -> str:
    path = Path(zero_json(tmp, 3))
    settings = json.loads(path.read_text())
    settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = gather
    path.write_text(json.dumps(settings))
    return str(path)


def _pretraining(tmp: Path, name: str, gather: bool) -> Path:
    cfg = tiny_config(tmp, name=name, deepspeed=_zero3(tmp, gather),
                      training={"max_steps": STEPS, "save_steps": STEPS, "per_device_train_batch_size": 4})
    return write_config(tmp, cfg, f"{name}.yaml")


def _finetuning(tmp: Path, name: str, base: Path, deepspeed: str, lora: dict | None = None) -> Path:
    cfg = tiny_config(tmp, name=name, data=ARITHMETIC, deepspeed=deepspeed)
    cfg["model"] = {"preset": None, "name_or_path": str(base), **({"lora": lora} if lora else {})}
    cfg["training"].update(max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=2)
    return write_config(tmp, cfg, f"{name}.yaml")


def _logits(checkpoint: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_trained_model(checkpoint, dtype=torch.float32)(IDS).logits


def _first_loss(run_dir: Path) -> float:
    return next(r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A tiny pretraining run, 3 steps under ZeRO-3 on 2 ranks, saved as DeepSpeed shards only."""
    tmp = tmp_path_factory.mktemp("sharded")
    deepspeed_train(_pretraining(tmp, "sharded", gather=False), 2, 29951)
    return tmp / "runs" / "sharded"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sharded_run) -> Path:
    """A LoRA run on the sharded run (its base is consolidated on rank 0), 3 steps under ZeRO-3 on 2 ranks, saved
    without gathering too (the Trainer still gathers the adapters alone into adapter_model.safetensors)."""
    tmp = tmp_path_factory.mktemp("lora")
    deepspeed_train(_finetuning(tmp, "lora", sharded_run, _zero3(tmp, gather=False), LORA), 2, 29952)
    return tmp / "runs" / "lora"


def test_a_sharded_zero3_checkpoint_loads_consolidated_and_resumes(tmp_path, sharded_run):
    checkpoint = sharded_run / f"checkpoint-{STEPS}"
    assert not (checkpoint / "model.safetensors").exists() and is_zero_sharded_checkpoint(checkpoint)
    verify_checkpoint(checkpoint)  # complete: the manifest lists the shards
    deepspeed_train(_pretraining(tmp_path, "gathered", gather=True), 2, 29953)
    gathered = tmp_path / "runs" / "gathered" / f"checkpoint-{STEPS}"
    assert (gathered / "model.safetensors").is_file()
    torch.testing.assert_close(_logits(checkpoint), _logits(gathered), atol=1e-5, rtol=1e-5)

    config = sharded_run.parent.parent / "sharded.yaml"
    out = deepspeed_train(config, 2, 29954, "--resume", "--set", f"training.max_steps={2 * STEPS}")
    assert f"resuming from {checkpoint}" in out
    state = json.loads((sharded_run / f"checkpoint-{2 * STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * STEPS


@pytest.fixture(scope="module")
def full_zero2(tmp_path_factory, lora_run) -> tuple[Path, str]:
    """Full fine-tuning from the LoRA run under ZeRO-2 (the merge runs on whole layers): its run folder and output."""
    tmp = tmp_path_factory.mktemp("zero2")
    out = deepspeed_train(_finetuning(tmp, "full-zero2", lora_run, zero_json(tmp, 2)), 2, 29955)
    return tmp / "runs" / "full-zero2", out


def _trainable_percent(out: str) -> float:
    """The share of the parameters that train, in percent, as the run reports it."""
    return float(re.search(r"M parameters \([\d.]+M trainable, ([\d.]+)%\)", out).group(1))


def test_full_finetuning_from_a_lora_run_under_zero2_trains_every_parameter(full_zero2):
    assert _trainable_percent(full_zero2[1]) == 100.0  # not PEFT's frozen flags


@pytest.mark.parametrize("lora", [None, {"r": 2}], ids=["full", "lora"])
def test_a_lora_run_is_the_base_of_the_next_run_under_zero3(tmp_path, lora_run, full_zero2, lora):
    out = deepspeed_train(_finetuning(tmp_path, "next", lora_run, zero_json(tmp_path, 3), lora), 2, 29956)
    percent = _trainable_percent(out)
    assert percent == 100.0 if lora is None else 0 < percent < 50
    # the same merged weights as under ZeRO-2, where the merge ran on whole layers (merged == base + adapter is
    # tests/test_base_run_loading.py's); a new LoRA adapter starts at B = 0, so at the same loss too
    assert _first_loss(tmp_path / "runs" / "next") == pytest.approx(_first_loss(full_zero2[0]), rel=1e-5)
    checkpoint = tmp_path / "runs" / "next" / f"checkpoint-{STEPS}"
    if lora is not None:  # the new adapter's base is the merged LoRA run, and it loads merged on it
        assert _adapter_base(checkpoint) == str(lora_run / f"checkpoint-{STEPS}")
    _logits(checkpoint)


def _adapter_base(checkpoint: Path) -> str:
    return json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_the_lora_run_saves_its_adapter_and_names_its_consolidated_base(sharded_run, lora_run):
    checkpoint = lora_run / f"checkpoint-{STEPS}"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not is_zero_sharded_checkpoint(checkpoint)
    base = Path(_adapter_base(checkpoint))  # the sharded run's newest checkpoint when the LoRA run started
    assert base.parent == sharded_run and is_zero_sharded_checkpoint(base)
