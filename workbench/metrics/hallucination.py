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
below 1 are negative). Sampling is seeded per prompt (`seed + prompt index`) inside a forked RNG, so the
training run's random state is untouched and the same model gives the same scores.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

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

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (a covariance of answers), got {self.samples}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("temperature must be > 0, top_p in (0, 1], top_k >= 0 and max_new_tokens >= 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _zero3_world() -> bool:
    """Whether generation must keep every rank stepping together (ZeRO-3 gathers weights in each forward)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return (is_deepspeed_zero3_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


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


def sample_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str,
                   config: EigenScoreConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K sampled continuations of `prompt`: (sequences (K, T), answer mask (K, T), prompt length)."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"].to(device)
    if input_ids.shape[1] == 0:
        raise ValueError("an EigenScore prompt is empty after tokenisation")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        sequences = model.generate(
            input_ids=input_ids.repeat(config.samples, 1), attention_mask=torch.ones_like(input_ids).repeat(
                config.samples, 1), do_sample=True, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, synced_gpus=_zero3_world(), use_cache=True)
    mask = _answer_mask(sequences, input_ids.shape[1], tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sequences, mask, input_ids.shape[1]


def answer_embeddings(model: torch.nn.Module, sequences: torch.Tensor, answer: torch.Tensor, prompt_length: int,
                      config: EigenScoreConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d) answer embeddings from the chosen layer, and the mean token entropy of each answer (K,)."""
    seen = torch.zeros_like(answer)
    seen[:, :prompt_length] = True
    seen |= answer
    lengths = answer.sum(dim=1)
    # the EOS that ended an answer is attended to by nothing we pool, so the mask stops at the answer's end
    outputs = model(input_ids=sequences, attention_mask=seen.long(), output_hidden_states=True, use_cache=False)
    hidden_states = outputs.hidden_states
    layer = len(hidden_states) // 2 if config.layer is None else config.layer
    hidden = hidden_states[layer].float()
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    last = torch.where(lengths > 0, prompt_length + lengths - 1, torch.full_like(lengths, prompt_length - 1))
    if config.pooling == "last":
        embeddings = hidden[torch.arange(len(hidden)), last]
    else:
        weights = answer.float()
        weights[lengths == 0, prompt_length - 1] = 1.0
        embeddings = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
    # entropy of the distribution each answer token was drawn from: logits at t-1 predict token t
    log_probs = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    predicted = answer[:, 1:] & (positions[1:] >= prompt_length)
    token_entropy = (entropy * predicted).sum(1) / predicted.sum(1).clamp(min=1)
    return embeddings, torch.where(lengths > 0, token_entropy, torch.full_like(token_entropy, math.nan))


@torch.no_grad()
def eigenscore_report(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                      config: EigenScoreConfig | None = None) -> dict[str, Any]:
    """Per-prompt and mean `ees`, `eigenscore` (if `config.exact`), `entropy`, `answer_tokens` over `prompts`;
    `seconds_sampling` and `seconds_ees`/`seconds_exact` are the wall time of each part."""
    config = config or EigenScoreConfig()
    if not prompts:
        raise ValueError("EigenScore needs at least one prompt")
    items: dict[str, list[float]] = {"ees": [], "entropy": [], "answer_tokens": []}
    if config.exact:
        items["eigenscore"] = []
    timings = {"seconds_sampling": 0.0, "seconds_ees": 0.0, "seconds_exact": 0.0}
    estimator = {k: v for k, v in (("moments", config.moments), ("probes", config.probes)) if v is not None}
    with _eval_mode(model):
        for index, prompt in enumerate(prompts):
            started = time.perf_counter()
            sequences, answer, prompt_length = sample_answers(model, tokenizer, prompt, config, config.seed + index)
            embeddings, entropy = answer_embeddings(model, sequences, answer, prompt_length, config)
            timings["seconds_sampling"] += time.perf_counter() - started
            started = time.perf_counter()
            items["ees"].append(float(efficient_eigenscore(embeddings.double(), alpha=config.alpha,
                                                           seed=config.seed + index, **estimator)))
            timings["seconds_ees"] += time.perf_counter() - started
            if config.exact:
                started = time.perf_counter()
                items["eigenscore"].append(float(eigenscore(embeddings.double(), alpha=config.alpha)))
                timings["seconds_exact"] += time.perf_counter() - started
            finite = entropy[~entropy.isnan()]
            items["entropy"].append(float(finite.mean()) if len(finite) else math.nan)
            items["answer_tokens"].append(float(answer.sum(1).float().mean()))
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
    `<prefix>_step`, the step they were measured at). Every rank computes them (under ZeRO-3 generation is a
    collective); rank 0's logs carry them. So that TensorBoard and other reporters see the added keys, the
    callback must come before them: the workbench trainer puts it first (`adds_metrics`); in a plain `Trainer`,
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
