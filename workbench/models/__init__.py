"""Model factory: tiny presets built from configs, or any HF causal or encoder-decoder LM by hub name or path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    TrainingArguments,
)

from workbench.checkpoints import (
    is_zero_sharded_checkpoint,
    zero_checkpoint_placeholders,
    zero_consolidated_state_dict,
)
from workbench.errors import CheckpointError, ConfigError
from workbench.models.lora import (
    adapter_base,
    apply_lora,
    attach_adapter,
    is_adapter_checkpoint,
    merge_adapter,
    set_loraplus_lr_ratio,
)
from workbench.models.moe_model import moe_model_class
from workbench.models.presets import PRESETS, preset_config
from workbench.models.tokenizer import load_or_train_tokenizer, train_bpe_tokenizer
from workbench.sources import looks_like_model_path

if TYPE_CHECKING:  # annotations only: workbench.config imports this package (LoRA options, presets), not the reverse
    from workbench.config import ModelConfig

__all__ = ["PRESETS", "build_model", "is_encoder_decoder", "model_class", "load_tokenizer", "load_or_train_tokenizer",
           "load_trained_model", "train_bpe_tokenizer", "training_weights_dtype", "training_weights_dtype_of"]


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


def training_weights_dtype(deepspeed_config: Mapping[str, Any] | None) -> torch.dtype:
    """The dtype a model to be trained is loaded in, given the DeepSpeed config the run trains under (as the
    engine reads it, "auto" values resolved: `TrainingArguments.hf_deepspeed_config.config`; None without
    DeepSpeed). Mixed-precision training needs fp32 master weights for the optimizer to update; who keeps them
    decides:

    - DeepSpeed with `bf16` (or its older name `bfloat16`) or `fp16` enabled: that dtype. The engine casts the
      module to it and keeps the fp32 masters in its optimizer (ZeRO 1-3, and its bf16/fp16 optimizers at
      stage 0), so loading fp32 would only double every rank's host memory before the cast;
    - anything else, fp32: plain `torch.autocast` (bf16/fp16 mixed precision without DeepSpeed, or DeepSpeed's
      own `torch_autocast` mode) computes in half precision but updates the parameters themselves, which must be
      fp32 (a bf16 parameter loses updates below its 8-bit mantissa; fp16 gradients are refused by the scaler).
    """
    if deepspeed_config is None:
        return torch.float32
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        if (deepspeed_config.get(key) or {}).get("enabled") is True:
            return dtype
    return torch.float32


def training_weights_dtype_of(args: TrainingArguments) -> torch.dtype:
    """`training_weights_dtype` of the run `args` configure."""
    return training_weights_dtype(args.hf_deepspeed_config.config if args.deepspeed else None)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, added_tokens: int = 0,
                dtype: torch.dtype = torch.float32) -> PreTrainedModel | PeftModel:
    """A fresh preset sized to `tokenizer`, or the pretrained model at `cfg.name_or_path` loaded in `dtype`
    (`training_weights_dtype`; safetensors, or ZeRO shards; a LoRA checkpoint is merged into its base and every
    parameter of the result trains); with `cfg.lora`, that model with LoRA adapters (a PeftModel, marked for LoRA+
    by `cfg.loraplus_lr_ratio`). A preset is built in fp32 whatever `dtype` (its initial weights are the same in
    every precision; the DeepSpeed engine casts it).

    `added_tokens`: how many tokens methods added to the pretrained tokenizer (`Method.prepare_tokenizer`); the
    embeddings grow to fit them (new rows initialised to the mean of the old ones, transformers' default)."""
    model = _build_base_model(cfg, tokenizer, added_tokens, dtype)
    if cfg.lora is None:
        return model
    model = apply_lora(model, cfg.lora)
    set_loraplus_lr_ratio(model, cfg.loraplus_lr_ratio)
    return model


def _build_base_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, added_tokens: int,
                      dtype: torch.dtype) -> PreTrainedModel:
    if cfg.name_or_path is None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
        config = preset_config(cfg.preset, len(tokenizer), special, **cfg.overrides)
        return model_class(config).from_config(config)
    _check_local(cfg.name_or_path, "model.name_or_path")
    model = _load_pretrained(cfg, cfg.name_or_path, dtype)
    if is_adapter_checkpoint(cfg.name_or_path):  # a LoRA run as the base of the next stage: trained whole again
        model.requires_grad_(True).train()  # (PEFT froze the base it merged into)
    return _fit_vocabulary(model, cfg, tokenizer, added_tokens)


def _load_pretrained(cfg: ModelConfig, source: str, dtype: torch.dtype) -> PreTrainedModel:
    """The pretrained model at `source` (a hub name or a folder; `cfg`'s remote-code choice and overrides) in
    `dtype`: from its weights files, consolidated from ZeRO shards (`_load_zero_sharded`), or for a LoRA
    checkpoint its base with the adapter merged in, in fp32 and under ZeRO-3 layer by layer (`merge_adapter`)."""
    if is_adapter_checkpoint(source):  # its base (itself maybe an adapter), the adapter merged in; named after
        adapter = Path(source)  # the adapter, so that a new adapter on it records this checkpoint as its base
        base = _load_pretrained(cfg, existing_adapter_base(adapter), dtype)
        return _named_after(merge_adapter(attach_adapter(base, adapter)), adapter)
    if is_zero_sharded_checkpoint(source):
        return _load_zero_sharded(Path(source), dtype, None, None)
    try:
        options = {"dtype": dtype, **cfg.overrides}
        config = _pretrained_config(source, cfg.trust_remote_code)  # a converted SMoE model loads as converted
        return moe_model_class(model_class(config), config).from_pretrained(
            source, trust_remote_code=cfg.trust_remote_code, **options
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{source}' could not be loaded: {str(err).splitlines()[0]}") from None


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
    """Whether the configured model (a preset, a pretrained one, or an adapter's base) is an encoder-decoder."""
    if cfg.name_or_path is None:
        return bool(PRESETS[cfg.preset][0]().is_encoder_decoder)
    _check_local(cfg.name_or_path, "model.name_or_path")
    source = cfg.name_or_path
    while is_adapter_checkpoint(source):  # an adapter checkpoint has no config.json: its base model has
        source = existing_adapter_base(Path(source))
    return bool(_pretrained_config(source, cfg.trust_remote_code).is_encoder_decoder)


def architecture(cfg: ModelConfig, auto_class: type | None = None) -> tuple[PretrainedConfig, type]:
    """The config and concrete model class a run's model will have (`auto_class` picks the head; default: causal
    LM or seq2seq as `model_class`), from the preset or the folder's config.json alone: no weights, no tokenizer
    (a preset's vocabulary is left at one row), no data. An adapter checkpoint answers with its base's."""
    if cfg.name_or_path is None:
        config = preset_config(cfg.preset, 1, dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")),
                               **cfg.overrides)
    else:
        _check_local(cfg.name_or_path, "model.name_or_path")
        source = cfg.name_or_path
        while is_adapter_checkpoint(source):
            source = existing_adapter_base(Path(source))
        config = _pretrained_config(source, cfg.trust_remote_code)
        smoe = getattr(config, "smoe", None)
        for key, value in cfg.overrides.items():
            setattr(config, key, value)
        if smoe is not None:
            config.smoe = smoe
    auto = auto_class or model_class(config)
    concrete = auto._model_mapping[type(config)]
    return config, moe_model_class(concrete[0] if isinstance(concrete, (list, tuple)) else concrete, config)


def _pretrained_config(source: str | Path, trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{source}' could not be loaded: {str(err).splitlines()[0]}") from None


def _check_local(source: str, field: str) -> None:
    """A path-like source that does not exist is a missing file, not a hub name."""
    if looks_like_model_path(source) and not Path(source).expanduser().exists():
        raise ConfigError(f"field '{field}': path '{source}' not found")


def existing_adapter_base(checkpoint: Path) -> str:
    """The base model adapter `checkpoint` names (`adapter_base`); CheckpointError when it is a path not found."""
    base = adapter_base(checkpoint)
    if looks_like_model_path(base) and not Path(base).expanduser().exists():
        raise CheckpointError(f"checkpoint '{checkpoint}': its base model '{base}' (base_model_name_or_path in "
                              f"adapter_config.json) not found")
    return base


def load_trained_model(checkpoint: str | Path, dtype: torch.dtype | str | None = None, device_map: str | None = None,
                       merge: bool = False, auto_class: type | None = None) -> PreTrainedModel | PeftModel:
    """A trained model from `checkpoint` (no remote code), in eval mode: a full model (model.safetensors, or
    only DeepSpeed ZeRO shards, consolidated here), or an adapter (adapter_config.json) on the base model it names
    (either form), merged into it when `merge` (in fp32, layer by layer: `merge_adapter`). `dtype` and
    `device_map` go to `from_pretrained` (default: the dtype saved, on CPU); `auto_class` (e.g.
    AutoModelForCausalLM) builds it, by default the one `model_class` picks for its config.

    Raises CheckpointError when the weights do not fit the architecture (a missing or mis-shaped weight, which
    transformers would otherwise initialise afresh with only a warning), ZeRO shards cannot be consolidated, or
    an adapter's base model is missing."""
    checkpoint = Path(checkpoint)
    if not is_adapter_checkpoint(checkpoint):
        return _load_full_model(checkpoint, dtype, device_map, auto_class)
    base = existing_adapter_base(checkpoint)
    model = attach_adapter(_load_full_model(base, dtype, device_map, auto_class, adapter=checkpoint), checkpoint)
    return (merge_adapter(model) if merge else model).eval()


def _load_full_model(source: str | Path, dtype: torch.dtype | str | None, device_map: str | None,
                     auto_class: type | None, adapter: Path | None = None) -> PreTrainedModel:
    """The model at `source` with every weight loaded from its safetensors or ZeRO shards, or CheckpointError;
    an adapter checkpoint (the base of an adapter trained on a merged LoRA run) merged into its own base."""
    if is_adapter_checkpoint(source):
        return _named_after(load_trained_model(source, dtype, device_map, merge=True, auto_class=auto_class), source)
    if is_zero_sharded_checkpoint(source):
        return _load_zero_sharded(Path(source), dtype, device_map, auto_class)
    what = f"checkpoint '{adapter}': base model '{source}'" if adapter else f"checkpoint '{source}'"
    options: dict = {"trust_remote_code": False, "use_safetensors": True}
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
        return _loaded_whole(moe_model_class(auto_class or model_class(config), config), what, str(source),
                             dtype=dtype, device_map=device_map, **options)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{what} could not be loaded: {str(err).strip().splitlines()[0]}") from None


def _load_zero_sharded(checkpoint: Path, dtype: torch.dtype | str | None, device_map: str | None,
                       auto_class: type | None) -> PreTrainedModel:
    """The model of a checkpoint that holds only DeepSpeed ZeRO shards: built from its config.json, its weights
    consolidated from the shards in `dtype` (default: the dtype its config records, else fp32); under ZeRO-3
    only rank 0 consolidates them (the others pass placeholders: `zero_checkpoint_placeholders`). CheckpointError
    when they cannot be consolidated or do not fit the model."""
    what = f"checkpoint '{checkpoint}'"
    try:
        config = AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{what} holds only DeepSpeed ZeRO shards and no readable config.json to build its "
                              f"model from: {str(err).strip().splitlines()[0]}") from None
    if dtype is None:
        dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    from transformers.integrations import is_deepspeed_zero3_enabled

    values_read_elsewhere = is_deepspeed_zero3_enabled() and torch.distributed.get_rank() != 0  # rank 0 reads them
    weights = zero_checkpoint_placeholders if values_read_elsewhere else zero_consolidated_state_dict
    state_dict = weights(checkpoint, dtype)
    try:
        cls = moe_model_class(auto_class or model_class(config), config)
        mapping = getattr(cls, "_model_mapping", None)  # an Auto class needs a name to load from: use the model's
        cls = mapping[type(config)] if mapping is not None else cls
        model = _loaded_whole(cls, what, None, config=config, state_dict=state_dict, dtype=dtype,
                              device_map=device_map)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{what}: its consolidated ZeRO weights could not be loaded: "
                              f"{str(err).strip().splitlines()[0]}") from None
    return _named_after(model, checkpoint)  # loaded from a state dict, it would name no source


def _named_after(model: PreTrainedModel, source: str | Path) -> PreTrainedModel:
    """`model` recording `source` as where it was loaded from (what PEFT writes as an adapter's base model)."""
    model.name_or_path = model.config._name_or_path = str(source)
    return model


def _loaded_whole(cls: type, what: str, source: str | None, **options: Any) -> PreTrainedModel:
    """`cls.from_pretrained(source, **options)` in eval mode, or CheckpointError when a weight is missing or has
    another shape than the architecture's (transformers would initialise it afresh with only a warning)."""
    options = {key: value for key, value in options.items() if value is not None}
    model, info = cls.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True, **options)
    if info["mismatched_keys"]:
        key, saved, expected = min(info["mismatched_keys"])
        raise CheckpointError(f"{what} does not fit the model: {len(info['mismatched_keys'])} weights have other "
                              f"shapes, e.g. '{key}' {tuple(saved)} vs {tuple(expected)}")
    if info["missing_keys"]:
        raise CheckpointError(f"{what} does not fit the model: {len(info['missing_keys'])} weights are missing, "
                              f"e.g. '{min(info['missing_keys'])}'")
    return model.eval()
