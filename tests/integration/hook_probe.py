"""A method that implements every hook of `workbench.methods.Method` and records what each one saw.

Enabled in a run config as `methods: {"tests.integration.hook_probe:HookProbe": {...}}`. Each rank writes
`<run>/probe/rank<r>-<phase>.json` at the end of training (`phase` is `fresh`, or `resumed` when its state
was restored from a checkpoint), so a test can check every hook under every ZeRO stage and rank count:

- `prepare_tokenizer` adds a token; the model must be built with room for it;
- `prepare_model` sees the built model; `wrap_collator` counts the batches it collates;
- `setup` sees the trainer (world size, ZeRO stage);
- `loss` records `num_items_in_batch` (per rank) and whether the outputs carry their graph, and adds nothing;
- `after_optimizer_step` adds `bump` to the full value of the `target` parameter through
  `workbench.distributed`, so the change must reach the optimizer's master copy to survive the next step;
- a callback runs a forward pass that every rank joins at step 1 and records its loss;
- `state_dict` holds a per-rank tensor of 4,096 values and counters, restored on resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from workbench.distributed import full_parameter, gathered_parameters, set_full_parameter
from workbench.methods import Method

PROBE_TOKEN = "<probe>"


@dataclass
class HookProbeConfig:
    bump: float = 0.5  # added to the target parameter after every optimizer step
    target: str = "final_layer_norm.bias"  # suffix of the parameter's name


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _state_tensor(rank: int) -> torch.Tensor:
    return torch.randint(0, 1 << 20, (4096,), generator=torch.Generator().manual_seed(1000 + rank))


class _Collator:
    def __init__(self, inner: Any, probe: HookProbe) -> None:
        self.inner, self.probe = inner, probe

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.probe.batches_collated += 1
        return self.inner(features)


class _Recorder(TrainerCallback):
    def __init__(self, probe: HookProbe) -> None:
        self.probe = probe

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs: Any) -> None:
        if self.probe.forward_loss is None:  # every rank joins a forward pass on the same batch
            trainer = self.probe.trainer
            batch = self.probe.inner_collator([trainer.eval_dataset[i] for i in range(2)])
            batch = {k: v.to(args.device) for k, v in batch.items()}
            with torch.no_grad():
                self.probe.forward_loss = float(self.probe.trainer.model_wrapped(**batch).loss)

    def on_train_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        probe = self.probe
        model = probe.trainer.model
        digest = hashlib.sha256()
        params = sorted(model.named_parameters())
        with gathered_parameters([p for _, p in params]):
            for name, param in params:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
        target = full_parameter(probe.target_param)
        record = {
            "rank": _rank(), "world_size": probe.world_size, "zero_stage": probe.zero_stage,
            "vocab": probe.vocab, "embedding_rows": probe.embedding_rows, "token_id": probe.token_id,
            "model_class": probe.model_class, "batches_collated": probe.batches_collated,
            "num_items": probe.num_items, "logits_with_graph": probe.logits_with_graph, "steps_seen": probe.steps_seen, "restored_steps": probe.restored_steps,
            "state_intact": bool(torch.equal(probe.tensor, _state_tensor(_rank()) + probe.steps_seen)),
            "forward_loss": probe.forward_loss, "target_mean": float(target.mean()),
            "global_step": state.global_step, "param_sha256": digest.hexdigest(),
        }
        phase = "resumed" if probe.restored_steps is not None else "fresh"
        out = Path(args.output_dir) / "probe" / f"rank{_rank()}-{phase}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))


class HookProbe(Method):
    Config = HookProbeConfig

    def __init__(self, config: HookProbeConfig | None = None) -> None:
        super().__init__(config)
        self.batches_collated, self.num_items, self.steps_seen = 0, [], 0
        self.restored_steps: int | None = None
        self.forward_loss: float | None = None
        self.logits_with_graph = True
        self.tensor = _state_tensor(_rank())

    def prepare_tokenizer(self, tokenizer):
        tokenizer.add_special_tokens({"additional_special_tokens": [PROBE_TOKEN]})
        self.vocab, self.token_id = len(tokenizer), tokenizer.convert_tokens_to_ids(PROBE_TOKEN)
        return tokenizer

    def prepare_model(self, model):
        self.model_class = type(model).__name__
        embedding = model.get_input_embeddings().weight
        self.embedding_rows = int(embedding.ds_shape[0] if hasattr(embedding, "ds_shape") else embedding.shape[0])
        matches = [p for n, p in model.named_parameters() if n.endswith(self.config.target)]
        if len(matches) != 1:
            raise ValueError(f"hook probe: {len(matches)} parameters end with '{self.config.target}'")
        self.target_param = matches[0]
        return model

    def wrap_collator(self, collator):
        self.inner_collator = collator
        return _Collator(collator, self)

    def callbacks(self):
        return [_Recorder(self)]

    def setup(self, trainer) -> None:
        self.trainer, self.world_size = trainer, trainer.args.world_size
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        self.zero_stage = plugin.zero_stage if plugin is not None else None

    def loss(self, model, inputs, outputs, loss, num_items_in_batch=None):
        self.num_items.append(None if num_items_in_batch is None else float(num_items_in_batch))
        self.logits_with_graph = self.logits_with_graph and bool(outputs.logits.requires_grad)
        return loss

    def after_optimizer_step(self, model, trainer) -> None:
        set_full_parameter(self.target_param, full_parameter(self.target_param) + self.config.bump)
        self.steps_seen += 1
        self.tensor += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen, "tensor": self.tensor.clone(), "batches": self.batches_collated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen, self.tensor = state["steps_seen"], state["tensor"]
        self.restored_steps = state["steps_seen"]
