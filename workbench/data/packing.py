"""Held-out split, tokenisation and packing into fixed-length blocks for causal-LM training."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase


def split_documents(docs: Dataset, validation_fraction: float, seed: int) -> DatasetDict:
    """Split by document; a validation document whose text also occurs in training is dropped."""
    if validation_fraction == 0:
        return DatasetDict(train=docs, validation=docs.select([]))
    parts = docs.train_test_split(test_size=validation_fraction, seed=seed, shuffle=True)
    train_texts = set(parts["train"]["text"])
    validation = parts["test"].filter(lambda batch: [t not in train_texts for t in batch["text"]], batched=True)
    return DatasetDict(train=parts["train"], validation=validation)


def pack_blocks(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, block_size: int) -> dict:
    """Tokenise a batch of documents, join them with EOS and cut the stream into `block_size` blocks.

    The remainder of each `datasets.map` batch that does not fill a block is dropped.
    """
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    stream = [tok for doc in ids for tok in (*doc, tokenizer.eos_token_id)]
    usable = len(stream) - len(stream) % block_size
    return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}


def tokenize_and_pack(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, block_size: int, num_proc: int | None = None
) -> DatasetDict:
    """Packed `input_ids` blocks for every split (batched `datasets.map`, 1,000 documents a batch)."""
    return splits.map(
        pack_blocks,
        batched=True,
        batch_size=1000,
        remove_columns=splits["train"].column_names,
        fn_kwargs={"tokenizer": tokenizer, "block_size": block_size},
        num_proc=num_proc,
        desc="Tokenising and packing",
    )
