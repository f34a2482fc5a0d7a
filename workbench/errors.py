"""Errors that reach the user as one line, and the helper that turns them into an exit code."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WorkbenchError(Exception):
    """A user-facing error: its message is one line that names the field or file at fault."""

    exit_code = 2


class ConfigError(WorkbenchError):
    """A wrong key, type or value in an experiment config, or a missing file it names."""


class CheckpointError(WorkbenchError):
    """A checkpoint that is missing, incomplete or corrupt."""


class TrainingDiverged(WorkbenchError):
    """A NaN or infinite loss: the run stops and keeps its last good checkpoint."""

    exit_code = 3


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
