"""T5's span-corruption objective (Raffel et al., JMLR 2020, Sec. 3.1.4 and 3.3.4) for encoder-decoder presets.

Each packed block of L tokens is split into `round(L * noise_density)` noise tokens in
`round(noise_tokens / mean_span_length)` spans, placed at random and alternating with non-noise spans
(the first span is non-noise), as in T5's `random_spans_noise_mask`. The encoder sees the non-noise
tokens with each noise span replaced by a sentinel; the decoder predicts each sentinel followed by the
span it replaced; both end in EOS. With L = 128 and the defaults (0.15, 3): 19 noise tokens in 6 spans,
an encoder input of 116 and a target of 26 tokens, the same for every block (no padding).

The noise mask of an example is a pure function of (seed, example_index): the same example seen in a
later epoch gets a fresh mask (its stream position differs), a resumed or multi-rank run draws exactly
the masks an uninterrupted run would, and validation masks are the same at every evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

SENTINEL = "<extra_id_{}>"
VALIDATION_OFFSET = 2**32  # validation examples are numbered from here, apart from any training position


@dataclass(frozen=True)
class SpanCorruptionConfig:
    noise_density: float = 0.15  # share of each block's tokens that are masked (T5: 0.15)
    mean_span_length: float = 3.0  # mean length of a masked span (T5: 3)
    num_sentinels: int = 100  # sentinel tokens added to the vocabulary (T5: 100)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ValueError(f"mean_span_length must be at least 1, got {self.mean_span_length}")
        if self.num_sentinels < 1:
            raise ValueError(f"num_sentinels must be positive, got {self.num_sentinels}")


def span_counts(length: int, cfg: SpanCorruptionConfig) -> tuple[int, int]:
    """(noise tokens, noise spans) for a block of `length` tokens, as T5 rounds them."""
    noise = min(max(round(length * cfg.noise_density), 1), length - 1)
    spans = max(min(round(noise / cfg.mean_span_length), noise, length - noise), 1)
    return noise, spans


def _random_segmentation(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `segments` non-empty segments summing to `items`, uniformly over such partitions."""
    cuts = np.sort(rng.choice(np.arange(1, items), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [items]]))


def noise_mask(length: int, cfg: SpanCorruptionConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the noise positions: non-noise and noise spans alternate, non-noise first."""
    noise, spans = span_counts(length, cfg)
    noise_lengths = _random_segmentation(noise, spans, rng)
    clean_lengths = _random_segmentation(length - noise, spans, rng)
    runs = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), runs)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: list[int], eos_id: int) -> tuple[list, list]:
    """(encoder input, target): each noise span -> one sentinel in the input; sentinel + span in the target."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span_number = np.cumsum(starts) - 1
    if span_number[-1] >= len(sentinel_ids):
        raise ValueError(f"{span_number[-1] + 1} masked spans but only {len(sentinel_ids)} sentinels")
    inputs, targets = [], []
    for position, token in enumerate(tokens.tolist()):
        if not mask[position]:
            inputs.append(token)
            continue
        if starts[position]:
            inputs.append(sentinel_ids[span_number[position]])
            targets.append(sentinel_ids[span_number[position]])
        targets.append(token)
    return inputs + [eos_id], targets + [eos_id]


def add_sentinels(tokenizer: PreTrainedTokenizerBase, cfg: SpanCorruptionConfig) -> list[int]:
    """Add `<extra_id_i>` special tokens (if missing) and return their ids, in span order."""
    names = [SENTINEL.format(i) for i in range(cfg.num_sentinels)]
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(n, special=True, normalized=False) for n in missing], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(names)


class SpanCorruptionCollator:
    """Batches of packed blocks (`input_ids`, `example_index`) -> T5 `input_ids`, `attention_mask`,
    `decoder_input_ids` and `labels`."""

    def __init__(self, cfg: SpanCorruptionConfig, sentinel_ids: list[int], eos_id: int, pad_id: int) -> None:
        self.cfg, self.sentinel_ids, self.eos_id, self.pad_id = cfg, sentinel_ids, eos_id, pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = []
        for example in examples:
            if "example_index" not in example:
                raise ValueError("span corruption needs an 'example_index' column (see workbench.run)")
            tokens = np.asarray(example["input_ids"])
            rng = np.random.default_rng([self.cfg.seed, int(example["example_index"])])
            pairs.append(corrupt(tokens, noise_mask(len(tokens), self.cfg, rng), self.sentinel_ids, self.eos_id))
        inputs = _pad([p[0] for p in pairs], self.pad_id)
        labels = _pad([p[1] for p in pairs], -100)
        # the decoder input is the target shifted right after the start token (T5's decoder_start = pad); given
        # here, as DataCollatorForSeq2Seq does, so the model need not see `labels` (label smoothing pops them)
        decoder_inputs = torch.cat([torch.full_like(labels[:, :1], self.pad_id), labels[:, :-1]], dim=1)
        decoder_inputs[decoder_inputs == -100] = self.pad_id
        return {"input_ids": inputs, "attention_mask": (inputs != self.pad_id).long(),
                "decoder_input_ids": decoder_inputs, "labels": labels}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def counted_targets(first_sentinel: int, eos_id: int):
    """The label positions span-corruption metrics count: masked-out text, not sentinels, EOS or padding
    (for `workbench.metrics.token_metrics(shift=False, counted=...)`)."""

    def counted(labels: np.ndarray) -> np.ndarray:
        return (labels != eos_id) & (labels < first_sentinel) & (labels >= 0)

    return counted
