"""Real `deepspeed` launches on CPU: 1 and 2 ranks, data sharding, identical parameters, kill -9 and resume."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TRAIN,
    deepspeed_command,
    kill_when_step_reached,
    subprocess_env,
    tiny_config,
    write_config,
)
from safetensors.torch import load_file

from workbench.io import read_jsonl

PROBE = Path(__file__).with_name("ds_probe.py")
DROPOUT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "hidden_dropout": 0.1, "attention_dropout": 0.1}


def _config(tmp_path: Path, name: str, **training) -> Path:
    cfg = tiny_config(
        tmp_path, name=name, deepspeed="configs/deepspeed/zero2.json", model={"overrides": DROPOUT},
        data={"max_documents": 8}, training=training,
    )
    return write_config(tmp_path, cfg, f"{name}.yaml")


def _launch(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _final_weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / f"checkpoint-{step}" / "model.safetensors")


@pytest.mark.parametrize("ranks", [1, 2])
def test_ranks_shard_the_data_and_agree(tmp_path, ranks):
    epoch = {"max_steps": -1, "num_train_epochs": 1, "save_steps": 100}
    path = _config(tmp_path, f"r{ranks}", **epoch)
    _launch(deepspeed_command(PROBE, str(path), str(tmp_path / "probe"), ranks=ranks, port=29620 + ranks))
    views = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in range(ranks)]
    blocks = 110  # 8 documents of the tiny fact world in 32-token blocks
    per_rank_batches = -(-blocks // (8 * ranks))
    for view in views:
        assert view["world_size"] == ranks
        assert view["global_step"] == per_rank_batches == view["train_batches"]
    assert len({v["param_sha256"] for v in views}) == 1  # ZeRO-2 keeps identical replicas


def test_steps_per_epoch_halve_with_two_ranks(tmp_path):
    steps = {}
    for ranks in (1, 2):
        path = _config(tmp_path, f"e{ranks}", max_steps=-1, num_train_epochs=1, save_steps=100)
        _launch(deepspeed_command(TRAIN, str(path), ranks=ranks, port=29630 + ranks))
        state = json.loads(next((tmp_path / "runs" / f"e{ranks}").glob("checkpoint-*/trainer_state.json")).read_text())
        steps[ranks] = state["global_step"]
    assert steps[1] == 14 and steps[2] == 7


@pytest.mark.parametrize(("seed", "ranks"), [(0, 1), (1, 2)])
def test_kill9_and_resume_is_bit_equal(tmp_path, seed, ranks):
    """Dropout on, 14 (7) steps an epoch, 30 steps: killed at a random step and resumed == never killed."""
    kill_step = random.Random(seed).randint(6, 26)
    steps = {"max_steps": 30, "save_steps": 3, "logging_steps": 1}
    reference = _config(tmp_path, "reference", **steps)
    _launch(deepspeed_command(TRAIN, str(reference), ranks=ranks, port=29640))
    killed = _config(tmp_path, "killed", **steps)
    run_dir = tmp_path / "runs" / "killed"
    kill_when_step_reached(deepspeed_command(TRAIN, str(killed), ranks=ranks, port=29641), run_dir / "metrics.jsonl", kill_step)
    assert not (run_dir / "checkpoint-30").exists()
    resumed = _launch(deepspeed_command(TRAIN, str(killed), "--resume", ranks=ranks, port=29642))
    assert "resuming from" in resumed.stdout
    want, got = _final_weights(tmp_path / "runs" / "reference", 30), _final_weights(run_dir, 30)
    assert want.keys() == got.keys()
    for name in want:
        assert (want[name] == got[name]).all(), f"{name} differs after kill at step {kill_step}"
    steps_logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps_logged == list(range(1, 31))  # no step lost or logged twice
