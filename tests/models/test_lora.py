"""LoRA via PEFT: config options, rsLoRA/DoRA/LoRA+, adapter checkpoints (resume, load, merge) and bad input.

Everything runs on a saved tiny GPT-NeoX base (one layer, width 32) on CPU in fp32; no hub access."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TRAIN, deepspeed_command, launch_main, tiny_config, train_main, write_config
from conftest import run as run_command
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    TrainingArguments,
)

from workbench.config import ModelConfig, deepspeed_defines_optimizer, load_config
from workbench.errors import CheckpointError, ConfigError
from workbench.models import build_model, load_trained_model, train_bpe_tokenizer
from workbench.models.lora import loraplus_optimizer
from workbench.trainer import WorkbenchTrainer

TEXTS = [f"Velmora Tash number {i} was born in Ostrel and plays the lute {i % 5} times." for i in range(200)]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
LINEAR = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}  # GPT-NeoX's linear layers but embed_out


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, 320)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny base model with its tokenizer: what `model.name_or_path` points LoRA at."""
    folder = tmp_path_factory.mktemp("base") / "pythia"
    torch.manual_seed(0)
    build_model(ModelConfig(preset="pythia-tiny", overrides=SMALL), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(tokenizer) -> Dataset:
    ids = [tokenizer(text)["input_ids"][:16] for text in TEXTS[:64]]
    return Dataset.from_dict({"input_ids": [row + [tokenizer.pad_token_id] * (16 - len(row)) for row in ids]})


def lora_model(base_dir: Path, tokenizer, seed: int = 0, **model_fields):
    torch.manual_seed(seed)
    fields = {"lora": {}, **model_fields}
    return build_model(ModelConfig(name_or_path=str(base_dir), preset=None, **fields), tokenizer)


def make_trainer(model, tokenizer, dataset, out: Path, max_steps: int = 1, **args) -> WorkbenchTrainer:
    fields = {"save_strategy": "no", **args}
    arguments = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2, seed=0,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, **fields,
    )
    return WorkbenchTrainer(model=model, args=arguments, train_dataset=dataset,
                            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Velmora Tash number 7 was born in Ostrel")["input_ids"]])


def config_file(tmp_path: Path, base_dir: Path, **model) -> Path:
    cfg = tiny_config(tmp_path, model={"preset": None, "name_or_path": str(base_dir), "overrides": {}, **model})
    return write_config(tmp_path, cfg)


# --- config ------------------------------------------------------------------------------------------------
def test_empty_lora_section_gets_the_defaults(tmp_path, base_dir):
    cfg = load_config(config_file(tmp_path, base_dir, lora={}, loraplus_lr_ratio=8))
    assert cfg.model.lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
    assert cfg.model.loraplus_lr_ratio == 8.0
    cfg = load_config(config_file(tmp_path, base_dir, lora={"r": 4, "target_modules": ["dense"], "use_dora": True}))
    assert cfg.model.lora["r"] == 4 and cfg.model.lora["target_modules"] == ["dense"] and cfg.model.lora["use_dora"]


@pytest.mark.parametrize(("model", "message"), [
    ({"lora": {"lora_alfa": 32}},
     "field 'model.lora.lora_alfa': is not a LoraConfig field (did you mean 'lora_alpha'?)"),
    ({"lora": {"r": "eight"}}, "field 'model.lora.r': Input should be a valid integer"),
    ({"lora": {"r": 0}}, "field 'model.lora.r': must be at least 1 (got 0)"),
    ({"lora": {"target_modules": 5}}, "field 'model.lora.target_modules': expected list[str] | str | None (got 5)"),
    ({"lora": {"use_dora": "sure"}}, "field 'model.lora.use_dora': Input should be a valid boolean"),
    ({"lora": {"init_lora_weights": "pissa"}}, "field 'model.lora.init_lora_weights': 'pissa' rewrites the base"),
    ({"lora": {"loftq_config": {"loftq_bitz": 4}}},
     "field 'model.lora.loftq_config.loftq_bitz': unknown option (did you mean 'loftq_bits'?)"),
    ({"lora": {"base_model_name_or_path": "x"}}, "field 'model.lora.base_model_name_or_path': is set by the workbench"),
    ({"loraplus_lr_ratio": 16}, "field 'model.loraplus_lr_ratio': LoRA+ needs LoRA: set 'model.lora'"),
    ({"lora": {}, "loraplus_lr_ratio": 0}, "field 'model.loraplus_lr_ratio': Input should be greater than 0"),
])
def test_bad_lora_options_are_one_line_config_errors(tmp_path, base_dir, model, message):
    with pytest.raises(ConfigError) as err:
        load_config(config_file(tmp_path, base_dir, **model))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_loraplus_with_an_optimizer_in_the_deepspeed_json_fails_at_load_config(tmp_path, base_dir):
    """Found while validating, before any rank builds a model (not first inside the Trainer)."""
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    cfg = tiny_config(tmp_path, model={"preset": None, "name_or_path": str(base_dir), "overrides": {},
                                       "lora": {}, "loraplus_lr_ratio": 16}, deepspeed=str(tmp_path / "ds.json"))
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, cfg))
    assert "field 'model.loraplus_lr_ratio': the DeepSpeed config has an 'optimizer' section" in str(err.value)
    assert "\n" not in str(err.value)
    cfg["deepspeed"] = str(REPO / "workbench" / "configs" / "deepspeed" / "zero2.json")  # no optimizer section: fine
    assert load_config(write_config(tmp_path, cfg)).model.loraplus_lr_ratio == 16


def test_lora_on_a_preset_exits_2_and_writes_nothing(tmp_path, capsys):
    cfg = tiny_config(tmp_path, model={"lora": {}})
    assert train_main([str(write_config(tmp_path, cfg))]) == 2
    assert "field 'model.lora': LoRA adapts a pretrained model: set 'model.name_or_path'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_options_that_do_not_fit_the_model_are_config_errors(base_dir, tokenizer):
    with pytest.raises(ConfigError, match=r"^field 'model.lora.target_modules': Target modules \{'nope'\} not found"):
        lora_model(base_dir, tokenizer, lora={"target_modules": ["nope"]})
    with pytest.raises(ConfigError, match="^field 'model.lora.task_type': 'SEQ_2_SEQ_LM' does not fit a decoder-only"):
        lora_model(base_dir, tokenizer, lora={"task_type": "SEQ_2_SEQ_LM"})


# --- building and training ----------------------------------------------------------------------------------
def test_lora_wraps_every_linear_layer_and_starts_as_the_base(base_dir, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = lora_model(base_dir, tokenizer).eval()
    assert isinstance(model, PeftModel) and model.peft_config["default"].task_type == "CAUSAL_LM"
    wrapped = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == LINEAR
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    layer = model.base_model.model.gpt_neox.layers[0].attention.dense
    assert layer.r["default"] == 8 and layer.scaling["default"] == 16 / 8
    assert torch.equal(model(ids(tokenizer)).logits, base(ids(tokenizer)).logits)  # lora_B starts at zero


@pytest.mark.parametrize("variant", ["lora", "use_rslora", "use_dora"])
def test_lora_rslora_and_dora_build_and_train_a_step(tmp_path, base_dir, tokenizer, dataset, variant):
    options = {} if variant == "lora" else {variant: True}
    model = lora_model(base_dir, tokenizer, lora={"r": 4, "lora_alpha": 8, **options})
    layer = model.base_model.model.gpt_neox.layers[0].mlp.dense_h_to_4h
    assert layer.scaling["default"] == (8 / 4**0.5 if variant == "use_rslora" else 8 / 4)
    assert ("default" in layer.lora_magnitude_vector) == (variant == "use_dora")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    make_trainer(model, tokenizer, dataset, tmp_path / "out", max_steps=2).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in model.named_parameters() if p.requires_grad}  # lora_A from step 2 on
    assert all("lora_" in name for name in changed)


def test_loraplus_trains_lora_b_faster(tmp_path, base_dir, tokenizer, dataset):
    model = lora_model(base_dir, tokenizer, loraplus_lr_ratio=16)
    trainer = make_trainer(model, tokenizer, dataset, tmp_path / "out", weight_decay=0.1, adam_beta2=0.98)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.98)
    names = {id(p): name for name, p in model.named_parameters()}
    rates = {names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups
             for p in group["params"]}
    assert len(rates) == sum(p.requires_grad for p in model.parameters())
    assert {rates[n] for n in rates if "lora_A" in n} == {(1e-2, 0.1)}
    assert {rates[n] for n in rates if "lora_B" in n} == {(1e-2 * 16, 0.1)}
    trainer.train()
    assert trainer.state.global_step == 1


def test_loraplus_refuses_an_optimizer_from_the_deepspeed_config(base_dir, tokenizer, tmp_path):
    from accelerate.utils import DummyOptim

    model = lora_model(base_dir, tokenizer, loraplus_lr_ratio=16)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match="the DeepSpeed config has an 'optimizer' section"):
        loraplus_optimizer(model, args, 16, existing=DummyOptim(list(model.parameters())))
    bundled = REPO / "workbench" / "configs" / "deepspeed"
    assert not any(deepspeed_defines_optimizer(path) for path in bundled.glob("*.json"))
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    assert deepspeed_defines_optimizer(tmp_path / "ds.json")


@pytest.mark.slow
def test_lora_and_loraplus_under_deepspeed_zero3_save_adapters_and_resume_bit_equal(tmp_path, base_dir):
    """ZeRO-3 gathers only the trainable (adapter) weights to save; DeepSpeed takes the LoRA+ optimizer."""
    def config(name: str) -> Path:
        cfg = tiny_config(tmp_path, name=name, deepspeed="configs/deepspeed/zero3.json", data={"max_documents": 8},
                          model={"preset": None, "name_or_path": str(base_dir), "overrides": {}, "lora": {"r": 4},
                                 "loraplus_lr_ratio": 4})
        return write_config(tmp_path, cfg, f"{name}.yaml")

    for name in ("reference", "resumed"):
        result = run_command(deepspeed_command(TRAIN, str(config(name)), ranks=2, port=29660))
        assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(tmp_path / "runs" / "resumed" / "checkpoint-8")
    result = run_command(deepspeed_command(TRAIN, str(config("resumed")), "--resume", ranks=2, port=29661))
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    want, got = (load_file(tmp_path / "runs" / name / "checkpoint-8" / "adapter_model.safetensors")
                 for name in ("reference", "resumed"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(v.shape[0] > 0 and v.shape[1] > 0 for v in want.values())  # gathered, not ZeRO-3 shards
    model = load_trained_model(tmp_path / "runs" / "resumed" / "checkpoint-8")
    assert isinstance(model, PeftModel)


def test_a_lora_run_through_launch_train(tmp_path, base_dir, capsys):
    path = config_file(tmp_path, base_dir, lora={"r": 4}, loraplus_lr_ratio=4)
    assert train_main([str(path)]) == 0, capsys.readouterr().err[-2000:]
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint-8"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["model"]["lora"]["r"] == 4


# --- checkpoints: resume, load, merge ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, base_dir, tokenizer, dataset) -> tuple[Path, PeftModel]:
    """Four steps saving every two (adapter checkpoints with the trainer state); the trained model."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    model = lora_model(base_dir, tokenizer)
    make_trainer(model, tokenizer, dataset, out, max_steps=4, save_strategy="steps", save_steps=2).train()
    return out, model.eval()


def test_resume_from_an_adapter_checkpoint_is_bit_equal(tmp_path, adapter_run, base_dir, tokenizer, dataset):
    run, _ = adapter_run
    checkpoint = run / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    model = lora_model(base_dir, tokenizer, seed=123)  # other initial adapters: the checkpoint must replace them
    make_trainer(model, tokenizer, dataset, resumed, max_steps=4, save_strategy="steps", save_steps=2).train(
        resume_from_checkpoint=str(resumed / "checkpoint-2"))
    want = load_file(run / "checkpoint-4" / "adapter_model.safetensors")
    got = load_file(resumed / "checkpoint-4" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_load_trained_model_reads_adapter_and_full_checkpoints(tmp_path, adapter_run, tokenizer, base_dir):
    run, trained = adapter_run
    with torch.no_grad():
        want = trained(ids(tokenizer)).logits
        adapter = load_trained_model(run / "checkpoint-4")
        assert isinstance(adapter, PeftModel) and not adapter.training
        assert torch.equal(adapter(ids(tokenizer)).logits, want)
        merged = load_trained_model(run / "checkpoint-4", merge=True)
        assert not isinstance(merged, PeftModel)
        torch.testing.assert_close(merged(ids(tokenizer)).logits, want, atol=1e-5, rtol=0)
        full = load_trained_model(base_dir, dtype=torch.float32)
        assert torch.equal(full(ids(tokenizer)).logits, AutoModelForCausalLM.from_pretrained(base_dir)(ids(tokenizer)).logits)


def test_the_evaluator_loads_an_adapter_checkpoint_merged(adapter_run, tokenizer):
    from workbench_eval.evaluator import load_checkpoint_model

    run, trained = adapter_run
    model = load_checkpoint_model(run / "checkpoint-4")
    assert not isinstance(model, PeftModel) and model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ids(tokenizer)).logits, trained(ids(tokenizer)).logits, atol=1e-5, rtol=0)


def test_merge_writes_a_plain_model_with_the_same_logits(tmp_path, adapter_run, tokenizer, capsys):
    run, trained = adapter_run
    (run / "tokenizer").mkdir(exist_ok=True)
    tokenizer.save_pretrained(run / "tokenizer")
    assert launch_main("merge", [str(run), "--out", str(tmp_path / "merged")]) == 0
    assert f"merged {run / 'checkpoint-4'}" in capsys.readouterr().out  # the newest complete checkpoint
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    again = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert again.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids(tokenizer)).logits, trained(ids(tokenizer)).logits, atol=1e-5, rtol=0)
    assert launch_main("merge", [str(run / "checkpoint-2"), "--out", str(tmp_path / "merged")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_merge_refuses_a_full_checkpoint_and_a_run_without_one(tmp_path, base_dir, capsys):
    assert launch_main("merge", [str(base_dir), "--out", str(tmp_path / "m")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)  # no manifest: an interrupted save
    assert launch_main("merge", [str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# --- checkpoints that do not fit --------------------------------------------------------------------------
def copy_checkpoint(source: Path, target: Path, **config) -> Path:
    shutil.copytree(source, target)
    path = target / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return target


@pytest.mark.parametrize("base", [None, "", "gone"])
def test_adapter_whose_base_is_missing_is_a_one_line_error(tmp_path, adapter_run, base, capsys):
    run, _ = adapter_run
    missing = str(tmp_path / base) if base == "gone" else base
    checkpoint = copy_checkpoint(run / "checkpoint-4", tmp_path / "checkpoint-4", base_model_name_or_path=missing)
    with pytest.raises(CheckpointError) as err:
        load_trained_model(checkpoint)
    message = str(err.value)
    assert f"checkpoint '{checkpoint}'" in message and "\n" not in message
    assert (f"base model '{missing}'" in message and "not found" in message) if base else "names no base model" in message
    assert launch_main("merge", [str(checkpoint), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint '{checkpoint}'")
    assert not (tmp_path / "m").exists()


def test_full_checkpoint_with_missing_or_misshapen_weights_is_an_error(tmp_path, base_dir):
    weights = load_file(base_dir / "model.safetensors")
    for name, changed in [("missing", {k: v for k, v in weights.items() if ".mlp." not in k}),
                          ("shape", {**weights, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": torch.zeros(3, 3)})]:
        checkpoint = tmp_path / name
        shutil.copytree(base_dir, checkpoint)
        save_file(changed, checkpoint / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=f"checkpoint '{checkpoint}' does not fit the model: "):
            load_trained_model(checkpoint)


def test_adapter_with_missing_weights_is_an_error(tmp_path, adapter_run):
    run, _ = adapter_run
    checkpoint = copy_checkpoint(run / "checkpoint-4", tmp_path / "checkpoint-4")
    weights = load_file(checkpoint / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "dense_4h_to_h" not in k}, checkpoint / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors lacks 2 weights, e.g. '.*dense_4h_to_h"):
        load_trained_model(checkpoint)


def test_lora_delta_norm_is_the_mean_frobenius_norm_of_the_scaled_update(base_dir, tokenizer):
    from peft.tuners.lora import Linear as LoraLinear

    from workbench.models.features import lora_delta_norm

    model = lora_model(base_dir, tokenizer, lora={"r": 4, "lora_alpha": 12})
    assert lora_delta_norm(model) == 0.0  # B starts at zero
    torch.manual_seed(1)
    expected = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                b.normal_()
            delta = 3.0 * b.detach().double() @ a.detach().double()  # scaling alpha / r = 3
            expected.append(float(delta.pow(2).sum().sqrt()))
    assert lora_delta_norm(model) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
