"""Fine-tuning through `launch/train.py`: a base run, then prompt/completion data with LoRA from `runs/<base>`."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import (
    TRAIN,
    deepspeed_command,
    kill_when_step_reached,
    run,
    tiny_config,
    train_main,
    write_config,
)
from safetensors.torch import load_file

from workbench.checkpoints import verify_checkpoint
from workbench.io import read_jsonl
from workbench.methods import METHODS, Method, register

ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny pretrained run (fact world, 8 steps) that fine-tuning runs start from."""
    tmp = tmp_path_factory.mktemp("base")
    config = write_config(tmp, tiny_config(tmp, name="base"), "base.yaml")
    assert train_main([str(config)]) == 0
    return tmp / "runs" / "base"


def _finetune_config(tmp_path: Path, base: Path, name: str = "ft", **sections) -> dict:
    cfg = tiny_config(tmp_path, name=name, **{"data": ARITHMETIC, **sections})
    cfg["model"] = {"preset": None, "name_or_path": str(base), **sections.get("model", {})}
    cfg["training"] = {**cfg["training"], "max_steps": 4, "save_steps": 2, "learning_rate": 1e-2,
                       "lr_scheduler_type": "constant"}
    return cfg


def test_lora_finetune_from_a_run_trains_the_completion_saves_adapters_and_resumes(tmp_path, base_run, capsys):
    cfg = _finetune_config(tmp_path, base_run, model={"lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}})
    config = write_config(tmp_path, cfg)
    assert train_main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "starting from run" in out and "checkpoint-8" in out
    assert "training examples truncated to 128 tokens" in out
    share = re.search(r"M trainable, ([0-9.]+)%\)", out)
    assert share and 0 < float(share.group(1)) < 50  # LoRA: a small share of the weights trains
    run_dir = tmp_path / "runs" / "ft"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(base_run / "checkpoint-8")  # what it started from
    assert saved["model"]["tokenizer"] == str(base_run / "tokenizer")
    for step in (2, 4):
        checkpoint = run_dir / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
        assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    norms = [r["lora_delta_norm"] for r in read_jsonl(run_dir / "metrics.jsonl") if "lora_delta_norm" in r]
    assert len(norms) == len(losses) and 0 < norms[0] < norms[-1]  # the adapters' update grows from zero
    assert len(losses) == 4 and losses[-1] < losses[0]  # the adapters learn the completions
    uninterrupted = load_file(run_dir / "checkpoint-4" / "adapter_model.safetensors")
    shutil.rmtree(run_dir / "checkpoint-4")
    newer = base_run / "checkpoint-9"  # the base trains on meanwhile: the resumed run keeps its own base
    shutil.copytree(base_run / "checkpoint-8", newer)
    try:
        assert train_main([str(config), "--resume"]) == 0
    finally:
        shutil.rmtree(newer)
    assert f"resuming on the base it started from: {base_run / 'checkpoint-8'}" in capsys.readouterr().out
    resumed = load_file(run_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all((uninterrupted[k] == resumed[k]).all() for k in uninterrupted)


def test_full_finetune_loss_covers_only_the_completion(tmp_path, base_run):
    """With no LoRA every weight trains; the final validation loss the run logs equals an independent
    completion-only NLL (prompt tokens not counted, EOS counted, each example cut at data.block_size) over the
    validation examples, and differs from the NLL over every token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.config import load_config
    from workbench.data.finetune import QA_PROMPT, load_finetune_splits

    cfg = _finetune_config(tmp_path, base_run, name="full")
    config = write_config(tmp_path, cfg)
    assert train_main([str(config)]) == 0
    run_dir = tmp_path / "runs" / "full"
    assert (run_dir / "checkpoint-4" / "model.safetensors").is_file()
    logged = [r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    tokenizer = AutoTokenizer.from_pretrained(str(base_run / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoint-4"), dtype=torch.float32).eval()
    completion = everything = 0.0
    n_completion = n_everything = 0
    for example in load_finetune_splits(load_config(config).data, tokenizer)["validation"]:
        assert example["prompt"].startswith(QA_PROMPT.split("{")[0])
        prompt = tokenizer(example["prompt"])["input_ids"]
        full = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
        full = full[:ARITHMETIC["block_size"]]  # truncated at the end, as data.block_size asks
        if len(full) <= len(prompt):
            continue  # no completion token left: TRL drops the example
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        nll = -torch.log_softmax(logits[:-1], -1)[torch.arange(len(full) - 1), torch.tensor(full[1:])]
        completion += nll[len(prompt) - 1:].sum().item()
        n_completion += len(full) - len(prompt)
        everything += nll.sum().item()
        n_everything += len(full) - 1
    assert abs(logged - completion / n_completion) < 2e-3, (logged, completion / n_completion)
    assert abs(logged - everything / n_everything) > 2e-2  # the test can tell the two apart


def test_packing_through_a_run(tmp_path, base_run):
    """`data.packing`: TRL's padding-free packing, checked against the model's attention, trains."""
    cfg = _finetune_config(tmp_path, base_run, name="packed", data={**ARITHMETIC, "packing": True})
    assert train_main([str(write_config(tmp_path, cfg))]) == 0
    assert (tmp_path / "runs" / "packed" / "checkpoint-4" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"source": "rows.jsonl"}}, "field 'data."),
        ({"model": {"lora": {"lora_alfa": 8}}}, "lora_alpha"),
        ({"model": {"name_or_path": "EMPTY_RUN"}}, "has no complete checkpoint"),
        ({"data": {"block_size": 16}}, "field 'data.block_size': all"),
        ({"data": {"noise": {"word_replace_prob": 0.1}}}, "field 'data.noise': applies to pretraining"),
    ],
)
def test_finetuning_bad_input_is_one_line_and_writes_nothing(tmp_path, base_run, capsys, change, message):
    (tmp_path / "rows.jsonl").write_text('{"question": "a", "reply": "b"}\n' * 4)
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text("name: empty\n")
    cfg = _finetune_config(tmp_path, base_run)
    for section, values in change.items():
        values = {k: (str(empty) if v == "EMPTY_RUN" else str(tmp_path / v) if v == "rows.jsonl" else v)
                  for k, v in values.items()}
        cfg[section] = {**cfg[section], **values}
    config = write_config(tmp_path, cfg)
    assert train_main([str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar of the data loading
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs" / "ft").exists()


@pytest.mark.integration
def test_lora_finetune_under_zero3_on_two_ranks(tmp_path, base_run):
    """Adapters under ZeRO-3 with 2 ranks, with the hook probe (every method hook, on TRL's SFTTrainer): trains,
    saves adapter-only checkpoints, and the evaluator's loader rebuilds base + adapter from them."""
    from workbench.models import load_trained_model

    cfg = _finetune_config(tmp_path, base_run, deepspeed="configs/deepspeed/zero3.json",
                           model={"lora": {"r": 4, "lora_dropout": 0.0}},
                           methods={"tests.integration.hook_probe:HookProbe": {"bump": 0.5}})
    config = write_config(tmp_path, cfg)
    result = run(deepspeed_command(TRAIN, str(config), ranks=2, port=29760))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "ft" / "checkpoint-4"
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not ZeRO-3 placeholders
    model = load_trained_model(checkpoint)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == sum(t.numel() for t in adapter.values())
    probes = [json.loads((tmp_path / "runs" / "ft" / "probe" / f"rank{r}-fresh.json").read_text()) for r in (0, 1)]
    for probe in probes:
        assert probe["world_size"] == 2 and probe["zero_stage"] == 3 and probe["model_class"] == "PeftModelForCausalLM"
        assert probe["steps_seen"] == 4 and probe["state_intact"] and all(n > 0 for n in probe["num_items"])
        assert probe["logits_with_graph"]  # TRL's SFTTrainer: the hook sees the training forward pass
        assert probe["embedding_rows"] >= probe["vocab"]  # the pretrained embeddings grew for the added token
        assert abs(probe["target_mean"] - 2.0) < 0.02  # frozen (its pretrained value is ~0), +0.5 a step, kept
    assert probes[0]["param_sha256"] == probes[1]["param_sha256"]


@pytest.mark.integration
def test_lora_finetune_killed_and_resumed_on_two_ranks_is_bit_equal(tmp_path, base_run):
    """kill -9 at step 7 of 12 (ZeRO-2, 2 ranks, SFTTrainer, LoRA with dropout): the resumed adapters equal
    an uninterrupted run's, and metrics.jsonl logs every step once."""
    def config(name: str) -> Path:
        cfg = _finetune_config(tmp_path, base_run, name=name, deepspeed="configs/deepspeed/zero2.json",
                               model={"lora": {"r": 4, "lora_dropout": 0.1}})
        cfg["training"].update(max_steps=12, save_steps=3, logging_steps=1, per_device_train_batch_size=4)
        return write_config(tmp_path, cfg, f"{name}.yaml")

    reference = run(deepspeed_command(TRAIN, str(config("reference")), ranks=2, port=29770))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    run_dir = tmp_path / "runs" / "killed"
    killed = config("killed")
    kill_when_step_reached(deepspeed_command(TRAIN, str(killed), ranks=2, port=29771), run_dir / "metrics.jsonl", 7)
    assert not (run_dir / "checkpoint-12").exists()
    resumed = run(deepspeed_command(TRAIN, str(killed), "--resume", ranks=2, port=29772))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    want = load_file(tmp_path / "runs" / "reference" / "checkpoint-12" / "adapter_model.safetensors")
    got = load_file(run_dir / "checkpoint-12" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    steps_logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps_logged == list(range(1, 13))


@dataclasses.dataclass
class _NanAtConfig:
    step: int = 3


def test_a_nan_loss_stops_a_finetuning_run_and_keeps_the_last_good_checkpoint(tmp_path, base_run, capsys):
    """The NaN stop holds on TRL's SFTTrainer too (here a loss hook makes step 3's loss NaN)."""
    @register("test_nan_at")
    class NanAt(Method):
        Config = _NanAtConfig

        def loss(self, model, inputs, outputs, loss, num_items_in_batch=None):
            step = self.trainer.state.global_step + 1
            return loss * float("nan") if step == self.config.step else loss

        def setup(self, trainer):
            self.trainer = trainer

    try:
        cfg = _finetune_config(tmp_path, base_run, name="nan", methods={"test_nan_at": {"step": 3}})
        assert train_main([str(write_config(tmp_path, cfg))]) == 3
    finally:
        METHODS.pop("test_nan_at")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss is nan at step 3") and "last good checkpoint" in err
    run_dir = tmp_path / "runs" / "nan"
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    verify_checkpoint(run_dir / "checkpoint-2")

