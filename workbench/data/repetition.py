"""Multi-epoch data for repetition studies ("To Repeat or Not To Repeat", Xue et al., NeurIPS 2023).

A fixed budget of D training tokens drawn from U unique tokens: the first U tokens of the (already
shuffled) packed corpus, repeated D/U times, reshuffled every epoch, with a fractional last epoch
(`repeat`). The RS2 arm ("Repeated Random Sampling") instead draws a fresh random subset of U tokens from
the whole pool each epoch at the same budget (`rs2`). Counts are in whole blocks of the packed corpus, so D
and U must be multiples of the block size. The stream is materialised in training order; train it with
`train_sampling_strategy: sequential` so the Trainer does not reshuffle it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from datasets import Dataset


@dataclass(frozen=True)
class RepetitionConfig:
    budget_tokens: int  # D: training tokens in total
    unique_tokens: int  # U: distinct training tokens (a prefix of the corpus for `repeat`)
    mode: Literal["repeat", "rs2"] = "repeat"  # repeat the prefix, or a fresh random subset per epoch
    seed: int = 0  # seed of the per-epoch shuffles

    def __post_init__(self) -> None:
        if self.budget_tokens < 1 or self.unique_tokens < 1:
            raise ValueError(f"budget_tokens and unique_tokens must be positive, got {self.budget_tokens}, "
                             f"{self.unique_tokens}")
        if self.unique_tokens > self.budget_tokens:
            raise ValueError(f"unique_tokens ({self.unique_tokens}) exceeds budget_tokens ({self.budget_tokens})")
        if self.mode not in ("repeat", "rs2"):
            raise ValueError(f"mode must be 'repeat' or 'rs2', got '{self.mode}'")

    @property
    def epochs(self) -> float:
        """E = D / U (fractional when U does not divide D)."""
        return self.budget_tokens / self.unique_tokens


def stream_indices(cfg: RepetitionConfig, pool_blocks: int, block_size: int) -> np.ndarray:
    """Indices into the packed pool, in training order: exactly D / block_size of them."""
    for name, tokens in (("budget_tokens", cfg.budget_tokens), ("unique_tokens", cfg.unique_tokens)):
        if tokens % block_size:
            raise ValueError(f"{name} ({tokens}) must be a multiple of the block size ({block_size})")
    unique, total = cfg.unique_tokens // block_size, cfg.budget_tokens // block_size
    if unique > pool_blocks:
        raise ValueError(f"unique_tokens ({cfg.unique_tokens}) exceeds the corpus ({pool_blocks * block_size} "
                         f"tokens in {pool_blocks} blocks of {block_size})")
    epochs = []
    for epoch in range(math.ceil(total / unique)):
        rng = np.random.default_rng([cfg.seed, epoch])
        if cfg.mode == "repeat":
            epochs.append(rng.permutation(unique))
        else:
            epochs.append(rng.choice(pool_blocks, size=unique, replace=False))
    return np.concatenate(epochs)[:total]


def repetition_stream(pool: Dataset, cfg: RepetitionConfig, block_size: int) -> Dataset:
    """The training stream of `cfg` drawn from `pool` (packed blocks), with the source block as `pool_index`."""
    indices = stream_indices(cfg, len(pool), block_size)
    return pool.select(indices.tolist()).add_column("pool_index", indices.tolist())
