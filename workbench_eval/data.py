"""Evaluation documents built from the synthetic data the model was trained on: the fact world, and
arithmetic word problems (see the arithmetic section below).

The entities are split three ways: test items (all but the last 10% and the few-shot pool, and never an
entity whose paragraph the run held out for validation), shuffled with a fixed seed so that any `limit`
takes a spread of entities and attributes; an instruction-tuning pool (the
next 10%, `factworld_sft`) never asked about in evaluation; and a few-shot pool (`train`) of 8 entities.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, DatasetDict

from workbench.data import fact_world_options
from workbench.data.arithmetic import OBJECTS, PEOPLE, ArithmeticConfig, arithmetic_problems
from workbench.data.finetune import QA_PROMPT
from workbench.data.loading import generator_options
from workbench.data.synthetic import FactWorld, FactWorldConfig, entity_pools
from workbench.errors import ConfigError


def _world(options: dict[str, Any]) -> FactWorld:
    known = {"num_entities", "seed", "attributes_per_entity"}
    return FactWorld(FactWorldConfig(**{k: v for k, v in options.items() if k in known}))


def untrained_entities(n: int, options: dict[str, Any]) -> set[int]:
    """Entities whose paragraph the run never trained on: its validation documents (the same split as
    `workbench.data.packing.split_documents`, which depends only on the row count and the seed) and any
    beyond `max_documents`."""
    from workbench.data.packing import split_documents

    total = n + _appended_documents(options)  # the n entity paragraphs come first
    rows = min(total, options.get("max_documents") or total)
    fraction = options.get("validation_fraction", 0.0)
    held_out: set[int] = set(range(rows, n))
    if fraction:
        docs = Dataset.from_dict({"text": [str(i) for i in range(rows)]})
        validation = split_documents(docs, fraction, options.get("split_seed", 0))["validation"]["text"]
        held_out |= {int(t) for t in validation if int(t) < n}
    return held_out


def _appended_documents(options: dict[str, Any]) -> int:
    """How many documents the run's corpus has after its entity paragraphs (`qa_share`, `other_share`)."""
    if not (options.get("qa_share") or options.get("other_share")):
        return 0
    from workbench.data.loading import FactCorpusConfig, generator

    corpus = generator("synthetic:fact_world").build(
        FactCorpusConfig(**{k: v for k, v in options.items() if k in FactCorpusConfig.__dataclass_fields__}))
    return len(corpus) - options.get("num_entities", FactWorldConfig.num_entities)


def _split(world: FactWorld, build, options: dict[str, Any]) -> DatasetDict:
    n = len(world.entities)
    test, _, fewshot = entity_pools(n, untrained_entities(n, options))
    return DatasetDict(test=build(test).shuffle(seed=0).flatten_indices(),
                       train=build(fewshot).shuffle(seed=0).flatten_indices())


def factworld_qa(**world_options: Any) -> DatasetDict:
    world = _world(world_options)
    return _split(world, lambda entities: world.qa(entities=entities), world_options)


def factworld_mc(**world_options: Any) -> DatasetDict:
    world = _world(world_options)
    return _split(world, lambda entities: world.multiple_choice(entities=entities), world_options)


def factworld_sft(**world_options: Any) -> Dataset:
    """Prompt/completion pairs ("Question: q\\nAnswer:", " a") about the instruction-tuning entities only."""
    world = _world(world_options)
    _, sft, _ = entity_pools(len(world.entities))
    qa = world.qa(entities=sft)
    return Dataset.from_dict({"prompt": [QA_PROMPT.format(question=q) for q in qa["question"]],
                              "completion": [f" {a}" for a in qa["answer"]]})


# ----------------------------------------------------------------------------------------------------------
# Arithmetic word problems: in-distribution, with an irrelevant sentence (GSM-IC), one step longer
# ----------------------------------------------------------------------------------------------------------

ARITHMETIC_TEST = 500  # problems per arithmetic set (a `limit` asks the first N)
ARITHMETIC_FEWSHOT = 8  # problems per set in its few-shot pool (`train`), never asked
EVAL_SEED_OFFSET = 1_000_003  # evaluation problems come from the generator's stream for seed + this
VALIDATION_STREAM = 7  # `arithmetic_validation` draws from the evaluation stream seed + EVAL_SEED_OFFSET + this
CANDIDATES_PER_PROBLEM = 4  # problems drawn per one needed, to make up for those seen in training

# One sentence with a number that changes nothing: another person, other objects, or neither counted.
IRRELEVANT_SENTENCES = (
    "{other} has {n} {obj}.",
    "{other} has {n} {other_obj}.",
    "{name} also has {n} {other_obj}.",
    "{other} is {n} years old.",
)
_FINAL_QUESTION = re.compile(r" (How many (?P<obj>.+) does (?P<name>\S+) have now\?)$")


def run_data_options(data: dict[str, Any]) -> dict[str, Any]:
    """What evaluation tasks may know of a run's training data (`data`: its config's `data` section): the
    fact world's options at the top level (`workbench.data.fact_world_options`) and, for a run trained on
    arithmetic problems (`synthetic:arithmetic`), their ArithmeticConfig fields under 'arithmetic'."""
    options = fact_world_options(data)
    if data.get("source") == "synthetic:arithmetic":  # as fine-tuning examples or as pretraining text
        options["arithmetic"] = dict(data.get("synthetic") or {})
        options["arithmetic_seen"] = [options["arithmetic"]]
    return options


def seen_arithmetic(world_options: dict[str, Any]) -> list[ArithmeticConfig]:
    """Every arithmetic problem set the run and the runs it descends from trained on (none: the default set,
    which `training_arithmetic` also falls back to)."""
    seen = world_options.get("arithmetic_seen") or [world_options.get("arithmetic") or {}]
    return [generator_options("synthetic:arithmetic", options) for options in seen]


def training_arithmetic(world_options: dict[str, Any]) -> ArithmeticConfig:
    """The config of the run's arithmetic training problems; ArithmeticConfig's defaults when the run did
    not train on arithmetic (so every run is asked the same problems of the default kind)."""
    return generator_options("synthetic:arithmetic", world_options.get("arithmetic") or {})


@lru_cache(maxsize=8)
def _questions(cfg: ArithmeticConfig) -> frozenset[str]:
    return frozenset(arithmetic_problems(cfg)["question"])


def unseen_problems(cfg: ArithmeticConfig, training: ArithmeticConfig | list[ArithmeticConfig], stream: int = 0,
                    exclude: frozenset[str] = frozenset()) -> DatasetDict:
    """Problems of `cfg`'s kind from the evaluation seed stream (`cfg.seed + EVAL_SEED_OFFSET + stream`),
    dropping any whose question is in the `training` problems (one set, or every set of a run's lineage), in
    `exclude` or already taken: `train`, the first ARITHMETIC_FEWSHOT (few-shot pool), then `test`, up to
    ARITHMETIC_TEST."""
    wanted = ARITHMETIC_FEWSHOT + ARITHMETIC_TEST
    drawn = arithmetic_problems(replace(cfg, num_problems=CANDIDATES_PER_PROBLEM * wanted,
                                        seed=cfg.seed + EVAL_SEED_OFFSET + stream))
    taken: set[str] = set(exclude).union(
        *(_questions(t) for t in (training if isinstance(training, list) else [training])))
    keep: list[int] = []
    for index, question in enumerate(drawn["question"]):
        if len(keep) == wanted:
            break
        if question not in taken:
            taken.add(question)
            keep.append(index)
    if len(keep) <= ARITHMETIC_FEWSHOT:
        raise ConfigError(f"field 'data.synthetic': only {len(keep)} of {len(drawn)} arithmetic problems drawn for "
                          f"evaluation are unseen in training; raise num_steps or max_value")
    return DatasetDict(train=drawn.select(keep[:ARITHMETIC_FEWSHOT]), test=drawn.select(keep[ARITHMETIC_FEWSHOT:]))


def add_irrelevant_sentence(question: str, max_value: int, rng: random.Random) -> str:
    """`question` with one sentence before its final question that names a number but not the asked
    person's count of the asked objects, so the answer stays the same (GSM-IC, Shi et al., ICML 2023)."""
    final = _FINAL_QUESTION.search(question)
    if final is None:
        raise ValueError(f"not an arithmetic problem's question: {question!r}")
    name, obj = final["name"], final["obj"]
    sentence = rng.choice(IRRELEVANT_SENTENCES).format(
        name=name, obj=obj, n=rng.randint(2, max_value),
        other=rng.choice([p for p, _ in PEOPLE if p != name]), other_obj=rng.choice([o for o in OBJECTS if o != obj]))
    return f"{question[:final.start()]} {sentence} {final[1]}"


def arithmetic(**world_options: Any) -> DatasetDict:
    """Problems like the run's training problems (same num_steps and max_value), none of them trained on."""
    training = training_arithmetic(world_options)
    return unseen_problems(training, seen_arithmetic(world_options))


def arithmetic_validation(**world_options: Any) -> DatasetDict:
    """Problems like `arithmetic`'s for choosing a checkpoint: from another seed stream (VALIDATION_STREAM), none
    trained on and none among `arithmetic`'s problems, so a choice made on them never sees the test set."""
    training = training_arithmetic(world_options)
    test = arithmetic(**world_options)
    asked = frozenset(test["train"]["question"]) | frozenset(test["test"]["question"])
    return unseen_problems(training, seen_arithmetic(world_options), VALIDATION_STREAM, asked)


def arithmetic_irrelevant(**world_options: Any) -> DatasetDict:
    """The `arithmetic` problems, each with an irrelevant sentence added; answers unchanged."""
    training = training_arithmetic(world_options)
    rng = random.Random(f"{training.seed + EVAL_SEED_OFFSET}:irrelevant")
    return DatasetDict({split: Dataset.from_dict({**docs.to_dict(), "question": [
        add_irrelevant_sentence(q, training.max_value, rng) for q in docs["question"]]})
        for split, docs in arithmetic(**world_options).items()})


def arithmetic_longer(**world_options: Any) -> DatasetDict:
    """Problems one step longer than the run's training problems (num_steps + 1), otherwise alike."""
    training = training_arithmetic(world_options)
    return unseen_problems(replace(training, num_steps=training.num_steps + 1), seen_arithmetic(world_options))


GENERATORS = {"factworld_qa": factworld_qa, "factworld_mc": factworld_mc, "arithmetic": arithmetic,
              "arithmetic_validation": arithmetic_validation,
              "arithmetic_irrelevant": arithmetic_irrelevant, "arithmetic_longer": arithmetic_longer}


def training_data_options(config: dict[str, Any], _seen: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`run_data_options` of a run (`config`: its config.yaml as a dict) and of the runs it descends from.

    A fine-tuning run that started from a run of this workbench (`model.name_or_path` is that run's folder or
    one of its checkpoints) knows the fact world its base was pretrained on: the base's options come first and
    the run's own on top, so e.g. an instruct model tuned on `synthetic:fact_qa` is asked about the base's
    fact world and never about the documents the base held out."""
    from workbench.layout import RUN_CONFIG

    base = (config.get("model") or {}).get("name_or_path")
    inherited: dict[str, Any] = {}
    if base:
        path = Path(base).expanduser()
        run = path if (path / RUN_CONFIG).is_file() else path.parent
        key = str(run.absolute())
        if (run / RUN_CONFIG).is_file() and key not in _seen:
            parent = yaml.safe_load((run / RUN_CONFIG).read_text()) or {}
            inherited = training_data_options(parent, _seen | {key})
    own = run_data_options(config.get("data") or {})
    seen = [*inherited.get("arithmetic_seen", []), *own.get("arithmetic_seen", [])]
    return {**inherited, **own, **({"arithmetic_seen": seen} if seen else {})}
