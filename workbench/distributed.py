"""Parameter access that is correct under every DeepSpeed ZeRO stage, for methods that read or change weights.

DeepSpeed hides a parameter's true value in different places per stage:

- no DeepSpeed, or ZeRO-0 in fp32: `param.data` is the value the optimizer updates;
- ZeRO-0 in fp16: DeepSpeed's fp16 optimizer updates an fp32 *master* copy of every trainable weight
  (`fp32_groups_flat`, or `fp32_groups` for the unfused one) and copies it into the fp16 `param.data` after each
  step, and nothing on the parameter points to it: `link_master_copies(optimizer)` (once, when training has
  started: the optimizer a `TrainerCallback` receives) makes those copies known here;
- ZeRO-1/2 (and the bf16 optimizer): the optimizer updates an fp32 master copy, flattened and partitioned
  across ranks, and copies it into the model's `param.data` after each step; a change made to `param.data`
  alone is overwritten at the next step;
- ZeRO-3: `param.data` is an empty placeholder outside a forward pass; each rank holds a shard.

`full_parameters` returns the whole values (the fp32 masters where there are some), with one collective per
process group however many parameters it is given, and `set_full_parameters` writes the master and the model
copy of each, so that the next forward pass and the next optimizer step both see them; it is local (each rank
writes its own shards), so every rank must give it the same values. `full_parameter` and `set_full_parameter`
are the one-parameter forms. Every rank calls them, for the same parameters, in the same order.

    from workbench.distributed import full_parameter, set_full_parameter
    value = full_parameter(layer.weight)            # every rank
    set_full_parameter(layer.weight, value * 0.5)   # every rank, the same value
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from workbench.collectives import collective_device

__all__ = ["full_parameter", "full_parameters", "gathered_parameters", "is_partitioned", "link_master_copies",
           "set_full_parameter", "set_full_parameters"]

_MASTER = "_workbench_fp32_master"  # the attribute `link_master_copies` gives a parameter: its fp32 master


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether `param` is a ZeRO-3 partitioned parameter (its `data` is a placeholder)."""
    return hasattr(param, "ds_id")


def _has_master(param: torch.nn.Parameter) -> bool:
    """Whether the optimizer keeps a master copy of `param` (ZeRO-1/2/3, the bf16 optimizer, a linked fp16
    optimizer). Under ZeRO-1/2 a rank whose partition holds no fragment of `param` has `_hp_mapping = None` but
    must still join the collective, so the attribute's presence is what counts. A frozen parameter (e.g. a LoRA
    base weight) has no master copy: the optimizer never sees it."""
    return param.requires_grad and (is_partitioned(param) or hasattr(param, "_hp_mapping") or hasattr(param, _MASTER))


def link_master_copies(optimizer: Any) -> int:
    """Make the fp32 master copies of DeepSpeed's ZeRO-0 fp16 optimizer (`FP16_Optimizer`: `fp32_groups_flat`;
    `FP16_UnfusedOptimizer`: `fp32_groups`) known to this module, so that `set_full_parameters` writes them.
    `optimizer` may be that optimizer or any wrapper reaching it through `.optimizer` (accelerate's, the
    Trainer's). Returns the number of parameters linked: 0 for every other optimizer (their masters are found
    without help, or there are none). Idempotent; every rank calls it (no collective)."""
    while optimizer is not None and not hasattr(optimizer, "fp16_groups"):
        optimizer = getattr(optimizer, "optimizer", None)
    if optimizer is None:
        return 0
    if hasattr(optimizer, "fp32_groups_flat"):
        masters = [torch._utils._unflatten_dense_tensors(flat, group)  # views into the flat master
                   for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups, strict=True)]
    elif hasattr(optimizer, "fp32_groups"):
        masters = optimizer.fp32_groups
    else:
        return 0
    linked = 0
    for params, copies in zip(optimizer.fp16_groups, masters, strict=True):
        for param, master in zip(params, copies, strict=True):
            setattr(param, _MASTER, master)
            linked += 1
    return linked


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


# --- where this rank's share of a parameter lives -------------------------------------------------------------
def _process_group(param: torch.nn.Parameter) -> Any | None:
    """The group `param` is split over (None: this rank holds it whole)."""
    if is_partitioned(param):
        return param.ds_process_group
    if _has_master(param) and hasattr(param, "_hp_mapping"):
        return param._dp_group
    return None


def _z3_partition(param: torch.nn.Parameter, partition_numel: int) -> tuple[int, int]:
    """(first element, element count) of this rank's ZeRO-3 partition within the flattened `param`: rank r holds
    elements [r·p, (r+1)·p) of the padded flat tensor, p = `partition_numel`; the padding is no element."""
    import torch.distributed as dist

    start = partition_numel * dist.get_rank(group=param.ds_process_group)
    return start, max(0, min(partition_numel, param.ds_numel - start))


def _local_share(param: torch.nn.Parameter) -> tuple[int, torch.Tensor]:
    """(offset, values): the elements of the flattened full parameter this rank holds, from the fp32 master
    where the optimizer keeps one, else from the model's copy; the whole parameter when nothing is split."""
    if is_partitioned(param):
        if _has_master(param):
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(param)
        else:
            local = param.ds_tensor
        start, count = _z3_partition(param, local.numel())
        return start, local.reshape(-1)[:count]
    if _has_master(param) and hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is None:  # ZeRO-1/2: no fragment of this parameter in this rank's partition
            return 0, param.new_empty(0, dtype=torch.float32)
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment().reshape(-1)
    source = getattr(param, _MASTER, param) if _has_master(param) else param
    return 0, source.detach().reshape(-1)


def full_parameters(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The full values of `params` as the optimizer holds them (fp32 masters where there are some, else the
    model's values in the model's dtype), detached copies, in order. Split parameters are assembled with one `all_reduce` of
    one flat fp32 buffer per process group (each rank writes its own elements into zeros): a collective whose
    count does not grow with the number of parameters; every rank calls it. The buffer holds all of them at
    once (4 bytes per element)."""
    values: list[torch.Tensor | None] = [None] * len(params)
    groups: dict[int, tuple[Any, list[int]]] = {}
    for index, param in enumerate(params):
        group = _process_group(param)
        if group is None:
            values[index] = _local_share(param)[1].clone().reshape(_full_shape(param))
        else:
            groups.setdefault(id(group), (group, []))[1].append(index)
    for group, indices in groups.values():
        for index, value in zip(indices, _assemble([params[i] for i in indices], group), strict=True):
            values[index] = value
    return values  # type: ignore[return-value]


def _assemble(params: list[torch.nn.Parameter], group: Any) -> list[torch.Tensor]:
    """The full fp32 values of `params`, all split over `group`: one all_reduce (sum) of their shares."""
    import torch.distributed as dist

    sizes = [int(torch.Size(_full_shape(p)).numel()) for p in params]
    buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=collective_device(group))
    for param, base, size in zip(params, _offsets(sizes), sizes, strict=True):
        start, local = _local_share(param)
        buffer[base: base + size].narrow(0, start, local.numel()).copy_(local)
    dist.all_reduce(buffer, group=group)
    return [part.reshape(_full_shape(p)).to(p.device, torch.float32 if _has_master(p) else p.dtype)
            for p, part in zip(params, buffer.split(sizes), strict=True)]


def _offsets(sizes: list[int]) -> list[int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape if is_partitioned(param) else param.shape)


def set_full_parameters(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Give each of `params` its full value in `values`, in the optimizer's fp32 master copy (where there is
    one) and in the model's copy. Local: each rank writes only what it holds (its master fragment, its ZeRO-3
    shard, and the gathered value of a parameter ZeRO-3 keeps whole), so every rank must pass the same values;
    every rank calls it."""
    if len(params) != len(values):
        raise ValueError(f"set_full_parameters: {len(params)} parameters and {len(values)} values")
    for param, value in zip(params, values, strict=True):
        if tuple(value.shape) != _full_shape(param):
            raise ValueError(f"set_full_parameter: value of shape {tuple(value.shape)} for a parameter of shape "
                             f"{_full_shape(param)}")
        with torch.no_grad():
            _set_master(param, value)
            _set_model_copy(param, value)


def _set_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    if not _has_master(param):
        return
    if hasattr(param, _MASTER):
        getattr(param, _MASTER).copy_(value.reshape(param.shape))
    elif is_partitioned(param):  # this rank's partition, its padding kept
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        partition = safe_get_local_fp32_param(param).clone()
        start, count = _z3_partition(param, partition.numel())
        partition.reshape(-1)[:count].copy_(value.reshape(-1)[start: start + count])
        safe_set_local_fp32_param(param, partition)
    else:  # ZeRO-1/2, the bf16 optimizer: this rank's fragment
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(torch.float32))


def _set_model_copy(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    if not is_partitioned(param):
        param.data.copy_(value.to(param.dtype))
        return
    start, count = _z3_partition(param, param.ds_tensor.numel())
    shard = param.ds_tensor.data.reshape(-1)[:count]
    shard.copy_(value.reshape(-1)[start: start + count].to(shard))
    if param.data.numel() == param.ds_numel:  # gathered now (a persistent parameter stays gathered): that too
        param.data.copy_(value.reshape(param.data.shape).to(param.dtype))


def full_parameter(param: torch.nn.Parameter) -> torch.Tensor:
    """The full value of `param` as the optimizer holds it (fp32 master when there is one), detached."""
    return full_parameters([param])[0]


def set_full_parameter(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Give `param` the full value `value` in the optimizer's master copy and in the model's copy."""
    set_full_parameters([param], [value])
