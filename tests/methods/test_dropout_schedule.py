"""The dropout schedule: sites per model family, dropstage switching, state across a resume."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, train_main, write_config
from safetensors.torch import load_file

from workbench.config import ModelConfig
from workbench.io import read_jsonl
from workbench.methods import build_methods, validate_method_config
from workbench.methods.dropout_schedule import DropoutSchedule, DropoutScheduleConfig, dropout_sites
from workbench.models import build_model, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([f"sentence number {i} about things" for i in range(50)], 300)


@pytest.mark.parametrize("preset", ["pythia-tiny", "llama-tiny"])
def test_every_family_gets_all_three_sites(preset, tokenizer):
    model = build_model(ModelConfig(preset=preset), tokenizer)
    sites = dropout_sites(model)
    assert all(sites[kind] for kind in ("attention", "residual", "embedding"))
    method = DropoutSchedule(DropoutScheduleConfig(rate=0.3))
    method.prepare_model(build_model(ModelConfig(preset=preset), tokenizer))
    method.apply(0.3)
    rates = [s.p if isinstance(s, torch.nn.Dropout) else getattr(*s) for v in method._sites.values() for s in v]
    assert rates and all(rate == 0.3 for rate in rates)


def test_hooked_residual_dropout_changes_training_outputs(tokenizer):
    model = build_model(ModelConfig(preset="llama-tiny"), tokenizer).train()
    ids = torch.tensor([tokenizer("sentence number 3 about things")["input_ids"]])
    (method,) = build_methods({"dropout_schedule": {"rate": 0.5, "sites": ["residual"]}})
    method.prepare_model(model)
    torch.manual_seed(0)
    off = model(ids).logits
    method.apply(0.5)
    torch.manual_seed(0)
    on = model(ids).logits
    assert not torch.equal(off, on)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout in eval mode


@pytest.mark.parametrize("preset", ["llama-tiny", "mixtral-tiny"])
def test_hooked_residual_dropout_is_on_the_sublayers_not_the_residual_stream(preset, tokenizer):
    """Dropout on the attention and MLP/MoE outputs before the residual add: at rate 1 every sublayer adds zero and
    the residual stream carries the embeddings through the layer unchanged (a hook on the layer's output would
    zero it)."""
    model = build_model(ModelConfig(preset=preset), tokenizer).train()
    sites = dropout_sites(model)
    hooked = [name for name, module in model.named_modules() if name.endswith("workbench_output_dropout")]
    layers = model.get_decoder().layers
    assert len(sites["residual"]) == len(hooked) == 2 * len(layers)
    assert all(name.rsplit(".", 2)[-2] in ("self_attn", "mlp") for name in hooked)
    for site in sites["residual"]:
        site.p = 1.0
    ids = torch.tensor([tokenizer("sentence number 3 about things")["input_ids"]])
    hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    assert torch.equal(hidden[1], hidden[0]) and hidden[0].abs().sum() > 0
    # and it is dropout: in eval mode the sublayers add their outputs again
    assert not torch.allclose(model.eval()(ids, output_hidden_states=True).hidden_states[1], hidden[0])


def test_config_validation():
    assert validate_method_config("dropout_schedule", {"rate": 0.2})["start_step"] == 0
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        validate_method_config("dropout_schedule", {"rate": 1.0})
    with pytest.raises(ValueError, match="unknown dropout sites"):
        validate_method_config("dropout_schedule", {"sites": ["mlp"]})


@pytest.mark.integration
def test_dropstage_switches_on_and_resumes_with_its_state(tmp_path):
    methods = {"dropout_schedule": {"rate": 0.2, "start_step": 5}}
    straight = tiny_config(tmp_path, name="straight", methods=methods, training={"max_steps": 10, "save_steps": 4})
    split = tiny_config(tmp_path, name="split", methods=methods, training={"max_steps": 10, "save_steps": 4})
    assert train_main([str(write_config(tmp_path, straight, "a.yaml"))]) == 0
    rates = {r["step"]: r["dropout_rate"] for r in read_jsonl(tmp_path / "runs/straight/metrics.jsonl") if "loss" in r}
    assert [rates[s] for s in range(1, 11)] == [0.0] * 5 + [0.2] * 5
    path = write_config(tmp_path, split, "b.yaml")
    assert train_main([str(path), "--set", "training.max_steps=10"]) == 0
    state = torch.load(tmp_path / "runs/split/checkpoint-8/workbench_methods_rank0.pt", weights_only=True)
    assert state["dropout_schedule"] == {"current_rate": 0.2, "switched_at": 5}
    for name in ("checkpoint-10",):
        import shutil

        shutil.rmtree(tmp_path / "runs/split" / name)
    assert train_main([str(path), "--resume"]) == 0  # resumes at step 8, dropout already on
    a = load_file(tmp_path / "runs/straight/checkpoint-10/model.safetensors")
    b = load_file(tmp_path / "runs/split/checkpoint-10/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
