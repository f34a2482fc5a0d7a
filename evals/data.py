"""Evaluation documents built from the synthetic fact world the model was trained on.

Test items cover every entity except a small few-shot pool, shuffled with a fixed seed so that any `limit`
takes a spread of entities and attributes; the few-shot pool (`train`) holds other entities' facts.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from workbench.data.synthetic import FactWorld, FactWorldConfig

FEWSHOT_ENTITIES = 8  # entities whose facts form the few-shot pool, never test items


def _world(options: dict[str, Any]) -> FactWorld:
    known = {"num_entities", "seed", "attributes_per_entity"}
    return FactWorld(FactWorldConfig(**{k: v for k, v in options.items() if k in known}))


def _split(world: FactWorld, build) -> DatasetDict:
    n = len(world.entities)
    if n <= FEWSHOT_ENTITIES:
        raise ValueError(f"the fact world has {n} entities; evaluation needs more than {FEWSHOT_ENTITIES}")
    test = build(list(range(n - FEWSHOT_ENTITIES))).shuffle(seed=0).flatten_indices()
    pool = build(list(range(n - FEWSHOT_ENTITIES, n))).shuffle(seed=0).flatten_indices()
    return DatasetDict(test=test, train=pool)


def factworld_qa(**world_options: Any) -> DatasetDict:
    world = _world(world_options)
    return _split(world, lambda entities: world.qa(entities=entities))


def factworld_mc(**world_options: Any) -> DatasetDict:
    world = _world(world_options)
    return _split(world, lambda entities: world.multiple_choice(entities=entities))


GENERATORS = {"factworld_qa": factworld_qa, "factworld_mc": factworld_mc}
