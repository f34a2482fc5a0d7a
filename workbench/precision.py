"""Choosing the training precision by capability and measurement, never by assumption.

CPUs differ wildly: with AMX a bf16 matmul runs several times the fp32 rate; on an AVX2-only CPU
it can run ~77x slower. So on CPU, `auto` measures both at the model's width and picks bf16 only
when it is clearly faster. On a GPU, `auto` picks bf16 where the hardware has bf16 units (compute capability
8.0 and later: A100, H100, RTX 30xx on; ROCm GPUs as torch reports them) and fp16 elsewhere: a V100 or T4
emulates bf16, which `torch.cuda.is_bf16_supported()` counts, at a fraction of its fp16 rate.
"""

from __future__ import annotations

import os
import time

import torch

CPU_BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this factor on CPU to be chosen by `auto`
GPU_BF16_CAPABILITY = (8, 0)  # the first CUDA compute capability with bf16 tensor cores (Ampere)


def matmul_gflops(n: int, dtype: torch.dtype, device: str = "cpu", min_seconds: float = 0.2,
                  shape: tuple[int, int, int] | None = None) -> float:
    """Measured GFLOP/s of an n x n @ n x n matmul in `dtype` (2 n^3 FLOPs each), or of an
    (m x k) @ (k x p) matmul when `shape` = (m, k, p) is given."""
    m, k, p = shape or (n, n, n)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, p, device=device).to(dtype)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2 * m * k * p * runs / elapsed / 1e9


def local_device_index() -> int:
    """The index of this rank's GPU among the visible ones: LOCAL_RANK, which launchers set (0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def gpu_has_bf16(device: int) -> bool:
    """Whether GPU `device` computes in bf16 natively, not emulated: a ROCm GPU (as torch counts them) or a
    CUDA GPU of compute capability >= 8.0. Reads the device's properties, creating no CUDA context on it or on
    GPU 0 (`torch.cuda.is_bf16_supported` asks the current device, GPU 0 in every rank before it is set)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) >= GPU_BF16_CAPABILITY


def choose_precision(requested: str, width: int) -> tuple[str, str]:
    """('fp32' | 'bf16' | 'fp16', why) for a model of hidden size `width`."""
    if requested != "auto":
        return requested, "as configured"
    if torch.cuda.is_available():
        device = local_device_index()
        if gpu_has_bf16(device):
            return "bf16", f"GPU {device} has bf16 units"
        return "fp16", f"GPU {device} lacks bf16 units (compute capability below 8.0)"
    n = max(256, min(2048, 4 * width))
    fp32 = matmul_gflops(n, torch.float32, min_seconds=0.1)
    bf16 = matmul_gflops(n, torch.bfloat16, min_seconds=0.1)
    choice = "bf16" if bf16 >= CPU_BF16_MIN_SPEEDUP * fp32 else "fp32"
    return choice, f"CPU matmul {n}x{n}: bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s"
