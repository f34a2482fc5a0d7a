"""`precision: auto` on a GPU: bf16 only where the GPU has bf16 units (compute capability >= 8.0), not where torch
counts emulated bf16 (V100, T4), asked of the rank's own GPU (LOCAL_RANK) from its properties, without a CUDA
context on GPU 0. torch.cuda is faked: this machine has no GPU."""

from __future__ import annotations

import pytest
import torch

from workbench import precision


@pytest.fixture
def gpus(monkeypatch):
    """Fake CUDA GPUs: index -> compute capability; records which devices were asked about. Any call that
    would need a CUDA context (is_bf16_supported, current_device) fails the test."""
    asked: list[int] = []
    capabilities: dict[int, tuple[int, int]] = {}

    def capability(device: int) -> tuple[int, int]:
        asked.append(device)
        return capabilities[device]

    def no_context(*args, **kwargs):
        raise AssertionError("opened a CUDA context")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_context)
    monkeypatch.setattr(torch.cuda, "current_device", no_context)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return capabilities, asked, monkeypatch


@pytest.mark.parametrize(("capability", "chosen"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                    ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_bf16_only_where_the_gpu_has_bf16_units(gpus, capability, chosen):
    capabilities, _, _ = gpus
    capabilities[0] = capability  # V100 7.0 and T4 7.5 emulate bf16; A100 8.0, RTX 30xx 8.6, H100 9.0 have it
    assert precision.choose_precision("auto", 64)[0] == chosen


def test_each_rank_asks_about_its_own_gpu(gpus):
    capabilities, asked, monkeypatch = gpus
    capabilities.update({0: (7, 0), 3: (8, 0)})
    monkeypatch.setenv("LOCAL_RANK", "3")
    choice, why = precision.choose_precision("auto", 64)
    assert (choice, asked) == ("bf16", [3]) and "GPU 3" in why


def test_a_configured_precision_asks_nothing(gpus):
    _, asked, _ = gpus
    assert precision.choose_precision("fp16", 64) == ("fp16", "as configured") and asked == []


def test_rocm_gpus_count_as_bf16(gpus):
    _, asked, monkeypatch = gpus
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert precision.choose_precision("auto", 64)[0] == "bf16" and asked == []
