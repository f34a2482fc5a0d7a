"""SMoE-Dropout as a method: k schedules, config errors, the callback and its logs, the learned-router loss, the
dense-dropout baseline, and a training run that saves, reloads converted and resumes."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, train_main, write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.methods import build_methods, method_class, validate_method_config
from workbench.methods.smoe_dropout import SCHEDULES, SMoEDropout, SMoEDropoutConfig, scheduled_k
from workbench.models import load_trained_model
from workbench.models.flops import active_parameters
from workbench.models.moe import MoEMLP
from workbench.models.moe_model import find_mlp_blocks, mean_active_fraction, moe_layers, set_active_experts


def tiny_model(family: str = "gpt_neox") -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    config = GPTNeoXConfig(**common) if family == "gpt_neox" else LlamaConfig(num_key_value_heads=2, **common)
    return AutoModelForCausalLM.from_config(config)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))


# --- schedules -------------------------------------------------------------------------------------------------
# mode -> k at t = 0, 50, 100 of T = 100, with E = 16 and k 8 -> 16 (multi-step: k 1 -> 16)
EXPECTED = {
    "linear_increase": (8, 12, 16),
    "linear_decrease": (16, 12, 8),
    "cosine_increase": (8, 10, 16),  # round(-8 cos(pi/4)) + 16 = -6 + 16
    "cosine_decrease": (16, 14, 8),
    "exp_increase": (8, 11, 13),  # round(-8 * 0.99^50) + 16 = -5 + 16; 0.99^100 -> -3
    "multi_step_increase": (1, 4, 16),  # levels 1 2 4 8 16, level int(5 t / T), the last at t = T
    "multi_step_decrease": (16, 4, 1),
    "constant": (16, 16, 16),
}


@pytest.mark.parametrize("mode", SCHEDULES)
def test_schedule_start_middle_end(mode):
    k_min = 1 if mode.startswith("multi_step") else 8
    assert tuple(scheduled_k(t, 100, mode, k_min, 16, 16) for t in (0, 50, 100)) == EXPECTED[mode]


def test_linear_schedule_is_monotone_clipped_and_rounds_half_to_even():
    ks = [scheduled_k(t, 16, "linear_increase", 8, 16, 16) for t in range(0, 20)]
    assert ks == sorted(ks) and ks[0] == 8 and ks[16:] == [16] * 4
    assert ks[1] == 8 and ks[3] == 10  # 0.5 -> 0, 1.5 -> 2 (Python's round)
    assert [scheduled_k(t, 100, "linear_increase", 2, 16, 16) for t in (0, 50, 100)] == [2, 9, 16]
    assert scheduled_k(5, 10, "constant", 2, 16, 16, k=3) == 3
    with pytest.raises(ValueError, match="schedule must be one of"):
        scheduled_k(0, 10, "linear", 8, 16, 16)


def test_default_schedule_spends_three_quarters_of_the_dense_mlp():
    method = SMoEDropout()
    ks = [method.k_at(t, 1000) for t in range(1000)]
    assert ks[0] == 8 and ks[-1] == 16
    assert mean_active_fraction(ks, 16) == pytest.approx(0.75, abs=0.01)


# --- config ----------------------------------------------------------------------------------------------------
def test_config_defaults_and_resolution():
    options = validate_method_config("smoe_dropout", {})
    assert options["experts"] == 16 and options["init"] == "scratch" and options["router"] == "random_frozen"
    cfg = SMoEDropoutConfig()
    assert (cfg.mode, cfg.k_lo, cfg.k_hi, cfg.inference_k) == ("linear_increase", 8, 16, None)
    learned = SMoEDropoutConfig(router="learned", balance_loss_weight=0.01)
    assert (learned.mode, learned.fixed_k, learned.inference_k) == ("constant", 2, 2)
    assert SMoEDropoutConfig(k=16).mode == "constant"
    assert method_class("smoe_dropout") is SMoEDropout


@pytest.mark.parametrize(("options", "message"), [
    ({"k_max": 20}, r"\[smoe_dropout\] k_max must be an integer in \[1, experts\] = \[1, 16\], got 20"),
    ({"experts": 4, "k": 5, "schedule": "constant"}, r"k must be an integer in \[1, experts\] = \[1, 4\]"),
    ({"k_min": 12, "k_max": 10}, r"k_min \(12\) must be <= k_max \(10\)"),
    ({"schedule": "linear"}, r"\[smoe_dropout.schedule\]"),
    ({"k": 4, "schedule": "linear_increase"}, "k .a fixed k. needs schedule 'constant'"),
    ({"combine": "mean"}, r"\[smoe_dropout.combine\]"),
    ({"balance_loss_weight": 0.1}, "balance_loss_weight needs router 'learned'"),
    ({"structured_dropout": 1.0}, r"structured_dropout must be in \[0, 1\)"),
    ({"experts": 0}, "experts must be an integer >= 1"),
    ({"expert": 4}, r"\[smoe_dropout.expert\] unknown option"),
])
def test_bad_config_names_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        validate_method_config("smoe_dropout", options)


def test_unknown_mode_in_the_dataclass_itself():
    with pytest.raises(ValueError, match="schedule must be one of .* got 'linear_increasing' .did you mean"):
        SMoEDropoutConfig(schedule="linear_increasing")


def test_experts_not_dividing_the_mlp_width_is_a_config_error():
    with pytest.raises(ConfigError, match=r"field 'methods.smoe_dropout.experts': num_experts \(3\) must divide"):
        SMoEDropout(SMoEDropoutConfig(experts=3)).prepare_model(tiny_model())
    with pytest.raises(ConfigError, match=r"field 'methods.smoe_dropout.layers': layers: 7 is not"):
        SMoEDropout(SMoEDropoutConfig(experts=4, layers=[7])).prepare_model(tiny_model())


def test_lora_is_refused():
    with pytest.raises(ValueError, match="cannot run on LoRA"):
        SMoEDropout.check_lora(SMoEDropoutConfig(), {"r": 8})


# --- the callback ----------------------------------------------------------------------------------------------
def test_callback_sets_k_each_step_and_logs_k_and_load():
    (method,) = build_methods({"smoe_dropout": {"experts": 4, "k_min": 1}})
    model = method.prepare_model(tiny_model("llama")).train()
    layers = moe_layers(model)
    assert len(layers) == 2 and all(layer.k == 1 and layer.eval_k is None for layer in layers)
    assert not method.overrides("loss") and method.overrides("state_dict")  # no loss hook without a balance loss
    (callback,) = method.callbacks()
    seen = []
    for step in range(0, 7):
        callback.on_step_begin(None, SimpleNamespace(global_step=step, max_steps=6), None)
        seen.append(layers[0].k)
        model(batch(step))
    assert seen == [1, 1, 2, 3, 3, 3, 4]  # round(3t/6) + 1: round of 0, 0.5, 1, 1.5, 2, 2.5, 3 is 0 0 1 2 2 2 3
    logs = {"loss": 1.0}
    callback.on_log(None, None, None, logs=logs)
    assert logs["smoe_k"] == 4 and 0 <= logs["smoe_load_min"] <= 0.25 <= logs["smoe_load_max"] <= 1
    assert logs["smoe_load_cv"] >= 0 and set(logs) - {"loss"} <= set(SMoEDropout.logged_metrics)
    logs = {"eval_loss": 1.0}
    callback.on_log(None, None, None, logs=logs)
    assert logs == {"eval_loss": 1.0}
    assert method.state_dict() == {"k": 4}
    method.load_state_dict({"k": 2})
    assert all(layer.k == 2 for layer in layers)


def test_eval_mode_uses_all_experts_by_default():
    (method,) = build_methods({"smoe_dropout": {"experts": 4, "init": "split", "combine": "scaled",
                                                "weights": "uniform"}})
    model = tiny_model().double().eval()
    dense = model(batch()).logits
    method.prepare_model(model)
    assert moe_layers(model)[0].k == 2
    torch.testing.assert_close(model.eval()(batch()).logits, dense, rtol=0, atol=1e-9)  # eval: k = E
    assert not torch.allclose(model.train()(batch()).logits, dense)  # training: k = 2 of 4
    set_active_experts(model, 1)  # the self-slimmable sweep's k
    assert all(layer.active_k == 1 for layer in moe_layers(model.eval()))


# --- learned router --------------------------------------------------------------------------------------------
def test_learned_router_adds_the_balance_loss_and_trains_the_router():
    (method,) = build_methods({"smoe_dropout": {"experts": 4, "router": "learned", "balance_loss_weight": 0.5}})
    model = method.prepare_model(tiny_model()).train()
    assert method.overrides("loss") and all(layer.k == 2 and layer.eval_k == 2 for layer in moe_layers(model))
    ids = batch()
    outputs = model(ids, labels=ids)
    aux = sum(layer.aux_loss for layer in moe_layers(model))
    assert aux.item() >= 2 * (1 / 2) - 1e-6  # each layer's E Σ f P is at least 1/k
    total = method.loss(model, {"input_ids": ids, "labels": ids}, outputs, outputs.loss)
    torch.testing.assert_close(total, outputs.loss + 0.5 * aux)
    assert method.statistics()["smoe_balance_loss"] == pytest.approx(aux.item())
    total.backward()
    router = moe_layers(model)[0].router_weight
    assert router.requires_grad and router.grad is not None and router.grad.abs().sum() > 0
    # with the Trainer's item count: this micro-batch's share of the accumulated tokens
    outputs = model(ids, labels=ids)
    aux = sum(layer.aux_loss for layer in moe_layers(model))
    scaled = method.loss(model, {"labels": ids}, outputs, outputs.loss, num_items_in_batch=4 * 11 * 2)
    torch.testing.assert_close(scaled, outputs.loss + 0.5 * aux / 2)


# --- the dense-dropout baseline --------------------------------------------------------------------------------
def test_structured_dropout_keeps_the_model_dense():
    model = tiny_model()
    keys = set(model.state_dict())
    (method,) = build_methods({"smoe_dropout": {"experts": 4, "structured_dropout": 0.5}})
    method.prepare_model(model)
    assert set(model.state_dict()) == keys and not moe_layers(model) and method.callbacks() == []
    assert type(model).__name__ == "GPTNeoXForCausalLM" and all(b.kind == "dense" for b in find_mlp_blocks(model))
    ids = batch()
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    assert not torch.equal(a, model(ids).logits)


# --- a training run -------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_training_run_logs_k_reloads_converted_and_resumes_exactly(tmp_path):
    methods = {"smoe_dropout": {"experts": 4, "k_min": 1}}
    model = {"overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2}}
    straight = tiny_config(tmp_path, name="straight", methods=methods, model=model)
    split = tiny_config(tmp_path, name="split", methods=methods, model=model)
    assert train_main([str(write_config(tmp_path, straight, "a.yaml"))]) == 0
    run = tmp_path / "runs" / "straight"
    ks = {r["step"]: r["smoe_k"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert [ks[s] for s in range(1, 9)] == [scheduled_k(s, 8, "linear_increase", 1, 4, 4) for s in range(8)]
    assert any("smoe_load_max" in r for r in read_jsonl(run / "metrics.jsonl"))
    loaded = load_trained_model(run / "checkpoint-8")
    (layer,) = moe_layers(loaded)
    assert isinstance(layer, MoEMLP) and layer.num_experts == 4 and layer.eval_k is None
    weights = load_file(run / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in loaded.state_dict().items() if k in weights)
    assert {"gpt_neox.layers.0.mlp.router_weight", "gpt_neox.layers.0.mlp.weight_in"} <= set(weights)
    # total_flos counts the experts in use at each step: 6 · active(k_t) · tokens, summed over the steps
    loaded.train()
    flos = 0
    for step in range(8):
        set_active_experts(loaded, scheduled_k(step, 8, "linear_increase", 1, 4, 4), evaluation=False)
        flos += 6 * active_parameters(loaded) * 8 * 32
    state = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["total_flos"] == pytest.approx(flos, rel=1e-6)
    path = write_config(tmp_path, split, "b.yaml")
    assert train_main([str(path)]) == 0
    shutil.rmtree(tmp_path / "runs" / "split" / "checkpoint-8")
    assert train_main([str(path), "--resume"]) == 0  # from checkpoint-4: the router and experts as saved
    resumed = load_file(tmp_path / "runs" / "split" / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


@pytest.mark.integration
@pytest.mark.parametrize("arm", ["learned", "structured", "frozen_fixed"])
def test_baselines_train_end_to_end_and_routed_models_log_their_load(tmp_path, arm):
    """The paper's baselines from the same config, through launch/train.py: the learned router with the balance
    loss at a fixed k, the frozen router at a fixed k, the structured dense dropout (a dense model: no load)."""
    options = {"learned": {"experts": 4, "router": "learned", "k": 2, "balance_loss_weight": 0.01},
               "structured": {"experts": 4, "structured_dropout": 0.5},
               "frozen_fixed": {"experts": 4, "schedule": "constant", "k": 4}}[arm]
    cfg = tiny_config(tmp_path, name=arm, methods={"smoe_dropout": options})
    assert train_main([str(write_config(tmp_path, cfg))]) == 0
    run = tmp_path / "runs" / arm
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    loaded = load_trained_model(run / "checkpoint-8")
    if arm == "structured":
        assert not moe_layers(loaded) and not any("smoe_load_max" in r for r in logged)
        return
    assert all("smoe_load_min" in r and "smoe_load_cv" in r for r in logged)  # every logging step
    assert {r["smoe_k"] for r in logged} == {options["k"]}
    (layer,) = moe_layers(loaded)
    assert layer.router_mode == ("learned" if arm == "learned" else "random_frozen")
    if arm == "learned":
        # eq. (6) with P over T·k: E Σ_e f_e P_e >= 1/k (balanced routing), one layer
        assert all(1 / 2 - 1e-6 <= r["smoe_balance_loss"] < 1.0 for r in logged)
        start = load_trained_model(run / "checkpoint-4")
        assert not torch.equal(moe_layers(start)[0].router_weight, layer.router_weight)  # the router trained
