"""The family matrix, integration tier (tests/families.py): per family one `deepspeed` launch on 1 rank (ZeRO-2)
of LoRA fine-tuning on every linear layer (classification for BERT), then the evaluator's loader on its final
checkpoint and `workbench merge`, both giving the logits of the base model with the adapter. And the method
cells: each method on each family it applies to, resumed from checkpoint-2 of 4 and bit-equal to an
uninterrupted run (enabled with `workbench.models.structure`, through which the methods find their sites)."""

from __future__ import annotations

import pytest
import torch
from conftest import deepspeed_train, family_config, launch_main, write_config
from families import (
    CAUSAL_LM,
    CLASSIFICATION_DATA,
    FAMILIES,
    FAMILY,
    FINETUNING_DATA,
    METHODS,
    PRETRAINING_DATA,
    Family,
)
from pydantic import ValidationError
from safetensors.torch import load_file
from test_resume_logging import _CrashAt, measured

from workbench.config import ExperimentConfig
from workbench.errors import ConfigError
from workbench.run import train

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
ZERO2 = "configs/deepspeed/zero2.json"
FIRST_PORT = 29880


def _probe_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Omar has 89 cookies. He loses 26 cookies.")["input_ids"]])


@pytest.mark.parametrize("name", [family.name for family in FAMILIES])
def test_family_launch_evaluator_and_merge(name, family_folder, tmp_path):
    family = FAMILY[name]
    folder = family_folder(name)
    port = FIRST_PORT + [f.name for f in FAMILIES].index(name)
    if family.run_kind != CAUSAL_LM:
        cfg = family_config(tmp_path, folder, "classify", CLASSIFICATION_DATA, deepspeed=ZERO2)
        deepspeed_train(write_config(tmp_path, cfg), 1, port)
        assert (tmp_path / "runs" / "classify" / "checkpoint-2" / "model.safetensors").is_file()
        return
    cfg = family_config(tmp_path, folder, "lora", FINETUNING_DATA, lora=LORA, deepspeed=ZERO2,
                        training={"learning_rate": 1e-2})
    deepspeed_train(write_config(tmp_path, cfg), 1, port)
    checkpoint = tmp_path / "runs" / "lora" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    base_logits, adapted_logits = _base_and_adapted_logits(folder, checkpoint)
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-4)  # the adapter changed the model
    _check_evaluator_loads(checkpoint, adapted_logits, folder)
    _check_merge(checkpoint, tmp_path / "merged", adapted_logits, folder)


def _base_and_adapted_logits(folder, checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the base model alone and with the trained adapter unmerged (PEFT, fp32), on one probe text."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = _probe_ids(AutoTokenizer.from_pretrained(str(folder)))
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(checkpoint)).eval()
        return base_logits, adapted(ids).logits


def _check_evaluator_loads(checkpoint, adapted_logits: torch.Tensor, folder) -> None:
    """`workbench_eval.evaluator.load_checkpoint_model`, which `workbench eval` loads each checkpoint with."""
    from transformers import AutoTokenizer

    from workbench_eval.evaluator import load_checkpoint_model

    model = load_checkpoint_model(checkpoint, dtype="float32")
    with torch.no_grad():
        logits = model(_probe_ids(AutoTokenizer.from_pretrained(str(folder)))).logits
    torch.testing.assert_close(logits, adapted_logits, atol=1e-5, rtol=1e-5)


def _check_merge(checkpoint, out, adapted_logits: torch.Tensor, folder) -> None:
    """`workbench merge <checkpoint> --out <folder>`: a plain model folder whose logits are base + adapter's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert launch_main("merge", [str(checkpoint), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(_probe_ids(AutoTokenizer.from_pretrained(str(out)))).logits
    assert _probe_ids(AutoTokenizer.from_pretrained(str(out))).tolist() == \
        _probe_ids(AutoTokenizer.from_pretrained(str(folder))).tolist()  # the family's tokenizer travels along
    torch.testing.assert_close(logits, adapted_logits, atol=1e-5, rtol=1e-5)


# --- the method cells -------------------------------------------------------------------------------------------


def method_options(method: str, folder) -> dict:
    """Tiny options of each method for a 4-step run (SinKD's teacher: the family's own model)."""
    return {"drop_path": {"rate": 0.2}, "dropout_schedule": {"rate": 0.1, "start_step": 2},
            "send": {"track_every": 1, "window": 2, "tracking_batch_size": 4},
            "masked_thought": {"p_max": 0.4}, "allora": {}, "sinkd": {"teacher": str(folder), "beta": 0.01},
            "smoe_dropout": {"experts": 2, "k_min": 1}}[method]


def method_run_config(family: Family, method: str, folder, tmp_path, name: str) -> ExperimentConfig:
    """The method's run on `family`: 4 steps saved every 2, on the data its run kind trains on (fine-tuning for
    the methods of completions and of LoRA, with LoRA for ALLoRA)."""
    methods = {method: method_options(method, folder)}
    if family.run_kind != CAUSAL_LM:
        data, lora = CLASSIFICATION_DATA, None
    elif method in ("masked_thought", "allora", "sinkd"):
        data, lora = FINETUNING_DATA, (LORA if method == "allora" else None)
    else:
        data, lora = PRETRAINING_DATA, None
    cfg = family_config(tmp_path, folder, name, data, lora=lora, methods=methods,
                        training={"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant"})
    return ExperimentConfig(**cfg)


def _untimed(metrics) -> list[dict]:
    """metrics.jsonl without what two identical runs log differently: the Trainer's timings and the methods'
    own (`..._seconds`, e.g. SeND's tracking time)."""
    return [{k: v for k, v in record.items() if not k.endswith("_seconds")} for record in measured(metrics)]


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    adapter = checkpoint / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else checkpoint / "model.safetensors")


CELLS = [(family.name, method) for family in FAMILIES for method in METHODS if family.applies(method)]


@pytest.mark.parametrize(("name", "method"), CELLS)
def test_method_resumes_bit_equal(name, method, family_folder, tmp_path):
    """A 4-step run with `method` on the family, crashed after step 3 and resumed from checkpoint-2, ends with the
    weights and logged metrics of the uninterrupted run, bit for bit."""
    family, folder = FAMILY[name], family_folder(name)
    straight = method_run_config(family, method, folder, tmp_path, "straight")
    split = method_run_config(family, method, folder, tmp_path, "split")
    reference = train(straight)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(split, callbacks=[_CrashAt(3)])
    assert not (split.run_dir / "checkpoint-4").exists()
    resumed = train(split, resume=True)
    want, got = _weights(straight.run_dir / "checkpoint-4"), _weights(split.run_dir / "checkpoint-4")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert _untimed(split.run_dir / "metrics.jsonl") == _untimed(straight.run_dir / "metrics.jsonl")
    assert resumed.train_loss == reference.train_loss


REFUSED = [(family.name, method) for family in FAMILIES for method in METHODS if not family.applies(method)]


@pytest.mark.parametrize(("name", "method"), REFUSED)
def test_a_refused_method_is_a_one_line_config_error(name, method, family_folder, tmp_path):
    """Where the table says a method does not apply, a run with it stops with a ConfigError (exit 2 from the
    command), never trains: the table cannot claim a refusal the code does not make."""
    family, folder = FAMILY[name], family_folder(name)
    with pytest.raises((ConfigError, ValidationError)) as err:  # the command prints either as one line, exit 2
        train(method_run_config(family, method, folder, tmp_path, "refused"))
    assert isinstance(err.value, ValidationError) or "\n" not in str(err.value)
    assert not list(tmp_path.rglob("checkpoint-*"))
