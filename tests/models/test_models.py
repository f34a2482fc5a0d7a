"""Tokenizer training and reload; presets; model save and reload; no remote code by default."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.config import ModelConfig
from workbench.errors import ConfigError
from workbench.models import PRESETS, build_model, load_tokenizer, train_bpe_tokenizer
from workbench.models.tokenizer import load_or_train_tokenizer

TEXTS = [f"Velmora Tash number {i} was born in Ostrel and plays the lute {i % 5} times." for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, 400)


def test_tokenizer_round_trips_and_reloads(tmp_path, tokenizer):
    text = "Velmora Tash was born in Ostrel. Zyx!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 400 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text)["input_ids"] == ids and again.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_cache_trains_once(tmp_path):
    first = load_or_train_tokenizer(tmp_path / "t", TEXTS, 300)
    second = load_or_train_tokenizer(tmp_path / "t", iter(()), 300)  # would fail to train on nothing new
    assert first.get_vocab() == second.get_vocab()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_with_the_tokenizer_vocabulary(preset, tokenizer):
    model = build_model(ModelConfig(preset=preset), tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    n = model.num_parameters()
    assert 5e4 < n < 3e7, n  # with this small vocabulary; about 1M-30M with 2k-8k tokens


def test_model_saves_and_reloads_identically(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="llama-tiny"), tokenizer).eval()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    reloaded = build_model(ModelConfig(name_or_path=str(tmp_path / "m"), preset=None), load_tokenizer(
        ModelConfig(name_or_path=str(tmp_path / "m"), preset=None))).eval()
    ids = torch.tensor([tokenizer("Velmora Tash was born")["input_ids"]])
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_no_remote_code_unless_asked(tmp_path, tokenizer, monkeypatch):
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    build_model(ModelConfig(preset="pythia-tiny"), tokenizer).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    build_model(ModelConfig(name_or_path=str(tmp_path / "m"), preset=None), tokenizer)
    assert seen["trust_remote_code"] is False


def test_missing_local_model_is_a_config_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="not found"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "nothing-here")), tokenizer)


def test_moe_and_dense_pair_have_matching_ffn_parameters(tokenizer):
    def ffn(model):
        return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)

    moe = build_model(ModelConfig(preset="mixtral-tiny"), tokenizer)
    dense = build_model(ModelConfig(preset="mixtral-dense-tiny"), tokenizer)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 1
    assert abs(ffn(moe) - ffn(dense)) / ffn(dense) < 0.05
    assert abs(moe.num_parameters() - dense.num_parameters()) / dense.num_parameters() < 0.05


def test_active_parameters_count_only_the_experts_a_token_uses(tokenizer):
    from workbench.models.flops import active_parameters

    moe = build_model(ModelConfig(preset="mixtral-tiny"), tokenizer)
    dense = build_model(ModelConfig(preset="mixtral-dense-tiny"), tokenizer)
    config = moe.config
    # by hand: per layer the 4 experts hold 3 * hidden * width weights each; top-1 uses one of them
    experts = config.num_hidden_layers * config.num_local_experts * 3 * config.hidden_size * config.intermediate_size
    # non-embedding parameters + the tied output head (its matmul runs) = every parameter, less unused experts
    assert active_parameters(dense) == dense.num_parameters()
    assert active_parameters(moe) == moe.num_parameters() - experts * 3 // 4
    pythia = build_model(ModelConfig(preset="pythia-tiny"), tokenizer)  # untied head: counted as a Linear
    assert active_parameters(pythia) == pythia.num_parameters(exclude_embeddings=True)
