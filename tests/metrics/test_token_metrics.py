"""`token_predictions`, the `preprocess_logits_for_metrics` of causal LM runs: argmax and label NLL per position."""

from __future__ import annotations

import torch

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
