"""Model factory: tiny presets built from configs, or any HF causal or encoder-decoder LM by hub name or path."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from workbench.config import ModelConfig
from workbench.errors import ConfigError
from workbench.models.presets import PRESETS, preset_config
from workbench.models.tokenizer import load_or_train_tokenizer, train_bpe_tokenizer

__all__ = ["PRESETS", "build_model", "is_encoder_decoder", "model_class", "load_tokenizer", "load_or_train_tokenizer", "train_bpe_tokenizer"]


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer the config names (its own field, else the model's), or None to train one on the data."""
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:
        return None
    _check_local(source, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer '{source}' could not be loaded: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh preset sized to `tokenizer`, or the pretrained model at `cfg.name_or_path` (safetensors)."""
    if cfg.name_or_path is None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
        config = preset_config(cfg.preset, len(tokenizer), special, **cfg.overrides)
        return model_class(config).from_config(config)
    _check_local(cfg.name_or_path, "model.name_or_path")
    try:
        model = model_class(_pretrained_config(cfg)).from_pretrained(
            cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, **cfg.overrides
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{cfg.name_or_path}' could not be loaded: {str(err).splitlines()[0]}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"tokenizer '{cfg.tokenizer or cfg.name_or_path}' has {len(tokenizer)} tokens but model "
            f"'{cfg.name_or_path}' has only {rows} embedding rows: use the model's own tokenizer"
        )
    return model


def model_class(config: PretrainedConfig) -> type:
    """The Auto class that builds `config`: seq2seq for encoder-decoder models, causal LM otherwise."""
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def is_encoder_decoder(cfg: ModelConfig) -> bool:
    """Whether the configured model (a preset or a pretrained one) is an encoder-decoder."""
    if cfg.name_or_path is None:
        return bool(PRESETS[cfg.preset][0]().is_encoder_decoder)
    return bool(_pretrained_config(cfg).is_encoder_decoder)


def _pretrained_config(cfg: ModelConfig) -> PretrainedConfig:
    _check_local(cfg.name_or_path, "model.name_or_path")
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{cfg.name_or_path}' could not be loaded: {str(err).splitlines()[0]}") from None


def _check_local(source: str, field: str) -> None:
    """A path-like source that does not exist is a missing file, not a hub name."""
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not Path(source).expanduser().exists():
        raise ConfigError(f"field '{field}': path '{source}' not found")
