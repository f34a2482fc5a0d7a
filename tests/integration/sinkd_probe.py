"""The `sinkd` method with a recorder: what each rank's loss hook saw, for `test_sinkd_zero.py`.

Enabled as `methods: {"tests.integration.sinkd_probe:SinkdProbe": {<sinkd options>}}` (it is the `sinkd`
method, under the same name in checkpoints). Each rank writes

- `<run>/probe/rank<r>-setup-<n>.json` once: how the teacher was prepared (engine, ZeRO stage, optimizer,
  requires_grad, partitioned parameters), and
- `<run>/probe/rank<r>-step<s>.pt` for every training micro-batch: the local batch, the student's and the
  teacher's logits and the unweighted parts of the loss (`parts`), as `distillation_loss` returned them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workbench.methods.sinkd import Sinkd


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class SinkdProbe(Sinkd):
    def setup(self, trainer) -> None:
        super().setup(trainer)
        teacher = self.teacher
        params = list(teacher.parameters())
        partitioned = [p for p in params if getattr(getattr(p, "ds_status", None), "name", "") == "NOT_AVAILABLE"]
        engine_stage = teacher.zero_optimization_stage() if hasattr(teacher, "zero_optimization_stage") else None
        record = {
            "rank": _rank(), "world_size": trainer.args.world_size, "teacher_class": type(teacher).__name__,
            "teacher_engine_stage": engine_stage,
            # ZeRO-3 without an optimizer: `optimizer` is DeepSpeedZeRoOffload, which only gathers and releases
            # the partitioned parameters; `basic_optimizer` (the one that would update weights) stays None
            "teacher_optimizer": type(getattr(teacher, "optimizer", None)).__name__,
            "teacher_basic_optimizer": getattr(teacher, "basic_optimizer", None) is not None,
            "teacher_requires_grad": any(p.requires_grad for p in params), "teacher_training": any(m.training for m in getattr(teacher, "module", teacher).modules()),
            "teacher_parameters": len(params), "teacher_partitioned": len(partitioned),
            "teacher_local_elements": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                          for p in params),
            "teacher_full_elements": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "shares_student_parameters": bool({id(p) for p in params} & {id(p) for p in trainer.model.parameters()}),
        }
        out = Path(trainer.args.output_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        index = len(list(out.glob(f"rank{_rank()}-setup-*.json")))
        (out / f"rank{_rank()}-setup-{index}.json").write_text(json.dumps(record, indent=1))
        self._parts: dict[str, torch.Tensor] = {}

    def record(self, parts: dict[str, torch.Tensor], scaled_for_accumulation: bool) -> None:
        self._parts = parts
        super().record(parts, scaled_for_accumulation)

    def loss(self, model, inputs: dict[str, Any], outputs: Any, loss: torch.Tensor,
             num_items_in_batch=None) -> torch.Tensor:
        total = super().loss(model, inputs, outputs, loss, num_items_in_batch)
        if model.training:
            step = self.trainer.state.global_step + 1
            record = {k: v.detach().cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            record.update(student_logits=outputs["logits"].detach().float().cpu(),
                          teacher_logits=self.teacher_logits(inputs).float().cpu(),
                          parts={k: v.detach().float().cpu() for k, v in self._parts.items()},
                          total=total.detach().float().cpu())
            torch.save(record, Path(self.trainer.args.output_dir) / "probe" / f"rank{_rank()}-step{step}.pt")
        return total
