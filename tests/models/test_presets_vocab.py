"""`model.overrides.vocab_size` on a preset: larger than the tokenizer pads the embeddings, smaller is a
ConfigError naming the field."""

from __future__ import annotations

import pytest
import torch

from workbench.config import ModelConfig
from workbench.errors import ConfigError
from workbench.models import build_model, train_bpe_tokenizer

TEXTS = [f"Velmora Tash number {i} was born in Ostrel and plays the lute {i % 5} times." for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, 300)


@pytest.mark.parametrize("preset", ["pythia-tiny", "llama-tiny", "t5-tiny"])
def test_a_larger_vocab_size_pads_the_embeddings(preset, tokenizer):
    padded = (len(tokenizer) // 64 + 1) * 64
    model = build_model(ModelConfig(preset=preset, overrides={"vocab_size": padded}), tokenizer)
    assert model.config.vocab_size == padded
    assert model.get_input_embeddings().num_embeddings == padded
    assert model.get_output_embeddings().out_features == padded
    ids = torch.tensor([[len(tokenizer) - 1, 0]])
    inputs = {"decoder_input_ids": ids} if preset == "t5-tiny" else {}
    assert model(input_ids=ids, **inputs).logits.shape[-1] == padded


def test_a_vocab_size_of_the_tokenizers_size_is_the_default(tokenizer):
    model = build_model(ModelConfig(preset="pythia-tiny", overrides={"vocab_size": len(tokenizer)}), tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


@pytest.mark.parametrize("given", [64, "512"])
def test_a_vocab_size_smaller_than_the_tokenizer_or_not_a_number_is_a_config_error(given, tokenizer):
    with pytest.raises(ConfigError, match=r"^field 'model\.overrides\.vocab_size': ") as raised:
        build_model(ModelConfig(preset="llama-tiny", overrides={"vocab_size": given}), tokenizer)
    assert "\n" not in str(raised.value)
    if given == 64:
        assert f"smaller than the tokenizer's {len(tokenizer)} tokens" in str(raised.value)
