"""Helpers for the study tests: a study YAML over the tiny config, and `launch/study.py` as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, run, tiny_config, write_config

STUDY = REPO / "launch" / "study.py"


def write_study(tmp_path: Path, **fields) -> Path:
    """A study over the tiny config (4 steps, checkpoints every 2): learning rate x 2 seeds, collecting loss;
    `fields` replace or add study YAML fields."""
    base = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 2}), "base.yaml")
    study = {"study": "s", "base": str(base), "runs_dir": str(tmp_path / "runs"),
             "axes": {"training.learning_rate": [1e-3, 2e-3]}, "seeds": [0, 1], "collect": ["loss"], **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def launch(*args: str) -> subprocess.CompletedProcess:
    """`python launch/study.py ARGS`, its output captured."""
    return run([sys.executable, str(STUDY), *args])
