"""Evaluation documents built from the synthetic fact world the model was trained on.

The entities are split three ways: test items (all but the last 10% and the few-shot pool, and never an
entity whose paragraph the run held out for validation), shuffled with a fixed seed so that any `limit`
takes a spread of entities and attributes; an instruction-tuning pool (the
next 10%, `factworld_sft`) never asked about in evaluation; and a few-shot pool (`train`) of 8 entities.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict

from workbench.data.synthetic import FactWorld, FactWorldConfig

FEWSHOT_ENTITIES = 8  # entities whose facts form the few-shot pool, never test items
SFT_FRACTION = 0.1  # share of entities reserved for instruction tuning, never test items


def _world(options: dict[str, Any]) -> FactWorld:
    known = {"num_entities", "seed", "attributes_per_entity"}
    return FactWorld(FactWorldConfig(**{k: v for k, v in options.items() if k in known}))


def untrained_entities(n: int, options: dict[str, Any]) -> set[int]:
    """Entities whose paragraph the run never trained on: its validation documents (the same split as
    `workbench.data.packing.split_documents`, which depends only on the row count and the seed) and any
    beyond `max_documents`."""
    from workbench.data.packing import split_documents

    rows = min(n, options.get("max_documents") or n)
    fraction = options.get("validation_fraction", 0.0)
    held_out: set[int] = set(range(rows, n))
    if fraction:
        docs = Dataset.from_dict({"text": [str(i) for i in range(rows)]})
        held_out |= {int(t) for t in split_documents(docs, fraction, options.get("split_seed", 0))["validation"]["text"]}
    return held_out


def entity_pools(n: int, untrained: set[int] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(test, instruction tuning, few-shot) entity indices of a world with `n` entities; `untrained` entities
    are never test items (a question about a fact the model never saw measures nothing)."""
    n_sft = int(n * SFT_FRACTION)
    if n - n_sft - FEWSHOT_ENTITIES < 1:
        raise ValueError(f"the fact world has {n} entities; evaluation needs more than {FEWSHOT_ENTITIES + n_sft}")
    test_end = n - FEWSHOT_ENTITIES - n_sft
    test = [i for i in range(test_end) if i not in (untrained or set())]
    return test, list(range(test_end, n - FEWSHOT_ENTITIES)), list(range(n - FEWSHOT_ENTITIES, n))


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
    return Dataset.from_dict({"prompt": [f"Question: {q}\nAnswer:" for q in qa["question"]],
                              "completion": [f" {a}" for a in qa["answer"]]})


GENERATORS = {"factworld_qa": factworld_qa, "factworld_mc": factworld_mc}
