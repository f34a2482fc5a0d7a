"""EigenScore of a model's sampled answers (INSIDE, Chen et al., ICLR 2024), its efficient estimate (EES; SeND,
arXiv 2410.15460) and the mean token entropy, on a fixed set of prompts; `EigenScoreCallback` logs them during
training in anyone's `Trainer`.

For each prompt, K answers are sampled (INSIDE's defaults: K = 10, temperature 0.5, top_p 0.99, top_k 10); one
extra forward pass over the K full sequences (prompt + answer, attention-masked) gives

    z_k   the sentence embedding of answer k: the hidden state of the middle layer (INSIDE's
          `len(hidden_states) // 2`, counting the embedding output as layer 0) at the answer's last token
          (`pooling: last`, INSIDE's `getEigenIndicator_v0`) or averaged over the answer's tokens (`mean`);
          the end-of-sequence token and padding never count
    ES    = (1/K) Σ_i log(λ_i(Σ) + α) of the K×K covariance Σ of z_1..z_K (`workbench.metrics.eigenscore`)
    EES   the same quantity from matrix-vector products (Chebyshev + Hutchinson; no eigendecomposition)
    H     the mean over answer tokens of the entropy (nats) of the model's next-token distribution

An answer of zero tokens (the model ends at once) is embedded at the last prompt token. Higher ES/EES means more
semantically diverse answers, which INSIDE reads as a sign of hallucination; no range is implied (log-eigenvalues
below 1 are negative). Sampling is seeded per prompt (`seed + prompt index`, a generator of its own per prompt), so
the training run's random state is untouched, the same model gives the same scores, and so do any batching of the
prompts (`batch_size` per generate call, left-padded) and any number of ranks (each scores its share, then the
scores are gathered).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TrainerCallback,
)

from workbench.metrics.eigenscore import efficient_eigenscore, eigenscore

POOLINGS = ("last", "mean")


@dataclass
class EigenScoreConfig:
    samples: int = 10  # K answers per prompt
    temperature: float = 0.5
    top_p: float = 0.99
    top_k: int = 10
    max_new_tokens: int = 16
    pooling: Literal["last", "mean"] = "last"  # answer embedding: last answer token, or mean over answer tokens
    layer: int | None = None  # hidden_states index; None: the middle layer, len(hidden_states) // 2 (INSIDE)
    alpha: float = 1e-3  # α in log(λ + α)
    exact: bool = True  # also the exact EigenScore (an eigendecomposition of the K×K covariance)
    moments: int | None = None  # EES Chebyshev degree M (None: eigenscore.py's default)
    probes: int | None = None  # EES Hutchinson probes N_z (None: eigenscore.py's default)
    seed: int = 0
    batch_size: int = 8  # prompts per generate call (batch_size × samples sequences)

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (a covariance of answers), got {self.samples}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("temperature must be > 0, top_p in (0, 1], top_k >= 0 and max_new_tokens >= 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (prompts per generate call), got {self.batch_size}")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _zero3_world() -> bool:
    """Whether generation must keep every rank stepping together (ZeRO-3 gathers weights in each forward)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and _world()[1] > 1


# --- which prompts a rank scores ------------------------------------------------------------------------


def prompt_shard(count: int, world: int, rank: int) -> range:
    """The prompts rank `rank` of `world` scores: a contiguous block; the first `count % world` ranks take one
    more than the others, so the blocks tile 0..count−1 in rank order."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard_batches(count: int, world: int, rank: int, batch_size: int) -> tuple[list[range], int]:
    """(this rank's batches of at most `batch_size` prompt indices, the dummy batches it runs after them):
    every rank runs ⌈⌈count/world⌉/batch_size⌉ batches in all, the batch count of the largest share, since
    under ZeRO-3 each generate and forward call is a collective that every rank must join."""
    share = prompt_shard(count, world, rank)
    batches = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
    largest = math.ceil(math.ceil(count / world) / batch_size)
    return batches, largest - len(batches)


# --- sampling ---------------------------------------------------------------------------------------------


@dataclass
class SampledAnswers:
    """K sampled answers to each of B prompts. Rows b·K .. b·K + K − 1 belong to prompt b; the prompts are
    left-padded to a common width P, so every answer starts at column P.

    sequences (B·K, T) token ids; prompt_mask (B·K, T) the prompt's own tokens (not its left padding);
    answer (B·K, T) the answer tokens, up to (not including) the first EOS or padding; prompt_length P."""

    sequences: torch.Tensor
    prompt_mask: torch.Tensor
    answer: torch.Tensor
    prompt_length: int


class PerPromptSampler(LogitsProcessor):
    """Multinomial sampling with one random generator per prompt, as a logits processor for greedy `generate`.

    Rows are grouped by prompt (`samples` consecutive rows each). The scores are warped as `generate` warps them
    when sampling (temperature, then top-k, then top-p), turned into probabilities, and each prompt's rows draw
    their next tokens from that prompt's generator; the processor returns 0 at the drawn token and −∞ elsewhere,
    so greedy decoding takes it. A prompt's draws thus depend on its seed alone, not on the prompts batched with
    it, and with one prompt they are those of `generate(do_sample=True)` after `torch.manual_seed(seed)`."""

    def __init__(self, seeds: Sequence[int], samples: int, config: EigenScoreConfig, device: torch.device) -> None:
        self.samples = samples
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        warpers = [TemperatureLogitsWarper(config.temperature)] if config.temperature != 1.0 else []
        if config.top_k:
            warpers.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        tokens = torch.cat([torch.multinomial(probs[i * self.samples:(i + 1) * self.samples], 1, generator=g)
                            for i, g in enumerate(self.generators)])
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


def _answer_mask(sequences: torch.Tensor, prompt_length: int, eos_id: int | None, pad_id: int | None) -> torch.Tensor:
    """(K, T) bool: the answer tokens of each sampled sequence, up to (not including) its first EOS."""
    answer = torch.zeros_like(sequences, dtype=torch.bool)
    answer[:, prompt_length:] = True
    stop = torch.zeros_like(answer)
    for token in {eos_id, pad_id} - {None}:
        stop |= sequences == token
    stop[:, :prompt_length] = False
    after_stop = stop.cumsum(dim=1) > 0  # the stop token and everything after it
    return answer & ~after_stop


def _left_padded(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' token ids left-padded to the longest, and their attention mask: (B, P) each."""
    token_lists = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    if any(len(tokens) == 0 for tokens in token_lists):
        raise ValueError("an EigenScore prompt is empty after tokenisation")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def sample_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   config: EigenScoreConfig, seeds: Sequence[int]) -> SampledAnswers:
    """`config.samples` sampled continuations of each prompt, drawn with that prompt's seed, in one `generate`
    call (synchronised across ranks under ZeRO-3); the global random state is not touched."""
    device = next(model.parameters()).device
    ids, mask = (tensor.repeat_interleave(config.samples, dim=0).to(device)
                 for tensor in _left_padded(prompts, tokenizer))
    sampler = PerPromptSampler(seeds, config.samples, config, device)
    sequences = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, logits_processor=LogitsProcessorList([sampler]),
        max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, synced_gpus=_zero3_world(), use_cache=True)
    prompt_length = ids.shape[1]
    prompt_mask = torch.zeros_like(sequences, dtype=torch.bool)
    prompt_mask[:, :prompt_length] = mask.bool()
    answer = _answer_mask(sequences, prompt_length, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return SampledAnswers(sequences, prompt_mask, answer, prompt_length)


# --- embeddings and entropy -------------------------------------------------------------------------------

ENTROPY_CHUNK_ELEMENTS = 1 << 24  # float32 log-probabilities held at once (64 MiB), however large the vocabulary


def _answer_entropy(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """(R,) mean entropy (nats) of the next-token distributions at the `predicted` positions of (R, S, V)
    logits, in float32 over a few rows at a time (no (R, S, V) float32 copy); 0 where a row predicts none."""
    rows_per_chunk = max(1, ENTROPY_CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    means = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        log_probs = torch.log_softmax(logits[start:start + rows_per_chunk].float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        chosen = predicted[start:start + rows_per_chunk]
        means.append(torch.where(chosen, entropy, 0.0).sum(1) / chosen.sum(1).clamp(min=1))
    return torch.cat(means)


def answer_embeddings(model: torch.nn.Module, sampled: SampledAnswers,
                      config: EigenScoreConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, d) answer embeddings from the chosen layer, and the mean token entropy of each answer (R,) (NaN for
    an empty answer), from one forward pass over the R = B·K sequences with the positions the unpadded
    sequences have; logits are computed for the answer positions only."""
    sequences, answer, prompt_length = sampled.sequences, sampled.answer, sampled.prompt_length
    # the EOS that ended an answer is attended to by nothing we pool, so the mask stops at the answer's end
    attended = sampled.prompt_mask | answer
    positions = (attended.long().cumsum(dim=1) - 1).clamp(min=0)
    kept = sequences.shape[1] - prompt_length + 1  # logits at columns P−1 .. T−1
    outputs = model(input_ids=sequences, attention_mask=attended.long(), position_ids=positions,
                    output_hidden_states=True, use_cache=False, logits_to_keep=kept)
    hidden_states = outputs.hidden_states
    layer = len(hidden_states) // 2 if config.layer is None else config.layer
    hidden = hidden_states[layer].float()
    lengths = answer.sum(dim=1)
    last = torch.where(lengths > 0, prompt_length + lengths - 1, torch.full_like(lengths, prompt_length - 1))
    if config.pooling == "last":
        embeddings = hidden[torch.arange(len(hidden), device=hidden.device), last]
    else:
        weights = answer.clone()
        weights[lengths == 0, prompt_length - 1] = True
        embeddings = torch.where(weights.unsqueeze(-1), hidden, 0.0).sum(1) / weights.sum(1, keepdim=True)
    # entropy of the distribution each answer token was drawn from: logits at column t−1 predict token t
    token_entropy = _answer_entropy(outputs.logits[:, -kept:-1], answer[:, prompt_length:])
    return embeddings, torch.where(lengths > 0, token_entropy, torch.full_like(token_entropy, math.nan))


# --- the report -------------------------------------------------------------------------------------------


def _score_batch(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 indices: range, config: EigenScoreConfig, timings: dict[str, float]) -> list[dict[str, float]]:
    """The scores of the prompts numbered `indices` (seeded `config.seed + index`), one dict per prompt."""
    started = time.perf_counter()
    seeds = [config.seed + index for index in indices]
    sampled = sample_answers(model, tokenizer, [prompts[index] for index in indices], config, seeds)
    embeddings, entropy = answer_embeddings(model, sampled, config)
    timings["seconds_sampling"] += time.perf_counter() - started
    estimator = {k: v for k, v in (("moments", config.moments), ("probes", config.probes)) if v is not None}
    rows = config.samples
    scores = []
    for position, seed in enumerate(seeds):
        group = slice(position * rows, (position + 1) * rows)
        vectors = embeddings[group].double()
        started = time.perf_counter()
        score = {"ees": float(efficient_eigenscore(vectors, alpha=config.alpha, seed=seed, **estimator))}
        timings["seconds_ees"] += time.perf_counter() - started
        if config.exact:
            started = time.perf_counter()
            score["eigenscore"] = float(eigenscore(vectors, alpha=config.alpha))
            timings["seconds_exact"] += time.perf_counter() - started
        finite = entropy[group][~entropy[group].isnan()]
        score["entropy"] = float(finite.mean()) if len(finite) else math.nan
        score["answer_tokens"] = float(sampled.answer[group].sum(1).float().mean())
        scores.append(score)
    return scores


def _gathered(local: dict[int, dict[str, float]], world: int) -> dict[int, dict[str, float]]:
    """Every rank's scores, by prompt index (a collective with more than one rank)."""
    if world == 1:
        return local
    shares: list[dict[int, dict[str, float]] | None] = [None] * world
    torch.distributed.all_gather_object(shares, local)
    return {index: score for share in shares for index, score in share.items()}


@torch.no_grad()
def eigenscore_report(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                      config: EigenScoreConfig | None = None) -> dict[str, Any]:
    """Per-prompt and mean `ees`, `eigenscore` (if `config.exact`), `entropy`, `answer_tokens` over `prompts`;
    `seconds_sampling` and `seconds_ees`/`seconds_exact` are this rank's wall time of each part.

    Prompts go `config.batch_size` at a time through `generate`. With a process group of several ranks each
    rank scores its share (`prompt_shard`) and the scores are gathered, so every rank gets all of them: a
    collective, which every rank calls with the same prompts. Under ZeRO-3 a rank with fewer batches runs
    dummy ones (the first prompt, result dropped) so that all ranks join the same generate and forward calls.
    Each prompt is sampled from its own seed, so the scores do not depend on the batching or the ranks."""
    config = config or EigenScoreConfig()
    if not prompts:
        raise ValueError("EigenScore needs at least one prompt")
    rank, world = _world()
    batches, dummies = shard_batches(len(prompts), world, rank, config.batch_size)
    timings = {"seconds_sampling": 0.0, "seconds_ees": 0.0, "seconds_exact": 0.0}
    local: dict[int, dict[str, float]] = {}
    with _eval_mode(model):
        for indices in batches:
            local.update(zip(indices, _score_batch(model, tokenizer, prompts, indices, config, timings), strict=True))
        for _ in range(dummies if _zero3_world() else 0):
            _score_batch(model, tokenizer, prompts, range(1), config, dict(timings))
    scores = _gathered(local, world)
    names = ["ees", *(["eigenscore"] if config.exact else []), "entropy", "answer_tokens"]
    items = {name: [scores[index][name] for index in range(len(prompts))] for name in names}
    means = {name: _nanmean(values) for name, values in items.items()}
    return {**means, "items": items, **timings}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


class EigenScoreCallback(TrainerCallback):
    """Logs `<prefix>_ees`, `<prefix>_eigenscore` (with `config.exact`) and `<prefix>_entropy` on `prompts` at
    every evaluation and/or save step, in any `Trainer`.

    The scores are computed at the end of the step the Trainer will evaluate or save at (its `eval_steps` /
    `save_steps`, or `every` steps when given) and added to the first log of that step, or the next one (with
    `<prefix>_step`, the step they were measured at). Every rank calls `eigenscore_report` (a collective with
    several ranks: each samples its share of the prompts, every rank gets all the scores); rank 0's logs carry
    them. So that TensorBoard and other reporters see the added keys, the callback must come before them: the
    workbench trainer puts it first (`adds_metrics`); in a plain `Trainer`,
    `trainer.callback_handler.callbacks.insert(0, callback)`."""

    adds_metrics = True

    def __init__(self, prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                 config: EigenScoreConfig | None = None, on: Literal["evaluate", "save", "both"] = "both",
                 every: int | None = None, prefix: str = "eigenscore") -> None:
        if on not in ("evaluate", "save", "both"):
            raise ValueError(f"on must be evaluate, save or both, got {on!r}")
        if not prompts:
            raise ValueError("EigenScoreCallback needs at least one prompt")
        self.prompts, self.tokenizer, self.config = list(prompts), tokenizer, config or EigenScoreConfig()
        self.on, self.every, self.prefix = on, every, prefix
        self.pending: dict[str, float] | None = None
        self.last: dict[str, float] = {}

    def due(self, args, state) -> bool:
        """Whether the Trainer evaluates or saves at this step (the steps strategy), or `every` divides it."""
        if self.every:
            return state.global_step % self.every == 0
        return bool((self.on != "save" and evaluation_step(args, state))
                    or (self.on != "evaluate" and save_step(args, state)))

    def on_step_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        if model is None or not self.due(args, state):
            return
        report = eigenscore_report(model, self.tokenizer, self.prompts, self.config)
        scores = {f"{self.prefix}_{k}": report[k] for k in ("ees", "eigenscore", "entropy") if k in report}
        scores[f"{self.prefix}_step"] = state.global_step
        scores[f"{self.prefix}_seconds"] = report["seconds_sampling"] + report["seconds_ees"] + report["seconds_exact"]
        self.pending, self.last = scores, scores

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and self.pending is not None:
            logs.update(self.pending)
            self.pending = None


def _by_steps(strategy: Any) -> bool:
    return getattr(strategy, "value", strategy) == "steps"


def evaluation_step(args, state) -> bool:
    """Whether the Trainer evaluates at the end of this step, decided as its `DefaultFlowCallback` decides
    (`eval_strategy: steps`, and the last step), so a callback that runs before that one can prepare."""
    if not _by_steps(args.eval_strategy) or args.eval_delay > state.global_step or not state.eval_steps:
        return False
    return state.global_step % state.eval_steps == 0 or state.global_step >= state.max_steps


def save_step(args, state) -> bool:
    """Whether the Trainer saves a checkpoint at the end of this step (`save_strategy: steps`; the last step
    too), decided as its `DefaultFlowCallback` decides."""
    if not _by_steps(args.save_strategy) or not state.save_steps:
        return False
    return state.global_step % state.save_steps == 0 or state.global_step >= state.max_steps
