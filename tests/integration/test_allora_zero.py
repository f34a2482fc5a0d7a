"""ALLoRA under DeepSpeed ZeRO 0-3 on 2 ranks equals a single process without DeepSpeed, for both `apply` variants.

Each cell fine-tunes LoRA adapters with ALLoRA for 2 SGD steps (B starts random, so c differs per row from the first
step, and A gets a reweighted gradient) with a global batch of 8: 2 ranks x 4 under `deepspeed`, or 1 process x 8
without it. SGD without clipping makes the step the (reweighted) gradient itself, which Adam would normalise away.
The adapters after the 2 steps and the logged c statistics must match the reference within float tolerance; a plain
LoRA run (same scaling 1) shows that ALLoRA's step differs from LoRA's by far more than that tolerance.

ZeRO partitions and flattens the gradients, so the gradient variant must act inside autograd (it does: a custom
`torch.autograd.Function`), and the update variant must reach the optimizer's fp32 master copy (it writes through
`workbench.distributed`). The ZeRO-3 cells lower `stage3_param_persistence_threshold` to 0 so that the LoRA
factors, which the "auto" threshold (10 x hidden size) would keep whole on every rank, are partitioned too.
The ZeRO-2 and ZeRO-3 cells run by default, ZeRO-0 and ZeRO-1 with `pytest -m slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TRAIN, deepspeed_command, run, tiny_config, train_main, write_config, zero_json
from safetensors.torch import load_file

from workbench.io import read_jsonl

ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
STATS = ("allora_c_min", "allora_c_median", "allora_c_max", "allora_ba_norm")
GLOBAL_BATCH, STEPS = 8, 2
CELLS = [  # ZeRO-2 (partitioned gradients and master copies) and ZeRO-3 (partitioned weights too) by default
    pytest.param(stage, apply, id=f"zero{stage}-{apply}", marks=[pytest.mark.slow] if stage < 2 else [])
    for apply in ("gradient", "update") for stage in range(4)
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny pretrained run (fact world, 8 steps) the fine-tuning runs start from."""
    tmp = tmp_path_factory.mktemp("base")
    assert train_main([str(write_config(tmp, tiny_config(tmp, name="base"), "base.yaml"))]) == 0
    return tmp / "runs" / "base"


def _config(tmp_path: Path, base: Path, name: str, methods: dict, ranks: int = 1, deepspeed: str | None = None,
            **lora) -> Path:
    cfg = tiny_config(tmp_path, name=name, data=ARITHMETIC, deepspeed=deepspeed, methods=methods)
    cfg["model"] = {"preset": None, "name_or_path": str(base), "lora": {**LORA, **lora}}
    cfg["training"].update(max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // ranks,
                           optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)
    return write_config(tmp_path, cfg, f"{name}.yaml")


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"checkpoint-{STEPS}" / "adapter_model.safetensors")


def _stats(run_dir: Path) -> list[list[float]]:
    return [[r[k] for k in STATS] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def references(base_run, tmp_path_factory) -> dict[str, Path]:
    """Single-process runs without DeepSpeed: ALLoRA with each `apply`, and plain LoRA at scaling 1."""
    tmp = tmp_path_factory.mktemp("references")
    for apply in ("gradient", "update"):
        assert train_main([str(_config(tmp, base_run, apply, {"allora": {"apply": apply}}))]) == 0
    assert train_main([str(_config(tmp, base_run, "lora", {}, lora_alpha=LORA["r"]))]) == 0
    return {name: tmp / "runs" / name for name in ("gradient", "update", "lora")}


@pytest.mark.parametrize(("stage", "apply"), CELLS)
def test_one_step_under_zero_on_two_ranks_matches_a_single_process(tmp_path, base_run, references, stage, apply):
    config = _config(tmp_path, base_run, "cell", {"allora": {"apply": apply}}, ranks=2,
                     deepspeed=zero_json(tmp_path, stage))
    result = run(deepspeed_command(TRAIN, str(config), ranks=2, port=29900 + 10 * stage + (apply == "update")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got, want, lora = (_adapters(d) for d in (tmp_path / "runs" / "cell", references[apply], references["lora"]))
    assert got.keys() == want.keys() == lora.keys()
    for key in want:
        assert got[key].shape == want[key].shape and got[key].numel() > 0, key  # gathered, not ZeRO-3 shards
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    gap = max((want[k] - lora[k]).abs().max().item() for k in want)
    assert gap > 1e-3, "ALLoRA's steps should differ from plain LoRA's by far more than the tolerance"
    torch.testing.assert_close(torch.tensor(_stats(tmp_path / "runs" / "cell")),
                               torch.tensor(_stats(references[apply])), rtol=1e-5, atol=1e-6)
