"""Collectives with their tensors on the device the process group's backend runs them on.

A backend moves tensors of one kind of device only: NCCL those on CUDA (the rank's current device), gloo
those on the CPU. A CPU tensor handed to an NCCL collective is refused, so a tensor that lives on the CPU
(indices, counters, scores) is moved to `collective_device()` for the collective and back afterwards.

    from workbench.collectives import broadcast_from
    indices = broadcast_from(indices, source=0)   # every rank; rank 0's values everywhere, on indices' device
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["broadcast_from", "collective_device"]


def collective_device(group: Any = None) -> torch.device:
    """The device the backend of `group` (None: the default process group) runs collectives on:
    `cuda:<current device>` under NCCL, the CPU under gloo (and the other CPU backends, or a mixed
    `cpu:gloo,cuda:nccl` group)."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Rank `source`'s `tensor` on every rank (same shape and dtype on every rank), returned on `tensor`'s
    device; a collective: every rank calls it. `tensor` itself is left as it was."""
    on_backend = tensor.to(collective_device(), copy=True)
    torch.distributed.broadcast(on_backend, src=source)
    return on_backend.to(tensor.device)
