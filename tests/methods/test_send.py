"""SeND: pooled embeddings, sensitivity and selection against independent computations; which block is tracked;
the drop in training only; the tracking split; bit-equal resume with the method's state; bad options."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, train_main, write_config
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.methods import validate_method_config
from workbench.methods.send import (
    SeND,
    SeNDConfig,
    block_index,
    dropped_count,
    pool,
    select_indices,
    sensitivity,
)


def tiny_model(family: str, layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                                                num_attention_heads=2, intermediate_size=32))
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=24))


def test_pooling_is_attention_mask_aware():
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    for pooling in ("mean", "last", "paper"):
        got = pool(hidden, mask, pooling)
        for row in range(3):
            n = int(mask[row].sum())
            mean, last = hidden[row, :n].mean(0), hidden[row, n - 1]
            want = {"mean": mean, "last": last, "paper": 0.5 * (mean + last)}[pooling]
            torch.testing.assert_close(got[row], want)


def test_sensitivity_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    history = rng.normal(size=(4, 6, 10)) * rng.uniform(0.1, 3, size=10)
    variance = history.var(axis=0)  # population variance over the tracking points
    change = np.abs(np.diff(history, axis=0)).sum(axis=0)
    want = (variance * change).mean(axis=0)  # averaged over tracking texts
    np.testing.assert_allclose(sensitivity(torch.from_numpy(history)).numpy(), want, rtol=1e-12)


def test_selection_takes_the_top_share_or_a_seeded_random_set():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.0, 0.4, 0.5, 0.6])
    assert dropped_count(10, 20) == 2 and dropped_count(128, 20) == 26 and dropped_count(10, 1) == 1
    assert select_indices(scores, 3, "sensitive", torch.Generator()).tolist() == [1, 3, 5]
    draw = [select_indices(scores, 3, "random", torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2]) and len(set(draw[0].tolist())) == 3


@pytest.mark.parametrize("family", ["neox", "llama"])
@pytest.mark.parametrize("layer", [-2, 1, -3])
def test_the_tracked_embedding_is_the_output_of_the_named_block(family, layer):
    model = tiny_model(family).eval()
    blocks = model.gpt_neox.layers if family == "neox" else model.model.layers
    seen = {}
    blocks[block_index(layer, len(blocks))].register_forward_hook(
        lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    ids = torch.randint(0, 50, (2, 7))
    hidden = model(ids, output_hidden_states=True).hidden_states[layer]
    assert torch.equal(hidden, seen["out"])


def reference_embeddings(model, method: SeND) -> torch.Tensor:
    """The tracking embeddings as SeND took them before hooks: the whole model, every hidden state, pooled."""
    with torch.no_grad():
        return torch.cat([pool(model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                     use_cache=False).hidden_states[method.config.layer].float(), mask,
                               method.config.pooling).double() for ids, mask in method.batches()])


@pytest.mark.parametrize("family", ["neox", "llama"])
@pytest.mark.parametrize(("layer", "pooling"), [(-2, "paper"), (1, "last"), (-3, "mean")])
def test_the_tracking_pass_skips_the_lm_head_and_keeps_the_embeddings(family, layer, pooling):
    """The tracking pass computes no logits (the LM head never runs) and gives the embeddings the whole-model
    pass with every hidden state gave, bit for bit, on right-padded texts of different lengths."""
    model = tiny_model(family)
    method = SeND(SeNDConfig(layer=layer, pooling=pooling, tracking_batch_size=2))
    method.prepare_model(model)
    method.tracking = [[int(t) for t in torch.randint(1, 50, (n,))] for n in (5, 9, 3, 7, 6)]
    model.eval()
    want = reference_embeddings(model, method)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_calls.append(out.shape))
    model.train()
    got = method.embed(model)
    assert head_calls == [] and model.training
    assert got.shape == (5, 16) and got.dtype == torch.float64
    assert torch.equal(got, want)


def test_the_chosen_indices_are_rank_zeros_broadcast_on_the_backends_device(monkeypatch):
    """On a rank other than 0 the broadcast overwrites the local choice with rank 0's; the tensor handed to it
    lives where the backend runs collectives (the CPU for gloo; cuda for NCCL: tests/test_collectives.py)."""
    rank_zero_choice = torch.tensor([1, 4, 6])
    handed = []

    def broadcast(tensor, src):
        handed.append((tensor.device, src))
        tensor.copy_(rank_zero_choice)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    method = SeND(SeNDConfig(top_percent=30, window=2))
    method.history = [torch.zeros(2, 10, dtype=torch.float64), torch.arange(20.0).reshape(2, 10).double()]
    method.choose()
    assert handed == [(torch.device("cpu"), 0)]
    assert torch.equal(method.indices, rank_zero_choice) and method.indices.device.type == "cpu"


def test_layers_outside_the_blocks_are_refused():
    with pytest.raises(ValueError, match="layer must index"):
        SeNDConfig(layer=-1)
    with pytest.raises(ConfigError, match="methods.send.layer"):
        block_index(-5, 3)


@pytest.mark.parametrize("site", ["block", "mlp"])
def test_the_drop_zeroes_the_indices_in_training_only(site):
    model = tiny_model("neox")
    method = SeND(SeNDConfig(site=site))
    method.prepare_model(model)
    method.indices = torch.tensor([0, 5, 9])
    ids = torch.randint(0, 50, (2, 6))
    block = model.gpt_neox.layers[1]
    target = block if site == "block" else block.mlp
    seen = {}
    target.register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    model.train()
    model(ids)
    assert seen["out"][..., [0, 5, 9]].abs().max() == 0 and seen["out"][..., 1].abs().max() > 0
    model.eval()
    model(ids)
    assert seen["out"][..., [0, 5, 9]].abs().max() > 0


def test_official_weight_zeroing_hits_mlp_units_numbered_like_the_indices():
    model = tiny_model("neox")
    method = SeND(SeNDConfig(site="weights"))
    method.prepare_model(model)
    method.indices, method.history = torch.tensor([2]), [torch.zeros(1, 16)]
    method.zero_weights()
    mlp = model.gpt_neox.layers[1].mlp
    assert mlp.dense_h_to_4h.weight[[2, 18]].abs().max() == 0 and mlp.dense_4h_to_h.weight[:, [2, 18]].abs().max() == 0
    assert mlp.dense_h_to_4h.weight[3].abs().max() > 0


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match=r"\[send\] top_percent must be in"):
        validate_method_config("send", {"top_percent": 0})
    with pytest.raises(ValueError, match="selection"):
        validate_method_config("send", {"selection": "sensitiv"})
    with pytest.raises(ValueError, match="stop_ees needs ees_prompts"):
        validate_method_config("send", {"stop_ees": 1.0})


SEND = {"track_every": 2, "window": 2, "drop_intervals": 2, "top_percent": 25, "tracking_fraction": 0.2}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("send")
    cfg = tiny_config(tmp, name="straight", methods={"send": SEND}, training={"max_steps": 12, "save_steps": 4})
    cfg["model"]["overrides"]["num_hidden_layers"] = 2
    assert train_main([str(write_config(tmp, cfg))]) == 0
    return tmp / "runs" / "straight"


def test_a_run_holds_out_tracking_texts_drops_and_logs(straight_run):
    records = [r for r in read_jsonl(straight_run / "metrics.jsonl") if "send_dropped" in r]
    dropped = {r["step"]: r["send_dropped"] for r in records}
    assert dropped[1] == 0 and dropped[4] == 8 and dropped[12] == 8  # 25% of 32 once two points exist
    assert [r["send_tracking_points"] for r in records if r["step"] == 12] == [6]
    state = torch.load(straight_run / "checkpoint-12" / "workbench_methods_rank0.pt", weights_only=True)["send"]
    assert state["points"] == 6 and state["selections"] == 3 and state["history"].shape[0] == 2
    assert state["history"].shape[1] > 0 and state["history"].dtype == torch.float64


def test_resuming_a_send_run_is_bit_equal(straight_run, tmp_path):
    run_dir = tmp_path / "runs" / "straight"
    shutil.copytree(straight_run, run_dir)
    for step in (8, 12):
        shutil.rmtree(run_dir / f"checkpoint-{step}")
    config = yaml.safe_load((straight_run / "config.yaml").read_text())
    config["runs_dir"] = str(tmp_path / "runs")
    assert train_main([str(write_config(tmp_path, config)), "--resume"]) == 0
    for step in (8, 12):
        want = load_file(straight_run / f"checkpoint-{step}" / "model.safetensors")
        got = load_file(run_dir / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.equal(want[k], got[k]) for k in want)
        a, b = (torch.load(d / f"checkpoint-{step}" / "workbench_methods_rank0.pt", weights_only=True)["send"]
                for d in (straight_run, run_dir))
        assert torch.equal(a["history"], b["history"]) and torch.equal(a["indices"], b["indices"])
        assert (a["remaining"], a["points"], a["selections"]) == (b["remaining"], b["points"], b["selections"])


def test_the_stop_rule_ends_the_run_when_either_threshold_is_met(tmp_path, capsys):
    """`stop_ees` with EES measured on two tracking prompts: any EES is below 1e9, so the run stops at the first
    logging step after the first tracking point; `send_ees` is logged."""
    options = {**SEND, "ees_prompts": 2, "ees_samples": 3, "stop_ees": 1e9}
    cfg = tiny_config(tmp_path, name="stop", methods={"send": options}, training={"max_steps": 12, "save_steps": 4})
    cfg["model"]["overrides"]["num_hidden_layers"] = 2
    assert train_main([str(write_config(tmp_path, cfg))]) == 0
    records = read_jsonl(tmp_path / "runs" / "stop" / "metrics.jsonl")
    assert max(r["step"] for r in records) == 2 and "stopping at step 2: EES" in capsys.readouterr().out
    assert any("send_ees" in r for r in records)


def test_in_a_plain_transformers_trainer(tmp_path):
    """The page's recipe: `prepare_model`, the callbacks to the Trainer, `setup` to hold the tracking split out."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model("neox")
    rows = [[int(t) for t in torch.randint(0, 50, (8,))] for _ in range(40)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    send = SeND(SeNDConfig(track_every=1, window=2, drop_intervals=2, tracking_fraction=0.1))
    model = send.prepare_model(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=send.callbacks())
    send.setup(trainer)
    assert len(send.tracking) == 4 and len(trainer.train_dataset) == 36
    trainer.train()
    assert send.points == 5 and len(send.indices) == dropped_count(16, 20) and send.selections == 2
