"""Writes under DeepSpeed's ZeRO-0 fp16 optimizers reach their fp32 master copies (`link_master_copies`), so that
ALLoRA's `update` variant and SeND's `site: weights` are not undone by the next step, which copies the masters into
the fp16 weights. The optimizers are DeepSpeed's own, built on the CPU around an SGD at learning rate 0 (a step
then changes nothing but that copy)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workbench.distributed import full_parameter, link_master_copies, set_full_parameter


def fp16_optimizer(kind: str, model: nn.Module, monkeypatch):
    from deepspeed.runtime.fp16 import unfused_optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    if kind == "fused":  # fp32_groups_flat: one flat master per group
        return FP16_Optimizer(sgd, verbose=False)
    monkeypatch.setattr(unfused_optimizer.dist, "get_rank", lambda *a, **kw: 0)  # it logs on rank 0 only
    return unfused_optimizer.FP16_UnfusedOptimizer(sgd, verbose=False)  # fp32_groups: one master per parameter


def step(optimizer, model: nn.Module) -> None:
    optimizer.zero_grad()
    optimizer.backward(model(torch.ones(2, 4, dtype=torch.float16)).float().sum())
    optimizer.step()


@pytest.mark.parametrize("kind", ["fused", "unfused"])
def test_a_write_reaches_the_fp16_optimizers_master_and_survives_its_step(kind, monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).half()
    optimizer = fp16_optimizer(kind, model, monkeypatch)
    value = torch.randn(3, 4)
    set_full_parameter(model.weight, value)  # not linked: the fp16 weight alone changes ...
    step(optimizer, model)
    assert not torch.equal(model.weight.detach(), value.half())  # ... and the step copies the old master back
    wrapper = SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer))  # as accelerate and the Trainer wrap it
    assert link_master_copies(wrapper) == 2  # weight and bias
    assert link_master_copies(torch.optim.SGD(model.parameters(), lr=0.0)) == 0  # no fp16 optimizer: nothing
    set_full_parameter(model.weight, value)
    torch.testing.assert_close(full_parameter(model.weight), value)  # read from the fp32 master
    step(optimizer, model)
    assert torch.equal(model.weight.detach(), value.half())


def test_allora_links_the_masters_when_training_starts(monkeypatch):
    from peft import LoraConfig, get_peft_model

    from workbench.methods.allora import Allora, AlloraConfig

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    model.half()
    method = Allora(AlloraConfig(apply="update"))
    method.prepare_model(model)
    optimizer = fp16_optimizer("fused", model, monkeypatch)
    (callback,) = method.callbacks()
    callback.on_train_begin(None, None, None, model=model, optimizer=SimpleNamespace(optimizer=optimizer))
    layer = method.layers[0]
    value = torch.randn(layer.weight_b.shape)
    set_full_parameter(layer.weight_b, value)
    step(optimizer, model)
    assert torch.equal(layer.weight_b.detach(), value.half())
