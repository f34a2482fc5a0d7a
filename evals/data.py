"""Evaluation documents built from the synthetic fact world the model was trained on.

The entities are split three ways: test items (all but the last 10% and the few-shot pool), shuffled with a
fixed seed so that any `limit` takes a spread of entities and attributes; an instruction-tuning pool (the
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


def entity_pools(n: int) -> tuple[list[int], list[int], list[int]]:
    """(test, instruction tuning, few-shot) entity indices of a world with `n` entities."""
    n_sft = int(n * SFT_FRACTION)
    if n - n_sft - FEWSHOT_ENTITIES < 1:
        raise ValueError(f"the fact world has {n} entities; evaluation needs more than {FEWSHOT_ENTITIES + n_sft}")
    test_end = n - FEWSHOT_ENTITIES - n_sft
    return list(range(test_end)), list(range(test_end, n - FEWSHOT_ENTITIES)), list(range(n - FEWSHOT_ENTITIES, n))


def _split(world: FactWorld, build) -> DatasetDict:
    test, _, fewshot = entity_pools(len(world.entities))
    return DatasetDict(test=build(test).shuffle(seed=0).flatten_indices(),
                       train=build(fewshot).shuffle(seed=0).flatten_indices())


def factworld_qa(**world_options: Any) -> DatasetDict:
    world = _world(world_options)
    return _split(world, lambda entities: world.qa(entities=entities))


def factworld_mc(**world_options: Any) -> DatasetDict:
    world = _world(world_options)
    return _split(world, lambda entities: world.multiple_choice(entities=entities))


def factworld_sft(**world_options: Any) -> Dataset:
    """Prompt/completion pairs ("Question: q\\nAnswer:", " a") about the instruction-tuning entities only."""
    world = _world(world_options)
    _, sft, _ = entity_pools(len(world.entities))
    qa = world.qa(entities=sft)
    return Dataset.from_dict({"prompt": [f"Question: {q}\nAnswer:" for q in qa["question"]],
                              "completion": [f" {a}" for a in qa["answer"]]})


GENERATORS = {"factworld_qa": factworld_qa, "factworld_mc": factworld_mc}
