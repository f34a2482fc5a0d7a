"""The evaluator's `eigenscore` task: EigenScore, its efficient estimate (EES) and the mean token entropy of
K sampled answers per prompt (`workbench.metrics.hallucination`), over the run's fact-world test items.

    python launch/eval.py runs/send --task eigenscore                    # style completion (default)
    python launch/eval.py runs/sft --task eigenscore:question --limit 30

Styles are the prompt forms: `completion` prompts with the sentence before the fact's blank ("Velmora Tash was
born in"), for models pretrained on statements; `question` with the fine-tuning format ("Question: ...\\nAnswer:").
Sampling and estimator options are `eval.style_options.eigenscore` (the fields of `EigenScoreConfig`, e.g.
`{samples: 10, pooling: mean, exact: true, batch_size: 8}`; `batch_size` prompts go through each generate call,
and the scores do not depend on it: each prompt is sampled from its own seed). Lower scores mean less diverse
answers (less hallucination, as INSIDE reads it). One result line per metric: `ees`, `eigenscore` (unless
`exact: false`), `entropy`.
"""

from __future__ import annotations

import time
from typing import Any

from workbench.errors import ConfigError
from workbench_eval.results import CellResult
from workbench_eval.specs import SpecReader, data_config, load_spec

TASK = "eigenscore"
STYLES = ("completion", "question")
SOURCE_SPEC = "factworld_qa"  # whose test documents give the prompts


class EigenScoreCell:
    """One (eigenscore, style) cell: its prompts and sampling options; `evaluate(model, tokenizer)`."""

    OUTPUT_TYPE = TASK

    def __init__(self, style: str, prompts: list[str], options: dict[str, Any]) -> None:
        from workbench.metrics.hallucination import EigenScoreConfig

        self.style, self.prompts = style, prompts
        try:
            self.config = EigenScoreConfig(**options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"field 'eval.style_options.eigenscore': {err}") from None
        self.instances: list = []  # no lm-eval requests

    def evaluate(self, model, tokenizer):
        from workbench.metrics.hallucination import eigenscore_report

        started = time.perf_counter()
        report = eigenscore_report(model, tokenizer, self.prompts, self.config)
        items = {name: report["items"][name] for name in ("ees", "eigenscore", "entropy") if name in report["items"]}
        metrics = {name: report[name] for name in items}
        return CellResult(TASK, self.style, metrics, items, time.perf_counter() - started)


def eigenscore_cells(styles: list[str] | None, world: dict[str, Any], limit: int | None,
                     options: dict[str, Any]) -> dict[tuple[str, str], EigenScoreCell]:
    """(eigenscore, style) -> cell, with the first `limit` test items of the run's fact world as prompts."""
    styles = styles or ["completion"]
    for style in styles:
        if style not in STYLES:
            raise ConfigError(f"task '{TASK}': unknown style '{style}'; valid: {', '.join(STYLES)}")
    spec = load_spec(SOURCE_SPEC)
    docs = data_config(spec, world, {})["custom_dataset"]()["test"]
    docs = docs.select(range(min(len(docs), limit))) if limit else docs
    read = SpecReader(spec)
    prompts = {"completion": [read.cloze(d)[0] for d in docs], "question": [read.prompt(d) for d in docs]}
    return {(TASK, style): EigenScoreCell(style, prompts[style], options) for style in styles}
