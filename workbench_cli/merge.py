"""Merge a LoRA run's adapter into its base model: a plain transformers model folder (safetensors + tokenizer).

    python launch/merge.py runs/lora-run --out merged/lora-run              # the newest complete checkpoint
    python launch/merge.py runs/lora-run/checkpoint-200 --out merged/step200
    workbench merge runs/lora-run --out merged/lora-run                     # the installed command

The adapter is loaded on the base model its adapter_config.json names, in the base model's saved dtype (fp32 when
`--dtype` asks for another); each adapted layer is merged in fp32, one layer at a time (W + B·A·scaling summed in
fp32 and rounded once), and the model is saved in `--dtype` (default: the base model's saved dtype), with the run's
tokenizer (runs/<name>/tokenizer, else the checkpoint's own). A bf16 merged weight still rounds away an update
smaller than its last bit: `--dtype float32` keeps it exactly. The result loads with
`AutoModelForCausalLM.from_pretrained(out)` and no PEFT. Nothing is written on an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.errors import CheckpointError, ConfigError, WorkbenchError
from workbench.layout import TOKENIZER_DIR


def find_adapter_checkpoint(path: Path) -> Path:
    """`path` itself when it is an adapter checkpoint (verified when it has a manifest), else the newest
    complete checkpoint of the run at `path`; CheckpointError when there is none or it holds a full model."""
    from workbench.checkpoints import (
        MANIFEST,
        list_checkpoints,
        newest_complete_checkpoint,
        verify_checkpoint,
    )
    from workbench.models.lora import is_adapter_checkpoint

    if not path.is_dir():
        raise ConfigError(f"'{path}' not found: give a run folder (runs/<name>) or one of its checkpoints")
    if list_checkpoints(path):
        checkpoint = newest_complete_checkpoint(path, report=lambda line: print(line, file=sys.stderr))
        if checkpoint is None:
            raise CheckpointError(f"run '{path}' has no complete checkpoint")
    else:
        checkpoint = path
        if (checkpoint / MANIFEST).is_file():
            verify_checkpoint(checkpoint)
    if not is_adapter_checkpoint(checkpoint):
        raise CheckpointError(f"checkpoint '{checkpoint}' holds no LoRA adapter (no adapter_config.json): "
                              f"its model.safetensors is already a full model")
    return checkpoint


def tokenizer_source(checkpoint: Path) -> Path | None:
    """The run's tokenizer folder (runs/<name>/tokenizer), else the checkpoint when the Trainer saved one there."""
    for folder in (checkpoint.parent / TOKENIZER_DIR, checkpoint):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return None


OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def saved_dtype(model: str | Path):
    """The dtype the model at `model` (a folder or hub name) was saved in, as its config records it; None when
    it records none; CheckpointError when its config cannot be read."""
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"base model '{model}': config.json could not be read: "
                              f"{str(err).strip().splitlines()[0]}") from None
    dtype = getattr(config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def merge(checkpoint: Path, out: Path, dtype: str = "auto") -> Path | None:
    """Write the merged model of adapter `checkpoint` (and its tokenizer) to `out`, atomically, in `dtype`
    (`auto`: the base model's saved dtype); returns the tokenizer folder used, or None when there was none to
    copy.

    The base model loads in its saved dtype when that is the output's, else in fp32; `load_trained_model` merges
    each adapted layer in fp32 and rounds it once into the loaded dtype, which is then cast to the output's (a
    rounding only from fp32)."""
    import torch
    from transformers import AutoTokenizer

    from workbench.io import publish_folder
    from workbench.models import load_trained_model
    from workbench.models.lora import adapter_base

    if dtype == "auto":
        model = load_trained_model(checkpoint, merge=True)
    else:
        wanted = getattr(torch, dtype)
        same = wanted == saved_dtype(adapter_base(checkpoint))
        model = load_trained_model(checkpoint, dtype=None if same else torch.float32, merge=True).to(wanted)
    source = tokenizer_source(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(source)) if source else None

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    if not publish_folder(out, write):
        raise ConfigError(f"--out '{out}' already exists and is not empty")
    return source


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder (runs/<name>) or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged model (must not exist)")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="auto",
                        help="dtype of the merged model (default auto: the base model's saved dtype)")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not (args.out.is_dir() and not any(args.out.iterdir())):
            raise ConfigError(f"--out '{args.out}' already exists and is not empty")
        checkpoint = find_adapter_checkpoint(args.path)
        tokenizer = merge(checkpoint, args.out, args.dtype)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"merged {checkpoint} into {args.out}" + (f" (tokenizer from {tokenizer})" if tokenizer else
                                                   " (no tokenizer found: copy one next to it)"))
    return 0


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`main` as a program: exit with its code."""
    sys.exit(main(argv, prog))


if __name__ == "__main__":  # python -m workbench_cli.merge
    run()
