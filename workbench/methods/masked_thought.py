"""Masked Thought fine-tuning (MFT): SFT with random input-side masking of the reasoning tokens.

Chen et al., "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning
Learning of Language Models", ACL 2024 (arXiv 2403.02178); official code AlibabaResearch/DAMO-ConvAI,
`MaskedThought/`. Each batch keeps its labels (the original tokens, prompt at -100) and replaces every
completion token of its *inputs* independently with probability p(step):

    x~_t = r_t  if t is a completion position and u_t < p(step), else x_t     (u_t ~ U(0, 1), fresh per batch)
    loss = -sum_{t in completion} log P(x_t | x~_<t)                          (labels: the clean tokens)

where r_t is the `<mask>` token (default), the pad token, or a uniformly random vocabulary token, and
p(step) = min(p_max, p_max * step / (ramp_fraction * max_steps + 1)), the official scripts' linear ramp
over the first 66% of the optimizer steps (or p_max throughout: `schedule: constant`). Masking position t
leaves the prediction of x_t itself alone (it reads x~_<t) and hides x_t from every later prediction, so
the model must recover the reasoning from the question and the steps it can still see.

    methods:
      masked_thought: {p_max: 0.4, replacement: mask}        # the official GSM8K/RFT setting with <mask>

Pieces usable in any `Trainer`/`SFTTrainer` (also exported by `workbench.collators`):
`MaskedThoughtCollator` (wraps any prompt/completion collator), `MaskSchedule` (p(step) and the step of each
batch, shared with dataloader workers) and `MaskedThoughtCallback` (keeps the schedule on the Trainer's
optimizer step). The step comes from the Trainer's state, so a resumed run continues the same schedule and
the same masks: there is no method state to save.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainerControl

from workbench.distributed import gathered_parameters
from workbench.errors import ConfigError
from workbench.methods import Method, register

if TYPE_CHECKING:  # workbench.models.lora imports PEFT: only a LoRA run needs it
    from workbench.models.lora import AddedTokenRows

MASK_TOKEN = "<mask>"
SCHEDULES = ("ramp", "constant")
REPLACEMENTS = ("mask", "pad", "random")
TARGETS = ("completion", "prompt")


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


def check_schedule(p_max: float, schedule: str, ramp_fraction: float) -> None:
    """Raise ValueError naming the first invalid schedule option."""
    if not 0.0 <= p_max <= 1.0:
        raise ValueError(f"p_max must be in [0, 1], got {p_max}")
    check_choice("schedule", schedule, SCHEDULES)
    if not 0.0 < ramp_fraction <= 1.0:
        raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction}")


@dataclass
class MaskedThoughtConfig:
    p_max: float = 0.4  # masking probability at the end of the ramp (or throughout), in [0, 1]
    schedule: Literal["ramp", "constant"] = "ramp"  # ramp: 0 -> p_max over ramp_fraction of max_steps; constant
    ramp_fraction: float = 0.66  # share of the optimizer steps the ramp lasts, in (0, 1]
    replacement: Literal["mask", "pad", "random"] = "mask"  # an added <mask> token, the pad token, a random token
    target: Literal["completion", "prompt"] = "completion"  # prompt: mask the question instead (a control arm)

    def __post_init__(self) -> None:
        check_schedule(self.p_max, self.schedule, self.ramp_fraction)
        check_choice("replacement", self.replacement, REPLACEMENTS)
        check_choice("target", self.target, TARGETS)


# ----------------------------------------------------------------------------------------------------------
# The schedule: p(step), and which optimizer step and micro-batch each collated batch belongs to
# ----------------------------------------------------------------------------------------------------------


class MaskSchedule:
    """p(step), and the (optimizer step, micro-batch) of every batch the collator builds.

    A batch's step is counted, not read from a clock: the Trainer collates a step's micro-batches before it
    announces the step (`get_batch_samples`), accelerate collates one batch ahead, and dataloader workers
    collate several ahead in other processes. So `start_epoch(step)` (the callback, at each epoch's start,
    before the epoch's iterator exists) records the epoch's first step in shared memory, and the n-th batch
    of the epoch belongs to step `first + n // gradient_accumulation_steps`, micro-batch `n % ...`. A worker
    knows n from its own count: a map-style DataLoader hands batch n to worker n % num_workers, in order.
    On resume the Trainer skips the trained batches without collating them, and the epoch starts at the
    resumed step. The random stream of a batch is a function of (seed, rank, step, micro-batch) only.
    """

    def __init__(self, p_max: float = 0.4, schedule: str = "ramp", ramp_fraction: float = 0.66) -> None:
        check_schedule(p_max, schedule, ramp_fraction)
        self.p_max, self.schedule, self.ramp_fraction = p_max, schedule, ramp_fraction
        self.total_steps: int | None = None
        self.gradient_accumulation_steps, self.seed, self.rank = 1, 0, 0
        self.driven = False  # a callback (or the user) drives it; a collator refuses to run otherwise
        self.training = False  # between the first epoch's start and the end of training
        self.control: TrainerControl | None = None  # the Trainer's: evaluation is due while should_evaluate
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch count, its first step]
        self._seen_epoch, self._batches = 0, 0  # per process (a worker's copy counts its own batches)

    def configure(self, total_steps: int, gradient_accumulation_steps: int = 1, seed: int = 0, rank: int = 0) -> None:
        """The run's optimizer steps (the ramp's length), accumulation, seed and rank."""
        self.total_steps, self.gradient_accumulation_steps = total_steps, gradient_accumulation_steps
        self.seed, self.rank, self.driven = seed, rank, True

    def rate(self, step: int) -> float:
        """p at optimizer step `step` (0-based: the number of steps already taken)."""
        if self.schedule == "constant":
            return self.p_max
        if self.total_steps is None:
            raise ValueError("MaskSchedule: the ramp needs the run's length: call configure(total_steps=...)")
        return min(self.p_max, self.p_max * step / (self.ramp_fraction * self.total_steps + 1))

    @property
    def active(self) -> bool:
        """Whether the batch being built is masked: training batches are, evaluation batches are not. Read at
        collation time, after every callback has had its say; a worker reads its copy from when it started."""
        return self.training and not (self.control is not None and self.control.should_evaluate)

    def start_epoch(self, step: int) -> None:
        """A new pass over the training data begins at optimizer step `step` (main process, before iter())."""
        self._epoch[0] += 1
        self._epoch[1] = step
        self._seen_epoch, self._batches = int(self._epoch[0]), 0
        self.training = self.driven = True

    def next_batch(self) -> tuple[int, int] | None:
        """(step, micro-batch) of the batch being collated in this process, or None when not training."""
        if not self.active:
            return None
        epoch, first = (int(v) for v in self._epoch)
        if epoch != self._seen_epoch:
            self._seen_epoch, self._batches = epoch, 0
        worker = get_worker_info()
        index = self._batches * (worker.num_workers if worker else 1) + (worker.id if worker else 0)
        self._batches += 1
        return first + index // self.gradient_accumulation_steps, index % self.gradient_accumulation_steps

    def generator(self, step: int, micro: int) -> torch.Generator:
        """The random stream of one micro-batch: a function of (seed, rank, step, micro) only."""
        key = hashlib.blake2b(f"{self.seed},{self.rank},{step},{micro}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(key, "little"))


def unsupported_loader(args: Any, train_dataset: Any) -> str | None:
    """Why batches would not reach the Trainer in the order `MaskSchedule` counts them, or None."""
    if isinstance(train_dataset, IterableDataset):
        return ("an IterableDataset (streaming) training set is not supported: its resume collates the skipped "
                "batches; use a map-style dataset")
    if not getattr(args, "dataloader_in_order", True):
        return "dataloader_in_order must be true (batches must reach the steps in the order they are drawn)"
    return None


class MaskedThoughtCallback(TrainerCallback):
    """Keeps a `MaskSchedule` on the Trainer's optimizer step and evaluation flag, and logs `masked_thought_p`
    (the p of the last optimizer step) with each training loss. Its place among the callbacks does not matter:
    the schedule reads the Trainer's `control.should_evaluate` when a batch is built, not when a callback runs."""

    def __init__(self, schedule: MaskSchedule) -> None:
        self.schedule = schedule
        schedule.driven = True

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs: Any) -> None:
        why = unsupported_loader(args, getattr(train_dataloader, "dataset", None))
        if why:
            raise ValueError(f"MaskedThoughtCollator: {why}")
        self.schedule.configure(state.max_steps, args.gradient_accumulation_steps, args.seed, args.process_index)
        self.schedule.control = control

    def on_epoch_begin(self, args, state, control, **kwargs: Any) -> None:
        self.schedule.control = control  # the same object all run long, unless a callback replaced it
        self.schedule.start_epoch(state.global_step)

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        self.schedule.control = control

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self.schedule.training = False

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs["masked_thought_p"] = self.schedule.rate(max(state.global_step - 1, 0))


# ----------------------------------------------------------------------------------------------------------
# The collator
# ----------------------------------------------------------------------------------------------------------


class MaskedThoughtCollator:
    """Wraps a prompt/completion collator (TRL's `DataCollatorForLanguageModeling`, or any collator whose
    `labels` are -100 on the prompt and on padding): replaces each completion token of `input_ids` with
    probability p(step) by `replacement`, freshly for every batch; `labels` keep the original tokens.

    Completion positions: `labels != -100` (or the batch's `completion_mask`). The EOS closing a completion
    is one of them. Padding is never masked: real tokens are those of `attention_mask`, or, in padding-free
    batches (no attention mask), the first sum(example lengths) tokens of the flattened row. `target="prompt"`
    masks the real tokens outside the loss instead (the question-masked control).

        schedule = MaskSchedule(p_max=0.4)                     # ramp over 66% of the optimizer steps
        collator = MaskedThoughtCollator.from_tokenizer(trl_collator, tokenizer, schedule)
        trainer = SFTTrainer(..., data_collator=collator, callbacks=[MaskedThoughtCallback(schedule)])
    """

    def __init__(self, collator: Any, schedule: MaskSchedule, *, replacement: str = "mask",
                 target: str = "completion", mask_token_id: int | None = None, pad_token_id: int | None = None,
                 vocab_size: int | None = None) -> None:
        check_choice("replacement", replacement, REPLACEMENTS)
        check_choice("target", target, TARGETS)
        needed = {"mask": ("mask_token_id", mask_token_id), "pad": ("pad_token_id", pad_token_id),
                  "random": ("vocab_size", vocab_size)}[replacement]
        if needed[1] is None:
            raise ValueError(f"MaskedThoughtCollator: replacement '{replacement}' needs {needed[0]}"
                             + (" (add the token with add_mask_token(tokenizer))" if replacement == "mask" else ""))
        self.collator, self.schedule, self.replacement, self.target = collator, schedule, replacement, target
        self.mask_token_id, self.pad_token_id, self.vocab_size = mask_token_id, pad_token_id, vocab_size

    @classmethod
    def from_tokenizer(cls, collator: Any, tokenizer: PreTrainedTokenizerBase, schedule: MaskSchedule,
                       replacement: str = "mask", target: str = "completion") -> MaskedThoughtCollator:
        """Token ids from `tokenizer`: its mask token (see `add_mask_token`), its pad token, and for random
        replacement `tokenizer.vocab_size` (the base vocabulary, as the official `randint(0, vocab_size-1)`)."""
        return cls(collator, schedule, replacement=replacement, target=target, mask_token_id=tokenizer.mask_token_id,
                   pad_token_id=tokenizer.pad_token_id, vocab_size=tokenizer.vocab_size)

    def callback(self) -> MaskedThoughtCallback:
        """The callback to add to the Trainer that trains with this collator."""
        return MaskedThoughtCallback(self.schedule)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.schedule.driven:
            raise RuntimeError("MaskedThoughtCollator: nothing drives its schedule; add collator.callback() to the "
                               "Trainer's callbacks (or call schedule.start_epoch(step) yourself)")
        batch = self.collator(features)
        position = self.schedule.next_batch()
        if position is not None:
            batch["input_ids"] = self.corrupt(batch["input_ids"], self.eligible(batch, features), *position)
        return batch

    def eligible(self, batch: dict[str, Any], features: list[dict[str, Any]]) -> torch.Tensor:
        """The positions `target` allows to mask: completion (or prompt) tokens, never padding."""
        in_loss = batch["completion_mask"].bool() if "completion_mask" in batch else batch["labels"] != -100
        real = _real_tokens(batch, features)
        return real & in_loss if self.target == "completion" else real & ~in_loss

    def corrupt(self, input_ids: torch.Tensor, eligible: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """`input_ids` with each eligible position replaced with probability p(step); a new tensor."""
        generator = self.schedule.generator(step, micro)
        masked = eligible & (torch.rand(input_ids.shape, generator=generator) < self.schedule.rate(step))
        if self.replacement == "random":
            replacement = torch.randint(0, self.vocab_size, input_ids.shape, generator=generator)
        else:
            replacement = torch.tensor(self.mask_token_id if self.replacement == "mask" else self.pad_token_id)
        return torch.where(masked.to(input_ids.device), replacement.to(input_ids), input_ids)


def _real_tokens(batch: dict[str, Any], features: list[dict[str, Any]]) -> torch.Tensor:
    """Which positions hold tokens rather than padding (collators without an attention mask pad on the right)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    ids = batch["input_ids"]
    lengths = [len(f["input_ids"]) for f in features]
    real = torch.zeros_like(ids, dtype=torch.bool)
    if ids.shape[0] == len(lengths):
        for row, length in enumerate(lengths):
            real[row, :length] = True
    elif ids.shape[0] == 1:  # padding-free: the examples laid end to end in one row
        real[0, : sum(lengths)] = True
    else:
        raise ValueError(f"MaskedThoughtCollator: a batch of {ids.shape[0]} rows from {len(lengths)} examples "
                         "without an attention mask")
    return real


# ----------------------------------------------------------------------------------------------------------
# The <mask> token
# ----------------------------------------------------------------------------------------------------------


def add_mask_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give `tokenizer` the mask token `<mask>` unless it has a mask token; whether a token was added."""
    if tokenizer.mask_token is not None:
        return False
    return tokenizer.add_special_tokens({"mask_token": MASK_TOKEN}) > 0


def init_mask_embedding(model: torch.nn.Module, token_id: int, vocab_size: int) -> None:
    """Set row `token_id` of the input and output embeddings to the mean of the other rows of the tokenizer's
    `vocab_size` tokens (as the official `smart_tokenizer_and_embedding_resize`); under ZeRO-3 on every rank."""
    output = model.get_output_embeddings()
    weights = [model.get_input_embeddings().weight]
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    with torch.no_grad(), gathered_parameters(weights, modify=True):
        for weight in weights:
            others = torch.cat([weight[:token_id], weight[token_id + 1 : vocab_size]])
            weight[token_id] = others.float().mean(0).to(weight.dtype)


def frozen_mask_rows(model: torch.nn.Module, token_id: int) -> AddedTokenRows | None:
    """The `<mask>` rows a LoRA `model` keeps frozen, which its adapter checkpoints must carry (PEFT saves only
    trained weights under ZeRO-3, and a padded vocabulary does not grow); None when every weight trains."""
    from workbench.models.lora import AddedTokenRows, is_lora_model

    return AddedTokenRows.of(model, [token_id]) if is_lora_model(model) else None


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


@register("masked_thought")
class MaskedThought(Method):
    Config = MaskedThoughtConfig
    logged_metrics = ("masked_thought_p",)

    def __init__(self, config: MaskedThoughtConfig | None = None) -> None:
        super().__init__(config)
        self.schedule = MaskSchedule(self.config.p_max, self.config.schedule, self.config.ramp_fraction)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.added_mask_token = False
        self.frozen_rows: AddedTokenRows | None = None  # the <mask> rows a LoRA run saves with its adapter

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        self.tokenizer = tokenizer
        if self.config.replacement == "mask":
            self.added_mask_token = add_mask_token(tokenizer)
        return tokenizer

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        if self.added_mask_token:  # a mask token the tokenizer already had keeps its trained rows
            init_mask_embedding(model, self.tokenizer.mask_token_id, len(self.tokenizer))
            self.frozen_rows = frozen_mask_rows(model, self.tokenizer.mask_token_id)
        if self.config.replacement == "mask" and self.tokenizer is not None:
            output = model.get_output_embeddings()
            tied = output is not None and output.weight is model.get_input_embeddings().weight
            how = "added, its rows the mean of the others" if self.added_mask_token else "the tokenizer's own"
            print(f"[masked_thought] {self.tokenizer.mask_token!r} = token {self.tokenizer.mask_token_id} ({how}; "
                  f"{'tied' if tied else 'untied'} embeddings), target {self.config.target}")
        return model

    def wrap_collator(self, collator: Any) -> MaskedThoughtCollator:
        if self.tokenizer is None:
            raise ValueError("masked_thought: prepare_tokenizer must run before wrap_collator")
        return MaskedThoughtCollator.from_tokenizer(collator, self.tokenizer, self.schedule,
                                                    self.config.replacement, self.config.target)

    def callbacks(self) -> list[TrainerCallback]:
        if self.frozen_rows is None:
            return [MaskedThoughtCallback(self.schedule)]
        from workbench.models.lora import AddedTokenRowsCallback

        return [MaskedThoughtCallback(self.schedule), AddedTokenRowsCallback(self.frozen_rows)]

    def setup(self, trainer: Trainer) -> None:
        if not (getattr(trainer, "completion_only_loss", False) or getattr(trainer.args, "assistant_only_loss", False)):
            raise ConfigError("field 'methods.masked_thought': needs fine-tuning examples with the prompt outside the "
                              "loss (prompt/completion data, or chat data with assistant masks); this run trains on "
                              "every token")
        why = unsupported_loader(trainer.args, trainer.train_dataset)
        if why:
            raise ConfigError(f"field 'methods.masked_thought': {why}")
