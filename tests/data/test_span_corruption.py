"""T5 span corruption: span counts as T5 rounds them, the (input, target) construction against an independent
decoding, determinism per example index, and the collator's batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.data.span_corruption import (
    VALIDATION_OFFSET,
    SpanCorruptionCollator,
    SpanCorruptionConfig,
    corrupt,
    counted_targets,
    noise_mask,
    span_counts,
)

SENTINELS = list(range(1000, 1100))
EOS, PAD = 0, 1


def test_span_counts_follow_t5_rounding():
    assert span_counts(128, SpanCorruptionConfig()) == (19, 6)  # round(19.2), round(19 / 3)
    assert span_counts(512, SpanCorruptionConfig()) == (77, 26)
    assert span_counts(10, SpanCorruptionConfig(noise_density=0.5, mean_span_length=1)) == (5, 5)


@pytest.mark.parametrize("length", [16, 128, 511])
@pytest.mark.parametrize("seed", range(5))
def test_noise_mask_has_the_counts_and_alternates_starting_clean(length, seed):
    cfg = SpanCorruptionConfig()
    mask = noise_mask(length, cfg, np.random.default_rng(seed))
    noise, spans = span_counts(length, cfg)
    assert mask.shape == (length,) and mask.sum() == noise and not mask[0]
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(starts) == spans


def _uncorrupt(inputs: list[int], targets: list[int]) -> list[int]:
    """Independent reconstruction: replace each sentinel in the input by the tokens after it in the target."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans[token] if token in SENTINELS else [token])
    return out


@pytest.mark.parametrize("seed", range(10))
def test_inputs_and_targets_reconstruct_the_block(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 900, size=128)
    mask = noise_mask(128, SpanCorruptionConfig(), rng)
    inputs, targets = corrupt(tokens, mask, SENTINELS, EOS)
    assert inputs[-1] == EOS and targets[-1] == EOS
    assert len(inputs) == 128 - 19 + 6 + 1 and len(targets) == 19 + 6 + 1
    assert [t for t in inputs if t in SENTINELS] == SENTINELS[:6] == [t for t in targets if t in SENTINELS]
    assert _uncorrupt(inputs, targets) == tokens.tolist()
    assert sorted(t for t in targets if t not in SENTINELS and t != EOS) == sorted(tokens[mask].tolist())


def test_collator_masks_depend_only_on_seed_and_example_index():
    collate = SpanCorruptionCollator(SpanCorruptionConfig(seed=3), SENTINELS, EOS, PAD)
    block = list(range(2, 130))
    a = collate([{"input_ids": block, "example_index": 7}, {"input_ids": block, "example_index": 8}])
    b = collate([{"input_ids": block, "example_index": 7}])
    assert torch.equal(a["input_ids"][0], b["input_ids"][0]) and torch.equal(a["labels"][0], b["labels"][0])
    assert not torch.equal(a["labels"][0], a["labels"][1])  # the same block at another stream position
    assert set(a) == {"input_ids", "attention_mask", "decoder_input_ids", "labels"}
    assert a["attention_mask"].all()
    # the decoder input is the target shifted right behind the start token (pad)
    assert a["decoder_input_ids"][0, 0] == PAD and torch.equal(a["decoder_input_ids"][0, 1:], a["labels"][0, :-1])
    other = SpanCorruptionCollator(SpanCorruptionConfig(seed=4), SENTINELS, EOS, PAD)
    assert not torch.equal(other([{"input_ids": block, "example_index": 7}])["labels"][0], b["labels"][0])
    with pytest.raises(ValueError, match="example_index"):
        collate([{"input_ids": block}])
    assert VALIDATION_OFFSET > 2**31


def test_counted_targets_exclude_sentinels_eos_and_padding():
    labels = np.array([[1000, 5, 6, 1001, 7, EOS, -100]])
    assert counted_targets(1000, EOS)(labels).tolist() == [[False, True, True, False, True, False, False]]


@pytest.mark.parametrize(("kwargs", "message"), [({"noise_density": 0.0}, "noise_density"),
                                                 ({"mean_span_length": 0.5}, "mean_span_length"),
                                                 ({"num_sentinels": 0}, "num_sentinels")])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpanCorruptionConfig(**kwargs)


def test_too_few_sentinels_is_a_clear_error():
    rng = np.random.default_rng(0)
    mask = noise_mask(128, SpanCorruptionConfig(), rng)
    with pytest.raises(ValueError, match="sentinels"):
        corrupt(np.arange(128), mask, SENTINELS[:3], EOS)
