"""Rows from anywhere the config points: a built-in generator, a hub dataset, a local file or folder.

`load_rows` is the one loader. Pre-training text (`load_documents`) and fine-tuning examples
(`workbench.data.finetune`) both read through it and then pick their columns.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
from datasets import Dataset, concatenate_datasets

from workbench.data.arithmetic import ArithmeticConfig, arithmetic_problems
from workbench.data.synthetic import FactWorld, FactWorldConfig, entity_pools
from workbench.errors import ConfigError
from workbench.options import dataclass_options
from workbench.sources import LOCAL_FORMATS, looks_local

if TYPE_CHECKING:  # annotations only: workbench.config imports this package (to check data options), not the reverse
    from workbench.config import DataConfig

TABLE_FORMATS = {suffix: builder for suffix, builder in LOCAL_FORMATS.items() if suffix != ".txt"}
MAP_PROCESSES_CAP = 8  # datasets.map processes by default: more rarely pay for their start-up and memory
ROWS_PER_MAP_PROCESS = 20_000  # rows a datasets.map process should have to be worth starting (about a second's
# tokenising): a dataset of fewer rows per available core gets fewer processes, one below 2 x this


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which Slurm and taskset narrow), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_processes(configured: int | None, rows: int | None) -> tuple[int, str]:
    """How many processes `datasets.map` tokenises `rows` rows with, and the line that says why.

    `data.num_proc` where set; else min(available cores, MAP_PROCESSES_CAP, rows // ROWS_PER_MAP_PROCESS),
    at least 1: the other ranks wait at a barrier while the main process tokenises, so a large corpus is
    worth the cores, while for a small one the processes' start-up costs more than it saves. `rows` None: a
    built-in generator's rows, made in this process in Python at about the rate they tokenise (1 process)."""
    if configured is not None:
        return configured, f"[workbench] tokenising with {configured} process{_plural(configured)} (data.num_proc)"
    if rows is None:
        return 1, "[workbench] tokenising the generated rows with 1 process (set data.num_proc to choose)"
    cores = available_cores()
    processes = max(1, min(cores, MAP_PROCESSES_CAP, rows // ROWS_PER_MAP_PROCESS))
    return processes, (f"[workbench] tokenising {rows} rows with {processes} process{_plural(processes)} "
                       f"({cores} cores available, at most {MAP_PROCESSES_CAP}, one per {ROWS_PER_MAP_PROCESS} "
                       "rows; set data.num_proc to choose)")


def _plural(count: int) -> str:
    return "es" if count != 1 else ""


# ----------------------------------------------------------------------------------------------------------
# Built-in generators (`synthetic:<name>`)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactCorpusConfig(FactWorldConfig):
    """`synthetic:fact_world` options: the world's, how many sentences state each fact, whether the cloze
    template is held out of the statements (`FactWorld.corpus`), and the share of the corpus's characters in
    question-answer documents about the entities evaluation never asks about (the instruction-tuning and
    few-shot pools, `FactWorld.qa_documents`) and in paragraphs about the entities of another world
    (`FactWorld.other_world`: text the evaluation never asks about, for data-mixture ablations), both
    appended after the entity paragraphs."""

    sentences_per_fact: int = 3
    hold_out_cloze: bool = False
    qa_share: float = 0.0
    other_share: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sentences_per_fact < 1:
            raise ValueError(f"sentences_per_fact must be >= 1, got {self.sentences_per_fact}")
        if not 0.0 <= self.qa_share < 0.5:
            raise ValueError(f"qa_share must be in [0, 0.5), got {self.qa_share}")
        if not 0.0 <= self.other_share < 1.0:
            raise ValueError(f"other_share must be in [0, 1), got {self.other_share}")
        if self.qa_share + self.other_share >= 1.0:
            raise ValueError(f"qa_share + other_share must be below 1, got {self.qa_share + self.other_share}")


def _world(options: FactWorldConfig) -> FactWorld:
    """The fact world of `options` (only its FactWorldConfig fields count)."""
    return FactWorld(FactWorldConfig(**{f.name: getattr(options, f.name) for f in fields(FactWorldConfig)}))


def _fact_corpus(options: FactCorpusConfig) -> Dataset:
    world = _world(options)
    parts = [world.corpus(sentences_per_fact=options.sentences_per_fact, hold_out_cloze=options.hold_out_cloze)]
    fact_chars = sum(len(text) for text in parts[0]["text"])
    total_chars = fact_chars / (1 - options.qa_share - options.other_share)
    if options.qa_share:
        try:
            _, instruction_pool, fewshot_pool = entity_pools(len(world))
        except ValueError as err:
            raise ConfigError(f"field 'data.synthetic.num_entities': {err}") from None
        parts.append(world.qa_documents(round(total_chars * options.qa_share), instruction_pool + fewshot_pool))
    if options.other_share:
        other = world.other_world()  # enough statements per fact to fill the share (5% spare), then cut to it
        target = total_chars * options.other_share
        per_fact = math.ceil(1.05 * options.sentences_per_fact * target / fact_chars * len(world) / len(other))
        text = other.corpus(sentences_per_fact=per_fact)
        ends = np.cumsum([len(t) for t in text["text"]])
        parts.append(text.select(range(min(len(text), int(np.searchsorted(ends, target)) + 1))))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _fact_qa(options: FactWorldConfig) -> Dataset:
    world = _world(options)
    try:
        _, instruction_pool, _ = entity_pools(len(world))
    except ValueError as err:
        raise ConfigError(f"field 'data.synthetic.num_entities': {err}") from None
    return world.qa(entities=instruction_pool)


@dataclass(frozen=True)
class FactTrueFalseConfig(FactWorldConfig):
    """`synthetic:fact_tf` options: the world's, how many statements (`FactWorld.true_false` variants) each fact
    gets before duplicates are dropped, and whether the classes are then balanced (true statements repeat more
    often, having fewer wordings, so without balancing most distinct statements are false)."""

    statements_per_fact: int = 4
    balance: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.statements_per_fact < 1:
            raise ValueError(f"statements_per_fact must be >= 1, got {self.statements_per_fact}")


def _fact_true_false(options: FactTrueFalseConfig) -> Dataset:
    """Columns text (a statement) and label (1 true, 0 false): `statements_per_fact` variants of
    `FactWorld.true_false` over every fact, each distinct statement once (in first-seen order); with `balance`,
    only the first n of each label, n the size of the smaller class. A held-out statement is then mostly a new
    wording, or a new wrong value, of a fact the training split states too."""
    world = _world(options)
    rows: dict[str, list] = {"text": [], "label": [], "entity": [], "attribute": []}
    seen: set[str] = set()
    for variant in range(options.statements_per_fact):
        for row in world.true_false(variant=variant):
            if row["statement"] not in seen:
                seen.add(row["statement"])
                rows["text"].append(row["statement"])
                for key in ("label", "entity", "attribute"):
                    rows[key].append(row[key])
    if options.balance:
        keep = min(rows["label"].count(0), rows["label"].count(1))
        seen_labels = {0: 0, 1: 0}
        index = []
        for i, label in enumerate(rows["label"]):
            seen_labels[label] += 1
            if seen_labels[label] <= keep:
                index.append(i)
        rows = {key: [values[i] for i in index] for key, values in rows.items()}
    return Dataset.from_dict(rows)


def _fact_value(options: FactWorldConfig) -> Dataset:
    """Columns text (a prompt for one fact's value: a statement cut before it, or a question) and label (the
    value), every wording of every fact (`FactWorld.value_prompts`): a many-class classification whose answers
    a language model pretrained on the same world's corpus knows."""
    return _world(options).value_prompts()


@dataclass(frozen=True)
class Generator:
    """A built-in source: its options dataclass (`data.synthetic`), its rows, and the kind of data they are
    (`text`: pre-training documents in column text; `qa`: columns question and answer; `classification`: columns
    text and label, a sequence-classification run, `workbench.kinds.classification`)."""

    options: type
    build: Callable[[Any], Dataset]
    kind: str


GENERATORS: dict[str, Generator] = {
    # one paragraph of facts per invented entity
    "fact_world": Generator(FactCorpusConfig, _fact_corpus, "text"),
    # one question per fact of the instruction-tuning entities, which the evaluator never asks about
    "fact_qa": Generator(FactWorldConfig, _fact_qa, "qa"),
    # GSM8K-format word problems; the answer is worked, one equation a line, ending '#### N'
    "arithmetic": Generator(ArithmeticConfig, arithmetic_problems, "qa"),
    # true/false statements of the fact world, label 1 (true) or 0 (false), several per fact
    "fact_tf": Generator(FactTrueFalseConfig, _fact_true_false, "classification"),
    # every fact asked for its value (statements cut before it, questions), label the value: many classes
    "fact_value": Generator(FactWorldConfig, _fact_value, "classification"),
}


def generator(source: str) -> Generator:
    """The built-in generator of a `synthetic:<name>` source, or a ConfigError listing the valid ones."""
    name = source.removeprefix("synthetic:")
    if name not in GENERATORS:
        valid = ", ".join(f"synthetic:{n}" for n in GENERATORS)
        raise ConfigError(f"field 'data.source': unknown synthetic source '{source}'; valid: {valid}")
    return GENERATORS[name]


def generator_options(source: str, options: dict[str, Any]) -> Any:
    """`data.synthetic` checked against the generator's options dataclass (cheap: nothing is generated)."""
    options_class = generator(source).options
    try:
        return options_class(**dataclass_options("synthetic", options_class, options))
    except ValueError as err:
        raise _options_error(str(err)) from None


def _options_error(message: str) -> ConfigError:
    """'[synthetic.x] msg' (from `dataclass_options`) as "field 'data.synthetic.x': msg"."""
    match = re.match(r"\[([^\]]+)\] (.*)", message, flags=re.DOTALL)
    field, text = (match.group(1), match.group(2)) if match else ("synthetic", message)
    return ConfigError(f"field 'data.{field}': {text.splitlines()[0]}")


# ----------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------


def load_rows(cfg: DataConfig) -> Dataset:
    """Every row of `cfg.source`, with the columns it has, in a fixed order.

    A `synthetic:<name>` source is built from `cfg.synthetic`; a path is a file (by suffix) or a folder (see
    `_local`); anything else is a hub dataset, read at `cfg.split`."""
    source = cfg.source
    if source.startswith("synthetic:"):
        return generator(source).build(generator_options(source, cfg.synthetic))
    path = Path(source).expanduser()
    if path.exists():
        return _local(path)
    if looks_local(source):
        raise ConfigError(f"field 'data.source': file '{source}' not found")
    return _hub(source, cfg.split)


def missing_column(field: str, column: str, source: str, columns: list[str]) -> ConfigError:
    """The error for a configured column that the source lacks, listing the columns it has."""
    return ConfigError(
        f"field 'data.{field}': '{column}' is not a column of '{source}' (columns: {', '.join(columns)})"
    )


QA_PROMPT = "Question: {question}\nAnswer:"  # the prompt of question/answer data (fine-tuning and evaluation)


def qa_documents(rows: Dataset) -> Dataset:
    """Question/answer rows as pretraining text, in the fine-tuning format: QA_PROMPT, a space, the answer."""
    return rows.map(lambda batch: {"text": [f"{QA_PROMPT.format(question=q)} {a}"
                                            for q, a in zip(batch["question"], batch["answer"], strict=True)]},
                    batched=True, remove_columns=rows.column_names)


def load_documents(cfg: DataConfig) -> Dataset:
    """One row per document with a `text` column, in a fixed order. A question/answer generator
    (`synthetic:arithmetic`, `synthetic:fact_qa`) with `data.format: text` gives `qa_documents`."""
    docs = load_rows(cfg)
    if cfg.format == "text" and cfg.source.startswith("synthetic:") and generator(cfg.source).kind == "qa":
        docs = qa_documents(docs)
    if cfg.text_column not in docs.column_names:
        raise missing_column("text_column", cfg.text_column, cfg.source, docs.column_names)
    docs = docs.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        docs = docs.rename_column(cfg.text_column, "text")
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    if len(docs) < 2:
        raise ConfigError(
            f"field 'data.source': '{cfg.source}' has {len(docs)} non-empty documents; need at least 2"
        )
    return docs


def _local(path: Path) -> Dataset:
    """A file read by its suffix, or a folder: its .txt files (one document per file) or its data files of
    one format (all their rows); files in sorted order, subfolders included."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS)
        suffixes = sorted({p.suffix for p in files})
        if not files:
            raise ConfigError(
                f"field 'data.source': folder '{path}' has no .txt files and no data files "
                f"({', '.join(TABLE_FORMATS)})"
            )
        if len(suffixes) > 1 and {TABLE_FORMATS.get(s) for s in suffixes} != {"json"}:
            counts = ", ".join(f"{s}: {sum(p.suffix == s for p in files)}" for s in suffixes)
            raise ConfigError(
                f"field 'data.source': folder '{path}' mixes kinds of files ({counts}); "
                "point data.source at one file or at a folder of one kind"
            )
        names = [str(p) for p in files]
        if suffixes == [".txt"]:
            # One document per file, in sorted order: `sample_by="document"` keeps each file whole.
            return _read(path, "text", names, sample_by="document")
        return _read(path, LOCAL_FORMATS[suffixes[0]], names)
    builder = LOCAL_FORMATS.get(path.suffix)
    if builder is None:
        raise ConfigError(
            f"field 'data.source': '{path}' has an unknown suffix; valid: {', '.join(LOCAL_FORMATS)} "
            "or a folder"
        )
    return _read(path, builder, [str(path)])


def _read(path: Path, builder: str, files: list[str], **kwargs: Any) -> Dataset:
    try:
        if builder == "csv":  # CSV has no types: each cell is text as written (" 2" stays " 2", "NA" "NA")
            with open(files[0], newline="") as f:
                header = next(csv.reader(f))
            kwargs.update(features=datasets.Features({name: datasets.Value("string") for name in header}),
                          keep_default_na=False)
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as err:  # datasets raises many kinds; the user needs the file and the first line
        raise ConfigError(f"field 'data.source': could not read '{path}': {_first_line(err)}") from None


def _hub(name: str, split: str) -> Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise ConfigError(
            f"field 'data.source': '{name}' is neither a local file nor a reachable hub dataset: "
            f"{_first_line(err)}"
        ) from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
