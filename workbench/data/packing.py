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
    ids = tokenize_documents(batch, tokenizer)["ids"]
    return pack_token_ids({"ids": ids}, tokenizer.eos_token_id, block_size)


def tokenize_documents(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase) -> dict:
    """Each document's token ids (no special tokens)."""
    return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}


def pack_token_ids(batch: dict[str, list[Any]], eos_token_id: int, block_size: int) -> dict:
    """A batch of documents' token ids joined with EOS after each and cut into `block_size` blocks; the
    remainder that does not fill a block is dropped."""
    stream = [tok for doc in batch["ids"] for tok in (*doc, eos_token_id)]
    usable = len(stream) - len(stream) % block_size
    return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}


def tokenize_and_pack(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, block_size: int, num_proc: int | None = None
) -> DatasetDict:
    """Packed `input_ids` blocks for every split: the documents tokenised by `num_proc` processes, then packed
    in this process, 1,000 documents a batch (`pack_blocks` of each batch), so the blocks are the same whatever
    the number of processes (packing in each process would end each process's share with its own remainder)."""
    ids = splits.map(tokenize_documents, batched=True, batch_size=1000, remove_columns=splits["train"].column_names,
                     fn_kwargs={"tokenizer": tokenizer}, num_proc=num_proc, desc="Tokenising")
    return ids.map(pack_token_ids, batched=True, batch_size=1000, remove_columns=["ids"],
                   fn_kwargs={"eos_token_id": tokenizer.eos_token_id, "block_size": block_size}, desc="Packing")
