"""Multi-epoch data for repetition studies ("To Repeat or Not To Repeat", Xue et al., NeurIPS 2023).

A fixed budget of D training tokens drawn from U unique tokens: the first U tokens of the (already
shuffled) packed corpus, or (`subset: random`) U tokens drawn with the seed, repeated D/U times, reshuffled
every epoch, with a fractional last epoch (`repeat`). `seed: null` takes the run's seed, so the seeds of a
study differ in the repeated subset and its shuffles too; `budget_tokens: null` trains one epoch of the U
tokens (D = U), the single-epoch control. The RS2 arm ("Repeated Random Sampling") instead draws a fresh random subset of U tokens from
the whole pool each epoch at the same budget (`rs2`). Counts are in whole blocks of the packed corpus, so D
and U must be multiples of the block size. The stream is materialised in training order; train it with
`train_sampling_strategy: sequential` so the Trainer does not reshuffle it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from datasets import Dataset


@dataclass(frozen=True)
class RepetitionConfig:
    budget_tokens: int | None = None  # D: training tokens in total; None: D = U (one epoch, the D = U control)
    unique_tokens: int | None = None  # U: distinct training tokens (required)
    mode: Literal["repeat", "rs2"] = "repeat"  # repeat one subset, or a fresh random subset per epoch
    seed: int | None = 0  # seed of the subset (`subset: random`) and of the epoch shuffles; None: the run's seed
    subset: Literal["prefix", "random"] = "prefix"  # `repeat`: the first U tokens of the pool, or a seeded draw

    def __post_init__(self) -> None:
        if self.unique_tokens is None:
            raise ValueError("unique_tokens is required")
        if self.budget_tokens is None:
            object.__setattr__(self, "budget_tokens", self.unique_tokens)
        if self.budget_tokens < 1 or self.unique_tokens < 1:
            raise ValueError(f"budget_tokens and unique_tokens must be positive, got {self.budget_tokens}, "
                             f"{self.unique_tokens}")
        if self.unique_tokens > self.budget_tokens:
            raise ValueError(f"unique_tokens ({self.unique_tokens}) exceeds budget_tokens ({self.budget_tokens})")
        if self.mode not in ("repeat", "rs2"):
            raise ValueError(f"mode must be 'repeat' or 'rs2', got '{self.mode}'")
        if self.subset not in ("prefix", "random"):
            raise ValueError(f"subset must be 'prefix' or 'random', got '{self.subset}'")

    @property
    def epochs(self) -> float:
        """E = D / U (fractional when U does not divide D)."""
        return self.budget_tokens / self.unique_tokens


SUBSET_STREAM = 7  # the random stream of `subset: random` is keyed (seed, 0, SUBSET_STREAM), apart from the shuffles


def resolve_seed(cfg: RepetitionConfig, run_seed: int) -> RepetitionConfig:
    """`cfg` with `seed: None` replaced by the run's seed (so each seed of a study draws its own subset and
    shuffles)."""
    return cfg if cfg.seed is not None else replace(cfg, seed=run_seed)


def stream_indices(cfg: RepetitionConfig, pool_blocks: int, block_size: int) -> np.ndarray:
    """Indices into the packed pool, in training order: exactly D / block_size of them."""
    for name, tokens in (("budget_tokens", cfg.budget_tokens), ("unique_tokens", cfg.unique_tokens)):
        if tokens % block_size:
            raise ValueError(f"{name} ({tokens}) must be a multiple of the block size ({block_size})")
    unique, total = cfg.unique_tokens // block_size, cfg.budget_tokens // block_size
    if unique > pool_blocks:
        raise ValueError(f"unique_tokens ({cfg.unique_tokens}) exceeds the corpus ({pool_blocks * block_size} "
                         f"tokens in {pool_blocks} blocks of {block_size})")
    if cfg.seed is None:
        raise ValueError("seed is None: give the run's seed (`resolve_seed`)")
    chosen = np.arange(unique) if cfg.subset == "prefix" else np.sort(
        np.random.default_rng([cfg.seed, 0, SUBSET_STREAM]).choice(pool_blocks, size=unique, replace=False))
    epochs = []
    for epoch in range(math.ceil(total / unique)):
        rng = np.random.default_rng([cfg.seed, epoch])
        if cfg.mode == "repeat":
            epochs.append(chosen[rng.permutation(unique)])
        else:
            epochs.append(rng.choice(pool_blocks, size=unique, replace=False))
    return np.concatenate(epochs)[:total]


def repetition_stream(pool: Dataset, cfg: RepetitionConfig, block_size: int) -> Dataset:
    """The training stream of `cfg` drawn from `pool` (packed blocks), with the source block as `pool_index`."""
    indices = stream_indices(cfg, len(pool), block_size)
    return pool.select(indices.tolist()).add_column("pool_index", indices.tolist())
