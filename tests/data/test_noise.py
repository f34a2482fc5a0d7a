"""Noised training text: the rate, determinism, clean validation text."""

from __future__ import annotations

import pytest
from datasets import Dataset

from workbench.config import DataConfig
from workbench.data import documents
from workbench.data.noise import NoiseConfig, corrupt_documents


def test_replacement_rate_and_determinism():
    docs = Dataset.from_dict({"text": [" ".join(f"w{i}_{j}" for j in range(200)) for i in range(20)]})
    noised = corrupt_documents(docs, NoiseConfig(word_replace_prob=0.3, seed=1))
    changed = sum(a != b for x, y in zip(docs["text"], noised["text"], strict=True)
                  for a, b in zip(x.split(), y.split(), strict=True))
    assert changed / 4000 == pytest.approx(0.3, abs=0.03)
    assert noised["text"] == corrupt_documents(docs, NoiseConfig(word_replace_prob=0.3, seed=1))["text"]
    assert corrupt_documents(docs, NoiseConfig(word_replace_prob=0.0))["text"] == docs["text"]


def test_only_training_text_is_noised():
    clean = documents(DataConfig(synthetic={"num_entities": 40}))
    noised = documents(DataConfig(synthetic={"num_entities": 40}, noise={"word_replace_prob": 0.5}))
    assert noised["validation"]["text"] == clean["validation"]["text"]
    assert noised["train"]["text"] != clean["train"]["text"]


def test_bad_rate():
    with pytest.raises(ValueError, match="word_replace_prob"):
        NoiseConfig(word_replace_prob=1.5)
