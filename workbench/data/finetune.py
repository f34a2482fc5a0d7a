"""Fine-tuning data for TRL's `SFTTrainer`: examples from any source, split, and their SFTConfig fields.

    splits = load_finetune_splits(cfg.data, tokenizer)      # train / validation, in TRL's columns
    fields = sft_config_fields(cfg.data, tokenizer, model)  # max_length, loss masks, packing
    trainer = SFTTrainer(model, SFTConfig(**other_fields, **fields), train_dataset=splits["train"], ...)
    print(truncation_report(splits["train"], tokenizer, cfg.data))

TRL does the rest: it appends EOS, tokenises, masks the loss, truncates to `max_length` (keeping the start),
pads and packs. The formats (`data.format`, see `resolve_format`):

- `prompt_completion`: text columns `prompt` and `completion`; the loss covers the completion (and its EOS).
- `messages`: a column `messages`, lists of `{"role", "content"}`, rendered by the tokenizer's chat template
  (which must exist). The loss covers the assistant turns where the template marks them with
  `{% generation %}` (or TRL knows how to mark them); with any other template it covers the whole
  conversation (`sft_config_fields` reports which). TRL appends no EOS here: the template ends the turns.
- `text`: a column `text`; EOS appended, the loss covers every token.

The built-in generators `synthetic:arithmetic` and `synthetic:fact_qa` give prompt/completion pairs in one
format, `QA_PROMPT` and a completion of " " + the answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict, Value
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workbench.data.loading import (
    QA_PROMPT,
    generator,
    generator_options,
    load_rows,
    map_processes,
    missing_column,
)
from workbench.data.packing import split_documents
from workbench.errors import ConfigError

if TYPE_CHECKING:  # annotations only: workbench.config imports this package (to check data options), not the reverse
    from workbench.config import DataConfig

__all__ = [
    "FORMATS", "QA_PROMPT", "TruncationReport", "assistant_masks_supported", "check_packing",
    "conversation_loss_line", "load_finetune_splits", "resolve_format", "sft_config_fields", "token_lengths",
    "truncation_report",
]  # fmt: skip

"""The prompt of the built-in QA generators; the completion is " " + the answer (for arithmetic, the worked
GSM8K answer ending `#### N`). Evaluators prompt the same way."""

# format -> the columns of its examples, as TRL names them
FORMATS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}


# ----------------------------------------------------------------------------------------------------------
# Format and examples
# ----------------------------------------------------------------------------------------------------------


def resolve_format(data: DataConfig) -> str:
    """`data.format` with `auto` resolved: `prompt_completion`, `messages` or `text`.

    For a built-in generator this generates nothing (it checks the source name and `data.synthetic`, so it
    doubles as an early config check); for any other source it reads the source's columns."""
    if data.source.startswith("synthetic:"):
        return _generator_format(data)
    return _format_of(data, load_rows(data).column_names)


def _generator_format(data: DataConfig) -> str:
    """A generator's format: its native one for `auto`; question/answer generators also give `text` (each
    problem and its answer as one pretraining document, `qa_documents`)."""
    native = "prompt_completion" if generator(data.source).kind == "qa" else "text"
    generator_options(data.source, data.synthetic)
    valid = ("auto", native, "text")
    if data.format not in valid:
        raise ConfigError(
            f"field 'data.format': '{data.source}' gives {native} examples, not {data.format}; "
            f"valid: {', '.join(dict.fromkeys(valid))}"
        )
    return native if data.format == "auto" else data.format


def _required_columns(data: DataConfig, fmt: str) -> list[tuple[str, str]]:
    """(config field, source column) for each column a format reads."""
    return {
        "prompt_completion": [("prompt_column", data.prompt_column),
                              ("completion_column", data.completion_column)],
        "messages": [("messages_column", data.messages_column)],
        "text": [("text_column", data.text_column)],
    }[fmt]


def _format_of(data: DataConfig, columns: list[str]) -> str:
    fmt = data.format
    if fmt == "auto":
        if data.prompt_column in columns and data.completion_column in columns:
            fmt = "prompt_completion"
        elif data.messages_column in columns:
            fmt = "messages"
        elif data.text_column in columns:
            fmt = "text"
        else:
            raise ConfigError(
                f"field 'data.format': auto finds neither prompt/completion ('{data.prompt_column}', "
                f"'{data.completion_column}'), messages ('{data.messages_column}') nor text "
                f"('{data.text_column}') in '{data.source}' (columns: {', '.join(columns)}); set "
                "data.prompt_column and data.completion_column, data.messages_column or data.text_column"
            )
    for field, column in _required_columns(data, fmt):
        if column not in columns:
            raise missing_column(field, column, data.source, columns)
    return fmt


def _examples(data: DataConfig, rows: Dataset, fmt: str) -> Dataset:
    """`rows` as examples of `fmt`: only its TRL columns, renamed, with empty examples dropped."""
    if data.source.startswith("synthetic:") and fmt == "prompt_completion":
        return rows.map(
            lambda batch: {"prompt": [QA_PROMPT.format(question=q) for q in batch["question"]],
                           "completion": [f" {a}" for a in batch["answer"]]},
            batched=True, remove_columns=rows.column_names,
        )  # fmt: skip
    required = _required_columns(data, fmt)
    for field, column in required:
        _check_column_type(data, rows, fmt, field, column)
    rows = rows.select_columns([column for _, column in required])
    for (_, column), name in zip(required, FORMATS[fmt], strict=True):
        if column != name:
            rows = rows.rename_column(column, name)
    return rows.filter(_non_empty, batched=True, fn_kwargs={"fmt": fmt})


def _check_column_type(data: DataConfig, rows: Dataset, fmt: str, field: str, column: str) -> None:
    feature = rows.features[column]
    if fmt == "messages":
        first = next((m for m in rows.select(range(min(100, len(rows))))[column] if m), None)
        ok = isinstance(first, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                             for m in first)
        expected = "lists of {role, content} messages"
    else:
        ok = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
        expected = "text" + (" (for conversations use data.format: messages)" if fmt == "prompt_completion"
                             else "")
    if not ok:
        raise ConfigError(
            f"field 'data.{field}': column '{column}' of '{data.source}' holds {feature}, not {expected}"
        )


def _non_empty(batch: dict[str, list[Any]], fmt: str) -> list[bool]:
    if fmt == "prompt_completion":
        return [p is not None and bool(c and c.strip()) for p, c in zip(batch["prompt"], batch["completion"],
                                                                          strict=True)]
    if fmt == "messages":
        return [bool(m) for m in batch["messages"]]
    return [bool(t and t.strip()) for t in batch["text"]]


def load_finetune_splits(data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
    """`train` and `validation` examples in TRL's columns (`prompt`, `completion` | `messages` | `text`).

    The first `data.max_documents` non-empty examples are split by example with `data.split_seed`
    (`data.validation_fraction` held out); a validation example identical to a training one is dropped, so no
    validation example is trained on. Raises ConfigError for a source without the columns its format reads,
    for messages with a tokenizer that has no chat template, and for a tokenizer without an EOS token where
    TRL appends one."""
    if data.source.startswith("synthetic:"):
        fmt = _generator_format(data)
        rows = load_rows(data)
    else:
        rows = load_rows(data)
        fmt = _format_of(data, rows.column_names)
    _check_tokenizer(tokenizer, fmt)
    examples = _examples(data, rows, fmt)
    if data.max_documents is not None:
        examples = examples.select(range(min(data.max_documents, len(examples))))
    if len(examples) < 2:
        raise ConfigError(
            f"field 'data.source': '{data.source}' has {len(examples)} non-empty examples; need at least 2"
        )
    if fmt == "text":
        return split_documents(examples, data.validation_fraction, data.split_seed)
    # split_documents compares examples by their `text`: give each a key that holds the whole example
    columns = FORMATS[fmt]
    keyed = examples.map(
        lambda batch: {"text": [json.dumps(row, sort_keys=True)
                                for row in zip(*(batch[c] for c in columns), strict=True)]},
        batched=True,
    )  # fmt: skip
    splits = split_documents(keyed, data.validation_fraction, data.split_seed)
    return DatasetDict({name: split.remove_columns("text") for name, split in splits.items()})


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.name_or_path or f"<unnamed {type(tokenizer).__name__}>"


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, fmt: str) -> None:
    if fmt == "messages" and not tokenizer.chat_template:
        raise ConfigError(
            f"field 'data.format': messages are rendered with the tokenizer's chat template, and tokenizer "
            f"'{_tokenizer_name(tokenizer)}' has none; use a tokenizer with a chat template or "
            "prompt_completion data"
        )
    if fmt != "messages" and tokenizer.eos_token is None:
        raise ConfigError(
            f"field 'model.tokenizer': tokenizer '{_tokenizer_name(tokenizer)}' has no EOS token, which "
            "fine-tuning appends to every example"
        )


# ----------------------------------------------------------------------------------------------------------
# SFTConfig fields
# ----------------------------------------------------------------------------------------------------------


def assistant_masks_supported(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether TRL can restrict the loss to assistant turns with this tokenizer's chat template: the template
    marks them with `{% generation %}`, or TRL ships a marked version of it (`get_training_chat_template`)."""
    from trl.chat_template_utils import get_training_chat_template

    if not tokenizer.chat_template:
        return False
    try:
        get_training_chat_template(tokenizer)
    except Exception:  # ValueError: a template TRL cannot mark; a template error while TRL renders it
        return False
    return True


def conversation_loss_line(tokenizer: PreTrainedTokenizerBase, assistant_only: bool) -> str:
    """The line that says which tokens of a conversation (messages data) the loss covers: the assistant turns
    (`assistant_only`, where `assistant_masks_supported(tokenizer)`) or, with a template TRL cannot mark, all."""
    if assistant_only:
        return "[workbench] loss on the assistant turns only (chat template marked for TRL's assistant masks)"
    return (f"[workbench] chat template of '{_tokenizer_name(tokenizer)}' cannot mark assistant turns (no "
            "{% generation %} and no TRL version of it): the loss covers the whole conversation")


def tokenising_processes(data: DataConfig) -> tuple[int, str]:
    """How many processes TRL tokenises the examples with (`dataset_num_proc`), and the line that says why:
    `workbench.data.loading.map_processes` of the source's rows (at most `data.max_documents`; a generator's
    are not counted), except with `data.packing` and no `data.num_proc`: one process, since TRL packs each
    process's share of the examples in batches of its own, so the packed rows would depend on the cores."""
    if data.num_proc is None and data.packing:
        return 1, "[workbench] tokenising with 1 process (packed rows the same on every machine; set data.num_proc)"
    if data.source.startswith("synthetic:"):
        return map_processes(data.num_proc, None)
    rows = len(load_rows(data))  # read once already by `resolve_format`: from the datasets cache
    return map_processes(data.num_proc, min(rows, data.max_documents or rows))


def sft_config_fields(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The `trl.SFTConfig` fields the data section decides (`report`, where given, gets the line that says how
    many processes tokenise, and for messages the line that says which tokens the loss covers,
    `conversation_loss_line`).

    - `max_length` = `data.block_size`; longer examples are cut at the end (`truncation_mode` keep_start)
      during TRL's dataset preparation, and without packing those left with no loss token are dropped.
    - `completion_only_loss`: True for prompt_completion, False otherwise.
    - `assistant_only_loss`: for messages, True where `assistant_masks_supported(tokenizer)`; otherwise the
      whole conversation is trained (system and user turns included).
    - packing (`data.packing`): TRL's `bfd` strategy, which never cuts an example across rows (an example over
      `max_length` is truncated), and padding-free batches: the rows of a batch are laid end to end with
      `position_ids` restarting at every example and no attention mask. Examples stay apart only where the
      model's attention splits the row at those restarts: packing is a ConfigError where `check_packing(model)`
      finds it does not (checked here when `model` is given; `workbench.run.train`, which builds the model
      later, calls `check_packing` itself). `wrapped` packing, which cuts examples and lets them attend
      across boundaries, is never used. With eager/sdpa attention transformers builds a dense mask over the
      whole row (batch size x max_length tokens squared); on a GPU, flash_attention_2 avoids it.
    - `dataset_num_proc`: `tokenising_processes` (the cores for a large dataset, one for a small one).
    """
    fmt = resolve_format(data)
    if data.packing and model is not None:
        check_packing(model)
    processes, why = tokenising_processes(data)
    assistant_only = fmt == "messages" and assistant_masks_supported(tokenizer)
    if report is not None:
        report(why)
        if fmt == "messages":
            report(conversation_loss_line(tokenizer, assistant_only))
    return {
        "max_length": data.block_size,
        "truncation_mode": "keep_start",
        "dataset_text_field": "text",
        "dataset_num_proc": processes,
        "completion_only_loss": fmt == "prompt_completion",
        "assistant_only_loss": assistant_only,
        "packing": data.packing,
        "packing_strategy": "bfd",
        "padding_free": data.packing,
        "eval_packing": data.packing,
    }


def check_packing(model: PreTrainedModel) -> None:
    """Raise ConfigError (field 'data.packing') unless packed examples stay apart in this model's attention.

    TRL's padding-free batches carry no attention mask, only `position_ids` that restart at 0 for each example
    (and `cu_seq_lens_*` for varlen kernels). FlashAttention 2/3 (`attn_implementation` flash_attention_2/3 or
    a flash kernel from the hub, on a GPU) split the row there, so they pass unchecked. For eager, sdpa and
    flex attention, transformers 5 builds a block-diagonal mask from the restarts in `create_causal_mask`,
    when it gets no attention mask and no cache (SFTTrainer passes `use_cache=False`), in the models that
    build their mask there (GPT-NeoX, Llama, Mixtral do); so these are checked by running the model once on a
    padding-free batch of two short examples and comparing the second example's logits with those of the
    example alone. A ZeRO-3-partitioned model cannot be run outside its engine, so it needs a flash kernel.
    """
    impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if "flash" in impl.lower():
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ConfigError(
            f"field 'data.packing': packing a ZeRO-3-partitioned model needs a flash attention kernel (this "
            f"model's attn_implementation is '{impl}', which cannot be checked before training); use "
            "flash_attention_2, another ZeRO stage, or data.packing: false"
        )
    isolated_error, leak = _packing_probe(model)
    if isolated_error > max(0.1 * leak, 1e-5):
        raise ConfigError(
            f"field 'data.packing': with attn_implementation '{impl}', {type(model).__name__} lets a "
            "packed example attend to the examples before it (it ignores the restarting position_ids of "
            "padding-free batches); use flash_attention_2 or data.packing: false"
        )


def _packing_probe(model: PreTrainedModel) -> tuple[float, float]:
    """(max |logit difference| of an example packed after another vs alone; the same for an attention that
    sees across the boundary), from one padding-free batch built by TRL's own collator."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    generator_ = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    first, second = (torch.randint(vocab, (n,), generator=generator_).tolist() for n in (6, 5))
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": first + second, "seq_lengths": [len(first), len(second)]}])
    del batch["labels"]
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**batch, use_cache=False).logits[0, len(first):].float()
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
            seen = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         attention_mask=torch.ones_like(batch["input_ids"])).logits[0, len(first):].float()
    finally:
        model.train(was_training)
    return float((packed - alone).abs().max()), float((seen - alone).abs().max())


# ----------------------------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------------------------


def _format_of_examples(dataset: Dataset) -> str:
    for fmt, columns in FORMATS.items():
        if set(columns) <= set(dataset.column_names):
            return fmt
    raise ValueError(f"not fine-tuning examples: columns {dataset.column_names}")


def token_lengths(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    assistant_only_loss: bool = False,
    batch_size: int = 1000,
) -> tuple[list[int], list[int] | None]:
    """Tokens of each example as SFTTrainer tokenises it, before truncation, and for prompt/completion
    examples the tokens of the prompt part (None otherwise).

    As TRL does: EOS appended to `completion` / `text` unless already there, the tokenizer's special tokens
    added, the prompt part being the common prefix of the tokenised prompt and prompt + completion; messages
    through the chat template (TRL's marked version of it for `assistant_only_loss`)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import common_prefix_length

    fmt = _format_of_examples(dataset)
    eos = tokenizer.eos_token or ""
    lengths: list[int] = []
    prompt_lengths: list[int] | None = [] if fmt == "prompt_completion" else None
    template = None
    if fmt == "messages" and assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        template = get_training_chat_template(tokenizer)
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        if fmt == "messages":
            ids = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, chat_template=template)
                   ["input_ids"] for m in batch["messages"]]  # fmt: skip
        elif fmt == "text":
            ids = tokenizer([t if t.endswith(eos) else t + eos for t in batch["text"]])["input_ids"]
        else:
            completions = [c if c.endswith(eos) else c + eos for c in batch["completion"]]
            ids = tokenizer([p + c for p, c in zip(batch["prompt"], completions, strict=True)])["input_ids"]
            prompts = tokenizer(batch["prompt"])["input_ids"]
            prompt_lengths.extend(common_prefix_length(p, i) for p, i in zip(prompts, ids, strict=True))
        lengths.extend(len(i) for i in ids)
    return lengths, prompt_lengths


@dataclass(frozen=True)
class TruncationReport:
    """How many examples `max_length` cuts; `no_completion`: prompt/completion examples cut before their
    completion's first token (they carry no loss; without packing, TRL drops them)."""

    total: int
    truncated: int
    no_completion: int
    max_length: int
    split: str = "training"

    def __str__(self) -> str:
        text = f"{self.truncated} of {self.total} {self.split} examples truncated to {self.max_length} tokens"
        if self.no_completion:
            text += f" ({self.no_completion} of them keep no completion token and add no loss)"
        return text


def truncation_report(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig, split: str = "training"
) -> TruncationReport:
    """How many of `dataset`'s examples (from `load_finetune_splits`) are longer than `data.block_size`
    tokens, counted from their token lengths (prompt + completion + EOS, as `token_lengths`)."""
    fmt = _format_of_examples(dataset)
    assistant_only = fmt == "messages" and assistant_masks_supported(tokenizer)
    lengths, prompt_lengths = token_lengths(dataset, tokenizer, assistant_only)
    limit = data.block_size
    return TruncationReport(
        total=len(lengths),
        truncated=sum(n > limit for n in lengths),
        no_completion=sum(p >= limit for p in prompt_lengths) if prompt_lengths is not None else 0,
        max_length=limit,
        split=split,
    )
