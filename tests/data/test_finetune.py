"""Fine-tuning data: each source kind and format, the example split, the built-in QA generators, the SFTConfig
fields, and what TRL's SFTTrainer makes of them (loss masks, padding, EOS, truncation, packing)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from workbench.config import DataConfig
from workbench.data.arithmetic import ArithmeticConfig, arithmetic_problems
from workbench.data.finetune import (
    QA_PROMPT,
    assistant_masks_supported,
    check_packing,
    load_finetune_splits,
    resolve_format,
    sft_config_fields,
    truncation_report,
)
from workbench.errors import ConfigError
from workbench.models import train_bpe_tokenizer

PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# assistant turns inside {% generation %}, ending with EOS so the model learns to stop
MARKED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}{{ m['content'] }}"
    "<|endoftext|>{% endgeneration %}\n{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
)
ARITHMETIC = {"num_problems": 24, "num_steps": 2, "max_value": 30, "seed": 5}


def _pairs(n: int) -> list[dict]:
    return [{"q": f"What is {i} plus {i}?", "a": f" {2 * i}", "id": i} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on arithmetic problems and chat words, with no chat template."""
    rows = arithmetic_problems(ArithmeticConfig(**{**ARITHMETIC, "num_problems": 200}))
    texts = [QA_PROMPT.format(question=q) + " " + a for q, a in zip(rows["question"], rows["answer"],
                                                                      strict=True)]
    tokenizer = train_bpe_tokenizer(texts + ["user: assistant: system: What is plus?"] * 5, 1000)
    tokenizer.name_or_path = "tiny-bpe"
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = MARKED_TEMPLATE
    return chat


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------------------
# Sources and formats
# ----------------------------------------------------------------------------------------------------------


def test_jsonl_with_named_columns_gives_trl_prompt_completion(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(20))
    data = DataConfig(source=str(path), prompt_column="q", completion_column="a", validation_fraction=0.2)
    assert resolve_format(data) == "prompt_completion"
    splits = load_finetune_splits(data, tokenizer)
    assert splits["train"].column_names == ["prompt", "completion"] == splits["validation"].column_names
    assert (len(splits["train"]), len(splits["validation"])) == (16, 4)
    rows = splits["train"].to_list() + splits["validation"].to_list()
    expected = [{"prompt": r["q"], "completion": r["a"]} for r in _pairs(20)]
    assert sorted(rows, key=str) == sorted(expected, key=str)


def test_csv_sources_prompt_completion_and_text(tmp_path, tokenizer):
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows({"prompt": r["q"], "completion": r["a"]} for r in _pairs(10))
    splits = load_finetune_splits(DataConfig(source=str(pairs)), tokenizer)
    assert splits["train"].column_names == ["prompt", "completion"]
    assert {r["completion"] for r in splits["train"]} <= {r["a"] for r in _pairs(10)}

    texts = tmp_path / "texts.csv"
    texts.write_text("text,other\n" + "".join(f"line {i},{i}\n" for i in range(10)))
    data = DataConfig(source=str(texts))
    assert resolve_format(data) == "text"
    assert load_finetune_splits(data, tokenizer)["train"].column_names == ["text"]


def test_missing_columns_name_the_field_and_list_the_columns(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(6))
    with pytest.raises(ConfigError, match=r"^field 'data.prompt_column': 'prompt' is not a column of .*"
                                          r"\(columns: q, a, id\)$"):
        load_finetune_splits(DataConfig(source=str(path), format="prompt_completion"), tokenizer)
    with pytest.raises(ConfigError, match=r"^field 'data.messages_column': .*\(columns: q, a, id\)$"):
        resolve_format(DataConfig(source=str(path), format="messages"))
    with pytest.raises(ConfigError, match=r"^field 'data.format': auto finds neither.*\(columns: q, a, id\)"):
        resolve_format(DataConfig(source=str(path)))
    nested = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}] * 4
    _write_jsonl(tmp_path / "nested.jsonl", nested)
    with pytest.raises(ConfigError, match=r"^field 'data.prompt_column': column 'prompt' .* not text"):
        load_finetune_splits(DataConfig(source=str(tmp_path / "nested.jsonl")), tokenizer)


def test_messages_need_a_chat_template(tmp_path, tokenizer, chat_tokenizer):
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": str(2 * i)}]} for i in range(8)]  # fmt: skip
    data = DataConfig(source=str(_write_jsonl(tmp_path / "chats.jsonl", chats)))
    assert resolve_format(data) == "messages"
    with pytest.raises(ConfigError, match=r"^field 'data.format': .*tokenizer 'tiny-bpe' has none"):
        load_finetune_splits(data, tokenizer)
    splits = load_finetune_splits(data, chat_tokenizer)
    assert splits["train"].column_names == ["messages"]
    assert splits["train"][0]["messages"][0].keys() == {"role", "content"}

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = PLAIN_TEMPLATE
    assert assistant_masks_supported(chat_tokenizer) and not assistant_masks_supported(plain)
    assert sft_config_fields(data, chat_tokenizer)["assistant_only_loss"] is True
    assert sft_config_fields(data, plain)["assistant_only_loss"] is False  # the whole conversation is trained
    assert sft_config_fields(data, plain)["completion_only_loss"] is False


def test_arithmetic_generator_is_qa_prompt_completion(tokenizer):
    data = DataConfig(source="synthetic:arithmetic", synthetic=ARITHMETIC, validation_fraction=0.25)
    assert resolve_format(data) == "prompt_completion"
    splits = load_finetune_splits(data, tokenizer)
    problems = arithmetic_problems(ArithmeticConfig(**ARITHMETIC))
    pairs = zip(problems["question"], problems["answer"], strict=True)
    expected = {QA_PROMPT.format(question=q): " " + a for q, a in pairs}
    got = {r["prompt"]: r["completion"] for split in splits.values() for r in split}
    assert got == expected and len(splits["validation"]) == 6
    prompt, completion = next(iter(got.items()))
    assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    assert completion.startswith(" ") and completion.rsplit("\n", 1)[1].startswith("#### ")
    assert sft_config_fields(data, tokenizer)["completion_only_loss"] is True


def test_fact_qa_is_the_evaluators_instruction_pool(tokenizer):
    from workbench_eval.data import factworld_qa, factworld_sft

    world = {"num_entities": 40, "seed": 1}
    splits = load_finetune_splits(DataConfig(source="synthetic:fact_qa", synthetic=world), tokenizer)
    rows = [r for split in splits.values() for r in split]
    assert sorted(rows, key=str) == sorted(factworld_sft(**world).to_list(), key=str)
    asked = {QA_PROMPT.format(question=q) for q in factworld_qa(**world)["test"]["question"]}
    assert rows and not asked & {r["prompt"] for r in rows}


def test_generator_errors_name_the_field(tokenizer):
    unknown = r"^field 'data.source': unknown synthetic source 'synthetic:gsm9k'; valid: "
    valid = "synthetic:fact_world, synthetic:fact_qa, synthetic:arithmetic, synthetic:fact_tf, synthetic:fact_value$"
    with pytest.raises(ConfigError, match=unknown + valid):
        resolve_format(DataConfig(source="synthetic:gsm9k"))
    with pytest.raises(ConfigError, match=r"^field 'data.synthetic.num_step': unknown option \(did you mean "
                                          r"'num_steps'\?\)$"):
        resolve_format(DataConfig(source="synthetic:arithmetic", synthetic={"num_step": 2}))
    with pytest.raises(ConfigError, match=r"^field 'data.synthetic': num_steps must be >= 1, got 0$"):
        load_finetune_splits(DataConfig(source="synthetic:arithmetic", synthetic={"num_steps": 0}), tokenizer)
    with pytest.raises(ConfigError, match=r"^field 'data.synthetic.num_entities': .*entities"):
        load_finetune_splits(DataConfig(source="synthetic:fact_qa", synthetic={"num_entities": 5}), tokenizer)
    with pytest.raises(ConfigError, match=r"^field 'data.format': 'synthetic:arithmetic' gives prompt_compl"):
        resolve_format(DataConfig(source="synthetic:arithmetic", format="messages"))


def test_split_is_by_example_disjoint_and_seeded(tmp_path, tokenizer):
    rows = _pairs(30) + _pairs(30)[:10]  # ten exact duplicates
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)

    def split(seed):
        data = DataConfig(source=str(path), prompt_column="q", completion_column="a", validation_fraction=0.3,
                          split_seed=seed)
        return load_finetune_splits(data, tokenizer)

    first, again, other = split(0), split(0), split(1)
    train = {(r["prompt"], r["completion"]) for r in first["train"]}
    validation = {(r["prompt"], r["completion"]) for r in first["validation"]}
    assert validation and not train & validation
    assert first["validation"].to_list() == again["validation"].to_list()
    assert first["validation"].to_list() != other["validation"].to_list()
    capped = DataConfig(source=str(path), prompt_column="q", completion_column="a", max_documents=7,
                        validation_fraction=0.0)
    assert len(load_finetune_splits(capped, tokenizer)["train"]) == 7


# ----------------------------------------------------------------------------------------------------------
# With TRL's SFTTrainer
# ----------------------------------------------------------------------------------------------------------


def _model(tokenizer, attn: str = "sdpa"):
    from transformers import GPTNeoXForCausalLM

    from workbench.models.presets import preset_config

    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = preset_config("pythia-tiny", len(tokenizer), ids, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    return GPTNeoXForCausalLM._from_config(config, attn_implementation=attn)


def _trainer(tmp_path, model, tokenizer, train, **fields):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(train), report_to=[],
                     use_cpu=True, bf16=False, activation_checkpointing=False, dataloader_num_workers=0,
                     disable_tqdm=True, **fields)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


def test_sft_trainer_masks_the_prompt_pads_appends_eos_and_truncates_as_reported(tmp_path, tokenizer):
    data = DataConfig(source="synthetic:arithmetic", synthetic=ARITHMETIC, validation_fraction=0.25)
    train = load_finetune_splits(data, tokenizer)["train"]
    eos = tokenizer.eos_token
    prompts = [tokenizer(p)["input_ids"] for p in train["prompt"]]
    pairs = zip(train["prompt"], train["completion"], strict=True)
    full = [tokenizer(p + c + eos)["input_ids"] for p, c in pairs]
    # QA_PROMPT ends on a token boundary: the prompt's tokens begin prompt + completion's
    assert all(f[: len(p)] == p for p, f in zip(prompts, full, strict=True))
    # a max length that cuts some completions and no prompt
    block = (max(len(p) for p in prompts) + max(len(f) for f in full)) // 2
    assert max(len(p) for p in prompts) < block and 0 < sum(len(f) > block for f in full) < len(full)
    data = data.model_copy(update={"block_size": block})

    fields = sft_config_fields(data, tokenizer)
    assert fields["max_length"] == block and fields["completion_only_loss"] and not fields["packing"]
    model = _model(tokenizer)
    trainer = _trainer(tmp_path, model, tokenizer, train, **fields)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["input_ids"]) == len(train)
    seen = set()
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist(), strict=True):  # fmt: skip
        n = sum(mask)
        index = next(i for i, f in enumerate(full) if f[:block] == ids[:n])
        seen.add(index)
        p = len(prompts[index])
        assert labels[:p] == [-100] * p  # prompt
        assert labels[p:n] == ids[p:n]  # completion, with its own ids
        assert ids[n:] == [tokenizer.pad_token_id] * (len(ids) - n) and labels[n:] == [-100] * (len(ids) - n)
        if len(full[index]) <= block:
            assert ids[n - 1] == tokenizer.eos_token_id and labels[n - 1] == tokenizer.eos_token_id
        else:
            assert n == block
    assert seen == set(range(len(train)))

    report = truncation_report(train, tokenizer, data)
    assert str(report) == f"{report.truncated} of {len(train)} training examples truncated to {block} tokens"
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == block

    # against TRL's own tokenisation, at limits one token either side of examples' lengths (EOS included)
    untruncated = _trainer(tmp_path, _model(tokenizer), tokenizer, train, **{**fields, "max_length": None})
    lengths = [len(ids) for ids in untruncated.train_dataset["input_ids"]]
    for limit in {block, min(lengths), max(lengths), *(n - 1 for n in lengths[:3])}:
        report = truncation_report(train, tokenizer, data.model_copy(update={"block_size": limit}))
        expected = (sum(n > limit for n in lengths), len(train), limit)
        assert (report.truncated, report.total, report.max_length) == expected
    # a limit inside some prompts: TRL drops the examples left without a completion token
    limit = sorted(len(p) for p in prompts)[len(prompts) // 2]
    short = data.model_copy(update={"block_size": limit})
    kept = _trainer(tmp_path, _model(tokenizer), tokenizer, train, **sft_config_fields(short, tokenizer))
    report = truncation_report(train, tokenizer, short)
    assert 0 < report.no_completion == len(train) - len(kept.train_dataset)
    assert str(report).endswith(f"({report.no_completion} of them keep no completion token and add no loss)")


def test_assistant_only_loss_trains_the_assistant_turns_only(tmp_path, chat_tokenizer):
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{2 * i}"}]} for i in range(6)]  # fmt: skip
    data = DataConfig(source=str(_write_jsonl(tmp_path / "chats.jsonl", chats)), validation_fraction=0.0)
    train = load_finetune_splits(data, chat_tokenizer)["train"]
    trainer = _trainer(tmp_path, _model(chat_tokenizer), chat_tokenizer, train,
                       **sft_config_fields(data, chat_tokenizer))
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        trained = chat_tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
        assert trained.endswith(chat_tokenizer.eos_token) and "user" not in trained and "plus" not in trained
        assert trained.removesuffix(chat_tokenizer.eos_token).strip().isdigit()


def test_packing_keeps_examples_apart(tmp_path, tokenizer, monkeypatch):
    data = DataConfig(source="synthetic:arithmetic", synthetic=ARITHMETIC, packing=True, block_size=256)
    train = load_finetune_splits(data, tokenizer)["train"]
    for attn in ("eager", "sdpa"):
        check_packing(_model(tokenizer, attn))
    model = _model(tokenizer)
    assert sft_config_fields(data, tokenizer)["packing"]  # the model is checked later (workbench.run.train)
    fields = sft_config_fields(data, tokenizer, model)
    assert fields["packing"] and fields["packing_strategy"] == "bfd" and fields["padding_free"]
    batch = next(iter(_trainer(tmp_path, model, tokenizer, train, **fields).get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(train)  # every example whole, its positions restarting at 0
    assert all(batch["labels"][0, s] == -100 for s in starts)  # no example is trained to follow another

    import transformers.masking_utils

    # a model whose attention ignores the restarting positions: packed examples would see each other
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match=r"^field 'data.packing': with attn_implementation 'sdpa', "
                                          r"GPTNeoXForCausalLM lets a packed example attend"):
        sft_config_fields(data, tokenizer, model)
    monkeypatch.undo()
    next(model.parameters()).ds_id = 0  # as ZeRO-3 partitions it
    with pytest.raises(ConfigError, match=r"^field 'data.packing': packing a ZeRO-3-partitioned model needs"):
        check_packing(model)
