"""Loading a model to train or evaluate: a LoRA checkpoint merged into its base (in fp32, every parameter trainable
again), the dtype weights load in for training, and checkpoints that hold only DeepSpeed ZeRO shards.

Everything runs on CPU on a saved tiny GPT-NeoX base (one layer, width 32); the ZeRO-3 paths of the same code are
tested on two ranks in tests/integration/test_base_run_zero.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

from workbench.checkpoints import is_zero_sharded_checkpoint
from workbench.config import ModelConfig
from workbench.errors import CheckpointError
from workbench.models import (
    build_model,
    is_encoder_decoder,
    load_trained_model,
    train_bpe_tokenizer,
    training_weights_dtype,
    training_weights_dtype_of,
)
from workbench.models.lora import lora_config

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TEXTS = [f"Velmora Tash number {i} was born in Ostrel and plays the lute {i % 5} times." for i in range(100)]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, 320)


def _save_base(folder: Path, tokenizer, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    build_model(ModelConfig(preset="pythia-tiny", overrides=SMALL), tokenizer).to(dtype).save_pretrained(folder)
    return folder


def _save_adapter(folder: Path, base: Path, **options) -> Path:
    """A random (B != 0) LoRA adapter on `base`, saved as a checkpoint that names `base`."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = lora_config({"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "init_lora_weights": False, **options})
    config.base_model_name_or_path = str(base)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp32_adapter(tmp_path_factory, tokenizer) -> Path:
    tmp = tmp_path_factory.mktemp("fp32")
    return _save_adapter(tmp / "adapter", _save_base(tmp / "base", tokenizer, torch.float32))


def _unmerged_logits(adapter: Path) -> torch.Tensor:
    """Logits of the base with the adapter applied on the side (x W^T + scaling x A^T B^T), in fp32."""
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"], dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter)).eval()(IDS).logits


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_a_merged_adapter_gives_the_logits_of_base_plus_adapter(tmp_path, fp32_adapter, variant):
    adapter = fp32_adapter if not variant else _save_adapter(tmp_path / "dora", Path(
        json.loads((fp32_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]), **variant)
    merged = load_trained_model(adapter, merge=True)
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, _unmerged_logits(adapter), atol=1e-5, rtol=0)


def test_a_bf16_base_is_merged_in_fp32_and_rounded_once(tmp_path, tokenizer):
    """W' = bf16(fp32(W) + scaling B A): the merged weight keeps the base's dtype and is rounded once."""
    base = _save_base(tmp_path / "base", tokenizer, torch.bfloat16)
    adapter = _save_adapter(tmp_path / "adapter", base)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    layer = unmerged.base_model.model.gpt_neox.layers[0].mlp.dense_h_to_4h
    want = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    merged = load_trained_model(adapter, merge=True)
    got = merged.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_a_lora_run_as_base_trains_every_parameter_of_the_merged_model(fp32_adapter, tokenizer):
    model = build_model(ModelConfig(preset=None, name_or_path=str(fp32_adapter)), tokenizer)
    assert not isinstance(model, PeftModel) and model.training
    assert all(param.requires_grad for param in model.parameters())  # PEFT had frozen the base
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, _unmerged_logits(fp32_adapter), atol=1e-5, rtol=0)


def test_a_new_adapter_on_a_merged_lora_run_names_it_as_base_and_loads_merged_on_it(tmp_path, fp32_adapter,
                                                                                      tokenizer):
    """LoRA on a LoRA run: only the new adapters train, the new adapter records the LoRA checkpoint (not the
    base under it) as its base, and loading it merges both adapters in turn."""
    torch.manual_seed(2)
    model = build_model(ModelConfig(preset=None, name_or_path=str(fp32_adapter),
                                    lora={"r": 2, "init_lora_weights": False}), tokenizer)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    model.save_pretrained(tmp_path / "second")
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        fp32_adapter)
    with torch.no_grad():
        want = model.eval()(IDS).logits
        torch.testing.assert_close(load_trained_model(tmp_path / "second", merge=True)(IDS).logits, want,
                                   atol=1e-5, rtol=0)
    assert is_encoder_decoder(ModelConfig(preset=None, name_or_path=str(tmp_path / "second"))) is False


def test_an_adapter_checkpoint_is_classified_by_its_base_model(fp32_adapter):
    assert not (fp32_adapter / "config.json").exists()  # what the Trainer writes for a LoRA run
    assert is_encoder_decoder(ModelConfig(preset=None, name_or_path=str(fp32_adapter))) is False


def test_weights_load_in_bf16_under_deepspeed_bf16_and_in_fp32_otherwise(fp32_adapter, tokenizer):
    config = ModelConfig(preset=None, name_or_path=json.loads(
        (fp32_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert {p.dtype for p in build_model(config, tokenizer, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    merged = build_model(ModelConfig(preset=None, name_or_path=str(fp32_adapter)), tokenizer, dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("deepspeed", "want"), [
    (None, torch.float32),                                                  # plain torch: fp32 (autocast or not)
    ({"bf16": {"enabled": True}, "fp16": {"enabled": False}}, torch.bfloat16),  # the engine keeps fp32 masters
    ({"bfloat16": {"enabled": True}}, torch.bfloat16),                     # DeepSpeed's older key
    ({"bf16": {"enabled": False}, "fp16": {"enabled": True}}, torch.float16),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, torch.float32),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, torch.float32),  # DeepSpeed's autocast: fp32 weights
    ({"bf16": {"enabled": "auto"}}, torch.float32),                         # unresolved: never assumed
])
def test_training_weights_dtype_follows_who_keeps_the_fp32_masters(deepspeed, want):
    assert training_weights_dtype(deepspeed) == want


@pytest.mark.parametrize(("precision", "deepspeed", "want"), [
    ("bf16", True, torch.bfloat16), ("fp32", True, torch.float32), ("bf16", False, torch.float32),
])
def test_training_weights_dtype_of_the_run_arguments(tmp_path, precision, deepspeed, want):
    config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=precision == "bf16", report_to=[],
                             deepspeed=config if deepspeed else None)
    assert training_weights_dtype_of(args) == want


def test_a_zero_sharded_checkpoint_that_cannot_be_consolidated_is_a_checkpoint_error(tmp_path, fp32_adapter):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    base = Path(json.loads((fp32_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    (checkpoint / "config.json").write_text((base / "config.json").read_text())
    (checkpoint / "latest").write_text("global_step3")  # the shards' folder is missing
    assert is_zero_sharded_checkpoint(checkpoint) and not is_zero_sharded_checkpoint(base)
    with pytest.raises(CheckpointError, match="only DeepSpeed ZeRO shards, which could not be consolidated"):
        load_trained_model(checkpoint)
