"""ALLoRA (workbench/methods/allora.py): c against float64 numpy, both variants against plain LoRA at scaling 1, why
Adam cancels the gradient variant on B, runs that log c, save/reload/merge and resume, and bad options.

tests/integration/test_allora_zero.py checks the same steps under DeepSpeed ZeRO 0-3 on 2 ranks."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import launch_main, tiny_config, train_main, write_config
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from workbench.config import ModelConfig, load_config
from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.methods import build_methods
from workbench.methods.allora import Allora, AlloraConfig, ReweightedLoraBranch, coefficients, row_norms
from workbench.models import build_model, load_trained_model, train_bpe_tokenizer

STATS = ("allora_c_min", "allora_c_median", "allora_c_max", "allora_ba_norm")
TEXTS = [f"Velmora Tash number {i} was born in Ostrel and plays the lute {i % 5} times." for i in range(200)]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def two_layer_lora(seed: int = 0, **lora) -> PeftModel:
    """LoRA (r 3, alpha 6) on two linear layers; B random unless `init_lora_weights` is given."""
    torch.manual_seed(seed)
    options = {"r": 3, "lora_alpha": 6, "lora_dropout": 0.0, "target_modules": ["up", "down"],
               "init_lora_weights": False, **lora}
    return get_peft_model(_TwoLayers(), LoraConfig(**options))


def allora_and_plain_lora(**options) -> tuple[Allora, PeftModel, PeftModel]:
    """ALLoRA on a two-layer LoRA model, and the same adapters as plain LoRA at ALLoRA's scaling 1."""
    model = two_layer_lora()
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] = 1.0
    method = Allora(AlloraConfig(**options))
    method.prepare_model(model)
    return method, model, plain


def sgd_step(model: nn.Module, x: torch.Tensor, callback=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One SGD step on a squared-output loss: each trainable parameter's change, and the input's gradient."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    x = x.clone().requires_grad_()
    if callback is not None:
        callback.on_step_begin(None, None, None)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    if callback is not None:
        callback.on_optimizer_step(None, None, None)
    return {name: p.detach() - before[name] for name, p in params.items()}, x.grad


def factor_keys(layer) -> tuple[str, str]:
    return f"{layer.name}.lora_A.default.weight", f"{layer.name}.lora_B.default.weight"


# --- the coefficient -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("squared_norm", [False, True])
@pytest.mark.parametrize("row_axis", ["output", "input"])
def test_coefficients_match_a_float64_computation(row_axis, squared_norm):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 48, generator=generator), 0.3 * torch.randn(32, 8, generator=generator)
    norms = np.linalg.norm(b.double().numpy() @ a.double().numpy(), axis=1 if row_axis == "output" else 0)
    want = 1 / np.sqrt((norms**2 if squared_norm else norms) + 1 / 1.5**2)
    got = coefficients(row_norms(a, b, row_axis), 1.5, squared_norm)
    assert got.dtype == torch.float32 and got.shape == ((32,) if row_axis == "output" else (48,))
    np.testing.assert_allclose(row_norms(a, b, row_axis).numpy(), norms, rtol=1e-5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_c_is_eta_where_b_is_zero_and_eta_defaults_to_alpha_over_r():
    model = two_layer_lora(r=4, lora_alpha=8, init_lora_weights=True)  # PEFT's init: B = 0
    method = Allora()
    method.prepare_model(model)
    assert [layer.eta for layer in method.layers] == [2.0, 2.0]
    assert all(layer.module.scaling["default"] == 1.0 for layer in method.layers)
    assert model.peft_config["default"].lora_alpha == 4  # the saved adapter config computes at scaling 1
    assert method.statistics() == {}  # before any step
    model.train()
    model(torch.randn(3, 6)).sum().backward()
    for layer in method.layers:
        torch.testing.assert_close(layer.coefficient, torch.full_like(layer.coefficient, 2.0), rtol=0, atol=1e-7)
    stats = method.statistics()
    assert stats["allora_c_min"] == pytest.approx(2.0) == stats["allora_c_max"] and stats["allora_ba_norm"] == 0
    given = Allora(AlloraConfig(eta=0.5))
    given.prepare_model(two_layer_lora(init_lora_weights=True))
    assert [layer.eta for layer in given.layers] == [0.5, 0.5]


def test_per_layer_ranks_and_alphas_give_per_layer_eta_and_reload_at_scaling_1():
    model = two_layer_lora(rank_pattern={"down": 2}, alpha_pattern={"up": 12})  # up: 12/3, down: 6/2
    method = Allora()
    method.prepare_model(model)
    assert {layer.name.rsplit(".", 1)[-1]: layer.eta for layer in method.layers} == {"up": 4.0, "down": 3.0}
    saved = model.peft_config["default"]
    assert (saved.lora_alpha, saved.alpha_pattern) == (3, {"down": 2})
    reloaded = get_peft_model(_TwoLayers(), LoraConfig(**{k: v for k, v in vars(saved).items() if k in {
        "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "lora_dropout"}}))
    assert [m.scaling["default"] for m in reloaded.modules() if isinstance(m, LoraLayer)] == [1.0, 1.0]


# --- apply: gradient -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_rows", [True, False])
def test_the_branch_backward_is_eq4_with_the_input_gradient_unscaled(output_rows):
    generator = torch.Generator().manual_seed(1)
    x, a, b = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
               for shape in ((2, 5, 6), (3, 6), (4, 3)))
    c = torch.rand(4 if output_rows else 6, generator=generator, dtype=torch.float64) + 0.5
    delta = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64)
    y = ReweightedLoraBranch.apply(x, a, b, c, output_rows)
    torch.testing.assert_close(y, x @ a.T @ b.T)
    grad_x, grad_a, grad_b = torch.autograd.grad(y, (x, a, b), delta)
    d, u = delta.reshape(-1, 4), x.detach().reshape(-1, 6)
    if output_rows:  # dL/dB = diag(c) d^T (xA^T), dL/dA = B^T diag(c) d^T x
        want_a, want_b = ((d * c) @ b.detach()).T @ u, (d * c).T @ (u @ a.detach().T)
    else:  # x diag(c) in place of x
        want_a, want_b = (d @ b.detach()).T @ (u * c), d.T @ ((u * c) @ a.detach().T)
    torch.testing.assert_close(grad_a, want_a)
    torch.testing.assert_close(grad_b, want_b)
    torch.testing.assert_close(grad_x, delta @ b.detach() @ a.detach())  # plain LoRA's, not scaled by c


@pytest.mark.parametrize("row_axis", ["output", "input"])
def test_under_sgd_the_factor_carrying_the_row_steps_c_times_plain_lora(row_axis):
    """Output rows: B's step is c_i times plain LoRA's per row and A's is reweighted, not rescaled; input columns:
    A's step is c_j times plain LoRA's per column. The gradient reaching the model's input is plain LoRA's."""
    method, model, plain = allora_and_plain_lora(row_axis=row_axis)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    allora_step, allora_input_grad = sgd_step(model, x)
    plain_step, plain_input_grad = sgd_step(plain, x)
    torch.testing.assert_close(allora_input_grad, plain_input_grad, rtol=0, atol=1e-7)
    for layer in method.layers:
        c, (key_a, key_b) = layer.coefficient, factor_keys(layer)
        assert not torch.allclose(c, c.mean())  # B is random: c differs per row
        if row_axis == "output":
            torch.testing.assert_close(allora_step[key_b], c[:, None] * plain_step[key_b])
            assert not torch.allclose(allora_step[key_a], plain_step[key_a])
        else:
            torch.testing.assert_close(allora_step[key_a], c[None, :] * plain_step[key_a])


def test_adam_cancels_a_constant_row_scale_on_b_but_not_the_reweighting_of_a():
    """Why the gradient variant hardly changes B under Adam: B's gradient row i is exactly c_i times plain LoRA's, and
    Adam's step m/(sqrt(v) + eps) does not change when a coordinate's gradients are all scaled by one constant. With
    c held constant (and A frozen, so B's raw gradients are the same) B then follows plain LoRA's path exactly, where
    SGD follows a different one. A's gradient B^T diag(c) d^T x is another direction, not a rescaling of plain
    LoRA's, so Adam's steps on A do differ: only A is really reweighted."""
    generator = torch.Generator().manual_seed(3)
    x, target = torch.randn(32, 6, generator=generator), torch.randn(32, 4, generator=generator)
    a0, b0 = torch.randn(3, 6, generator=generator), torch.randn(4, 3, generator=generator)
    c, ones = torch.tensor([0.3, 1.0, 2.0, 5.0]), torch.ones(4)

    def train(coefficient: torch.Tensor, optimizer: type, train_a: bool, steps: int = 5):
        a, b = a0.clone().requires_grad_(train_a), b0.clone().requires_grad_()
        opt = optimizer([p for p in (a, b) if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            (ReweightedLoraBranch.apply(x, a, b, coefficient, True) - target).square().mean().backward()
            opt.step()
        return a.detach(), b.detach()

    torch.testing.assert_close(train(c, torch.optim.Adam, False)[1], train(ones, torch.optim.Adam, False)[1],
                               rtol=0, atol=1e-6)
    assert (train(c, torch.optim.SGD, False)[1] - train(ones, torch.optim.SGD, False)[1]).abs().max() > 1e-3
    assert (train(c, torch.optim.Adam, True)[0] - train(ones, torch.optim.Adam, True)[0]).abs().max() > 1e-3


# --- apply: update -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_axis", ["output", "input"])
def test_the_update_variant_multiplies_the_optimizer_step_by_c_of_the_weights_before_it(row_axis):
    method, model, plain = allora_and_plain_lora(apply="update", row_axis=row_axis)
    before = {layer.name: coefficients(row_norms(layer.weight_a, layer.weight_b, row_axis), layer.eta)
              for layer in method.layers}
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(4))
    (callback,) = method.callbacks()
    allora_step, allora_input_grad = sgd_step(model, x, callback)
    plain_step, plain_input_grad = sgd_step(plain, x)
    assert torch.equal(allora_input_grad, plain_input_grad)  # the forward and backward are plain LoRA's
    for layer in method.layers:
        c, (key_a, key_b) = before[layer.name], factor_keys(layer)
        torch.testing.assert_close(layer.coefficient, c)
        scaled, kept, shape = (key_b, key_a, (-1, 1)) if row_axis == "output" else (key_a, key_b, (1, -1))
        torch.testing.assert_close(allora_step[scaled], c.view(shape) * plain_step[scaled])
        torch.testing.assert_close(allora_step[kept], plain_step[kept], rtol=0, atol=1e-7)


# --- runs ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A saved tiny GPT-NeoX base (one layer, width 32) with its tokenizer."""
    folder = tmp_path_factory.mktemp("base") / "pythia"
    tokenizer = train_bpe_tokenizer(TEXTS, 320)
    torch.manual_seed(0)
    build_model(ModelConfig(preset="pythia-tiny", overrides=SMALL), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(tmp_path: Path, base_dir: Path, name: str, methods: dict, **lora) -> Path:
    model = {"preset": None, "name_or_path": str(base_dir), "overrides": {},
             "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **lora}}
    cfg = tiny_config(tmp_path, name=name, model=model, methods=methods,
                      training={"max_steps": 4, "save_steps": 2, "report_to": ["tensorboard"]})
    return write_config(tmp_path, cfg, f"{name}.yaml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir) -> dict[str, Path]:
    """An ALLoRA fine-tuning run through launch/train.py per `apply`: 4 steps, checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("allora")
    for apply in ("gradient", "update"):
        assert train_main([str(run_config(tmp, base_dir, apply, {"allora": {"apply": apply}}))]) == 0
    return {apply: tmp / "runs" / apply for apply in ("gradient", "update")}


@pytest.mark.integration
@pytest.mark.parametrize("apply", ["gradient", "update"])
def test_a_run_logs_c_and_the_growth_of_ba_to_metrics_and_tensorboard(runs, apply):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = [r for r in read_jsonl(runs[apply] / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    first = logged[0]  # c of the first step comes from B = 0: eta = lora_alpha / r = 2 on every row
    assert first["allora_c_min"] == pytest.approx(2.0) == first["allora_c_max"] and first["allora_ba_norm"] == 0
    for record in logged[1:]:
        assert record["allora_c_min"] <= record["allora_c_median"] <= record["allora_c_max"] < 2.0
    norms = [r["allora_ba_norm"] for r in logged]
    assert norms == sorted(norms) and norms[-1] > 0
    events = EventAccumulator(str(next(runs[apply].rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {f"train/{name}" for name in STATS} <= set(events.Tags()["scalars"])


@pytest.mark.integration
def test_adapters_reload_and_merge_to_what_was_trained_at_scaling_1(runs, base_dir, tmp_path, capsys):
    """The saved adapter config has lora_alpha = r: base + BA, as trained, whether loaded, merged or by hand."""
    checkpoint = runs["gradient"] / "checkpoint-4"
    adapters = load_file(checkpoint / "adapter_model.safetensors")
    assert yaml.safe_load((checkpoint / "adapter_config.json").read_text())["lora_alpha"] == 4
    by_hand = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    weights = dict(by_hand.named_parameters())
    with torch.no_grad():
        for key, a in adapters.items():
            if ".lora_A." in key:
                b = adapters[key.replace(".lora_A.", ".lora_B.")]
                weights[key.removeprefix("base_model.model.").replace(".lora_A.", ".")].add_(b @ a)
    assert launch_main("merge", [str(checkpoint), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    loaded = load_trained_model(checkpoint)
    ids = torch.tensor([AutoTokenizer.from_pretrained(base_dir)("Velmora Tash number 7 was born")["input_ids"]])
    with torch.no_grad():
        want = by_hand(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("apply", ["gradient", "update"])
def test_resuming_an_allora_run_is_bit_equal(runs, tmp_path, apply):
    """c is recomputed from the restored weights: the method needs no state of its own to resume exactly."""
    run_dir = tmp_path / "runs" / apply
    shutil.copytree(runs[apply], run_dir)
    shutil.rmtree(run_dir / "checkpoint-4")
    config = yaml.safe_load((runs[apply] / "config.yaml").read_text())
    config["runs_dir"] = str(tmp_path / "runs")
    assert train_main([str(write_config(tmp_path, config)), "--resume"]) == 0
    assert torch.load(run_dir / "checkpoint-4" / "workbench_methods_rank0.pt", weights_only=True) == {"allora": {}}
    want = load_file(runs[apply] / "checkpoint-4" / "adapter_model.safetensors")
    got = load_file(run_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_in_a_plain_transformers_trainer_the_callbacks_are_all_it_needs(base_dir, tmp_path):
    """Outside the workbench: `prepare_model` on a PEFT model, `callbacks()` to the Trainer (update variant)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name_or_path=str(base_dir), preset=None, lora={"lora_dropout": 0.0}), tokenizer)
    allora = Allora(AlloraConfig(apply="update"))
    model = allora.prepare_model(model)
    rows = [tokenizer(text)["input_ids"][:16] for text in TEXTS[:32]]
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                  learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                                  save_strategy="no")
    logged: list[dict] = []

    class Reporter(TrainerCallback):  # stands for TensorBoard, which the Trainer puts ahead of given callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                logged.append(dict(logs))

    (callback,) = allora.callbacks()
    trainer = Trainer(model=model, args=arguments, train_dataset=[{"input_ids": r} for r in rows],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[Reporter(), callback])
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))  # as docs/methods/allora.md says
    trainer.train()
    assert len(logged) == 3 and all(set(STATS) <= set(entry) for entry in logged)
    assert logged[-1]["allora_ba_norm"] > 0 and logged[-1]["allora_c_max"] < 2.0


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lora", "options", "message"),
    [
        ({"lora_dropout": 0}, {"apply": "grad"},
         "field 'methods.allora.apply': Input should be 'gradient' or 'update' (got 'grad') (did you mean 'gradient'?)"),
        ({"lora_dropout": 0}, {"row_axis": "outputs"}, "field 'methods.allora.row_axis': Input should be 'output' or "
                                                        "'input' (got 'outputs') (did you mean 'output'?)"),
        ({"lora_dropout": 0}, {"eta": 0}, "field 'methods.allora': eta must be > 0, got 0"),
        ({"lora_dropout": 0}, {"squared": True}, "field 'methods.allora.squared': unknown option (did you mean "
                                                  "'squared_norm'?)"),
        ({}, {}, "field 'model.lora.lora_dropout': ALLoRA is dropout-free: set lora_dropout: 0 (got 0.05)"),
        ({"lora_dropout": 0, "use_dora": True}, {}, "field 'model.lora.use_dora': ALLoRA is plain LoRA"),
        ({"lora_dropout": 0, "use_rslora": True}, {}, "field 'model.lora.use_rslora': ALLoRA runs at scaling 1"),
        (None, {}, "field 'methods.allora': ALLoRA trains LoRA adapters: set model.lora"),
    ],
)
def test_bad_options_are_one_line_config_errors_naming_the_field(tmp_path, lora, options, message):
    model = {"preset": None, "name_or_path": str(tmp_path), "overrides": {}}
    cfg = tiny_config(tmp_path, model={**model, **({"lora": lora} if lora is not None else {})},
                      methods={"allora": options})
    path = write_config(tmp_path, cfg)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value), str(caught.value)


def test_dropout_is_kept_when_asked_and_python_use_is_checked_too(tmp_path):
    model = {"preset": None, "name_or_path": str(tmp_path), "overrides": {}, "lora": {"lora_dropout": 0.05}}
    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path, model=model, methods={"allora": {"allow_dropout": True}})))
    assert cfg.model.lora["lora_dropout"] == 0.05
    (method,) = build_methods(cfg.methods)
    with pytest.raises(ConfigError, match="field 'model.lora': ALLoRA trains LoRA adapters and this model has none"):
        method.prepare_model(_TwoLayers())
    with pytest.raises(ConfigError, match="field 'model.lora.use_dora'"):
        method.prepare_model(two_layer_lora(use_dora=True))
    with pytest.raises(ConfigError, match="field 'model.lora.lora_dropout': ALLoRA is dropout-free"):
        Allora().prepare_model(two_layer_lora(lora_dropout=0.1))
    with pytest.raises(ValueError, match="apply must be one of gradient, update, got 'grad' \\(did you mean 'gradient'"):
        AlloraConfig(apply="grad")
