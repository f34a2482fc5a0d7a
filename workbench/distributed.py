"""Parameter access that is correct under every DeepSpeed ZeRO stage, for methods that read or change weights.

DeepSpeed hides a parameter's true value in different places per stage:

- no DeepSpeed, or ZeRO-0 in fp32: `param.data` is the value the optimizer updates;
- ZeRO-1/2 (and the bf16 optimizer): the optimizer updates an fp32 *master* copy, flattened and partitioned
  across ranks, and copies it into the model's `param.data` after each step; a change made to `param.data`
  alone is overwritten at the next step;
- ZeRO-3: `param.data` is an empty placeholder outside a forward pass; each rank holds a shard.

`full_parameter` returns the whole value (the fp32 master where there is one) and `set_full_parameter`
writes both the master and the model copy, so the next forward pass and the next optimizer step both see
it. Under ZeRO-3 both are collectives: every rank must call them, for the same parameters, in the same order.

    from workbench.distributed import full_parameter, set_full_parameter
    value = full_parameter(layer.weight)            # every rank
    set_full_parameter(layer.weight, value * 0.5)   # every rank
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

__all__ = ["full_parameter", "gathered_parameters", "is_partitioned", "set_full_parameter"]


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether `param` is a ZeRO-3 partitioned parameter (its `data` is a placeholder)."""
    return hasattr(param, "ds_id")


def _has_master(param: torch.nn.Parameter) -> bool:
    """Whether the optimizer keeps a master copy of `param` (ZeRO-1/2/3, the bf16 optimizer). Under ZeRO-1/2
    a rank whose partition holds no fragment of `param` has `_hp_mapping = None` but must still join the
    collective, so the attribute's presence is what counts. A frozen parameter (e.g. a LoRA base weight) has
    no master copy: the optimizer never sees it."""
    return param.requires_grad and (is_partitioned(param) or hasattr(param, "_hp_mapping"))


@contextlib.contextmanager
def gathered_parameters(params: Sequence[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Inside the block, every parameter in `params` holds its full value on every rank.

    With `modify=True`, rank 0's changes to `param.data` are written back to every rank's shard on exit (model
    copy only: use `set_full_parameter` to change what the optimizer updates). Without ZeRO-3 this does
    nothing. A collective under ZeRO-3: every rank enters it."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def full_parameter(param: torch.nn.Parameter) -> torch.Tensor:
    """The full value of `param` as the optimizer holds it (fp32 master when there is one), detached."""
    if _has_master(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().clone()
    with gathered_parameters([param]):  # a frozen ZeRO-3 parameter: gathered from the shards
        return param.detach().clone()


def set_full_parameter(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Give `param` the full value `value` in the optimizer's master copy and in the model's copy."""
    if tuple(value.shape) != tuple(param.ds_shape if is_partitioned(param) else param.shape):
        raise ValueError(f"set_full_parameter: value of shape {tuple(value.shape)} for a parameter of shape "
                         f"{tuple(param.ds_shape if is_partitioned(param) else param.shape)}")
    if _has_master(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(torch.float32))
    with torch.no_grad(), gathered_parameters([param], modify=True):
        param.data.copy_(value.to(param.dtype))
