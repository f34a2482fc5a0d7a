"""SMoE-Dropout under DeepSpeed ZeRO 0-3 on 2 ranks: the MLPs are converted in `prepare_model` (under ZeRO-3 on a
model whose parameters may already be partitioned: the new experts are partitioned when the engine starts, the
frozen router is a buffer every rank holds), the router stays bitwise fixed, a run resumed from its middle
checkpoint is bit-equal to the uninterrupted one, and the checkpoint reloads converted. ZeRO-3 runs by default,
ZeRO-0/1/2 with `pytest -m slow`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_command, deepspeed_train, run, zero_method_config
from safetensors.torch import load_file

from workbench.io import read_jsonl
from workbench.methods.smoe_dropout import scheduled_k
from workbench.models import load_trained_model
from workbench.models.moe_model import moe_layers

SMOE = {"experts": 4, "k_min": 1}
CELLS = [pytest.param(stage, id=f"zero{stage}", marks=[] if stage == 3 else [pytest.mark.slow]) for stage in range(4)]


@pytest.mark.parametrize("stage", CELLS)
def test_smoe_on_two_ranks_keeps_the_router_resumes_bit_equal_and_reloads(tmp_path, stage):
    config = zero_method_config(tmp_path, "smoe", stage, {"smoe_dropout": SMOE})
    run_dir = tmp_path / "runs" / "smoe"
    port = 29950 + 10 * stage
    deepspeed_train(config, 2, port)
    middle = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    straight = load_file(run_dir / "checkpoint-8" / "model.safetensors")
    routers = [k for k in straight if ".router_" in k]
    assert len(routers) == 4 and all(torch.equal(middle[k], straight[k]) for k in routers)  # frozen
    assert not torch.equal(middle["gpt_neox.layers.0.mlp.weight_in"], straight["gpt_neox.layers.0.mlp.weight_in"])
    logged = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert [logged[s]["smoe_k"] for s in range(1, 9)] == [scheduled_k(s, 8, "linear_increase", 1, 4, 4)
                                                          for s in range(8)]
    assert all("smoe_load_max" in logged[s] for s in range(1, 9))
    shutil.rmtree(run_dir / "checkpoint-8")
    deepspeed_train(config, 2, port + 1, "--resume")
    resumed = load_file(run_dir / "checkpoint-8" / "model.safetensors")
    assert set(resumed) == set(straight) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    model = load_trained_model(run_dir / "checkpoint-8")
    layers = moe_layers(model)
    assert len(layers) == 2 and all(layer.num_experts == 4 for layer in layers)
    assert all(torch.equal(t, straight[k]) for k, t in model.state_dict().items() if k in straight)
    # a two-stage study's second stage: the SMoE checkpoint as the base (built converted, under ZeRO-3 inside
    # zero.Init), adopted by the method; its frozen router is carried over unchanged
    deepspeed_train(config, 2, port + 2, "--set", "name=next", "--set", f"model.name_or_path={run_dir / 'checkpoint-8'}",
            "--set", "model.preset=null", "--set", "training.max_steps=4")
    adopted = load_file(tmp_path / "runs" / "next" / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(adopted[k], straight[k]) for k in routers)


PROBE = Path(__file__).with_name("moe_zero3_probe.py")


def test_zero3_conversion_builds_the_experts_partitioned_and_fills_them_one_layer_at_a_time(tmp_path):
    result = run(deepspeed_command(PROBE, str(tmp_path), ranks=2, port=29990))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["layers"] == [{"built_partitioned": True, "gathered_while_filled": True,
                                     "others_partitioned": True}] * 3, record
        assert record["placeholders_after"] and record["split"] == [True] * 3, record
