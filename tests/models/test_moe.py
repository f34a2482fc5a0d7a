"""MoE MLPs cut from dense MLPs (SMoE-Dropout's model side): equivalence, routing, sparse path, checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPTNeoXConfig, LlamaConfig

from workbench.models import load_trained_model
from workbench.models import moe as moe_module
from workbench.models.moe import MoEMLP, grouped_mm_supported
from workbench.models.moe_model import (
    ChunkDropout,
    add_chunk_dropout,
    convert_to_moe,
    expert_load,
    find_mlp_blocks,
    is_moe_checkpoint,
    moe_layers,
    moe_model_class,
    set_active_experts,
)

E = 4  # experts; d_ff 128 -> 4 x 32


def neox_config(**kw) -> GPTNeoXConfig:
    return GPTNeoXConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=64, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True, **kw)


CONFIGS = {"gpt_neox": neox_config, "llama": llama_config, "llama_bias": lambda: llama_config(mlp_bias=True)}


def dense_model(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]()).to(dtype).eval()
    with torch.no_grad():  # non-zero MLP biases, so that the b2/E split is exercised
        for block in find_mlp_blocks(model):
            for p in block.module.parameters():
                if p.ndim == 1:
                    p.normal_(0, 0.1)
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(seed))


def moe(gated: bool = False, router: str = "random_frozen", dtype=torch.float64, **kw) -> MoEMLP:
    torch.manual_seed(3)
    layer = MoEMLP(16, 64, E, nn.SiLU() if gated else nn.GELU(), gated=gated, router=router, dtype=dtype, **kw)
    layer.init_scratch(0.2)
    with torch.no_grad():
        for bias in (layer.bias_in, layer.bias_gate, layer.bias_out):
            if bias is not None:
                bias.normal_(0, 0.1)
    layer.init_router("normal", 1.0)  # spread-out logits: distinct top-k sets per token
    return layer


# --- equivalence with the dense model ------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_split_scaled_uniform_at_k_equal_e_reproduces_dense_logits(family):
    model = dense_model(family)
    batch = ids()
    dense = model(batch).logits
    layers = convert_to_moe(model, E, init="split", combine="scaled", weights="uniform")
    assert len(layers) == 2 and type(model).__name__.startswith("SMoE")
    torch.testing.assert_close(model(batch).logits, dense, rtol=0, atol=1e-6)
    model.train()  # the training-mode path at k = E too (no dropout in these configs)
    torch.testing.assert_close(model(batch).logits, dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_split_scaled_softmax_with_equal_logits_reproduces_dense_in_float32(family):
    model = dense_model(family, torch.float32)
    batch = ids()
    dense = model(batch).logits
    for layer in convert_to_moe(model, E, init="split", combine="scaled"):
        layer.router_weight.zero_()  # equal logits: softmax weights are exactly uniform
    torch.testing.assert_close(model(batch).logits, dense, rtol=0, atol=1e-5)


def test_bert_blocks_keep_their_residual_and_layernorm():
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).double()
    model.eval()
    batch = ids()
    dense = model(batch).last_hidden_state
    convert_to_moe(model, E, init="split", combine="scaled", weights="uniform")
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, MoEMLP) and isinstance(layer.output.dense, nn.Identity)
    torch.testing.assert_close(model(batch).last_hidden_state, dense, rtol=0, atol=1e-9)


def test_code_combine_at_k_equal_e_is_dense_over_e():
    """softmax_topk (the code's rule) with uniform weights at k = E: Σ E_e / E = dense / E (spec Corrections)."""
    model = dense_model("gpt_neox")
    block = find_mlp_blocks(model)[0]
    x = torch.randn(5, 32, dtype=torch.float64)
    dense = block.module(x)
    (layer,) = convert_to_moe(model, E, layers=[0], init="split", weights="uniform")
    torch.testing.assert_close(layer(x) * E, dense, rtol=0, atol=1e-12)
    assert isinstance(find_mlp_blocks(model)[1].module, nn.Module) and len(moe_layers(model)) == 1


# --- router -------------------------------------------------------------------------------------------------
def test_frozen_router_is_saved_unchanged_and_never_optimised():
    model = dense_model("gpt_neox", torch.float32)
    layers = convert_to_moe(model, E)
    set_active_experts(model, 2)
    model.train()
    before = [layer.router_weight.clone() for layer in layers] + [layer.router_bias.clone() for layer in layers]
    experts_before = layers[0].weight_in.detach().clone()
    assert all(not layer.router_weight.requires_grad for layer in layers)
    assert all(key.endswith(("router_weight", "router_bias")) for key in model.state_dict() if "router" in key)
    assert sum("router" in key for key in model.state_dict()) == 2 * len(layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(t) in in_optimizer for layer in layers for t in (layer.router_weight, layer.router_bias))
    for step in range(3):
        batch = ids(step)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = [layer.router_weight for layer in layers] + [layer.router_bias for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(layer.router_weight.grad is None for layer in layers)
    assert not torch.equal(layers[0].weight_in, experts_before)  # the experts did train


def test_learned_router_trains():
    layer = moe(router="learned", k=2)
    assert layer.router_weight.requires_grad and "router_weight" in dict(layer.named_parameters())
    layer.train()(torch.randn(6, 16, dtype=torch.float64)).sum().backward()
    assert layer.router_weight.grad is not None and layer.router_weight.grad.abs().sum() > 0
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad


def test_router_default_init_is_pytorch_linear():
    layer = MoEMLP(64, 128, E, nn.GELU())
    layer.init_router("default")
    bound = 1 / 64**0.5
    assert layer.router_weight.abs().max() <= bound and layer.router_bias.abs().max() <= bound
    layer.init_router("normal")
    assert torch.equal(layer.router_bias, torch.zeros(E)) and 0.01 < layer.router_weight.std() < 0.03


def test_topk_weights_sum_to_one_and_scaled_to_e():
    layer = moe()
    logits = layer.router_logits(torch.randn(9, 16, dtype=torch.float64))
    for k in range(1, E + 1):
        index, gate = layer.route(logits, k)
        assert index.shape == (9, k) and torch.allclose(gate.sum(-1), torch.ones(9, dtype=gate.dtype))
        assert torch.equal(index, logits.topk(k, dim=-1).indices)
    layer.combine = "scaled"
    assert torch.allclose(layer.route(logits, 2)[1].sum(-1), torch.full((9,), float(E), dtype=torch.float64))


@pytest.mark.parametrize("gated", [False, True])
def test_only_selected_experts_get_gradient_for_a_token(gated):
    layer = moe(gated=gated, k=2).train()
    x = torch.randn(1, 16, dtype=torch.float64)
    selected = set(layer.router_logits(x).topk(2, dim=-1).indices[0].tolist())
    layer(x).sum().backward()
    for name in ("weight_in", "bias_in", "weight_gate", "weight_out", "bias_out"):
        param = getattr(layer, name)
        if param is None:
            continue
        touched = {e for e in range(E) if param.grad[e].abs().sum() > 0}
        assert touched == selected, name


# --- the sparse path ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, E])
@pytest.mark.parametrize("combine", ["softmax_topk", "scaled"])
def test_sparse_path_equals_masked_dense_reference(gated, k, combine):
    layers = [moe(gated=gated, router="learned", k=k, combine=combine) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    inputs = [x.clone().requires_grad_(True) for _ in layers]
    sparse, reference = layers[0].train()(inputs[0]), layers[1].train().forward_reference(inputs[1])
    torch.testing.assert_close(sparse, reference, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(sparse)
    (sparse * weight).sum().backward()
    (reference * weight).sum().backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(layers[0].named_parameters(), layers[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_sparse_path_runs_only_the_selected_experts(monkeypatch):
    layer = moe(k=1).train()
    calls = []
    real = layer._hidden
    monkeypatch.setattr(layer, "_hidden", lambda x, *a: (calls.append(x.shape[0]), real(x, *a))[1])
    x = torch.randn(10, 16, dtype=torch.float64)
    layer(x)
    assert sum(calls) == 10 and len(calls) <= E  # every token once, one call per expert that has tokens


def test_expert_load_sums_to_one_and_accumulates_over_training_passes():
    layer = moe(k=2).train()
    for _ in range(3):
        layer(torch.randn(8, 16, dtype=torch.float64))
        assert torch.isclose(layer.last_load.sum(), torch.tensor(1.0))
    holder = nn.Sequential(layer)
    load = expert_load(holder)
    assert load.shape == (1, E) and torch.allclose(load.sum(1), torch.ones(1))
    assert expert_load(holder) is None  # reset
    layer.eval()(torch.randn(8, 16, dtype=torch.float64))
    assert expert_load(holder) is None  # eval passes are not accumulated
    assert torch.allclose(layer.last_load, torch.full((E,), 1 / E))  # eval at k = E: every expert, every token


def test_k_is_settable_per_mode_and_checked():
    model = dense_model("llama")
    layers = convert_to_moe(model, E)
    assert set_active_experts(model, 1, evaluation=False) == 2
    assert layers[0].k == 1 and layers[0].eval_k is None
    assert layers[0].active_k == E  # eval mode: all experts (score-based dense inference)
    set_active_experts(model, 3)
    assert layers[0].train().active_k == 3 and layers[0].eval().active_k == 3
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        set_active_experts(model, E + 1)
    with pytest.raises(ValueError, match="no MoE layers"):
        set_active_experts(dense_model("llama"), 2)


# --- bad arguments --------------------------------------------------------------------------------------------
def test_bad_arguments_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"num_experts \(3\) must divide the MLP width d_ff \(128\)"):
        convert_to_moe(dense_model("gpt_neox"), 3)
    with pytest.raises(ValueError, match="layers: 5 is not an MLP block index"):
        convert_to_moe(dense_model("gpt_neox"), E, layers=[5])
    with pytest.raises(ValueError, match="combine must be one of softmax_topk, scaled"):
        convert_to_moe(dense_model("gpt_neox"), E, combine="mean")
    with pytest.raises(ValueError, match="init must be one of scratch, split"):
        convert_to_moe(dense_model("gpt_neox"), E, init="random")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        MoEMLP(16, 64, E, nn.GELU(), k=5)
    model = dense_model("gpt_neox")
    convert_to_moe(model, E)
    with pytest.raises(ValueError, match="already has MoE layers"):
        convert_to_moe(model, E)


# --- checkpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_save_and_reload_through_the_workbench_loader(tmp_path, family):
    model = dense_model(family, torch.float32)
    layers = convert_to_moe(model, E, layers=[1], init="scratch", eval_k=2)
    with torch.no_grad():
        layers[0].router_weight.normal_(0, 1.0)  # distinct routing, so that a router lost in loading shows
    batch = ids()
    expected = model(batch).logits
    model.save_pretrained(tmp_path)
    assert is_moe_checkpoint(tmp_path) and not is_moe_checkpoint(tmp_path / "missing")
    loaded = load_trained_model(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    (layer,) = moe_layers(loaded)
    assert layer.eval_k == 2 and not layer.router_weight.requires_grad
    assert isinstance(find_mlp_blocks(loaded)[0].module, nn.Module) and find_mlp_blocks(loaded)[0].kind != "moe"
    assert torch.equal(loaded(batch).logits, expected)
    set_active_experts(loaded, E)  # any k at inference
    assert not torch.equal(loaded(batch).logits, expected)


def test_moe_model_class_leaves_plain_configs_alone():
    config = neox_config()
    assert moe_model_class(AutoModelForCausalLM, config) is AutoModelForCausalLM
    config.smoe = {"num_experts": E, "layers": [0]}
    cls = moe_model_class(AutoModelForCausalLM, config)
    assert cls.__name__ == "SMoEGPTNeoXForCausalLM" and moe_model_class(cls) is cls
    model = cls(config)  # built from the config alone: converted, experts initialised
    assert len(moe_layers(model)) == 1 and torch.isfinite(model(ids()).logits).all()


# --- the dense-dropout baseline ---------------------------------------------------------------------------------
def test_chunk_dropout_drops_strided_expert_chunks_in_training_only():
    chunk = ChunkDropout(12, 4, 0.5)
    hidden = torch.ones(3, 12)
    torch.manual_seed(0)
    out = chunk.train()(hidden)
    keep = out[0].reshape(3, 4)  # unit i belongs to chunk i mod 4
    assert torch.equal(keep, keep[:1].expand(3, 4)) and torch.equal(out[0], out[1])
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(chunk.eval()(hidden), hidden)
    with pytest.raises(ValueError, match="structured_dropout must be in"):
        ChunkDropout(12, 4, 1.0)


def test_chunk_dropout_equals_masking_the_dense_weights():
    model = dense_model("gpt_neox")
    mlp = find_mlp_blocks(model)[0].module
    (chunk,) = add_chunk_dropout(model, E, 0.5, layers=[0])
    model.train()
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.manual_seed(4)
    out = mlp(x)
    torch.manual_seed(4)
    mask = torch.rand(E).gt(0.5).repeat(128 // E).double()
    up, down = mlp.dense_h_to_4h, mlp.dense_4h_to_h
    expected = F.linear(mlp.act(F.linear(x, up.weight * mask[:, None], up.bias * mask)), down.weight * mask, down.bias)
    torch.testing.assert_close(out, expected)
    assert "workbench_chunk_dropout" not in str(list(model.state_dict()))
    assert find_mlp_blocks(model)[0].kind == "dense" and chunk.training


def test_k_equal_e_is_the_softmax_weighted_sum_over_every_expert():
    """Spec test (e): dense inference at k = E against a plain loop over the experts with softmax(g) weights."""
    layer = moe().eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    w = torch.softmax(x @ layer.router_weight.T + layer.router_bias, dim=-1)
    expected = sum(w[:, e:e + 1] * (F.gelu(x @ layer.weight_in[e].T + layer.bias_in[e]) @ layer.weight_out[e]
                                    + layer.bias_out[e]) for e in range(E))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


# --- FLOPs: only the active experts count --------------------------------------------------------------------
@pytest.mark.parametrize("router", ["random_frozen", "learned"])
def test_active_parameters_follow_each_layers_current_k(router):
    from workbench.models.flops import active_experts_key, active_parameters

    model = dense_model("gpt_neox", torch.float32)
    dense = active_parameters(model)
    assert dense == model.num_parameters(exclude_embeddings=True)  # untied head: a Linear, counted
    d, d_ff, layers = 32, 128, 2
    convert_to_moe(model, E, router=router, layers=[0, 1])
    router_size = E * d + E  # per layer, counted whole (a frozen router's buffers too: its matmul runs)
    experts = 2 * d_ff * d + d_ff + E * d  # per layer: W1, W2, b1 and E copies of b2 (b2 / E each)
    mlp = 2 * d_ff * d + d_ff + d  # the dense MLP it replaced
    model.train()
    for k in range(1, E + 1):
        set_active_experts(model, k, evaluation=False)
        expected = dense + layers * (router_size + round(experts * k / E) - mlp)
        assert active_experts_key(model) == (k, k) and active_parameters(model) == expected
    set_active_experts(model, 1, training=False)
    model.eval()  # eval mode counts eval_k
    assert active_parameters(model) == dense + layers * (router_size + round(experts / E) - mlp)
    assert active_experts_key(AutoModelForCausalLM.from_config(neox_config())) == ()


def test_a_converted_pretrained_untied_head_reloads(tmp_path):
    """GPT-NeoX's untied head is `lm_head` in the model and `embed_out` in a checkpoint loaded with
    `from_pretrained` (transformers renames it per class name): the SMoE class gets the same renaming."""
    dense = dense_model("gpt_neox", torch.float32)
    dense.save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    convert_to_moe(model, E)
    model.save_pretrained(tmp_path / "smoe")
    loaded = load_trained_model(tmp_path / "smoe")  # a missing head would be a CheckpointError
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)


class _OneExpertRouter(nn.Module):  # named like transformers' routers: (logits, weights, indices), all on expert 0
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, 8))

    def forward(self, x: torch.Tensor):
        logits = x @ self.weight.T
        return logits, torch.ones(len(x), 1), torch.zeros(len(x), 1, dtype=torch.long)


def test_router_load_of_a_collapsed_and_of_a_real_mixtral_router():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from workbench.config import ModelConfig
    from workbench.models import build_model, train_bpe_tokenizer
    from workbench.models.moe_model import RouterLoadCallback

    args, state, control = TrainingArguments("unused", report_to=[]), TrainerState(), TrainerControl()
    collapsed = nn.Sequential(_OneExpertRouter(4)).train()
    callback = RouterLoadCallback()
    callback.on_train_begin(args, state, control, model=collapsed)
    collapsed(torch.randn(10, 8))
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    assert logs["router_load_min"] == 0 and logs["router_load_max"] == 1
    assert logs["router_load_cv"] == pytest.approx(3**0.5)  # √(E − 1): everything on one expert
    collapsed.eval()(torch.randn(10, 8))  # evaluation passes do not count
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    assert "router_load_min" not in logs  # counts reset at each log, nothing counted since
    tokenizer = train_bpe_tokenizer([f"text number {i}" for i in range(40)], 300)
    model = build_model(ModelConfig(preset="mixtral-tiny"), tokenizer).train()
    callback = RouterLoadCallback()
    callback.on_train_begin(args, state, control, model=model)
    assert len(callback.counts) == 2  # one router per layer
    model(torch.randint(0, len(tokenizer), (4, 32)))
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    assert logs["router_load_min"] <= 0.25 <= logs["router_load_max"] and logs["router_load_cv"] >= 0
    assert all(c.sum() == 0 for c in callback.counts.values())


# --- no waits for the host: grouped matmuls, loads counted on the device --------------------------------------
HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    """Every call of a Tensor method that brings a value to Python (a host sync on a GPU), by name."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name: str, method):
        return lambda self, *args, **kwargs: (calls.append(name), method(self, *args, **kwargs))[1]

    for name, method in saved.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def gpu_shaped_moe(gated: bool, dtype: torch.dtype, router: str = "random_frozen") -> MoEMLP:
    """A layer whose rows are 16-byte aligned (d = 16, H = 16), so that grouped_mm can run it."""
    layer = moe(gated=gated, router=router, k=2, dtype=torch.float32).to(dtype).train()
    assert grouped_mm_supported(torch.device("cpu"), dtype) and layer._grouped_fits(torch.zeros(1, 16, dtype=dtype))
    return layer


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_looped_expert_paths_agree(monkeypatch, gated, dtype):
    layers = [gpu_shaped_moe(gated, dtype) for _ in range(2)]
    x = torch.randn(3, 5, 16, dtype=dtype)
    x[0, :3] = 0  # tokens with equal logits; with k = 2 of 4 some expert is likely left without tokens
    inputs = [x.clone().requires_grad_(True) for _ in layers]
    grouped_calls = []
    real_grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: (grouped_calls.append(1), real_grouped_mm(*a, **kw))[1])
    grouped = layers[0](inputs[0])
    assert len(grouped_calls) == (3 if gated else 2)  # in, (gate,) out: one call each for every expert
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda device, dtype: False)
    looped = layers[1](inputs[1])
    assert len(grouped_calls) == (3 if gated else 2)
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(grouped, looped, **tolerance)
    weight = torch.randn_like(grouped)
    (grouped * weight).sum().backward()
    (looped * weight).sum().backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, **tolerance)
    for (name, a), b in zip(layers[0].named_parameters(), layers[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, **tolerance)


def test_grouped_path_equals_the_masked_dense_reference_in_float32():
    layer = gpu_shaped_moe(True, torch.float32)
    x = torch.randn(4, 6, 16)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["random_frozen", "learned"])
def test_the_sparse_path_never_reads_a_tensor_on_the_host(router):
    layer = gpu_shaped_moe(True, torch.float32, router)
    x = torch.randn(2, 9, 16, requires_grad=True)
    with counting_host_reads() as calls:
        out = layer(x)
        loss = out.square().sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
        loss.backward()
        layer(x.detach())  # the load accumulates on the device too
    assert calls == []
    assert layer._load_sum.device == x.device and layer.pop_load().sum() == pytest.approx(1.0)


class _OnDeviceRouter(_OneExpertRouter):  # as _OneExpertRouter, its outputs on the input's device
    def forward(self, x: torch.Tensor):
        return x @ self.weight.T, torch.ones(len(x), 1, device=x.device), x.new_zeros(len(x), 1, dtype=torch.long)


def test_router_load_is_counted_on_the_routers_device():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from workbench.models.moe_model import RouterLoadCallback

    args, state, control = TrainingArguments("unused", report_to=[]), TrainerState(), TrainerControl()
    router = nn.Sequential(_OnDeviceRouter(4)).train()
    callback = RouterLoadCallback()
    callback.on_train_begin(args, state, control, model=router)
    router.to("meta")  # a device whose values Python cannot read: any copy to the host in the hook would raise
    with counting_host_reads() as calls:
        for _ in range(3):
            router(torch.randn(10, 8, device="meta"))
    assert calls == [] and callback.counts[0].device.type == "meta"
