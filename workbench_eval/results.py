"""`eval/results.jsonl`: one line per (checkpoint, task, style, metric), appended atomically per cell,
and what each metric means (:data:`METRICS`: its direction, its unit, whether chance applies).

A cell's lines go to disk in one `write` on an `O_APPEND` file, so a killed sweep loses at most the cell
in progress, and a re-run evaluates only the cells that are missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from workbench.io import read_jsonl
from workbench.layout import EXPERTS_MARK


@dataclass(frozen=True)
class Metric:
    """What a metric in results.jsonl means: the one place its direction is stated.

    `share`: a mean of per-item scores in [0, 1], shown as a percentage. `chance`: a multiple-choice
    accuracy, which random guessing scores at the mean of 1/(number of options) (recorded per cell).
    `primary`: the metric a task's plot and the consistency ranking use (one per task kind).
    """

    name: str
    higher_is_better: bool
    label: str  # axis label, in the reader's units
    description: str
    share: bool = True
    chance: bool = False
    primary: bool = False


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("acc", True, "accuracy (% of items correct)",
           "share of items whose gold option the model scores best", chance=True, primary=True),
    Metric("acc_norm", True, "length-normalised accuracy (% of items correct)",
           "as acc, each option's log-likelihood divided by its length in characters", chance=True),
    Metric("em", True, "exact match (% of items)",
           "share of items whose generated answer equals the reference after SQuAD normalisation"),
    Metric("f1", True, "token F1 (%, mean over items)",
           "token-overlap F1 between generated and reference answer after SQuAD normalisation", primary=True),
    Metric("exact_match", True, "exact match of the final answer (% of items)",
           "lm-eval's exact match: share of items whose extracted final answer equals the reference", primary=True),
    Metric("eigenscore", False, "EigenScore (nats, mean over prompts)",
           "INSIDE's EigenScore of K sampled answers: (1/K) Σ log(λ + 1e-3) of their embeddings' covariance "
           "(higher: more diverse answers, read as hallucination)", share=False),
    Metric("ees", False, "efficient EigenScore (nats, mean over prompts)",
           "the EigenScore estimated from matrix-vector products (Chebyshev + Hutchinson), SeND's EES",
           share=False, primary=True),
    Metric("entropy", False, "token entropy (nats per token)",
           "mean entropy of the model's next-token distribution over the sampled answers' tokens", share=False),
    Metric("nll", False, "NLL of the gold answer (nats per token)",
           "mean negative log-likelihood per token of the gold worked answer after the prompt (style gold_nll)",
           share=False),
    Metric("gold_ppl", False, "perplexity of the gold option",
           "Blank-ppl: exp of the mean NLL per token of the gold option's span (1 = certain)", share=False),
)}


@cache
def metric_info(name: str) -> Metric:
    """`METRICS[name]`; a metric not listed there (a native lm-eval task's) takes its direction from
    lm-eval's registry, else counts as higher-is-better."""
    if name in METRICS:
        return METRICS[name]
    import logging

    from lm_eval.api.registry import is_higher_better

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about names it does not know
    try:
        higher = is_higher_better(name)
    finally:
        logger.setLevel(level)
    return Metric(name, higher is not False, name, "an lm-eval metric", share=False)




def experts_style(style: str, experts: int | None) -> str:
    """The style a cell is recorded under: `style`, or `style@k<K>` when evaluated at K active experts, so that
    every reader keyed by (checkpoint, task, style) - resuming, the report, a study's `task.style.metric`
    columns - tells the k apart without knowing about it."""
    return style if experts is None else f"{style}{EXPERTS_MARK}{experts}"


def split_experts_style(style: str) -> tuple[str, int | None]:
    """`zero_shot@k2` -> (`zero_shot`, 2); a plain style -> (style, None)."""
    base, mark, k = style.rpartition(EXPERTS_MARK)
    return (base, int(k)) if mark and base and k.isdigit() else (style, None)


@dataclass
class CellResult:
    """One (task, style) on one model: aggregate metrics and per-item scores (what `Evaluator.evaluate` and the
    `eigenscore` task return for a cell)."""

    task: str
    style: str
    metrics: dict[str, float]
    items: dict[str, list[float]]
    seconds: float
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = max((len(v) for v in self.items.values()), default=0)


def cell_records(run: str, checkpoint: str, step: int | None, result: CellResult, limit: int | None,
                 chance: float | None = None, experts: int | None = None) -> list[dict[str, Any]]:
    """The lines of one evaluated cell (a `CellResult`), one per metric, items included.

    `chance`: a multiple-choice cell's chance accuracy, recorded on the metrics it applies to. `experts`: the
    number of active experts per token of an SMoE model (style `<style>@k<K>` and a field `experts`)."""
    return [
        {"run": run, "checkpoint": checkpoint, "step": step, "task": result.task,
         "style": experts_style(result.style, experts), "limit": limit,
         **({"experts": experts} if experts is not None else {}),
         "metric": metric, "value": value, "n": len(result.items.get(metric, [])),
         "items": result.items.get(metric, []), "seconds": round(result.seconds, 3),
         **({"chance": chance} if chance is not None and metric_info(metric).chance else {})}
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
