"""DropPath: each residual branch dropped per sequence with probability p and scaled by 1/(1 − p) (eq. 1)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, train_main, write_config

from workbench.config import ModelConfig
from workbench.io import read_jsonl
from workbench.methods import build_methods, validate_method_config
from workbench.methods.drop_path import BranchDrop
from workbench.models import build_model, train_bpe_tokenizer


def test_a_branch_is_dropped_per_sequence_with_probability_p_and_otherwise_rescaled():
    torch.manual_seed(0)
    branch = torch.nn.Linear(4, 4).train()
    out = BranchDrop(0.3)(branch, (), torch.ones(4000, 5, 4))
    per_sequence = out.reshape(4000, -1)
    assert torch.all(per_sequence == per_sequence[:, :1])  # one draw per sequence: all positions alike
    kept = per_sequence[:, 0]
    assert kept.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert (kept == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)  # unbiased
    attention = BranchDrop(0.3)(branch, (), (torch.ones(8, 2, 4), "weights"))  # a tuple: its first element
    assert attention[1] == "weights" and attention[0].shape == (8, 2, 4)
    assert torch.equal(BranchDrop(0.3)(branch.eval(), (), torch.ones(3, 4)), torch.ones(3, 4))  # eval: identity


@pytest.mark.parametrize("preset", ["pythia-tiny", "llama-tiny"])
def test_every_attention_and_mlp_branch_is_hooked(preset):
    tokenizer = train_bpe_tokenizer([f"words number {i}" for i in range(30)], 300)
    model = build_model(ModelConfig(preset=preset), tokenizer)
    ids = torch.tensor([tokenizer("words number 3")["input_ids"]] * 2)
    before = model.eval()(ids).logits
    (method,) = build_methods({"drop_path": {"rate": 0.5}})
    method.prepare_model(model)
    hooked = [m for m in model.modules() if any(isinstance(h, BranchDrop) for h in m._forward_hooks.values())]
    assert len(hooked) == 2 * model.config.num_hidden_layers
    assert torch.equal(model.eval()(ids).logits, before)  # eval mode: the model unchanged
    torch.manual_seed(1)
    assert not torch.equal(model.train()(ids).logits, model.train()(ids).logits)


def test_config_and_a_run_through_launch(tmp_path):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        validate_method_config("drop_path", {"rate": 1.0})
    config = tiny_config(tmp_path, name="dp", methods={"drop_path": {"rate": 0.2}}, training={"max_steps": 4})
    assert train_main([str(write_config(tmp_path, config, "dp.yaml"))]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "runs/dp/metrics.jsonl") if "loss" in r]
