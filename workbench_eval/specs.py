"""BOSE task specs: a YAML that says where a task's documents come from and how to read a question,
its options and its answer out of one; `workbench_eval/styles.py` turns a spec into one lm-eval task per prompt style.

Specs live in `workbench_eval/tasks/` (and any folder passed as `include_path`). A spec takes its data from
a generator of `workbench_eval/data.py` (`dataset: {generator: factworld_mc}`), built from what the run trained on,
or from a stock lm-eval task (`stock: arc/arc_easy.yaml`: the stock YAML's dataset, splits and
`process_docs`, nothing else). Specs that share a `tag` are selected together by that name, as lm-eval's
tags are (`arithmetic`: the three arithmetic sets).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from workbench.config import validate_model
from workbench.errors import ConfigError, did_you_mean
from workbench.yaml_text import parse_yaml

TASKS_DIR = Path(str(resources.files("workbench_eval").joinpath("tasks")))  # package data, shipped in the wheel
_DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
              "test_split", "fewshot_split", "process_docs")


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    kind: Literal["open", "multiple_choice", "worked"]  # worked: a worked answer ending "#### N", scored on N
    tag: str | None = None  # a name that selects this spec together with the others that carry it
    dataset: dict[str, Any] | None = None  # {generator: name}
    stock: str | None = None  # path of a stock task YAML, relative to lm_eval/tasks/
    question: str
    prompt: str | None = None  # Jinja: the standard prompt; default QA_PROMPT, "Question: {question}\nAnswer:"
    choices: str | None = None  # Jinja rendering a JSON list
    gold: str | None = None  # Jinja rendering the gold option's index
    answer: str | None = None  # Jinja rendering the reference answer (open, worked)
    worked_answer: str | None = None  # Jinja: the worked answer ICLiP examples (worked: few-shot examples) show
    cloze: str | None = None  # Jinja: the item as a sentence with ___ at the answer (Blank-ppl)


def render(template: str, doc: dict) -> str:
    from lm_eval.utils import apply_template

    return apply_template(template, doc)


class SpecReader:
    """The document accessors of one spec: question, options, gold index, answer, cloze."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def question(self, doc: dict) -> str:
        return render(self.spec.question, doc).strip()

    def prompt(self, doc: dict) -> str:
        """The standard prompt: the spec's own, else the fine-tuning format QA_PROMPT,
        "Question: {question}\nAnswer:"."""
        from workbench.data.finetune import QA_PROMPT

        return render(self.spec.prompt, doc) if self.spec.prompt else QA_PROMPT.format(question=self.question(doc))

    def choices(self, doc: dict) -> list[str]:
        return [str(c).strip() for c in json.loads(render(self.spec.choices, doc))]

    def gold(self, doc: dict) -> int:
        return int(render(self.spec.gold, doc))

    def answer(self, doc: dict) -> str:
        return render(self.spec.answer, doc).strip()

    def worked(self, doc: dict) -> str:
        return render(self.spec.worked_answer, doc).strip() if self.spec.worked_answer else ""

    def cloze(self, doc: dict) -> tuple[str, str] | None:
        """(text before the blank, text after it), or None when the spec has no cloze form."""
        if not self.spec.cloze:
            return None
        before, blank, after = render(self.spec.cloze, doc).partition("___")
        return (before.rstrip(), after) if blank else None


@cache
def _catalogue(include_paths: tuple[str, ...]) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """(task name -> spec file, tag -> its task names), from workbench_eval/tasks/ and the include paths."""
    files: dict[str, Path] = {}
    tags: dict[str, list[str]] = {}
    for folder in (TASKS_DIR, *map(Path, include_paths)):
        for path in sorted(folder.glob("*.yaml")):
            head = yaml.safe_load(path.read_text()) or {}
            if head.get("task"):
                files[head["task"]] = path
                if head.get("tag"):
                    tags.setdefault(head["tag"], []).append(head["task"])
    return files, tags


def available_specs(include_paths: tuple[str, ...] = ()) -> dict[str, Path]:
    """Task name -> spec file, from workbench_eval/tasks/ and the include paths."""
    return _catalogue(include_paths)[0]


def spec_names(name: str, include_paths: tuple[str, ...] = ()) -> list[str]:
    """The spec names a selection `name` stands for: every spec tagged `name`, else `name` itself."""
    files, tags = _catalogue(include_paths)
    return [name] if name in files else tags.get(name, [name])


def load_spec(name: str, include_paths: tuple[str, ...] = ()) -> TaskSpec:
    files, tags = _catalogue(include_paths)
    if name not in files:
        valid = [*files, *tags]
        raise ConfigError(
            f"unknown task '{name}'{did_you_mean(name, valid)}; BOSE tasks: {', '.join(sorted(files))}"
            f"{'; tags: ' + ', '.join(sorted(tags)) if tags else ''} (or any lm-eval task name with style 'native')"
        )
    spec = validate_model(TaskSpec, parse_yaml(files[name].read_text()), files[name])
    needed = {"multiple_choice": ("choices", "gold"), "open": ("answer",), "worked": ("answer", "worked_answer")}
    for field in needed[spec.kind]:
        if getattr(spec, field) is None:
            raise ConfigError(f"{files[name]}: a {spec.kind} task needs field '{field}'")
    if (spec.dataset is None) == (spec.stock is None):
        raise ConfigError(f"{files[name]}: give exactly one of 'dataset' and 'stock'")
    if spec.kind == "worked" and spec.dataset is None:  # its generation budget is read off its documents
        raise ConfigError(f"{files[name]}: a worked task needs 'dataset' (a generator), not 'stock'")
    return spec


def data_config(spec: TaskSpec, world: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The lm-eval data keys for `spec`: a generator's documents, or a stock task's data with `overrides`.

    `world` is what the tasks may know of the run's training data (`workbench_eval.data.run_data_options`)."""
    if spec.dataset is not None:
        from workbench_eval.data import GENERATORS

        generator = spec.dataset.get("generator")
        if generator not in GENERATORS:
            raise ConfigError(f"task '{spec.task}': unknown generator '{generator}'; valid: {', '.join(GENERATORS)}")
        docs = GENERATORS[generator](**world)  # built once, shared by the spec's styles
        return {"custom_dataset": lambda **_: docs, "test_split": "test", "fewshot_split": "train",
                "training_split": "train", "metadata": {"world": world}}
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_path = Path(lm_eval.tasks.__file__).parent / spec.stock
    if not stock_path.is_file():
        raise ConfigError(f"task '{spec.task}': stock task file '{spec.stock}' not found in lm_eval/tasks")
    stock = load_yaml(str(stock_path), resolve_func=True)
    data = {key: stock[key] for key in _DATA_KEYS if key in stock}
    files = (overrides.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):  # local files in the stock schema: the json builder, only their splits
        data.update(dataset_path="json", dataset_name=None)
        for split in ("training_split", "validation_split", "test_split"):
            if data.get(split) not in files:
                data[split] = None
    data.update(overrides)
    eval_split = data.get("test_split") or data.get("validation_split")
    data["fewshot_split"] = data.get("fewshot_split") or data.get("training_split") or eval_split
    return data
