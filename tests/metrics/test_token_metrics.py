"""`token_predictions`, the `preprocess_logits_for_metrics` of causal LM runs: argmax and label NLL per position."""

from __future__ import annotations

import pytest
import torch
from allocation_probe import LargestWideOutput

from workbench.metrics import token_predictions


def test_token_predictions_find_the_logits_among_an_moe_models_outputs():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    plain = token_predictions(shift=True)(logits, labels)
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(plain[..., 1], nll)
    assert torch.equal(plain[..., 0], logits[:, :-1].argmax(-1).float())
    # Mixtral with output_router_logits: (aux_loss, logits, router_logits) once the loss is dropped
    moe = token_predictions(shift=True)((torch.tensor(0.3), logits, (torch.randn(10, 4),)), labels)
    assert torch.equal(moe, plain)


def reference_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unchunked float64 computation: argmax and −log_softmax at the shifted label."""
    log_probs = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -log_probs.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    return torch.stack([logits[:, :-1].argmax(-1).double(), nll], -1)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 4096])
def test_chunked_predictions_equal_the_float64_reference(chunk_rows):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 50, generator=generator) * 4
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[0, :4] = -100
    chunked = token_predictions(shift=True, chunk_rows=chunk_rows)(logits, labels)
    torch.testing.assert_close(chunked.double(), reference_predictions(logits, labels), rtol=1e-6, atol=1e-5)
    unshifted = token_predictions(shift=False, chunk_rows=chunk_rows)(logits, labels)
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(unshifted[..., 1].double(), expected, rtol=1e-6, atol=1e-5)


def test_bf16_logits_never_become_a_float32_batch_by_vocabulary_tensor():
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 16, 300, generator=generator) * 3).bfloat16()
    labels = torch.randint(0, 300, (2, 16), generator=generator)
    with LargestWideOutput() as probe:
        chunked = token_predictions(shift=True, chunk_rows=4)(logits, labels)
    assert probe.largest <= 4 * 300  # one chunk of rows in float32, never (2 x 15) x 300
    torch.testing.assert_close(chunked.double(), reference_predictions(logits.float(), labels), rtol=1e-6,
                               atol=1e-5)
    with pytest.raises(ValueError, match="chunk_rows"):
        token_predictions(shift=True, chunk_rows=0)(logits, labels)
