"""Checkpoint completeness: a manifest written last, and the search for the newest checkpoint that is whole.

A checkpoint is complete when `workbench_manifest.json` exists (written after every rank finished
saving), every file it lists has the recorded size, and every safetensors file has a readable header.

The model's weights are in one of two forms: safetensors files (`model.safetensors`, sharded with an index, or
a LoRA adapter's `adapter_model.safetensors`), or, under ZeRO-3 with `stage3_gather_16bit_weights_on_model_save:
false` (`configs/deepspeed/zero3_sharded.json`), only DeepSpeed's own shards: `latest` names a `global_step<N>/`
folder of `*_model_states.pt` and `zero_pp_rank_*_optim_states.pt` files beside `config.json`
(`is_zero_sharded_checkpoint`), which `zero_consolidated_state_dict` turns into whole weights on demand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from workbench.errors import CheckpointError
from workbench.io import atomic_write_text
from workbench.layout import CHECKPOINT_PATTERN, MANIFEST

if TYPE_CHECKING:
    import torch


def write_manifest(checkpoint: Path, step: int, sizes: Mapping[str, int] | None = None) -> None:
    """Record every file of `checkpoint` with its size; the last write of a save, by rank 0.

    `sizes` (file name inside the checkpoint -> bytes, as each rank measured its own files: `rank_file_sizes`)
    overrides what this process sees, and adds the files it does not see yet: on a shared file system (NFS) a
    node may list another node's files late or with stale sizes. The manifest is `{"step", "files"}` either way."""
    files = {**_file_sizes(checkpoint), **(sizes or {})}
    manifest = {"step": step, "files": dict(sorted(files.items()))}
    atomic_write_text(checkpoint / MANIFEST, json.dumps(manifest, indent=1))


def rank_file_sizes(checkpoint: Path, rank: int) -> dict[str, int]:
    """The sizes of the files of `checkpoint` that `rank` measures for the manifest: its own (`file_rank`), and on
    rank 0 also the files every rank reads (which rank 0 writes)."""
    return _file_sizes(checkpoint, lambda name: file_rank(name) == rank or (rank == 0 and file_rank(name) is None))


def _file_sizes(checkpoint: Path, only: Callable[[str], bool] = lambda name: True) -> dict[str, int]:
    """Name inside `checkpoint` -> size in bytes of each file this process sees there (the manifest aside) for
    which `only(name)` is true."""
    sizes = {}
    for path in sorted(checkpoint.rglob("*")):
        name = str(path.relative_to(checkpoint))
        if path.name != MANIFEST and only(name) and path.is_file():
            sizes[name] = path.stat().st_size
    return sizes


def verify_checkpoint(checkpoint: Path, only: Callable[[str], bool] | None = None) -> None:
    """Raise CheckpointError naming the first missing, truncated or unreadable file of `checkpoint` (of the files
    the manifest lists for which `only(name)` is true, when given)."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint '{checkpoint}' is incomplete: no {MANIFEST} (the save was interrupted)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"checkpoint '{checkpoint}': {MANIFEST} is corrupt") from None
    for name, size in files.items():
        if only is not None and not only(name):
            continue
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{checkpoint}' is incomplete: '{name}' is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint '{checkpoint}' is corrupt: '{name}' has {path.stat().st_size} bytes, expected {size}"
            )
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as err:
                raise CheckpointError(f"checkpoint '{checkpoint}' is corrupt: '{name}': {err}") from None
        elif name.endswith(".json"):
            try:
                json.loads(path.read_text())
            except ValueError:
                raise CheckpointError(f"checkpoint '{checkpoint}' is corrupt: '{name}' is not valid JSON") from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_checkpoints(run_dir: Path, report=print,
                         verify: Callable[[Path], None] = verify_checkpoint) -> Iterator[Path]:
    """The checkpoints of `run_dir` that `verify` passes, newest first; each broken one is reported in one line via
    `report` as the search passes it."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify(checkpoint)
        except CheckpointError as err:
            report(f"skipping {err}")
            continue
        yield checkpoint


def newest_complete_checkpoint(run_dir: Path, report=print) -> Path | None:
    """The newest checkpoint that verifies; each newer broken one is reported in one line via `report`."""
    return next(complete_checkpoints(run_dir, report), None)


# Per-rank files of a checkpoint, by their names: Hugging Face's `rng_state_<rank>.pth`, DeepSpeed's
# `[bf16_]zero_pp_rank_<rank>_mp_rank_<mp>_{optim,model}_states.pt` (data-parallel rank = global rank: the
# workbench trains data-parallel only) and the workbench's `..._rank<rank>.<ext>` (`workbench.trainer`).
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_|_rank)(\d+)[_.]")


def file_rank(name: str) -> int | None:
    """The rank that writes and reads the checkpoint file `name` (a path inside the checkpoint); None for a file
    every rank reads (weights, configs, trainer state, DeepSpeed's model states without ZeRO-3)."""
    match = RANK_FILE.search(Path(name).name)
    return int(match.group(1)) if match else None


def verify_shared_files(checkpoint: Path) -> None:
    """`verify_checkpoint` for the files every rank reads: what rank 0 checks when it chooses the checkpoint to
    resume. Each rank's own files are left to that rank (`verify_rank_files`): on a shared file system (NFS) one
    node may see stale sizes of files another node wrote."""
    verify_checkpoint(checkpoint, only=lambda name: file_rank(name) is None)


def verify_rank_files(checkpoint: Path, rank: int) -> None:
    """`verify_checkpoint` for the files of `rank` that the manifest lists (its optimizer shard, RNG state, method
    and logging state): what each rank checks of the checkpoint rank 0 chose."""
    verify_checkpoint(checkpoint, only=lambda name: file_rank(name) == rank)


ZERO_TAG_FILE = "latest"  # DeepSpeed's pointer to the newest `global_step<N>` folder of a checkpoint
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def is_zero_sharded_checkpoint(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` holds its model only as DeepSpeed ZeRO shards (no safetensors weights)."""
    checkpoint = Path(checkpoint)
    return (checkpoint / ZERO_TAG_FILE).is_file() and not any((checkpoint / name).is_file() for name in WEIGHT_FILES)


def zero_consolidated_state_dict(checkpoint: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole weights of a ZeRO-sharded `checkpoint`, from DeepSpeed's fp32 masters
    (`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`, lazily), each floating-point tensor
    cast to `dtype` as it is consolidated: host memory peaks at the model in `dtype` plus one fp32 tensor and
    DeepSpeed's flat fp32 partitions. CheckpointError when the shards cannot be consolidated."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), lazy_mode=True)
        return to_torch_tensor(lazy, dtype=dtype)  # tied weights stay one tensor
    except Exception as err:  # DeepSpeed raises ValueError, FileNotFoundError, KeyError, unpickling errors...
        raise CheckpointError(_consolidation_error(checkpoint, err)) from None


def zero_checkpoint_placeholders(checkpoint: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every weight of a ZeRO-sharded `checkpoint` as a meta tensor of its shape in `dtype` (buffers with their
    values), read from one of DeepSpeed's small model-state files: what ranks other than 0 pass to a ZeRO-3 load,
    in which only rank 0 reads values (`transformers.integrations.deepspeed._load_state_dict_into_zero3_model`),
    so the whole model is consolidated once, not once per rank. CheckpointError when the files cannot be read."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_model_state_files, parse_model_states

    try:
        tag = (Path(checkpoint) / ZERO_TAG_FILE).read_text().strip()
        state = parse_model_states(get_model_state_files(str(Path(checkpoint) / tag))[:1])[0]
    except Exception as err:  # as in `zero_consolidated_state_dict`
        raise CheckpointError(_consolidation_error(checkpoint, err)) from None
    shapes = {name: shape for group in state.param_shapes for name, shape in group.items()}
    shapes.update(state.frozen_param_shapes or {})
    shapes.update({alias: shapes[name] for alias, name in state.shared_params})
    return {**{name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()},
            **state.buffers}


def _consolidation_error(checkpoint: str | Path, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"checkpoint '{checkpoint}' holds only DeepSpeed ZeRO shards, which could not be consolidated: {reason}"
