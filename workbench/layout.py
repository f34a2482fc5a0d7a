"""The layout of a run folder, defined once: every reader and writer of a run uses these names.

    runs/<name>/config.yaml                  RUN_CONFIG: the resolved config as run
    runs/<name>/tokenizer/                   TOKENIZER_DIR: the tokenizer the model was trained with
    runs/<name>/metrics.jsonl                METRICS: one JSON line per logging step
    runs/<name>/tensorboard/                 TENSORBOARD_DIR
    runs/<name>/eval/results.jsonl           EVAL_DIR / RESULTS: the evaluator's cells
    runs/<name>/checkpoint-<step>/           checkpoint_dir(run, step); MANIFEST written last
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_CONFIG = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
RESULTS = "results.jsonl"
EXPERTS_MARK = "@k"  # evaluator style `zero_shot@k2`: the cell evaluated with 2 active experts per token (SMoE)
CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "workbench_manifest.json"
CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """`<run>/checkpoint-<step>`."""
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, or None for any other name."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def results_path(run_dir: Path) -> Path:
    """`<run>/eval/results.jsonl`."""
    return Path(run_dir) / EVAL_DIR / RESULTS
