"""A byte-level BPE tokenizer trained locally with `tokenizers`, saved as a transformers fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from workbench.io import publish_folder

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on `texts`; `<|endoftext|>` is BOS/EOS/UNK, `<|pad|>` pads."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=2048,
    )


def batched_texts(texts: Iterable[str], batch: int = 1000) -> Iterator[list[str]]:
    """Group `texts` in lists of `batch` for `train_from_iterator`."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_or_train_tokenizer(
    cache_dir: Path, texts: Iterable[str], vocab_size: int
) -> PreTrainedTokenizerFast:
    """The tokenizer cached in `cache_dir`, or train one on `texts` and save it there atomically."""
    if (cache_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    if not publish_folder(cache_dir, lambda tmp: tokenizer.save_pretrained(str(tmp))):
        return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))  # another process trained it first
    return tokenizer
