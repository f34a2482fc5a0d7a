"""`lora_delta_norm` (workbench/models/features.py): ‖scaling · BA‖_F from the r x r Gram matrices, never BA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.overrides import TorchFunctionMode

from workbench.models.features import lora_delta_norm, product_frobenius_norm


@pytest.mark.parametrize(("out", "rank", "inputs"), [(7, 3, 5), (2, 6, 9), (40, 8, 33)])
def test_the_gram_trace_is_the_frobenius_norm_of_ba_in_float64(out, rank, inputs):
    generator = torch.Generator().manual_seed(out)
    a = torch.randn(rank, inputs, dtype=torch.float64, generator=generator)
    b = torch.randn(out, rank, dtype=torch.float64, generator=generator)
    want = torch.linalg.matrix_norm(b @ a)
    torch.testing.assert_close(product_frobenius_norm(a, b), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(product_frobenius_norm(a.float(), b.float()).double(), want, rtol=1e-5, atol=0)
    assert product_frobenius_norm(a, torch.zeros_like(b)) == 0


class _Shapes(TorchFunctionMode):
    """The shapes of every tensor a torch function returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor):
            self.shapes.append(tuple(result.shape))
        return result


def test_lora_delta_norm_is_the_mean_scaled_norm_and_never_forms_ba():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 9)),
                           LoraConfig(r=2, lora_alpha=6, target_modules=["0", "1"], init_lora_weights=False))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    want = sum(3.0 * torch.linalg.matrix_norm(m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
               for m in layers) / len(layers)
    with _Shapes() as mode:
        got = lora_delta_norm(model)
    assert got == pytest.approx(want.item(), rel=1e-6)
    assert not {(10, 12), (9, 10)} & set(mode.shapes)  # no out x in product of the factors
    assert lora_delta_norm(nn.Linear(3, 3)) is None
