"""Sites by structure (`workbench.models.structure`) on every family of the matrix (`tests/families.py`): the
layers, the two residual branches of each, the MLP parts, the dropouts by what they drop, and SMoE conversion at
k = E reproducing the dense model."""

from __future__ import annotations

import pytest
import torch
import transformers
from families import CLASSIFICATION, FAMILIES, FAMILY
from torch import nn

from workbench.errors import ConfigError
from workbench.methods import build_methods, check_methods_on_model
from workbench.models.moe_model import convert_to_moe, find_mlp_blocks
from workbench.models.structure import SiteError, model_sites, traced_sites

VOCAB = 64
DENSE = [f for f in FAMILIES if not f.moe]
# What each family's feed-forward branch is: the module transformers' own forward adds to the residual stream.
MLP_KIND = {"gpt2": "plain", "opt": "plain", "gpt_neox": "plain", "falcon": "plain", "bert": "plain",
            "phi3": "fused gate-up"}


def tiny_model(name: str) -> nn.Module:
    family = FAMILY[name]
    extra = {"num_labels": 2, "pad_token_id": 0} if family.run_kind == CLASSIFICATION else {"pad_token_id": 0}
    config = getattr(transformers, family.config_class)(vocab_size=VOCAB, **family.config, **extra)
    torch.manual_seed(0)
    return getattr(transformers, family.model_class)(config).eval()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_two_branches_per_layer_and_its_mlp(family):
    model = tiny_model(family.name)
    sites = model_sites(model)
    assert len(sites.layers) == model.config.num_hidden_layers == 2
    assert len(sites.branches) == 4 and len(set(map(id, sites.branches))) == 4
    for layer in sites.layers:
        assert isinstance(layer.attention.is_causal, bool)
        assert layer.is_moe == family.moe and (layer.mlp is None) == family.moe
    if not family.moe:
        mlp = sites.layers[0].mlp
        kind = ("fused gate-up" if mlp.fused_gate_up else "gated") if mlp.gated else "plain"
        assert kind == MLP_KIND.get(family.name, "gated")
    assert sites.input_embeddings is model.get_input_embeddings()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.run_kind != CLASSIFICATION], ids=lambda f: f.name)
def test_the_branches_are_all_a_layer_adds_to_its_residual_stream(family):
    """With every branch output zeroed, each decoder layer passes its input through unchanged: the branches are
    exactly the residual contributions (a missed branch, or a hook on the layer output, fails this)."""
    model = tiny_model(family.name)
    for branch in model_sites(model).branches:
        branch.register_forward_hook(lambda module, args, output: (
            (output[0] * 0, *output[1:]) if isinstance(output, tuple) else output * 0))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], hidden[0])
    torch.testing.assert_close(hidden[2], hidden[0]) if len(hidden) > 3 else None


def test_gpt2_opt_and_post_norm_families_get_the_right_sites():
    gpt2 = model_sites(tiny_model("gpt2")).layers[0]
    assert gpt2.attention_name.endswith("attn") and gpt2.branch_names[1].endswith("mlp")
    assert [d for d in gpt2.dropouts["attention"]] == [gpt2.attention.attn_dropout]
    assert gpt2.dropouts["residual_attention"] == [gpt2.attention.resid_dropout]
    assert gpt2.dropouts["residual_feed_forward"] == [gpt2.module.mlp.dropout]
    assert gpt2.mlp.container.endswith("mlp.c_fc") and [n.rsplit(".", 1)[1] for n in gpt2.mlp.bypassed] == ["act", "c_proj"]
    opt = model_sites(tiny_model("opt")).layers[0]
    assert opt.branch_names[1].endswith("fc2") and opt.mlp.up.endswith("fc1")  # the MLP sits on the layer itself
    for name in ("gemma3", "olmo2"):  # the branch is the post-norm's output, the sublayer's contribution
        layer = model_sites(tiny_model(name)).layers[0]
        assert layer.branch_names == (f"{layer.name}.post_attention_layernorm",
                                      f"{layer.name}.post_feedforward_layernorm")


@pytest.mark.parametrize("family", DENSE, ids=lambda f: f.name)
def test_the_documented_conversion_reproduces_the_dense_model_at_k_equal_e(family):
    """`{experts, init: split, combine: scaled}` (weights default to uniform under split) at k = E gives the dense
    model's logits; the softmax weights would not (the check can fail)."""
    model = tiny_model(family.name)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        dense = model(ids).logits
    (method,) = build_methods({"smoe_dropout": {"experts": 4, "init": "split", "combine": "scaled"}})
    assert method.config.weights == "uniform"
    method.prepare_model(model)
    blocks = find_mlp_blocks(model)
    assert len(blocks) == 2 and all(b.kind == "moe" for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, dense, rtol=1e-5, atol=1e-5)
    softmax = tiny_model(family.name)
    convert_to_moe(softmax, 4, init="split", combine="scaled", weights="softmax")
    with torch.no_grad():
        assert not torch.allclose(softmax.eval()(ids).logits, dense, atol=1e-5)


def test_moe_families_are_refused_for_conversion_with_the_reason():
    for name in ("mixtral", "qwen2_moe"):
        with pytest.raises(ConfigError, match="mixtures of experts already"):
            check_methods_on_model({"smoe_dropout": {"experts": 4}},
                                   lambda n=name: (tiny_model(n).config, type(tiny_model(n))))


def test_methods_report_what_they_act_on(capsys):
    model = tiny_model("opt")
    for name in ("drop_path", "dropout_schedule", "send"):
        (method,) = build_methods({name: {}})
        method.prepare_model(model)
    out = capsys.readouterr().out
    assert "[drop_path] 4 branches in 2 layers" in out
    assert "[dropout_schedule] 2 layers: attention 2, residual 4 (4 added as output hooks)" in out
    assert "[send] tracking layer 1 of 2 output (32 indices)" in out


def test_a_model_without_the_sites_is_one_line_naming_its_class():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    with pytest.raises(SiteError, match=r"^T5ForConditionalGeneration: 2 layer stacks .*encoder-decoder") as err:
        model_sites(t5)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"field 'methods.drop_path': T5ForConditionalGeneration"):
        check_methods_on_model({"drop_path": {}}, lambda: (t5.config, type(t5)))


def test_early_checks_need_no_weights_and_name_the_field():
    config = transformers.GPT2Config(vocab_size=VOCAB, **FAMILY["gpt2"].config)  # MLP width 128
    with pytest.raises(ConfigError, match=r"methods.smoe_dropout': GPT2LMHeadModel: experts \(3\) must divide"):
        check_methods_on_model({"smoe_dropout": {"experts": 3}}, lambda: (config, transformers.GPT2LMHeadModel))
    sites = traced_sites(config, transformers.GPT2LMHeadModel)
    assert all(p.is_meta for p in sites.layers[0].module.parameters())


@pytest.mark.parametrize(("name", "axes"), [("gpt2", [1, 0]), ("llama", [0, 0, 1]), ("phi3", [0, 1])])
def test_send_weight_site_reads_the_intermediate_axis_of_each_layout(name, axes):
    """SeND's `site: weights` zeroes MLP units: rows of Linear up/gate maps (columns of GPT-2's Conv1D c_fc),
    columns of the down map (rows of Conv1D c_proj); the axis it zeroes has the MLP's width (2x for fused)."""
    from workbench.methods.send import mlp_weights

    model = tiny_model(name)
    layer = model_sites(model).layers[0]
    found = mlp_weights(model, layer)
    assert [axis for _, axis in found] == axes
    assert all(weight.shape[axis] in (layer.mlp.width, 2 * layer.mlp.width) for weight, axis in found)


OTHER_FAMILIES = {  # beyond the matrix: layouts that needed a rule of their own
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM,  # one dropout module on both branches
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 resid_pdrop=0.1)),
    "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification,  # padding index at build
                dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     pad_token_id=1, num_labels=2)),
    "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForSequenceClassification,  # no
                   dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, num_labels=2)),  # _no_split_modules
    "t5-encoder": (transformers.T5Config, transformers.T5EncoderModel,  # a dropout inside the MLP, before wo
                   dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
}


@pytest.mark.parametrize("name", list(OTHER_FAMILIES))
def test_other_layouts_get_their_sites_and_convert_exactly(name):
    config_class, model_class, fields = OTHER_FAMILIES[name]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=VOCAB, **fields)).eval()
    sites = model_sites(model)
    assert len(sites.layers) == 2 and len(sites.branches) == 4
    ids = torch.randint(2, VOCAB, (2, 6))
    with torch.no_grad():
        dense = model(ids)[0]
    convert_to_moe(model, 4, init="split", combine="scaled", weights="uniform")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[0], dense, rtol=1e-5, atol=1e-5)


def test_one_dropout_on_both_branches_is_set_once_and_gets_no_second_hook():
    from workbench.methods.dropout_schedule import dropout_sites

    config_class, model_class, fields = OTHER_FAMILIES["phi"]
    model = model_class(config_class(vocab_size=VOCAB, **fields))
    layer = model_sites(model).layers[0]
    assert layer.dropouts["residual_attention"] == layer.dropouts["residual_feed_forward"] == [layer.module.resid_dropout]
    sites = dropout_sites(model, ["residual"])
    assert len(sites["residual"]) == 2  # one module per layer, no hook added on top
    assert not [n for n, _ in model.named_modules() if n.endswith("workbench_output_dropout")]
