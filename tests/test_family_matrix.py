"""The family matrix, fast tier: each family's tiny random model (tests/families.py) loaded from its folder as a
download would be, trained for 2 steps through `workbench.run.train` (pretraining, or classification for BERT),
and for causal LMs 2 steps of LoRA fine-tuning on every linear layer with the completion-only loss checked
against the family's tokenizer conventions (BOS, pad = EOS); for each family with a chat template, 2 steps on
conversations with the loss checked against its template (assistant turns only where TRL can mark them, the whole
conversation otherwise). Also: docs/families.md holds the generated table.
tests/integration/test_family_matrix_launch.py launches the same families under DeepSpeed, loads and merges them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, family_config
from families import (
    CAUSAL_LM,
    CLASSIFICATION_DATA,
    FAMILIES,
    FAMILY,
    FINETUNING_DATA,
    MISTRAL_CHAT_TEMPLATE,
    PRETRAINING_DATA,
    Family,
    feature_table,
)
from transformers import TrainerCallback

from workbench.config import ExperimentConfig
from workbench.data.finetune import assistant_masks_supported, conversation_loss_line, load_finetune_splits
from workbench.io import append_jsonl
from workbench.models import load_tokenizer
from workbench.run import train

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
ROWS_CHECKED = 8  # training examples whose collated labels are checked
IGNORE = -100
CHAT_FAMILIES = [family.name for family in FAMILIES if family.tokens.chat_template is not None]
# TRL's training version of the Qwen2.5 template opens `{% generation %}` before the newline that ends the
# assistant header (`<|im_start|>assistant\n`), so that newline is trained too; the other templates train from
# the first token the model generates after the header
HEADER_NEWLINE_TRAINED = {"qwen2_5"}
CHAT_BLOCK_SIZE = 256  # every conversation whole


class FirstRows(TrainerCallback):
    """At the start of training, the first `rows` training examples collated by the run's own collator (as the
    Trainer batches them, without drawing from its sampler), and the model as the Trainer holds it."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.batch: dict[str, torch.Tensor] = {}
        self.model: torch.nn.Module | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
        dataset = train_dataloader.dataset
        self.batch = train_dataloader.collate_fn([dataset[i] for i in range(self.rows)])
        self.model = model


def test_docs_table_is_the_generated_one():
    """docs/families.md holds `python -m tests.families --table` as it is now."""
    assert feature_table() in (REPO / "docs" / "families.md").read_text(encoding="utf-8"), (
        "docs/families.md is out of date: paste `python -m tests.families --table` into it")


def test_every_family_lists_each_refusal_with_a_reason():
    for family in FAMILIES:
        assert all(reason.strip() for reason in family.refused.values()), family.name
        assert family.applies("pretraining") == (family.run_kind == CAUSAL_LM)
        assert family.applies("smoe_dropout") != family.moe


@pytest.mark.parametrize("name", [family.name for family in FAMILIES])
def test_family_trains_from_its_folder(name, family_folder, tmp_path):
    family = FAMILY[name]
    folder = family_folder(name)
    if family.run_kind == CAUSAL_LM:
        _pretrain(folder, tmp_path)
        _finetune_with_lora(family, folder, tmp_path)
    else:
        _classify(folder, tmp_path)


def _pretrain(folder: Path, tmp_path: Path) -> None:
    result = train(ExperimentConfig(**family_config(tmp_path, folder, "pretrain", PRETRAINING_DATA)))
    assert result.kind == "pretrain" and result.global_step == 2 and math.isfinite(result.train_loss)
    assert (result.run_dir / "checkpoint-2" / "model.safetensors").is_file()


def _classify(folder: Path, tmp_path: Path) -> None:
    result = train(ExperimentConfig(**family_config(tmp_path, folder, "classify", CLASSIFICATION_DATA)))
    assert result.kind == "classification" and result.global_step == 2 and math.isfinite(result.train_loss)
    assert result.eval_accuracy is not None and (result.run_dir / "checkpoint-2" / "model.safetensors").is_file()


def _finetune_with_lora(family: Family, folder: Path, tmp_path: Path) -> None:
    cfg = ExperimentConfig(**family_config(tmp_path, folder, "lora", FINETUNING_DATA, lora=LORA))
    first = FirstRows(ROWS_CHECKED)
    result = train(cfg, callbacks=[first])
    assert result.kind == "finetune" and result.global_step == 2 and math.isfinite(result.train_loss)
    assert (result.run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()
    _check_every_linear_layer_adapted(first.model)
    tokenizer = load_tokenizer(cfg.model)
    examples = load_finetune_splits(cfg.data, tokenizer)["train"].select(range(ROWS_CHECKED))
    _check_completion_mask(family, tokenizer, examples, first.batch)


def _check_every_linear_layer_adapted(model: torch.nn.Module) -> None:
    """`target_modules: all-linear`: a LoRA adapter on every linear layer of the base model but its output head."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    head = base.get_output_embeddings()
    adapted = [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]
    plain = [name for name, module in base.named_modules() if type(module) is torch.nn.Linear and module is not head
             and not name.endswith(".base_layer") and ".lora_" not in name]
    assert adapted and not plain, f"linear layers without an adapter: {plain}"


def _check_completion_mask(family: Family, tokenizer, examples, batch: dict[str, torch.Tensor]) -> None:
    """Each collated row is the family's encoding of prompt + completion + EOS (starting with the family's BOS or
    prefix, if any, nothing else added), right-padded; its labels are -100 exactly on the prompt's tokens and the
    padding, and the tokens elsewhere, the closing EOS included even where the pad token is EOS."""
    prefix = tokenizer.convert_tokens_to_ids(family.tokens.prefix) if family.tokens.prefix else None
    padded = False
    for row, example in enumerate(examples):
        prompt = tokenizer(example["prompt"])["input_ids"]
        full = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
        assert full[:len(prompt)] == prompt and full[-1] == tokenizer.eos_token_id
        assert len(full) <= FINETUNING_DATA["block_size"], "an example is truncated: raise its block_size"
        if prefix is None:
            assert full[0] not in tokenizer.all_special_ids, f"{family.name} adds no BOS"
        else:
            assert full[0] == prefix and full[1] not in tokenizer.all_special_ids
        padded |= _check_row_labels(batch, row, full, len(prompt))
    assert padded, "no row was padded: the padding check saw nothing"


def _check_row_labels(batch: dict[str, torch.Tensor], row: int, full: list[int], loss_start: int) -> bool:
    """Collated row `row` is `full` right-padded, with labels -100 on `full[:loss_start]` and the padding and the
    token ids elsewhere; whether the row was padded."""
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    length = len(full)
    assert ids[:length] == full
    assert labels[:loss_start] == [IGNORE] * loss_start
    assert labels[loss_start:length] == full[loss_start:]
    assert labels[length:] == [IGNORE] * (len(ids) - length)
    return length < len(ids)


def chat_rows(count: int) -> list[dict[str, list[dict[str, str]]]]:
    """`count` conversations of a system prompt, a user question and the assistant's answer, of varied lengths."""
    rows = []
    for i in range(count):
        first, second = 7 * i + 1, 13 * i * i + 2
        answer = f"{first} plus {second} is {first + second}." + " Check: it adds up." * (i % 3)
        rows.append({"messages": [{"role": "system", "content": "You add numbers."},
                                  {"role": "user", "content": f"What is {first} plus {second}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_chat_loss_follows_the_family_template(name, family_folder, tmp_path, capsys):
    """Two full fine-tuning steps on conversations (`data.format: messages`): each collated row is the family's
    chat template rendered and tokenised (its BOS once where it has one), right-padded; with a template TRL can
    mark, the labels are -100 exactly on the system and user turns, the assistant header and the padding (the
    answer, what the model generates after the generation prompt, with its end-of-turn token, is trained), and
    otherwise the report says so and the labels cover the whole conversation."""
    family = FAMILY[name]
    source = tmp_path / "chats.jsonl"
    append_jsonl(source, *chat_rows(ROWS_CHECKED + 2))
    data = {"source": str(source), "format": "messages", "block_size": CHAT_BLOCK_SIZE, "validation_fraction": 0.0}
    cfg = ExperimentConfig(**family_config(tmp_path, family_folder(name), "chat", data))
    first = FirstRows(ROWS_CHECKED)
    result = train(cfg, callbacks=[first])
    assert result.kind == "finetune" and result.global_step == 2 and math.isfinite(result.train_loss)
    tokenizer = load_tokenizer(cfg.model)
    assistant_only = assistant_masks_supported(tokenizer)
    assert assistant_only == (family.tokens.chat_template != MISTRAL_CHAT_TEMPLATE), "TRL marks all but [INST]"
    assert capsys.readouterr().out.splitlines().count(conversation_loss_line(tokenizer, assistant_only)) == 1
    examples = load_finetune_splits(cfg.data, tokenizer)["train"].select(range(ROWS_CHECKED))
    padded = False
    for row, example in enumerate(examples):
        full = _rendered(tokenizer, example["messages"])
        _check_bos_once(family, tokenizer, full)
        loss_start = _answer_start(family, tokenizer, example["messages"], full) if assistant_only else 0
        padded |= _check_row_labels(first.batch, row, full, loss_start)
    assert padded, "no row was padded: the padding check saw nothing"


def _rendered(tokenizer, messages: list[dict[str, str]], **options) -> list[int]:
    """The token ids of `messages` as the tokenizer's own chat template renders them (nothing added after)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= CHAT_BLOCK_SIZE, "a conversation is truncated: raise CHAT_BLOCK_SIZE"
    return ids


def _check_bos_once(family: Family, tokenizer, ids: list[int]) -> None:
    """A family that starts every text with its BOS starts a conversation with it exactly once (the template's
    BOS and no second one from the tokenizer); any other family's conversation holds no BOS."""
    bos = tokenizer.convert_tokens_to_ids(family.tokens.bos) if family.tokens.bos else None
    if family.tokens.prefix is not None:
        assert ids[0] == bos and ids.count(bos) == 1, f"{family.name}: BOS not exactly once at the start"
    elif bos is not None:
        assert bos not in ids, f"{family.name} adds no BOS"


def _answer_start(family: Family, tokenizer, messages: list[dict[str, str]], full: list[int]) -> int:
    """Where the assistant turn starts in `full` (the tokens of system, user, assistant): after the template's
    generation prompt (the conversation up to the assistant header), less the header's newline that TRL's
    training template trains for some templates (`HEADER_NEWLINE_TRAINED`)."""
    assert messages[-1]["role"] == "assistant" and all(m["role"] != "assistant" for m in messages[:-1])
    prompt = _rendered(tokenizer, messages[:-1], add_generation_prompt=True)
    assert full[:len(prompt)] == prompt, "the generation prompt is not a prefix of the conversation's tokens"
    if family.tokens.chat_template in HEADER_NEWLINE_TRAINED:
        assert tokenizer.decode(prompt[-1:]) == "\n"
        return len(prompt) - 1
    return len(prompt)
