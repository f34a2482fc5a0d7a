"""Repetition streams: exact token counts, the same unique prefix each epoch, RS2 subsets, no validation text."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from datasets import Dataset

from workbench.data.repetition import RepetitionConfig, repetition_stream, stream_indices

B = 16  # block size


def _pool(n_blocks: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i * 1000 + t for t in range(B)] for i in range(n_blocks)]})


@pytest.mark.parametrize(("budget", "unique"), [(64 * B, 64 * B), (64 * B, 16 * B), (64 * B, 4 * B), (60 * B, 16 * B)])
def test_exact_token_counts_and_distinct_positions(budget, unique):
    stream = repetition_stream(_pool(100), RepetitionConfig(budget, unique), B)
    tokens = [t for block in stream["input_ids"] for t in block]
    assert len(tokens) == budget
    assert len(set(tokens)) == unique  # exactly U distinct token positions
    assert set(stream["pool_index"]) == set(range(unique // B))  # the first U tokens of the corpus


def test_each_epoch_is_a_permutation_of_the_same_prefix_reshuffled():
    cfg = RepetitionConfig(budget_tokens=50 * B, unique_tokens=8 * B, seed=3)
    order = stream_indices(cfg, 100, B)
    epochs = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert all(sorted(e) == list(range(8)) for e in epochs[:-1])
    assert len(epochs[-1]) == 2 and set(epochs[-1]) <= set(range(8))  # the fractional last epoch
    assert len({tuple(e) for e in epochs[:-1]}) > 1  # reshuffled between epochs
    assert np.array_equal(order, stream_indices(cfg, 100, B))  # seeded


def test_rs2_draws_a_fresh_subset_each_epoch_at_the_same_budget():
    cfg = RepetitionConfig(budget_tokens=40 * B, unique_tokens=10 * B, mode="rs2")
    order = stream_indices(cfg, 100, B)
    epochs = [set(order[i : i + 10]) for i in range(0, 40, 10)]
    assert len(order) == 40 and all(len(e) == 10 for e in epochs)
    assert len(set().union(*epochs)) > 10  # more of the pool is seen than with plain repetition


def test_validation_text_never_in_training(tmp_path):
    from workbench.config import DataConfig, ModelConfig
    from workbench.data import prepare_data

    data = DataConfig(synthetic={"num_entities": 60}, block_size=B, cache_dir=str(tmp_path))
    _, blocks = prepare_data(data, ModelConfig(tokenizer_vocab_size=300))
    unique = (len(blocks["train"]) // 2) * B
    stream = repetition_stream(blocks["train"], RepetitionConfig(4 * unique, unique), B)
    train_blocks = {tuple(b) for b in stream["input_ids"]}
    assert not train_blocks & {tuple(b) for b in blocks["validation"]["input_ids"]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_tokens": 10 * B, "unique_tokens": 20 * B}, "exceeds budget_tokens"),
        ({"budget_tokens": 10 * B, "unique_tokens": 0}, "must be positive"),
        ({"budget_tokens": 10 * B, "unique_tokens": B, "mode": "shuffle"}, "mode must be"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RepetitionConfig(**kwargs)


def test_counts_must_be_whole_blocks_and_fit_the_corpus():
    with pytest.raises(ValueError, match="multiple of the block size"):
        stream_indices(RepetitionConfig(10 * B + 1, B), 100, B)
    with pytest.raises(ValueError, match="exceeds the corpus"):
        stream_indices(RepetitionConfig(200 * B, 200 * B), 100, B)


def test_budget_none_is_one_epoch_of_the_unique_tokens():
    cfg = RepetitionConfig(unique_tokens=12 * B)
    assert cfg.budget_tokens == 12 * B and cfg.epochs == 1
    indices = stream_indices(cfg, 100, B)
    assert sorted(indices.tolist()) == list(range(12))


def test_random_subset_differs_by_seed_and_each_block_repeats_once_per_epoch():
    streams = {}
    for seed in (0, 1):
        cfg = RepetitionConfig(budget_tokens=40 * B, unique_tokens=10 * B, seed=seed, subset="random")
        indices = stream_indices(cfg, 100, B)
        chosen = set(indices.tolist())
        assert len(chosen) == 10 and all(0 <= i < 100 for i in chosen)
        assert all(indices.tolist().count(i) == 4 for i in chosen)
        for epoch in range(4):  # every epoch is a permutation of the same subset
            assert set(indices[epoch * 10:(epoch + 1) * 10].tolist()) == chosen
        streams[seed] = chosen
    assert streams[0] != streams[1]
    prefix = stream_indices(RepetitionConfig(budget_tokens=40 * B, unique_tokens=10 * B), 100, B)
    assert set(prefix.tolist()) == set(range(10))


def test_seed_none_takes_the_run_seed():
    from workbench.data.repetition import resolve_seed

    cfg = RepetitionConfig(budget_tokens=20 * B, unique_tokens=5 * B, seed=None, subset="random")
    with pytest.raises(ValueError, match="seed is None"):
        stream_indices(cfg, 100, B)
    resolved = resolve_seed(cfg, 3)
    assert resolved.seed == 3
    assert (stream_indices(resolved, 100, B) == stream_indices(replace(cfg, seed=3), 100, B)).all()
    with pytest.raises(ValueError, match="unique_tokens is required"):
        RepetitionConfig(budget_tokens=20 * B)
    with pytest.raises(ValueError, match="subset"):
        RepetitionConfig(budget_tokens=20 * B, unique_tokens=5 * B, subset="first")
