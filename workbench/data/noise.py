"""Lower-quality text for data-quality studies: seeded word-level corruption of training documents.

Each word is, independently with probability `p`, replaced by a word drawn uniformly from the corpus's own
vocabulary of words (so the text stays in-distribution in its word statistics but loses its facts).
Validation text is never corrupted: it measures what the model learned about clean text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset


@dataclass(frozen=True)
class NoiseConfig:
    word_replace_prob: float = 0.1  # probability that a word is replaced by a random corpus word
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.word_replace_prob <= 1.0:
            raise ValueError(f"word_replace_prob must be in [0, 1], got {self.word_replace_prob}")


def corrupt_documents(docs: Dataset, cfg: NoiseConfig) -> Dataset:
    """`docs` (column `text`) with words replaced as `cfg` says; deterministic in the seed and the order.
    With probability 0 the documents are returned untouched (the clean arm of a quality study)."""
    if cfg.word_replace_prob == 0:
        return docs
    vocabulary = sorted({word for text in docs["text"] for word in text.split()})
    rng = random.Random(cfg.seed)

    def corrupt(text: str) -> str:
        return " ".join(rng.choice(vocabulary) if rng.random() < cfg.word_replace_prob else w for w in text.split())

    return docs.map(lambda batch: {"text": [corrupt(t) for t in batch["text"]]}, batched=True,
                    desc="Corrupting training text")
