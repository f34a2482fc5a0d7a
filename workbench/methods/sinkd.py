"""SinKD: knowledge distillation with a batch-wise Sinkhorn distance, from a frozen teacher.

Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation" (LREC-COLING 2024); official code
2018cx/SinKD. The sections cited are the project's spec `docs/specs/sinkd.md`, whose Corrections win where they
differ. With the student's logits z^s, the teacher's z^t (same inputs, no gradient) and the model's own CE:

    (1) s = softmax(z^s/τ), t = softmax(z^t/τ)                          KD temperature τ (`temperature`)
    (2) KD = KL(t‖s) (`kd: kl`), KL(s‖t) (`rkl`) or JS(t, s) (`js`)    per sample/token, mean (×τ² with tau_squared)
    (3) W_ij = ‖s'_i − t'_j‖₁,  s' = softmax(z^s/τ_S), t' = softmax(z^t/τ_S)   τ_S = `sinkhorn_temperature`
    (4) Sinkhorn = ⟨P, W⟩ after `iterations` Sinkhorn steps at ε = `epsilon`, P's marginals uniform
    (5) L = (1 − α)·CE + α·KD + β·Sinkhorn                               (the intended recipe, §1.2)

Classification logits (N, C): (3)-(4) over the N samples of the batch (N·⟨P,W⟩ with `scaling: sum`, the
paper's; ⟨P,W⟩ with POT's 1/N marginals for `mean`), the form `workbench.losses.sinkhorn_distance` computes.
Causal LMs (logits (B, L, V)): every term is per token over the completion (labels != -100 after the shift),
reduced like the CE (sum / num_items_in_batch under gradient accumulation); the Sinkhorn problems are each
sequence's tokens (`sinkhorn_scope: sequence`, the authors' token-level recipe), the batch's tokens flattened
(`batch`, with `top_k` vocabulary truncation for large vocabularies) or each token alone (`sample`: the L1
distance, SinKD's sample-wise variant); see `workbench.losses.distill`. Padding-free batches (position_ids, no
attention mask) split into their sequences at every position 0.

Defaults: α = 0.9, τ = τ_S = 2, ε = 0.1, 20 iterations (the official SST-2 script and `loss.py`); β = 8e-4, the
official effective weight β·λ_S = 0.8·0.001 on the N-sample sum (§Corrections "Weights"; its maintainers advise
balancing by gradient size, and for causal LMs the term is a per-token mean, so tune β there). The official KD
term is soft cross-entropy without τ² (same gradient as `kl`, which is used here).

    methods:
      sinkd: {teacher: runs/teacher, alpha: 0.9, beta: 8.0e-4, temperature: 2.0}

The teacher is a hub name, a folder, or a workbench run (`runs/<name>`: its newest complete checkpoint; an
adapter checkpoint is merged into its base). It is loaded in the run's training dtype (bf16/fp16 under mixed
precision, float32 otherwise; `teacher_dtype` overrides, `auto` keeps the saved one) straight onto the rank's
device (under ZeRO-3, partitioned while loading), in eval mode with requires_grad False, and prepared as
TRL prepares reference models (`trl.models.utils.prepare_deepspeed` under DeepSpeed: ZeRO-3 partitions it for
inference, other stages hold a full copy; `prepare_fsdp` under FSDP; else `accelerator.prepare_model(...,
evaluation_mode=True)`), never part of the student's optimizer. It must share the student's vocabulary.
Logged with each training loss (this rank's values, in the loss's units): `sinkd_ce`, `sinkd_kd`, `sinkd_sinkhorn`.
The method keeps no state across steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback

from workbench.errors import ConfigError, did_you_mean
from workbench.losses.distill import KD_KINDS, SCOPES, causal_lm_mask, distillation_loss
from workbench.losses.sinkhorn import SCALINGS
from workbench.methods import Method, register

TEACHER_DTYPES = ("float32", "bfloat16", "float16", "auto")
LABEL_KEYS = ("labels", "shift_labels", "num_items_in_batch")  # what the teacher's forward is not given


@dataclass
class SinkdConfig:
    teacher: str  # hub name, model folder, or workbench run folder (runs/<name>: its newest complete checkpoint)
    # None: the run's training dtype (bf16/fp16 under mixed precision, else float32); auto: as saved
    teacher_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    temperature: float = 2.0  # τ of the KD term (official SST-2: 2)
    kd: Literal["kl", "rkl", "js", "none"] = "kl"  # KL(t‖s), KL(s‖t), Jensen-Shannon, or no KD term (CE + β·Sinkhorn)
    tau_squared: bool = False  # multiply the KD term by τ² (Hinton); the official code does not
    alpha: float = 0.9  # L = (1 − α)·CE + α·KD + β·Sinkhorn, in [0, 1]
    beta: float = 8e-4  # the Sinkhorn weight: official β·λ_S = 0.8·0.001 on the N-sample sum; 0 switches it off
    sinkhorn_temperature: float = 2.0  # τ_S of the Sinkhorn term (hard-coded 2 in the official code)
    epsilon: float = 0.1  # entropic regularisation ε
    iterations: int = 20  # Sinkhorn steps, unrolled and differentiated through
    scaling: Literal["sum", "mean"] = "sum"  # sum: N·⟨P,W⟩ (official doubly stochastic plan); mean: POT's ⟨P,W⟩
    sinkhorn_scope: Literal["sequence", "batch", "sample"] = "sequence"  # causal LMs: the transport problems
    # causal LMs: keep the k vocabulary entries of largest teacher mass (+ the rest); None: all; auto: all up to
    # V = 8192, the authors' top 50 above (memory per setting: docs/methods/sinkd.md)
    top_k: int | Literal["auto"] | None = "auto"
    log_domain: bool | None = None  # None: log-domain iteration for ε < 0.05 or half-precision logits

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("teacher must name the teacher model (hub name, folder or runs/<name>)")
        for name, value, valid in (("teacher_dtype", self.teacher_dtype, (*TEACHER_DTYPES, None)),
                                   ("kd", self.kd, KD_KINDS), ("scaling", self.scaling, SCALINGS),
                                   ("sinkhorn_scope", self.sinkhorn_scope, SCOPES)):
            if value not in valid:
                choices = [str(v) for v in valid if v is not None]
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}"
                                 f"{did_you_mean(str(value), choices)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        for name in ("temperature", "sinkhorn_temperature", "epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.top_k not in (None, "auto") and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, auto or null, got {self.top_k}")


def teacher_dtype(requested: str | None, args: Any) -> torch.dtype | str:
    """The dtype the teacher loads in: `requested` when set ('auto': as saved), else the run's training dtype:
    bfloat16 or float16 when `args` (TrainingArguments) train in it, else float32. A frozen teacher only runs
    forward passes, so it needs no float32 master copy under mixed precision."""
    if requested == "auto":
        return "auto"
    if requested is not None:
        return getattr(torch, requested)
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(args, "fp16", False) else torch.float32


def teacher_device_map(args: Any) -> str | None:
    """Where the teacher's weights load: straight onto this rank's device (`args.device`), never all onto the
    host first; None under ZeRO-3, where transformers' `deepspeed.zero.Init` partitions them while loading
    (transformers refuses a device_map there) and `prepare_teacher` wraps the partitioned model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    device = getattr(args, "device", None)
    return None if device is None else str(device)


def load_teacher(source: str, dtype: torch.dtype | str | None = None, like: torch.nn.Module | None = None,
                 device_map: str | None = None) -> PreTrainedModel:
    """The frozen teacher: `source` as a workbench run (its newest complete checkpoint), a folder or a hub name,
    through `workbench.models.load_trained_model` (adapters merged), in `dtype` ('auto' or None: as saved; a
    name such as 'bfloat16' is read as torch's dtype) on `device_map`, in eval mode with requires_grad False.
    A sequence-classification student (`like`) gets a sequence-classification teacher."""
    from workbench.base_run import is_run_folder
    from workbench.checkpoints import newest_complete_checkpoint
    from workbench.models import load_trained_model

    path: str | Path = source
    if is_run_folder(source):
        checkpoint = newest_complete_checkpoint(Path(source).expanduser().absolute())
        if checkpoint is None:
            raise ConfigError(f"field 'methods.sinkd.teacher': run '{source}' has no complete checkpoint")
        path = checkpoint
    elif source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"field 'methods.sinkd.teacher': path '{source}' not found")
    auto_class = None
    if like is not None and type(like).__name__.endswith("ForSequenceClassification"):
        from transformers import AutoModelForSequenceClassification

        auto_class = AutoModelForSequenceClassification
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    teacher = load_trained_model(path, dtype=torch_dtype, device_map=device_map, merge=True, auto_class=auto_class)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def output_size(model: torch.nn.Module) -> int | None:
    """The size of a model's output distribution from its config (vocabulary, or labels of a classifier)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if type(model).__name__.endswith("ForSequenceClassification"):
        return getattr(config, "num_labels", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def prepare_teacher(teacher: torch.nn.Module, trainer: Trainer) -> torch.nn.Module:
    """Place the teacher as TRL places reference/teacher models (DPOTrainer, DistillationTrainer): DeepSpeed ->
    `trl.models.utils.prepare_deepspeed` (an inference engine; ZeRO-3 partitions it, lower stages run stage 0),
    FSDP -> `prepare_fsdp`, else `accelerator.prepare_model(teacher, evaluation_mode=True)` (device and mixed
    precision, no DDP wrapper). None of them gives it to the optimizer."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        from trl.models.utils import prepare_deepspeed

        teacher = prepare_deepspeed(teacher, trainer.accelerator)
    elif getattr(trainer, "is_fsdp_enabled", False):
        from trl.models.utils import prepare_fsdp

        teacher = prepare_fsdp(teacher, trainer.accelerator)
    else:
        teacher = trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
    teacher.eval()
    return teacher


def sequence_ids(mask: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor | None:
    """Padding-free batches (position_ids, no attention mask): which sequence each position belongs to, a new one
    at every position 0; None for ordinary (one sequence per row) batches."""
    position_ids = inputs.get("position_ids")
    if position_ids is None or inputs.get("attention_mask") is not None or position_ids.shape != mask.shape:
        return None
    return (position_ids == 0).flatten().cumsum(0).view(mask.shape) - 1


@register("sinkd")
class Sinkd(Method):
    Config = SinkdConfig
    logged_metrics = ("sinkd_ce", "sinkd_kd", "sinkd_sinkhorn")

    def __init__(self, config: SinkdConfig | None = None) -> None:
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None
        self.trainer: Trainer | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._logged_step = 0

    def setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        student = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        self.check_tokenizer(getattr(trainer, "processing_class", None))
        teacher = load_teacher(self.config.teacher, teacher_dtype(self.config.teacher_dtype, trainer.args),
                               like=student, device_map=teacher_device_map(trainer.args))
        self.check_vocabulary(student, teacher)
        self.teacher = prepare_teacher(teacher, trainer)

    def check_vocabulary(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        sizes = output_size(student), output_size(teacher)
        if None in sizes or sizes[0] == sizes[1]:
            return
        if type(student).__name__.endswith("ForSequenceClassification"):
            raise ConfigError(f"field 'methods.sinkd.teacher': the teacher '{self.config.teacher}' classifies into "
                              f"{sizes[1]} labels and the student into {sizes[0]}; SinKD compares the distributions "
                              "label by label and needs the same labels")
        raise ConfigError(f"field 'methods.sinkd.teacher': the teacher '{self.config.teacher}' has a vocabulary "
                          f"of {sizes[1]} entries and the student {sizes[0]}; SinKD compares the distributions "
                          "entry by entry and needs one shared vocabulary (same tokenizer and size)")

    def check_tokenizer(self, tokenizer: Any) -> None:
        """A teacher run's tokenizer must be the student's: the teacher reads the student's input_ids (a
        classifier's labels can agree while its inputs are tokenised differently)."""
        from workbench.base_run import is_run_folder
        from workbench.layout import TOKENIZER_DIR

        folder = Path(self.config.teacher).expanduser() / TOKENIZER_DIR
        if tokenizer is None or not hasattr(tokenizer, "get_vocab") or not is_run_folder(self.config.teacher) \
                or not folder.is_dir():
            return
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(folder))
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"field 'methods.sinkd.teacher': the teacher run '{self.config.teacher}' has another "
                              f"tokenizer ({len(theirs)} tokens) than the student ({len(tokenizer)} tokens); the "
                              "teacher reads the student's token ids, so both need one tokenizer (set "
                              f"model.tokenizer: {folder})")

    def callbacks(self) -> list[TrainerCallback]:
        return [_SinkdCallback(self)]

    def teacher_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The teacher's logits on the student's inputs (labels left out), without a graph."""
        if self.teacher is None:
            raise RuntimeError("sinkd: setup(trainer) must load the teacher before the first loss")
        with torch.no_grad():
            return self.teacher(**{k: v for k, v in inputs.items() if k not in LABEL_KEYS}).logits

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any, loss: torch.Tensor,
             num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        student_logits = outputs["logits"]
        teacher_logits = self.teacher_logits(inputs)  # ours alone: the loss may overwrite it (overwrite_teacher)
        cfg = self.config
        mask, items = None, None
        if student_logits.dim() == 3:
            labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
            if labels is None and shift_labels is None:
                raise ValueError("sinkd: causal-LM batches need labels (the positions that count)")
            mask, items = causal_lm_mask(labels, shift_labels), num_items_in_batch
        total, parts = distillation_loss(
            student_logits, teacher_logits, loss, mask=mask, kd=cfg.kd, temperature=cfg.temperature,
            tau_squared=cfg.tau_squared, alpha=cfg.alpha, beta=cfg.beta, sinkhorn_temperature=cfg.sinkhorn_temperature,
            epsilon=cfg.epsilon, iterations=cfg.iterations, scaling=cfg.scaling, scope=cfg.sinkhorn_scope,
            top_k=cfg.top_k, log_domain=cfg.log_domain, num_items_in_batch=items,
            sequences=None if mask is None else sequence_ids(mask, inputs), overwrite_teacher=True)
        if model.training:
            self.record(parts, scaled_for_accumulation=items is not None)
        return total

    # --- logging: the parts of the loss, in the units of the logged loss ---------------------------------
    def record(self, parts: dict[str, torch.Tensor], scaled_for_accumulation: bool) -> None:
        """Add one micro-batch's parts. As the Trainer's own loss: parts normalised by num_items_in_batch add up
        over a step's micro-batches, per-micro-batch means are divided by the accumulation steps."""
        steps = 1
        if not scaled_for_accumulation and self.trainer is not None:
            steps = getattr(self.trainer, "current_gradient_accumulation_steps", None) or \
                self.trainer.args.gradient_accumulation_steps
        for name, value in parts.items():
            value = value.detach().float() / steps
            self._sums[name] = self._sums[name].to(value.device) + value if name in self._sums else value

    def state_dict(self) -> dict[str, Any]:
        """The parts summed since the last log and that log's step: a resumed run logs what an uninterrupted one
        does (also when a checkpoint falls between two logs)."""
        return {"logged_step": self._logged_step, "sums": {name: total.cpu() for name, total in self._sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._logged_step = int(state.get("logged_step", 0))
        self._sums = dict(state.get("sums", {}))

    def metrics(self, global_step: int) -> dict[str, float]:
        """The parts averaged over the optimizer steps since the last log ({} when nothing was recorded)."""
        steps = max(1, global_step - self._logged_step)
        values = {f"sinkd_{name}": (total / steps).item() for name, total in self._sums.items()}
        self._sums, self._logged_step = {}, global_step
        return values


class _SinkdCallback(TrainerCallback):
    """Adds the loss's parts to each training log."""

    def __init__(self, method: Sinkd) -> None:
        self.method = method

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs.update(self.method.metrics(state.global_step))
