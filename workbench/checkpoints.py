"""Checkpoint completeness: a manifest written last, and the search for the newest checkpoint that is whole.

A checkpoint is complete when `workbench_manifest.json` exists (written after every rank finished
saving), every file it lists has the recorded size, and every safetensors file has a readable header.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from workbench.errors import CheckpointError
from workbench.io import atomic_write_text
from workbench.layout import CHECKPOINT_PATTERN, MANIFEST


def write_manifest(checkpoint: Path, step: int) -> None:
    """Record every file of `checkpoint` with its size; the last write of a save."""
    files = {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    atomic_write_text(checkpoint / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or unreadable file of `checkpoint`."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint '{checkpoint}' is incomplete: no {MANIFEST} (the save was interrupted)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"checkpoint '{checkpoint}': {MANIFEST} is corrupt") from None
    for name, size in files.items():
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


def newest_complete_checkpoint(run_dir: Path, report=print) -> Path | None:
    """The newest checkpoint that verifies; each newer broken one is reported in one line via `report`."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as err:
            report(f"skipping {err}")
            continue
        return checkpoint
    return None
