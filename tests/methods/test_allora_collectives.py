"""ALLoRA's update variant under a DeepSpeed-style fp32 master: a constant number of collectives per optimizer step
(not one or more per LoRA layer), and the rescaled step written into the master and the model's copy.

The factors are linked to a flat fp32 master with DeepSpeed's own `link_hp_params` (what its ZeRO-1/2 and bf16
optimizers do) in a one-rank gloo process group, so `workbench.distributed` takes its partitioned path: the same
calls as on many ranks, counted here. tests/integration/test_allora_zero.py checks the values on 2 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn

from workbench.methods.allora import Allora, AlloraConfig, coefficients, row_norms

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single")


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group, which DeepSpeed's comm layer uses too (as after `deepspeed.init_distributed`)."""
    from deepspeed import comm as ds_comm

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ds_comm.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)  # adopts the group made above
    try:
        yield dist.group.WORLD
    finally:
        ds_comm.comm.cdb = None
        dist.destroy_process_group()


@pytest.fixture
def collectives(monkeypatch) -> list[str]:
    """Every collective called through `torch.distributed` (DeepSpeed's comm layer calls these too), by name."""
    calls: list[str] = []
    for name in COLLECTIVES:
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    return calls


def lora_stack(layers: int) -> nn.Module:
    """LoRA (r 3, B random) on every linear of a stack of `layers` 6 x 6 linears."""
    torch.manual_seed(layers)
    model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(layers)))
    config = LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=[str(i) for i in range(layers)])
    return get_peft_model(model, config)


def link_flat_master(model: nn.Module, group) -> tuple[list[nn.Parameter], torch.Tensor]:
    """The trainable parameters linked to one flat fp32 master, as DeepSpeed's ZeRO-1/2 optimizer links them."""
    from deepspeed.utils.mixed_precision_linkage import link_hp_params

    params = [p for p in model.parameters() if p.requires_grad]
    master = torch.cat([p.detach().float().reshape(-1) for p in params])
    link_hp_params(params, master, {}, {}, False, 0, 0, master.numel(), group)
    return params, master


def optimizer_step(params: list[nn.Parameter], master: torch.Tensor, seed: int) -> None:
    """What DeepSpeed's step does: the master moves, then the model's copy is set from it."""
    master += 0.1 * torch.randn(master.shape, generator=torch.Generator().manual_seed(seed))
    offset = 0
    for param in params:
        param.data.copy_(master[offset: offset + param.numel()].view_as(param))
        offset += param.numel()


@pytest.mark.parametrize("row_axis", ["output", "input"])
def test_the_update_variant_runs_two_collectives_per_step_for_any_number_of_layers(
        one_rank_group, collectives, row_axis):
    counts = {}
    for layers in (2, 7):
        model = lora_stack(layers)
        method = Allora(AlloraConfig(apply="update", row_axis=row_axis))
        method.prepare_model(model)
        params, master = link_flat_master(model, one_rank_group)
        (callback,) = method.callbacks()
        before = {layer.name: (layer.weight_a.detach().clone(), layer.weight_b.detach().clone())
                  for layer in method.layers}
        collectives.clear()
        callback.on_step_begin(None, None, None)
        optimizer_step(params, master, seed=layers)
        after = {layer.name: (layer.weight_a.detach().clone(), layer.weight_b.detach().clone())
                 for layer in method.layers}
        callback.on_optimizer_step(None, None, None)
        counts[layers] = list(collectives)
        for layer in method.layers:  # eq. (5) in the master and in the model's copy
            (a0, b0), (a1, b1) = before[layer.name], after[layer.name]
            c = coefficients(row_norms(a0, b0, row_axis), layer.eta)
            param, want = ((layer.weight_b, b0 + c[:, None] * (b1 - b0)) if row_axis == "output"
                           else (layer.weight_a, a0 + c * (a1 - a0)))
            torch.testing.assert_close(param.detach(), want)
            torch.testing.assert_close(param._hp_mapping.get_hp_fragment().view_as(want), want)  # the master
    assert counts[2] == counts[7] == ["all_reduce", "all_reduce"]  # one before the step, one after
