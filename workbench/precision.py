"""Choosing the training precision by capability and measurement, never by assumption.

CPUs differ wildly: with AMX a bf16 matmul runs several times the fp32 rate; on an AVX2-only CPU
it can run ~77x slower. So on CPU, `auto` measures both at the model's width and picks bf16 only
when it is clearly faster.
"""

from __future__ import annotations

import time

import torch

CPU_BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this factor on CPU to be chosen by `auto`


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


def choose_precision(requested: str, width: int) -> tuple[str, str]:
    """('fp32' | 'bf16' | 'fp16', why) for a model of hidden size `width`."""
    if requested != "auto":
        return requested, "as configured"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", "GPU supports bf16"
        return "fp16", "GPU lacks bf16"
    n = max(256, min(2048, 4 * width))
    fp32 = matmul_gflops(n, torch.float32, min_seconds=0.1)
    bf16 = matmul_gflops(n, torch.bfloat16, min_seconds=0.1)
    choice = "bf16" if bf16 >= CPU_BF16_MIN_SPEEDUP * fp32 else "fp32"
    return choice, f"CPU matmul {n}x{n}: bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s"
