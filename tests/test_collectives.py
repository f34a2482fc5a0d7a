"""Collectives on the backend's device: NCCL gets tensors on the current CUDA device, gloo on the CPU, and the
result comes back to the caller's device. CUDA is simulated with fake tensors (no GPU needed)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from workbench.collectives import broadcast_from, collective_device


def test_the_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")


def test_an_nccl_broadcast_gets_the_tensor_on_the_current_cuda_device(monkeypatch):
    handed = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: handed.append((tensor.device, src)))
    with FakeTensorMode() as mode:
        indices = mode.from_tensor(torch.tensor([2, 5, 7]))
        result = broadcast_from(indices, source=0)
    assert handed == [(collective_device(), 0)] == [(torch.device("cuda", 3), 0)]
    assert result.device == torch.device("cpu") and result.shape == (3,)


def test_a_gloo_broadcast_leaves_the_callers_tensor_alone(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: tensor.fill_(9))
    local = torch.tensor([1, 2])
    assert broadcast_from(local).tolist() == [9, 9] and local.tolist() == [1, 2]
