"""Convert a ZeRO-3 partitioned model's MLPs to SMoE experts (`init: split`) on every rank and write what this
rank saw: each new layer built partitioned (DeepSpeed ids before it is filled), gathered whole only while it is
filled, the layers converted before it partitioned meanwhile, and after the conversion every expert a placeholder
whose gathered value is eq. (5)'s split of the dense weights.

    deepspeed --num_gpus 2 tests/integration/moe_zero3_probe.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig
from transformers.integrations import HfDeepSpeedConfig

from workbench.distributed import gathered_parameters
from workbench.distributed_launch import exit_distributed
from workbench.models.moe import MoEMLP
from workbench.models.moe_model import convert_to_moe, find_mlp_blocks, moe_layers

EXPERTS = 4
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def full(param: torch.nn.Parameter) -> bool:
    return param.numel() == param.ds_numel


if __name__ == "__main__":
    out_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    deepspeed.init_distributed("gloo")
    keep = HfDeepSpeedConfig(ZERO3)  # transformers sees ZeRO-3 while this lives (as the Trainer's arguments do)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           vocab_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # built under zero.Init: partitioned
    dense = []
    for block in find_mlp_blocks(model):
        up, down = block.module.dense_h_to_4h, block.module.dense_4h_to_h
        with gathered_parameters([up.weight, down.weight]):
            dense.append((up.weight.detach().clone(), down.weight.detach().clone()))
    seen = []
    load_dense = MoEMLP.load_dense

    def watched_load_dense(self: MoEMLP, *args, **kwargs) -> None:
        params = list(self.parameters())
        seen.append({"built_partitioned": all(hasattr(p, "ds_id") for p in params),
                     "gathered_while_filled": all(full(p) for p in params),
                     "others_partitioned": all(p.numel() == 0 for layer in moe_layers(model)
                                               for p in layer.parameters())})
        load_dense(self, *args, **kwargs)

    MoEMLP.load_dense = watched_load_dense
    layers = convert_to_moe(model, EXPERTS, init="split")
    MoEMLP.load_dense = load_dense
    placeholders = all(p.numel() == 0 for layer in layers for p in layer.parameters())
    split = []
    for layer, (w_in, w_out) in zip(layers, dense, strict=True):
        with gathered_parameters([layer.weight_in, layer.weight_out]):
            split.append(torch.equal(layer.weight_in.reshape(w_in.shape), w_in)
                         and torch.equal(layer.weight_out.reshape(-1, w_out.shape[0]), w_out.t()))
    rank = int(os.environ.get("RANK", "0"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"layers": seen, "placeholders_after": placeholders,
                                                          "split": split}))
    exit_distributed(0)
