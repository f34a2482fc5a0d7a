"""Scoring pieces the prompt styles share: answer normalisation, exact match and F1, Blank-ppl, and the
number of a worked answer.

Exact match and F1 follow SQuAD's normalisation (lower case, no punctuation, no articles, single spaces).
Blank-ppl (BOSE, Luan et al., Findings of ACL 2025; our spec `docs/specs/bose.md`) scores each option by
the mean negative log-likelihood of the span after the blank, s_k = -(1/n_k) sum_t log p(x_t | x_<t, P),
and predicts argmin_k s_k (lowest perplexity exp s_k; a tie goes to the lowest index).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from workbench.gsm8k import GSM8K_ANSWER  # the answer pattern of parse_gsm8k_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line_answer(generation: str) -> str:
    """The answer part of a plain generation: its first line, stripped."""
    return generation.strip().split("\n")[0].strip()


# The number of a worked answer ("... #### N"), for lm-eval's regex filter: the pattern of the generator's own
# `parse_gsm8k_answer` (which takes the last match, as the filter does with group_select -1).
NUMBER_PATTERN = GSM8K_ANSWER.pattern
# What lm-eval's exact_match ignores in the extracted number and the gold one, so that it matches exactly when
# parse_gsm8k_answer gives the gold integer: thousands separators, a zero fraction, leading zeros.
NUMBER_VARIANTS = (",", r"\.0+$", r"(?<![\d.])0+(?=\d)")


# Counts the tokens a model scores for continuation `cont` after context `ctx`. The sweep installs the
# language model's own split (HFLM._encode_pair) so n_k matches the scored tokens exactly; without one,
# Blank-ppl normalises by UTF-8 bytes.
TokenCounter = Callable[[str, str], int]


class BlankPplScorer:
    """`process_results` for the Blank-ppl style: argmin of length-normalised NLL over the options.

    `norm`: 'token' (mean NLL per scored token; default), 'byte' (per UTF-8 byte), 'none' (total NLL).
    """

    token_counter: TokenCounter | None = None  # set by the evaluator for the model being evaluated

    def __init__(self, context: Callable[[dict], str], continuations: Callable[[dict], list[str]],
                 gold: Callable[[dict], int], norm: str = "token") -> None:
        if norm not in ("token", "byte", "none"):
            raise ValueError(f"blank_ppl norm must be token, byte or none, got '{norm}'")
        self.context, self.continuations, self.gold, self.norm = context, continuations, gold, norm

    def lengths(self, doc: dict) -> list[int]:
        ctx, conts = self.context(doc), self.continuations(doc)
        if self.norm == "none":
            return [1] * len(conts)
        if self.norm == "token" and BlankPplScorer.token_counter is not None:
            return [max(1, BlankPplScorer.token_counter(ctx, c)) for c in conts]
        return [max(1, len(c.encode())) for c in conts]

    def scores(self, doc: dict, loglikelihoods: Sequence[float]) -> list[float]:
        """s_k for every option (lower is better)."""
        return [-ll / n for ll, n in zip(loglikelihoods, self.lengths(doc), strict=True)]

    def __call__(self, doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
        s = self.scores(doc, [ll for ll, _ in results])
        best = min(range(len(s)), key=lambda k: (s[k], k))
        gold = self.gold(doc)
        return {"acc": float(best == gold), "gold_ppl": math.exp(min(s[gold], 50.0))}


class GoldNllScorer(BlankPplScorer):
    """`process_results` of a one-continuation log-likelihood request (the gold answer): its NLL per token
    (nats; `norm` as for Blank-ppl), metric `nll`."""

    def __call__(self, doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
        return {"nll": self.scores(doc, [ll for ll, _ in results])[self.gold(doc)]}
