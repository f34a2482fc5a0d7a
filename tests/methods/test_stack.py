"""Methods compose (`workbench.methods.stack`): the loss rule L0 + sum_m (L_m - L0) in any order, collator wrappers
nested in config order, `prepare_model` replacing parts of the model before others hook them, and the pairs that
cannot share a run refused as one-line config errors naming both. The runs of each pair under ZeRO-2/3 on 2 ranks
are in tests/integration/test_method_pairs.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, train_main, write_config
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Trainer, TrainingArguments

from workbench.config import load_config
from workbench.errors import ConfigError
from workbench.methods import METHODS, Method, build_methods, register
from workbench.methods.drop_path import BranchDrop
from workbench.methods.stack import MethodStack, check_compatible
from workbench.models.moe import MoEMLP
from workbench.models.moe_model import moe_layers


def tiny_model(family: str = "gpt_neox") -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    config = GPTNeoXConfig(**common) if family == "gpt_neox" else LlamaConfig(num_key_value_heads=2, **common)
    return AutoModelForCausalLM.from_config(config)


# --- loss: every method gets L0 and returns its own L_m; the step trains on L0 + sum_m (L_m - L0) ---------------
class Mixing(Method):
    """As SinKD: (1 - a) L0 + a X."""

    name = "test_mixing"

    def loss(self, model, inputs, outputs, loss, num_items_in_batch=None):
        return 0.25 * loss + 0.75 * inputs["x"]


class Adding(Method):
    """As SMoE's balance term: L0 + l Y."""

    name = "test_adding"

    def loss(self, model, inputs, outputs, loss, num_items_in_batch=None):
        return loss + 0.5 * inputs["y"]


def test_two_loss_methods_add_up_to_the_documented_formula_in_either_order():
    l0, x, y = torch.tensor(1.3), torch.tensor(0.7), torch.tensor(2.9)
    inputs = {"x": x, "y": y}
    forward = MethodStack([Mixing(), Adding()]).loss(None, inputs, None, l0)
    backward = MethodStack([Adding(), Mixing()]).loss(None, inputs, None, l0)
    expected = 0.25 * l0 + 0.75 * x + 0.5 * y  # (1 - a) L0 + a X + l Y
    torch.testing.assert_close(forward, expected)
    torch.testing.assert_close(backward, expected)
    assert MethodStack([Mixing()]).loss(None, inputs, None, l0) == 0.25 * l0 + 0.75 * x  # one method: L_m itself
    assert MethodStack([]).loss(None, inputs, None, l0) is l0


def test_sinkd_and_smoe_balance_term_combine_in_either_order(tmp_path):
    """The real pair: SinKD's (1-a) CE + a KD + b S and SMoE's learned-router balance term l B, in-process."""
    teacher = tiny_model()
    teacher.save_pretrained(tmp_path / "teacher")
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "labels": ids}
    totals, alone = {}, {}
    for order in (("sinkd", "smoe_dropout"), ("smoe_dropout", "sinkd")):
        configs = {"sinkd": {"teacher": str(tmp_path / "teacher"), "alpha": 0.6, "beta": 0.3},
                   "smoe_dropout": {"experts": 4, "router": "learned", "balance_loss_weight": 0.5}}
        stack = MethodStack(build_methods({name: configs[name] for name in order}))
        model = stack.prepare_model(tiny_model()).train()
        sinkd = next(m for m in stack if m.name == "sinkd")
        sinkd.setup(Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                                use_cpu=True)))
        outputs = model(**inputs)
        balance = torch.stack([layer.aux_loss for layer in moe_layers(model)]).sum()
        totals[order] = stack.loss(model, inputs, outputs, outputs.loss)
        alone[order] = sinkd.loss(model, inputs, outputs, outputs.loss) + 0.5 * balance  # L_sinkd + l B
        assert balance.item() > 0
    (first, second), (want_first, want_second) = totals.values(), alone.values()
    torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first, want_first)
    torch.testing.assert_close(second, want_second)


# --- collators: nested in config order, the first listed innermost ---------------------------------------------
def _tagging(tag: str) -> Method:
    class Tagging(Method):
        name = f"test_tag_{tag}"

        def wrap_collator(self, collator):
            return lambda features: {**collator(features), "trace": [*collator(features)["trace"], tag]}

    return Tagging()


def test_collator_wrappers_nest_in_config_order():
    stack = MethodStack([_tagging("a"), _tagging("b"), _tagging("c")])
    collate = stack.wrap_collator(lambda features: {"trace": ["trainer"]})
    assert collate([{}])["trace"] == ["trainer", "a", "b", "c"]  # a wraps the Trainer's collator, c wraps them all


# --- prepare_model: methods that replace parts of the model first ----------------------------------------------
ORDERS = [pytest.param(True, id="smoe-listed-first"), pytest.param(False, id="smoe-listed-last")]


def _prepared(other: str, options: dict, smoe_first: bool, family: str = "gpt_neox"):
    smoe = ("smoe_dropout", {"experts": 4})
    listed = [smoe, (other, options)] if smoe_first else [(other, options), smoe]
    stack = MethodStack(build_methods(dict(listed)))
    assert [m.name for m in stack.preparation_order()] == ["smoe_dropout", other]
    model = stack.prepare_model(tiny_model(family))
    return model, next(m for m in stack if m.name == other)


def _layers(model):
    return model.get_decoder().layers


@pytest.mark.parametrize("smoe_first", ORDERS)
def test_drop_path_hooks_the_experts_in_either_order(smoe_first):
    model, _ = _prepared("drop_path", {"rate": 0.2}, smoe_first)
    for layer in _layers(model):
        assert isinstance(layer.mlp, MoEMLP)
        assert any(isinstance(hook, BranchDrop) for hook in layer.mlp._forward_hooks.values())


@pytest.mark.parametrize("smoe_first", ORDERS)
def test_send_site_mlp_drops_on_the_experts_in_either_order(smoe_first):
    model, send = _prepared("send", {"site": "mlp"}, smoe_first)
    assert isinstance(send._hooked, MoEMLP) and send._hooked is _layers(model)[0].mlp
    send.indices = torch.tensor([1, 5])
    captured = []  # what the block adds to the residual stream: the experts' output after SeND's drop
    _layers(model)[0].mlp.register_forward_hook(lambda m, a, o: captured.append(o))
    model.train()(torch.randint(0, 64, (2, 6)))
    assert captured and (captured[0][..., [1, 5]] == 0).all() and (captured[0][..., 0] != 0).any()


@pytest.mark.parametrize("smoe_first", ORDERS)
def test_dropout_schedule_reaches_the_experts_in_either_order(smoe_first):
    """Llama has no dropout modules of its own: dropout_schedule hooks each MLP's output, which must be the
    experts' (a hook left on the replaced dense MLP would never run)."""
    model, schedule = _prepared("dropout_schedule", {"rate": 0.3, "sites": ["residual"]}, smoe_first, "llama")
    schedule.apply(0.3)
    for layer in _layers(model):
        assert isinstance(layer.mlp, MoEMLP) and layer.mlp.workbench_output_dropout.p == 0.3
        assert any(site is layer.mlp.workbench_output_dropout for site in schedule._sites["residual"])


# --- pairs that cannot share a run: one-line config errors naming both, before any work -------------------------
@pytest.fixture
def replacing_methods():
    names = ("test_replace_a", "test_replace_b")
    for name in names:
        register(name)(type(name, (Method,), {"replaces": ("mlp",)}))
    yield names
    for name in names:
        METHODS.pop(name)


def test_two_methods_replacing_one_part_are_refused(replacing_methods):
    with pytest.raises(ValueError, match=r"^\[methods\] methods 'test_replace_a' and 'test_replace_b' cannot run "
                                         r"together: both replace the model's mlp; remove one of them$"):
        check_compatible(dict.fromkeys(replacing_methods, {}))


def _config(tmp_path, methods: dict, lora: dict | None = None):
    cfg = tiny_config(tmp_path, methods=methods)
    if lora is not None:
        (tmp_path / "base").mkdir(exist_ok=True)
        cfg["model"] = {"name_or_path": str(tmp_path / "base"), "lora": lora}
    return write_config(tmp_path, cfg)


REFUSED = [
    pytest.param({"smoe_dropout": {}, "allora": {}}, {"lora_dropout": 0.0},
                 "methods 'allora' and 'smoe_dropout' cannot run together: 'smoe_dropout' trains every weight and "
                 "'allora' trains LoRA adapters; remove one of them", id="allora+smoe_dropout"),
    pytest.param({"send": {"site": "weights"}, "smoe_dropout": {}}, None,
                 "methods 'send' and 'smoe_dropout' cannot run together: 'smoe_dropout' replaces the model's mlp and "
                 "'send' uses its own weights: site 'weights' zeroes rows of the tracked block's dense MLP at every "
                 "tracking point (site 'block' or 'mlp' works beside it); remove one of them",
                 id="send-weights+smoe_dropout"),
]


@pytest.mark.parametrize(("methods", "lora", "message"), REFUSED)
def test_incompatible_pairs_are_one_line_config_errors(tmp_path, capsys, methods, lora, message):
    path = _config(tmp_path, methods, lora)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: field 'methods': {message}"
    assert train_main([str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {path}: field 'methods': {message}"


def test_send_weights_under_lora_is_refused_and_its_other_sites_are_not(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'methods.send.site': 'weights' zeroes MLP weights .* frozen"):
        load_config(_config(tmp_path, {"send": {"site": "weights"}}, {}))
    load_config(_config(tmp_path, {"send": {"site": "mlp"}}, {}))


COMPOSING = [
    pytest.param({"masked_thought": {}, "allora": {}}, {"lora_dropout": 0.0}, id="masked_thought+allora"),
    pytest.param({"masked_thought": {}, "send": {}}, None, id="masked_thought+send"),
    pytest.param({"allora": {}, "send": {}}, {"lora_dropout": 0.0}, id="allora+send"),
    pytest.param({"sinkd": {"teacher": "TEACHER"}, "drop_path": {}}, None, id="sinkd+drop_path"),
    pytest.param({"smoe_dropout": {}, "dropout_schedule": {}}, None, id="smoe_dropout+dropout_schedule"),
    pytest.param({"send": {}, "smoe_dropout": {}}, None, id="send+smoe_dropout"),
    pytest.param({"send": {"site": "mlp"}, "smoe_dropout": {}}, None, id="send-mlp+smoe_dropout"),
    pytest.param({"send": {"site": "weights"}, "smoe_dropout": {"structured_dropout": 0.5}}, None,
                 id="send-weights+smoe-structured"),
]


@pytest.mark.parametrize(("methods", "lora"), COMPOSING)
def test_the_composing_pairs_are_valid_configs(tmp_path, methods, lora):
    (tmp_path / "teacher").mkdir()
    if "sinkd" in methods:
        methods["sinkd"]["teacher"] = str(tmp_path / "teacher")
    assert list(load_config(_config(tmp_path, methods, lora)).methods) == sorted(methods)
