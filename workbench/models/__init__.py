"""Model factory: tiny presets built from configs, or any HF causal or encoder-decoder LM by hub name or path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from workbench.errors import CheckpointError, ConfigError
from workbench.models.lora import (
    adapter_base,
    apply_lora,
    attach_adapter,
    is_adapter_checkpoint,
    set_loraplus_lr_ratio,
)
from workbench.models.moe_model import moe_model_class
from workbench.models.presets import PRESETS, preset_config
from workbench.models.tokenizer import load_or_train_tokenizer, train_bpe_tokenizer
from workbench.sources import looks_like_model_path

if TYPE_CHECKING:  # annotations only: workbench.config imports this package (LoRA options, presets), not the reverse
    from workbench.config import ModelConfig

__all__ = ["PRESETS", "build_model", "is_encoder_decoder", "model_class", "load_tokenizer", "load_or_train_tokenizer",
           "load_trained_model", "train_bpe_tokenizer"]


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


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, added_tokens: int = 0) -> PreTrainedModel | PeftModel:
    """A fresh preset sized to `tokenizer`, or the pretrained model at `cfg.name_or_path` (safetensors; a
    LoRA checkpoint is merged into its base); with `cfg.lora`, that model with LoRA adapters (a PeftModel,
    marked for LoRA+ by `cfg.loraplus_lr_ratio`).

    `added_tokens`: how many tokens methods added to the pretrained tokenizer (`Method.prepare_tokenizer`); the
    embeddings grow to fit them (new rows initialised to the mean of the old ones, transformers' default)."""
    model = _build_base_model(cfg, tokenizer, added_tokens)
    if cfg.lora is None:
        return model
    model = apply_lora(model, cfg.lora)
    set_loraplus_lr_ratio(model, cfg.loraplus_lr_ratio)
    return model


def _build_base_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, added_tokens: int) -> PreTrainedModel:
    if cfg.name_or_path is None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
        config = preset_config(cfg.preset, len(tokenizer), special, **cfg.overrides)
        return model_class(config).from_config(config)
    _check_local(cfg.name_or_path, "model.name_or_path")
    if is_adapter_checkpoint(cfg.name_or_path):  # e.g. a LoRA run as the base of the next stage
        return _fit_vocabulary(load_trained_model(cfg.name_or_path, merge=True).train(), cfg, tokenizer, added_tokens)
    try:
        options = {"dtype": torch.float32, **cfg.overrides}  # fp32 weights; mixed precision is the run's choice
        config = _pretrained_config(cfg)  # a converted SMoE model (config.smoe) loads as converted: models.moe_model
        model = moe_model_class(model_class(config), config).from_pretrained(
            cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, **options
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{cfg.name_or_path}' could not be loaded: {str(err).splitlines()[0]}") from None
    return _fit_vocabulary(model, cfg, tokenizer, added_tokens)


def _fit_vocabulary(model: PreTrainedModel, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                    added_tokens: int) -> PreTrainedModel:
    """Check the tokenizer fits the pretrained embeddings, and grow them for tokens methods added."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) - added_tokens > rows:
        raise ConfigError(
            f"tokenizer '{cfg.tokenizer or cfg.name_or_path}' has {len(tokenizer) - added_tokens} tokens but model "
            f"'{cfg.name_or_path}' has only {rows} embedding rows: use the model's own tokenizer"
        )
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
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
    if looks_like_model_path(source) and not Path(source).expanduser().exists():
        raise ConfigError(f"field '{field}': path '{source}' not found")


def load_trained_model(checkpoint: str | Path, dtype: torch.dtype | str | None = None, device_map: str | None = None,
                       merge: bool = False, auto_class: type | None = None) -> PreTrainedModel | PeftModel:
    """A trained model from `checkpoint` (no remote code, safetensors only), in eval mode: a full model
    (model.safetensors), or an adapter (adapter_config.json) on the base model it names, merged into it when
    `merge`. `dtype` and `device_map` go to `from_pretrained` (default: the dtype saved, on CPU); `auto_class`
    (e.g. AutoModelForCausalLM) builds it, by default the one `model_class` picks for its config.

    Raises CheckpointError when the weights do not fit the architecture (a missing or mis-shaped weight, which
    transformers would otherwise initialise afresh with only a warning) or an adapter's base model is missing."""
    checkpoint = Path(checkpoint)
    if not is_adapter_checkpoint(checkpoint):
        return _load_full_model(checkpoint, dtype, device_map, auto_class)
    base = adapter_base(checkpoint)
    if looks_like_model_path(base) and not Path(base).expanduser().exists():
        raise CheckpointError(f"checkpoint '{checkpoint}': its base model '{base}' (base_model_name_or_path in "
                              f"adapter_config.json) not found")
    model = attach_adapter(_load_full_model(base, dtype, device_map, auto_class, adapter=checkpoint), checkpoint)
    return (model.merge_and_unload() if merge else model).eval()


def _load_full_model(source: str | Path, dtype: torch.dtype | str | None, device_map: str | None,
                     auto_class: type | None, adapter: Path | None = None) -> PreTrainedModel:
    """The model at `source` with every weight loaded from its safetensors, or CheckpointError."""
    what = f"checkpoint '{adapter}': base model '{source}'" if adapter else f"checkpoint '{source}'"
    options: dict = {"trust_remote_code": False, "use_safetensors": True, "output_loading_info": True,
                     "ignore_mismatched_sizes": True}  # mismatches are reported below, by name
    if dtype is not None:
        options["dtype"] = dtype
    if device_map is not None:
        options["device_map"] = device_map
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
        model, info = moe_model_class(auto_class or model_class(config), config).from_pretrained(str(source), **options)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{what} could not be loaded: {str(err).strip().splitlines()[0]}") from None
    if info["mismatched_keys"]:
        key, saved, expected = min(info["mismatched_keys"])
        raise CheckpointError(f"{what} does not fit the model: {len(info['mismatched_keys'])} weights have other "
                              f"shapes, e.g. '{key}' {tuple(saved)} vs {tuple(expected)}")
    if info["missing_keys"]:
        raise CheckpointError(f"{what} does not fit the model: {len(info['missing_keys'])} weights are missing, "
                              f"e.g. '{min(info['missing_keys'])}'")
    return model.eval()
