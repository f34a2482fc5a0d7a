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


def test_noised_and_clean_runs_share_the_tokenizer_and_validation(tmp_path):
    from workbench.config import ModelConfig
    from workbench.data import prepare_data

    base = {"synthetic": {"num_entities": 40}, "cache_dir": str(tmp_path), "block_size": 16}
    model = ModelConfig(preset="pythia-tiny", tokenizer_vocab_size=300)
    tok_clean, clean = prepare_data(DataConfig(**base), model)
    tok_noised, noised = prepare_data(DataConfig(**base, noise={"word_replace_prob": 0.5}), model)
    assert tok_clean.backend_tokenizer.to_str() == tok_noised.backend_tokenizer.to_str()
    assert clean["validation"]["input_ids"] == noised["validation"]["input_ids"]
    assert clean["train"]["input_ids"] != noised["train"]["input_ids"]
    # repetition and the objective act after packing: they reuse the cached blocks
    prepare_data(DataConfig(**base, repetition={"budget_tokens": 64, "unique_tokens": 32}), model)
    assert len(list((tmp_path / "blocks").iterdir())) == 2 and len(list((tmp_path / "tokenizers").iterdir())) == 1
