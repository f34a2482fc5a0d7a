"""Atomic file writes: a reader never sees a half-written results or config file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and an atomic rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_folder(target: str | Path, write: Callable[[Path], None]) -> bool:
    """Build a folder atomically: `write(tmp)` fills a private temporary folder beside `target`, which is then
    renamed to `target`. Processes racing to build the same cache entry (e.g. a study's parallel runs) each
    build their own; the first rename wins and the others discard theirs. Returns whether this call won."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)  # fails if target exists and is not empty: someone else published it
            return True
        except OSError:
            if not target.is_dir():
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: str | Path, *records: dict[str, Any]) -> None:
    """Append JSON lines with a single write() on an O_APPEND file: they land together or not at all."""
    payload = "".join(json.dumps(r, default=float) + "\n" for r in records).encode()
    if not payload:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping a torn last line left by a killed writer."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
