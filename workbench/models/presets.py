"""Tiny model presets, built from transformers configs: Pythia-shaped (GPT-NeoX), Llama-shaped, Mixtral-shaped
(dense and MoE) and T5-shaped (encoder-decoder, for the span-corruption objective).

Sizes are given for a 2,048-token vocabulary; `vocab_size` is set from the tokenizer, or padded beyond it by
`model.overrides.vocab_size`.
"""

from __future__ import annotations

from typing import Any

from transformers import GPTNeoXConfig, LlamaConfig, MixtralConfig, PretrainedConfig, T5Config

# name -> (config class, fields). Parameter counts with a 2,048-token vocabulary in the comments.
PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "pythia-tiny": (  # ~0.9M parameters: d 128, 2 layers
        GPTNeoXConfig,
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
    ),
    "pythia-small": (  # ~4.2M parameters: d 256, 4 layers
        GPTNeoXConfig,
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024),
    ),
    "pythia-medium": (  # ~21M parameters: d 512, 6 layers
        GPTNeoXConfig,
        dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    ),
    "llama-tiny": (  # ~0.8M parameters: d 128, 2 layers, grouped-query attention
        LlamaConfig,
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=352),
    ),
    "llama-small": (  # ~3.7M parameters: d 256, 4 layers
        LlamaConfig,
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=704),
    ),
    "mixtral-tiny": (  # ~1.0M parameters: 4 experts of width 256, top-1 (the MoE side of a dense/MoE pair)
        MixtralConfig,
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, num_local_experts=4, num_experts_per_tok=1),
    ),
    "mixtral-dense-tiny": (  # ~1.0M parameters: the same model with one expert of width 4 x 256 (dense FFN)
        MixtralConfig,
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1024, num_local_experts=1, num_experts_per_tok=1),
    ),
    "mixtral-dense-active-tiny": (  # ~0.56M parameters: one expert of width 256, the MoE's active parameters per token
        MixtralConfig,
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, num_local_experts=1, num_experts_per_tok=1),
    ),
    "t5-tiny": (  # ~1.2M parameters: d 128, 2 encoder + 2 decoder layers (train with data.objective span_corruption)
        T5Config,
        dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4),
    ),
}

_SHARED: dict[type[PretrainedConfig], dict[str, Any]] = {
    GPTNeoXConfig: dict(
        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        attention_dropout=0.0, hidden_dropout=0.0,
    ),
    LlamaConfig: dict(max_position_embeddings=2048, tie_word_embeddings=True, attention_dropout=0.0),
    MixtralConfig: dict(max_position_embeddings=2048, tie_word_embeddings=True, attention_dropout=0.0,
                        router_jitter_noise=0.0, sliding_window=None),
    T5Config: dict(dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True, n_positions=2048),
}


def check_overrides(name: str, overrides: dict[str, Any]) -> None:
    """Raise ConfigError for an override that is not a field of the preset's config class."""
    from workbench.errors import ConfigError, did_you_mean

    config_class, fields = PRESETS[name]
    known = config_class().to_dict()
    for key in overrides:
        if key not in known:
            raise ConfigError(
                f"field 'model.overrides.{key}': not a {config_class.__name__} field{did_you_mean(key, known)}"
            )


def preset_config(name: str, tokenizer_size: int, special_ids: dict[str, int], /,
                  **overrides: Any) -> PretrainedConfig:
    """The transformers config of preset `name`, its vocabulary the tokenizer's `tokenizer_size` tokens, with
    `overrides` applied; `overrides["vocab_size"]` (`model.overrides.vocab_size`) may pad the embeddings beyond the
    tokenizer (e.g. to a multiple of 64, for faster matrix products) but not cut them below it (`vocabulary_size`)."""
    check_overrides(name, overrides)
    config_class, fields = PRESETS[name]
    if config_class is T5Config:  # T5 starts decoding from the pad token and has no BOS
        special_ids = {"pad_token_id": special_ids.get("pad_token_id"), "eos_token_id": special_ids.get("eos_token_id"),
                       "decoder_start_token_id": special_ids.get("pad_token_id")}
    vocab_size = vocabulary_size(tokenizer_size, overrides.get("vocab_size"))
    return config_class(**{**_SHARED[config_class], **fields, **special_ids, **overrides, "vocab_size": vocab_size})


def vocabulary_size(tokenizer_size: int, override: int | None) -> int:
    """The embedding rows of a preset: the tokenizer's size, or `model.overrides.vocab_size` when given, which must
    be at least the tokenizer's size (a token id at or past it would have no embedding); ConfigError otherwise."""
    from workbench.errors import ConfigError

    if override is None:
        return tokenizer_size
    if not isinstance(override, int) or isinstance(override, bool):
        raise ConfigError(f"field 'model.overrides.vocab_size': {override!r} is not a whole number of tokens")
    if override < tokenizer_size:
        raise ConfigError(f"field 'model.overrides.vocab_size': {override!r} is smaller than the tokenizer's "
                          f"{tokenizer_size} tokens; give at least {tokenizer_size} (more pads the embeddings) "
                          "or leave it out")
    return override
