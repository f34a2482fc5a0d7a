"""A method that records what every training forward pass of a run receives, for the Masked Thought tests.

Enabled after `masked_thought` as `methods: {"tests.methods.masked_thought_probe:MaskProbe": {}}`. Each rank
writes `<run>/mask_probe/rank<r>.json` at the end of training: one record per training micro-batch with the
optimizer step it ran at (`global_step`), its `input_ids` and `labels` (what the model saw, after masking); the
same for the evaluation batches during training (`evaluations`); and how far the `<mask>` rows of the input and
output embeddings were from the mean of the other rows when the model reached the Trainer (`mask_row_error`,
gathered under ZeRO-3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from workbench.distributed import gathered_parameters
from workbench.methods import Method


class _Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.state = None
        self.mask_row_error: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        self.state = state
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        record = {"step": self.state.global_step, "input_ids": kwargs["input_ids"].tolist(),
                  "labels": kwargs["labels"].tolist()}
        (self.records if module.training else self.evaluations).append(record)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        out = Path(args.output_dir) / "mask_probe" / f"rank{args.process_index}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rank": args.process_index, "seed": args.seed, "max_steps": state.max_steps,
                                   "gradient_accumulation_steps": args.gradient_accumulation_steps,
                                   "mask_row_error": self.mask_row_error, "records": self.records,
                                   "evaluations": self.evaluations}))


class MaskProbe(Method):
    def __init__(self, config: Any | None = None) -> None:
        super().__init__(config)
        self.recorder = _Recorder()
        self.mask_token_id: int | None = None

    def prepare_tokenizer(self, tokenizer):
        self.mask_token_id = tokenizer.mask_token_id
        return tokenizer

    def prepare_model(self, model):
        if self.mask_token_id is not None:
            weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
            with torch.no_grad(), gathered_parameters(weights):
                self.recorder.mask_row_error = max(
                    float((w[self.mask_token_id] - torch.cat([w[: self.mask_token_id], w[self.mask_token_id + 1:]])
                           .mean(0)).abs().max()) for w in weights)
        return model

    def callbacks(self) -> list[TrainerCallback]:
        return [self.recorder]
