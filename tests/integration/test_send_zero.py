"""SeND under DeepSpeed ZeRO 0-3 on 2 ranks: every rank takes the tracking passes (ZeRO-3 gathers weights in
them), all ranks drop the same indices, and a run resumed from its middle checkpoint is bit-equal to the
uninterrupted one, method state included. The EES of one tracking prompt is measured at every tracking point:
rank 0 samples it, rank 1 joins each generate and forward call with a dummy batch (ZeRO-3: both are collectives),
and both log it. ZeRO-3 runs by default, ZeRO-0/1/2 with `pytest -m slow`."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import deepspeed_train, zero_method_config
from safetensors.torch import load_file

from workbench.io import read_jsonl

SEND = {"track_every": 2, "window": 2, "drop_intervals": 2, "top_percent": 25, "tracking_fraction": 0.2,
        "ees_prompts": 1, "ees_samples": 3}
CELLS = [pytest.param(stage, id=f"zero{stage}", marks=[] if stage == 3 else [pytest.mark.slow]) for stage in range(4)]


def _states(checkpoint) -> list[dict]:
    return [torch.load(checkpoint / f"workbench_methods_rank{r}.pt", weights_only=True)["send"] for r in (0, 1)]


@pytest.mark.parametrize("stage", CELLS)
def test_send_on_two_ranks_drops_the_same_indices_and_resumes_bit_equal(tmp_path, stage):
    config = zero_method_config(tmp_path, "send", stage, {"send": SEND})
    run_dir = tmp_path / "runs" / "send"
    port = 29900 + 10 * stage
    deepspeed_train(config, 2, port)
    straight = load_file(run_dir / "checkpoint-8" / "model.safetensors")
    states = _states(run_dir / "checkpoint-8")
    assert len(states[0]["indices"]) == 8 and states[0]["selections"] == 2
    for key in ("indices", "history"):
        assert torch.equal(states[0][key], states[1][key])  # one set of indices, one history, on every rank
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["send_dropped"] for r in records if "send_dropped" in r][-1] == 8
    ees = {r["step"]: r["send_ees"] for r in records if "send_ees" in r}
    assert min(ees) == 2 and max(ees) == 8 and all(math.isfinite(value) for value in ees.values())
    shutil.copytree(run_dir / "checkpoint-8", tmp_path / "straight-8")
    shutil.rmtree(run_dir / "checkpoint-8")
    deepspeed_train(config, 2, port + 1, "--resume")
    resumed = load_file(run_dir / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for a, b in zip(_states(tmp_path / "straight-8"), _states(run_dir / "checkpoint-8"), strict=True):
        assert torch.equal(a["history"], b["history"]) and torch.equal(a["indices"], b["indices"])
        assert (a["remaining"], a["points"], a["selections"]) == (b["remaining"], b["points"], b["selections"])
