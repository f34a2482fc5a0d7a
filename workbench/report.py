"""What `launch/train.py` prints: where a finished run's files went and what to run next, the resolved config
of a dry run, and the presets, methods and DeepSpeed configs that exist (`--list`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from workbench.bundled import builtin_name, configs_dir
from workbench.checkpoints import list_checkpoints
from workbench.config import ExperimentConfig, config_yaml
from workbench.layout import METRICS, RUN_CONFIG, TENSORBOARD_DIR, TOKENIZER_DIR

LIST_KINDS = ("presets", "methods", "deepspeed")


def print_run_summary(result, config_path: str, overrides: list[str] | None = None) -> None:
    """Where the run's files went, and the commands that continue it or repeat it on two ranks."""
    run = result.run_dir
    kept = " ".join(f"--set {o}" for o in overrides or [] if not o.startswith(("training.max_steps=", "name=")))
    again = f"{config_path} {kept}".strip()
    checkpoints = list_checkpoints(run)
    ppl = f" (perplexity {math.exp(result.eval_loss):.2f})" if result.eval_loss is not None else ""
    accuracy = getattr(result, "eval_accuracy", None)
    if accuracy is not None:  # a classifier: NLL per text, no perplexity
        ppl = f", accuracy {accuracy:.4f}"
    lines = [
        "",
        f"Finished {run.name}: {result.global_step} steps in {result.precision}, "
        f"train loss {result.train_loss:.4f}"
        + (f", validation NLL {result.eval_loss:.4f}{ppl}" if result.eval_loss is not None else ""),
        f"  config        {run / RUN_CONFIG}",
        f"  metrics       {run / METRICS}  (one JSON line per logging step)",
        f"  checkpoints   {', '.join(c.name for c in checkpoints)}  in {run}/",
        f"  tokenizer     {run / TOKENIZER_DIR}",
        f"  tensorboard   tensorboard --logdir {run / TENSORBOARD_DIR}",
        "Next:",
        *([f"  python launch/eval.py {run}   # evaluate every checkpoint (BOSE styles, Kendall-tau stability)"]
          if result.objective == "causal" else []),  # the evaluator scores causal LMs
        f"  deepspeed launch/train.py {again} --set name={run.name} --resume "
        f"--set training.max_steps={2 * result.global_step}   # train further",
        f"  deepspeed --num_gpus 2 launch/train.py {again} --set name={run.name}-2ranks   # the same on two ranks",
        *([f"  python launch/merge.py {run} --out {run}-merged   # LoRA adapters merged into the base: one model"]
          if checkpoints and (checkpoints[-1] / "adapter_config.json").is_file() else []),
    ]
    print("\n".join(lines))


def resolved_config_text(cfg: ExperimentConfig, config_path: str, overrides: list[str] | None = None) -> str:
    """The resolved config as YAML (which `load_config` reads back), headed by comments giving the absolute
    run folder and data cache; `precision: auto` is marked as decided when the run starts."""
    text = config_yaml(cfg)
    if cfg.precision == "auto":
        rule = ExperimentConfig.model_fields["precision"].description
        text = re.sub(r"^precision: auto$", f"precision: auto  # decided at start ({rule})", text, flags=re.M)
    command = " ".join([config_path, *(f"--set {o}" for o in overrides or [])])
    header = [
        f"# {command}: resolved by --dry-run (nothing was run or written)",
        f"# run folder: {cfg.run_dir}",
        f"# data cache: {Path(cfg.data.cache_dir).expanduser().absolute()}",
    ]
    return "\n".join(header) + "\n" + text


def listing(kind: str) -> str:
    """What `launch/train.py --list <kind>` prints: the presets, methods or DeepSpeed configs that exist."""
    return {"presets": _list_presets, "methods": _list_methods, "deepspeed": _list_deepspeed}[kind]()


def _list_presets(vocab_size: int = 2048) -> str:
    import torch

    from workbench.models import model_class
    from workbench.models.presets import PRESETS, preset_config

    lines = [f"presets (model.preset), parameters with a {vocab_size:,}-token vocabulary:"]
    for name in PRESETS:
        config = preset_config(name, vocab_size, {})
        with torch.device("meta"):  # shapes only: nothing allocated or initialised
            parameters = model_class(config).from_config(config).num_parameters()
        kind = type(config).__name__.removesuffix("Config")
        lines.append(f"  {name:<20} {kind:<8} {parameters / 1e6:6.2f}M")
    return "\n".join(lines)


def _option(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"{field.name}={field.default!r}"
    if field.default_factory is not dataclasses.MISSING:
        return f"{field.name}={field.default_factory()!r}"
    return f"{field.name} (required)"


def _list_methods() -> str:
    from workbench.methods import available_methods

    lines = ["methods (methods: {<name>: {<option>: <value>}}), with their options and defaults:"]
    for name, cls in available_methods().items():
        options = ", ".join(_option(f) for f in dataclasses.fields(cls.Config)) or "(no options)"
        lines.append(f"  {name:<20} {options}")
    return "\n".join(lines)


def _list_deepspeed() -> str:
    folder = configs_dir() / "deepspeed"  # the built-in ones, named configs/deepspeed/<file>
    lines = ["DeepSpeed configs (deepspeed: <file>; null runs without DeepSpeed):"]
    paths = sorted(folder.glob("*.json"))
    width = max((len(builtin_name(path)) for path in paths), default=0)
    for path in paths:
        try:
            zero = json.loads(path.read_text()).get("zero_optimization", {})
            what = f"ZeRO stage {zero.get('stage', 0)}"
            what += "".join(f", {part} offloaded to {zero[key].get('device', '?')}"
                            for part, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
                            if isinstance(zero.get(key), dict) and zero[key].get("device", "none") != "none")
            if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
                what += ", checkpoints saved as ZeRO shards"
        except (OSError, ValueError, AttributeError) as err:
            what = f"unreadable: {err}"
        lines.append(f"  {builtin_name(path):<{width}}  {what}")
    return "\n".join(lines)
