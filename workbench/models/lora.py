"""LoRA adapters via PEFT: the `model.lora` options, the adapted model, the LoRA+ optimizer, adapter loading.

`model.lora` takes `peft.LoraConfig` fields by name (`{}` gives the defaults below); rsLoRA and DoRA are one
option each (`use_rslora: true`, `use_dora: true`). `model.loraplus_lr_ratio` trains `lora_B` (and 1-D
adapter parameters such as DoRA magnitudes) at that multiple of the learning rate (LoRA+).

    model = apply_lora(model, {"r": 16, "use_dora": True})      # a PeftModel; only the adapters train
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

from workbench.deepspeed_json import LORAPLUS_UNDER_DEEPSPEED_OPTIMIZER, deepspeed_defines_optimizer
from workbench.errors import CheckpointError, ConfigError, did_you_mean

LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")  # by the model: decoder-only or encoder-decoder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADDED_ROWS = "added_token_embeddings.safetensors"  # `AddedTokenRows` of an adapter trained with added tokens
LORAPLUS_ATTRIBUTE = "workbench_loraplus_lr_ratio"  # set on the PeftModel by `build_model`

# LoraConfig fields PEFT or the workbench sets.
MANAGED_LORA_FIELDS = {
    "peft_type": "always LORA",
    "base_model_name_or_path": "PEFT records 'model.name_or_path'",
    "revision": "PEFT records the base model's revision",
    "inference_mode": "adapters are trained; evaluation loads them for inference",
    "auto_mapping": "set by PEFT",
    "peft_version": "set by PEFT",
}
# Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or need a pass over
# data (EVA): a checkpoint holds only the adapter, which would not fit the unchanged base model it names.
BASE_CHANGING_INITS = re.compile(r"^(pissa.*|olora|corda.*|loftq|lora_ga|eva)$", re.IGNORECASE)


@functools.cache
def _lora_field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(LoraConfig) if f.init}


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Union:  # sorted: typing caches equal unions in either order
        args = typing.get_args(annotation)
        names = sorted(_type_name(arg) for arg in args if arg is not type(None))
        return " | ".join(names + (["None"] if type(None) in args else []))
    if annotation is type(None):
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _dataclass_in(annotation: Any) -> type | None:
    """The options dataclass a field takes (e.g. LoftQConfig in `LoftQConfig | dict`), if any."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _typed_value(key: str, value: Any) -> Any:
    """`value` checked against the LoraConfig field `key`; ValueError('[lora.key] ...') naming the field."""
    types = _lora_field_types()
    if key in MANAGED_LORA_FIELDS:
        raise ValueError(f"[lora.{key}] is set by the workbench: {MANAGED_LORA_FIELDS[key]}")
    if key not in types:
        raise ValueError(f"[lora.{key}] is not a LoraConfig field{did_you_mean(key, types)}")
    if key == "task_type" and value not in TASK_TYPES:
        raise ValueError(f"[lora.{key}] must be one of {', '.join(TASK_TYPES)} (got {value!r})")
    options_class = _dataclass_in(types[key])
    if options_class is not None and isinstance(value, dict):  # unknown keys too, which pydantic would drop
        from workbench.options import dataclass_options

        value = dataclass_options(f"lora.{key}", options_class, value)
    try:
        typed = pydantic.TypeAdapter(types[key]).validate_python(value)
    except pydantic.ValidationError as err:
        errors = err.errors()
        message = errors[0]["msg"] if len(errors) == 1 else f"expected {_type_name(types[key])}"
        raise ValueError(f"[lora.{key}] {message} (got {value!r})") from None
    if key == "r" and typed < 1:
        raise ValueError(f"[lora.{key}] must be at least 1 (got {value!r})")
    if key == "lora_dropout" and not 0.0 <= typed < 1.0:
        raise ValueError(f"[lora.{key}] must be in [0, 1) (got {value!r})")
    if key == "init_lora_weights" and isinstance(typed, str) and BASE_CHANGING_INITS.match(typed):
        raise ValueError(
            f"[lora.{key}] '{typed}' rewrites the base weights or needs a pass over data, so an adapter checkpoint "
            f"would not fit its base model; use true, 'gaussian', 'orthogonal' or 'mica' (got {value!r})"
        )
    return typed


def _checked(options: dict[str, Any]) -> tuple[dict[str, Any], LoraConfig]:
    """`options` over `LORA_DEFAULTS`, each typed, and their `LoraConfig`; ValueError('[lora.field] ...')."""
    typed = {key: _typed_value(key, value) for key, value in {**LORA_DEFAULTS, **options}.items()}
    try:
        return typed, LoraConfig(**typed)
    except (TypeError, ValueError) as err:  # LoraConfig's own checks of option combinations
        raise ValueError(f"[lora] {str(err).strip().splitlines()[0]}") from None


def lora_config(options: dict[str, Any]) -> LoraConfig:
    """The `LoraConfig` of `options` over `LORA_DEFAULTS`; ValueError('[lora.field] ...') for a bad option."""
    return _checked(options)[1]


def validate_lora_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the defaults filled in, as plain YAML values, once `LoraConfig` accepted them."""
    typed, _ = _checked(options)
    types = _lora_field_types()
    return {key: pydantic.TypeAdapter(types[key]).dump_python(value, mode="json") for key, value in typed.items()}


def _config_error(err: ValueError) -> ConfigError:
    """'[lora.r] message' -> ConfigError("field 'model.lora.r': message")."""
    field, _, message = str(err).removeprefix("[").partition("] ")
    return ConfigError(f"field 'model.{field}': {message}")


def apply_lora(model: PreTrainedModel, options: dict[str, Any]) -> PeftModel:
    """`model` with LoRA adapters from `options` (LoraConfig fields); only the adapters are trainable.

    The task type follows the model (CAUSAL_LM, or SEQ_2_SEQ_LM for an encoder-decoder) unless given."""
    kind = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    try:
        config = lora_config({"task_type": kind, **options})
    except ValueError as err:
        raise _config_error(err) from None
    if config.task_type != kind:
        model_kind = "an encoder-decoder" if model.config.is_encoder_decoder else "a decoder-only"
        raise ConfigError(f"field 'model.lora.task_type': '{config.task_type}' does not fit {model_kind} model; "
                          f"use '{kind}' or leave it out")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules the model does not have
        message = str(err).strip().splitlines()[0]
        if "ParamWrapper" in message and "lora_dropout" in message:  # transformers 5 MoE experts: 3-D parameters
            raise ConfigError(f"field 'model.lora.lora_dropout': this model's experts are adapted as parameters, "
                              f"which PEFT cannot do with dropout; set lora_dropout: 0 ({message})") from None
        field = "model.lora.target_modules" if "target modules" in message.lower() else "model.lora"
        raise ConfigError(f"field '{field}': {message}") from None


def set_loraplus_lr_ratio(model: PeftModel, ratio: float | None) -> None:
    """Mark `model` for LoRA+ (`workbench.models.features.LoraPlus` reads it)."""
    setattr(model, LORAPLUS_ATTRIBUTE, ratio)


def loraplus_lr_ratio(model: torch.nn.Module) -> float | None:
    """The LoRA+ ratio `build_model` set on `model`, or None for the Trainer's usual optimizer."""
    return getattr(model, LORAPLUS_ATTRIBUTE, None)


def is_lora_model(model: torch.nn.Module) -> bool:
    """Whether `model` carries LoRA adapters (a PEFT model with LoRA layers)."""
    from peft.tuners.lora import LoraLayer

    return isinstance(model, PeftModel) and any(isinstance(m, LoraLayer) for m in model.modules())


class _GroupsOnly:
    """Stands in for an optimizer class: keeps the parameter groups it is given (see `loraplus_param_groups`)."""

    def __init__(self, params: list[dict[str, Any]], **options: Any) -> None:
        self.param_groups = params


def loraplus_param_groups(model: torch.nn.Module, lr: float, lr_ratio: float,
                          weight_decay: float) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups exactly as `peft.optimizers.create_loraplus_optimizer` builds them: `lora_B`
    and 1-D parameters at `lr_ratio` x `lr`, LoRA embeddings at peft's embedding rate, the rest at `lr`."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, _GroupsOnly, lr=lr, loraplus_lr_ratio=lr_ratio,
                                     loraplus_weight_decay=weight_decay).param_groups


def loraplus_groups(model: torch.nn.Module, groups: list[dict[str, Any]], lr_ratio: float,
                    args: TrainingArguments) -> list[dict[str, Any]]:
    """The `param_groups` hook of LoRA+: the Trainer's groups regrouped by `loraplus_param_groups` (every
    parameter the Trainer optimises, at LoRA+'s rate and `args.weight_decay`)."""
    optimised = {id(p) for group in groups for p in group["params"]}
    regrouped = loraplus_param_groups(model, args.learning_rate, lr_ratio, args.weight_decay)
    regrouped = [{**group, "params": [p for p in group["params"] if id(p) in optimised]} for group in regrouped]
    if sum(len(group["params"]) for group in regrouped) != len(optimised):
        raise ValueError("LoRA+: the optimizer trains parameters the model does not list as trainable")
    return regrouped


def check_loraplus_optimizer(args: TrainingArguments, existing: torch.optim.Optimizer | None = None) -> None:
    """ConfigError where LoRA+ cannot set its rates: DeepSpeed's placeholder for an optimizer its JSON config
    defines (which would train every parameter at one rate), or an optimizer that builds its own groups."""
    from accelerate.utils import DummyOptim
    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    config = args.deepspeed
    defines = "optimizer" in config if isinstance(config, dict) else bool(config) and deepspeed_defines_optimizer(config)
    if isinstance(existing, DummyOptim) or defines:
        raise ConfigError(LORAPLUS_UNDER_DEEPSPEED_OPTIMIZER)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise ConfigError(f"field 'model.loraplus_lr_ratio': LoRA+ needs an optimizer over parameter groups, "
                          f"and 'training.optim' {args.optim!r} builds its own; use e.g. 'adamw_torch'")


def loraplus_optimizer(model: PeftModel, args: TrainingArguments, lr_ratio: float,
                       existing: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """A LoRA+ optimizer for anyone's `Trainer` (`optimizers=(loraplus_optimizer(...), None)`): the optimizer
    class and options `args` give the Trainer over `loraplus_param_groups`. `existing`: an optimizer built
    before is kept; DeepSpeed's placeholder is a ConfigError (`check_loraplus_optimizer`)."""
    from transformers import Trainer

    check_loraplus_optimizer(args, existing)
    if existing is not None:
        return existing
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr")
    return optimizer_cls(loraplus_param_groups(model, lr, lr_ratio, args.weight_decay), lr=lr, **kwargs)


def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter (adapter_config.json) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(checkpoint: str | Path) -> str:
    """The base model an adapter checkpoint names (`base_model_name_or_path`); CheckpointError if none."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(checkpoint))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{checkpoint}': {ADAPTER_CONFIG} could not be read: "
                              f"{str(err).strip().splitlines()[0]}") from None
    if not config.base_model_name_or_path:
        raise CheckpointError(f"checkpoint '{checkpoint}': {ADAPTER_CONFIG} names no base model "
                              f"(base_model_name_or_path is missing); the adapter cannot be loaded")
    return config.base_model_name_or_path


def attach_adapter(base: PreTrainedModel, checkpoint: str | Path) -> PeftModel:
    """`base` with the adapter of `checkpoint` (safetensors only) for inference, its embeddings first grown to the
    vocabulary the adapter was trained with (`grow_to_adapter_vocabulary`); CheckpointError when the adapter does
    not fit the base model (a missing, extra or mis-shaped adapter weight)."""
    weights = Path(checkpoint) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint '{checkpoint}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    grow_to_adapter_vocabulary(base, Path(checkpoint))
    try:
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatches, target modules not in the base
        raise CheckpointError(f"checkpoint '{checkpoint}': the adapter does not fit its base model: "
                              f"{str(err).strip().splitlines()[0]}") from None
    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    optional = set(get_peft_model_state_dict(model, save_embedding_layers=True)) - expected  # PEFT's "auto"
    for keys, what in ((expected - saved, "lacks"), (saved - expected - optional, "has extra")):
        if keys:
            raise CheckpointError(f"checkpoint '{checkpoint}': the adapter does not fit its base model: "
                                  f"{ADAPTER_WEIGHTS} {what} {len(keys)} weights, e.g. '{min(keys)}'")
    return model


# ----------------------------------------------------------------------------------------------------------
# Tokens added to a pretrained vocabulary: their embedding rows, which LoRA leaves frozen and does not save
# ----------------------------------------------------------------------------------------------------------


def _embedding_weights(model: PreTrainedModel) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None]:
    """The input embedding matrix and the output one when it is a weight of its own (None when tied)."""
    input_weight = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    return input_weight, (output.weight if output is not None and output.weight is not input_weight else None)


@dataclasses.dataclass(frozen=True)
class AddedTokenRows:
    """The embedding rows of tokens a run added to its pretrained base's vocabulary (Masked Thought's `<mask>`),
    as the run trained them: the input embedding's rows and, untied, the output embedding's. A LoRA adapter
    holds neither (the embeddings are frozen base weights, and under ZeRO-3 the Trainer saves no frozen weight),
    so each adapter checkpoint of such a run carries them in `ADDED_ROWS`; the trained model is then

        base grown to `rows` embedding rows;  E_in[token_ids] = input;  E_out[token_ids] = output (untied)

    plus the adapter (`attach_adapter` does both)."""

    token_ids: tuple[int, ...]
    rows: int  # embedding rows of the trained model (at least its tokenizer's size)
    input: torch.Tensor  # [len(token_ids), hidden], in the training dtype
    output: torch.Tensor | None  # the same rows of an untied output embedding; None when tied

    @classmethod
    def of(cls, model: PreTrainedModel, token_ids: list[int]) -> AddedTokenRows:
        """The rows `token_ids` of `model`'s embeddings, copied to CPU; under ZeRO-3 a collective (every rank
        gathers one embedding matrix at a time)."""
        from workbench.distributed import gathered_parameters

        copies = []
        for weight in _embedding_weights(model):
            if weight is None:
                copies.append(None)
                continue
            with torch.no_grad(), gathered_parameters([weight]):
                copies.append(weight[list(token_ids)].detach().to("cpu", copy=True))
                rows = weight.shape[0]
        return cls(tuple(token_ids), rows, copies[0], copies[1])

    def save(self, folder: Path) -> None:
        """Write `ADDED_ROWS` into `folder` (a checkpoint)."""
        from safetensors.torch import save_file

        tensors = {"token_ids": torch.tensor(self.token_ids, dtype=torch.int64), "input": self.input.contiguous()}
        if self.output is not None:
            tensors["output"] = self.output.contiguous()
        save_file(tensors, str(folder / ADDED_ROWS), metadata={"rows": str(self.rows)})

    @classmethod
    def load(cls, folder: Path) -> AddedTokenRows | None:
        """The rows `folder` holds in `ADDED_ROWS`, or None when it has none; CheckpointError when unreadable."""
        path = folder / ADDED_ROWS
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                rows = int(handle.metadata()["rows"])
            return cls(tuple(tensors["token_ids"].tolist()), rows, tensors["input"], tensors.get("output"))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint '{folder}': {ADDED_ROWS} could not be read: {err}") from None

    def write_into(self, model: PreTrainedModel, what: str) -> None:
        """Write the rows into `model`, whose embeddings have `rows` rows (in its dtype; under ZeRO-3 a
        collective). CheckpointError (naming `what`) when the model's output embedding is tied and these rows
        are not, or the other way round."""
        from workbench.distributed import gathered_parameters

        weights = _embedding_weights(model)
        if (weights[1] is None) != (self.output is None):
            tied = "tied" if self.output is None else "untied"
            raise CheckpointError(f"{what}: {ADDED_ROWS} holds rows of {tied} embeddings, the base model's are not")
        index = torch.tensor(self.token_ids, dtype=torch.int64)
        for weight, values in zip(weights, (self.input, self.output), strict=True):
            if weight is not None:
                with torch.no_grad(), gathered_parameters([weight], modify=True):
                    weight.index_copy_(0, index.to(weight.device), values.to(weight))


def _embedding_keys(base: PreTrainedModel) -> list[str]:
    """The adapter-file keys under which PEFT saves `base`'s embedding matrices (`save_embedding_layers`)."""
    embeddings = (base.get_input_embeddings(), base.get_output_embeddings())
    return [f"base_model.model.{name}.weight" for name, module in base.named_modules()
            if any(module is embedding for embedding in embeddings)]


def _saved_embedding_rows(checkpoint: Path, base: PreTrainedModel) -> int:
    """The most rows of an embedding matrix PEFT saved in the adapter file of `checkpoint` (0: none saved)."""
    with safe_open(str(checkpoint / ADAPTER_WEIGHTS), framework="pt") as handle:
        saved = set(handle.keys())
        return max((handle.get_slice(key).get_shape()[0] for key in _embedding_keys(base) if key in saved),
                   default=0)


def grow_to_adapter_vocabulary(base: PreTrainedModel, checkpoint: Path) -> None:
    """Give `base` the embeddings the adapter of `checkpoint` was trained with, as PEFT asks before an adapter
    loads: grown (never shrunk) to the rows its `AddedTokenRows` record, or to those of the embedding matrices
    PEFT saved when the vocabulary grew (`save_embedding_layers="auto"`, which PEFT then loads), and the added
    tokens' rows written in. New rows start unset (no full-vocabulary statistics): every one of them is then
    written. CheckpointError when rows of the grown embeddings would stay unset."""
    added = AddedTokenRows.load(checkpoint)
    saved_rows = _saved_embedding_rows(checkpoint, base)
    current = base.get_input_embeddings().num_embeddings
    rows = max(current, saved_rows, added.rows if added else 0)
    what = f"checkpoint '{checkpoint}'"
    unset = set(range(current, rows)) - set(added.token_ids if added else ()) if saved_rows < rows else set()
    if unset:
        raise CheckpointError(f"{what}: the adapter was trained with {rows} embedding rows, the base model has "
                              f"{current}, and neither {ADDED_ROWS} nor {ADAPTER_WEIGHTS} holds row {min(unset)}")
    if rows > current:
        base.resize_token_embeddings(rows, mean_resizing=False)
    if added is not None:
        added.write_into(base, what)


class AddedTokenRowsCallback(TrainerCallback):
    """Writes `rows` (`AddedTokenRows` of a LoRA run's frozen embeddings) into every checkpoint the Trainer saves:
    `WorkbenchTrainer` calls `save_files` on the process that saves, before it writes the manifest, so a checkpoint
    that is marked complete has them. The rows are frozen, so the copy taken when they were set is the one to
    save: saving gathers nothing."""

    def __init__(self, rows: AddedTokenRows) -> None:
        self.rows = rows

    def save_files(self, checkpoint: Path) -> None:
        self.rows.save(checkpoint)

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        """In another Trainer (which does not call `save_files`): write the rows after the checkpoint."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and checkpoint.is_dir() and not (checkpoint / ADDED_ROWS).is_file():
            self.rows.save(checkpoint)


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """The base model of `model` with its active adapters merged in, one adapted layer at a time:
    W' = W + scaling * B A (or the variant's merge, e.g. DoRA's), computed in fp32 and rounded once to W's dtype.

    Correct under ZeRO-3, where it is a collective (every rank calls it): each layer's base weights are gathered
    whole only while that layer merges, rank 0's result is partitioned again on exit, so beyond its shards no
    process holds more than one full layer (PEFT's `merge_and_unload` on a partitioned model would add the full
    delta to an empty shard). Without ZeRO-3 the gather does nothing. The parameters keep PEFT's frozen flags."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from workbench.distributed import gathered_parameters

    model.base_model._check_merge_allowed()  # e.g. GPTQ-quantised or replicated layers cannot merge
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            weights = list(module.get_base_layer().parameters())
            with torch.no_grad(), gathered_parameters(weights, modify=True), _computed_in_fp32(weights):
                module.merge()
    return model.unload()  # the merged layers replaced by their base layers


@contextlib.contextmanager
def _computed_in_fp32(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block each parameter's `data` is an fp32 copy; on exit its value is rounded once into the
    original tensor, which the parameter holds again (so a ZeRO-3 gather partitions the tensor it made)."""
    originals = [param.data for param in params]
    for param in params:
        param.data = param.data.float()
    try:
        yield
    finally:
        for param, original in zip(params, originals, strict=True):
            original.copy_(param.data)
            param.data = original
