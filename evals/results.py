"""`eval/results.jsonl`: one line per (checkpoint, task, style, metric), appended atomically per cell.

A cell's lines go to disk in one `write` on an `O_APPEND` file, so a killed sweep loses at most the cell
in progress, and a re-run evaluates only the cells that are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.io import read_jsonl


def cell_records(run: str, checkpoint: str, step: int | None, result, limit: int | None) -> list[dict[str, Any]]:
    """The lines of one evaluated cell (`evals.sweep.CellResult`), one per metric, items included."""
    return [
        {"run": run, "checkpoint": checkpoint, "step": step, "task": result.task, "style": result.style,
         "limit": limit,
         "metric": metric, "value": value, "n": len(result.items.get(metric, [])),
         "items": result.items.get(metric, []), "seconds": round(result.seconds, 3)}
        for metric, value in result.metrics.items()
    ]


def read_results(path: Path) -> list[dict[str, Any]]:
    """All complete lines (a torn last line from a killed writer is ignored)."""
    return read_jsonl(path) if path.is_file() else []


def done_cells(records: list[dict[str, Any]], limit: int | None) -> set[tuple[str, str, str]]:
    """(checkpoint, task, style) cells that have results at this item `limit` (or more items)."""
    return {(r["checkpoint"], r["task"], r["style"]) for r in records
            if r.get("status", "ok") == "ok" and (r.get("limit") == limit or limit is not None and r["n"] >= limit)}


def skip_record(run: str, checkpoint: str, step: int | None, reason: str) -> dict[str, Any]:
    return {"run": run, "checkpoint": checkpoint, "step": step, "status": "skipped", "reason": reason}
