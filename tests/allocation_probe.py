"""A probe for full-vocabulary float32 blow-ups: the largest float32/float64 tensor any operation returns."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

WIDE = (torch.float32, torch.float64)


class LargestWideOutput(TorchDispatchMode):
    """While active, `largest` is the most elements of any float32 or float64 tensor an operation returned
    (forward and backward alike), so a test can bound the temporaries of a computation on narrower inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dtype in WIDE:
                self.largest = max(self.largest, leaf.numel())
        return out
