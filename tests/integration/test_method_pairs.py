"""Pairs of methods in one run, through `deepspeed launch/train.py` on 2 CPU ranks, under ZeRO-2 and ZeRO-3.

Each pair trains a tiny model for 8 steps (4 examples per rank, checkpoints at steps 4 and 8) under each stage and
shows both methods acted (their metrics in metrics.jsonl); under one of the two stages (alternating from pair to
pair) a second run of the same config is killed (kill -9 of every rank) once it has logged step 6, resumes from
its step-4 checkpoint with `--resume`, and ends bit-equal to the uninterrupted run: every weight file and every
rank's method state.

    masked_thought + allora           LoRA fine-tuning of a pretrained tiny run (prompt/completion arithmetic)
    masked_thought + send             full fine-tuning of the same run
    allora + send                     LoRA fine-tuning; SeND drops on the LoRA model's block outputs
    sinkd + drop_path                 pretraining with a teacher (the same pretrained run) and dropped branches
    smoe_dropout + dropout_schedule   pretraining: the MLPs become experts, dropout switches on at step 3
    send + smoe_dropout               pretraining; SeND's `site: mlp` drops on the experts' output (SeND is
                                      listed first: the replacement still comes first, see methods/stack.py)

The pairs refused as config errors (`allora` + `smoe_dropout`; SeND's `site: weights` + `smoe_dropout`) are in
tests/methods/test_stack.py, with the unit tests of the rules. The ZeRO-3 runs partition every parameter
(`stage3_param_persistence_threshold: 0`), LoRA factors and experts included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    TRAIN,
    deepspeed_command,
    deepspeed_train,
    kill_when_step_reached,
    tiny_config,
    train_main,
    write_config,
    zero_json,
)
from safetensors.torch import load_file

from workbench.io import read_jsonl

pytestmark = pytest.mark.integration

ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
SEND = {"track_every": 2, "window": 2, "drop_intervals": 2, "top_percent": 25, "tracking_fraction": 0.2}
STEPS, SAVE, KILL_STEP = 8, 4, 6

# name: (methods, kind, the metrics each method logs with every training loss)
PAIRS = {
    "masked_thought+allora": ({"masked_thought": {"p_max": 0.4}, "allora": {"apply": "gradient"}}, "lora",
                              ("masked_thought_p", "allora_c_median")),
    "masked_thought+send": ({"masked_thought": {"p_max": 0.4}, "send": SEND}, "full", ("masked_thought_p", "send_dropped")),
    "allora+send": ({"allora": {"apply": "update"}, "send": SEND}, "lora", ("allora_c_median", "send_dropped")),
    "sinkd+drop_path": ({"sinkd": {"teacher": "TEACHER", "alpha": 0.5, "beta": 0.05}, "drop_path": {"rate": 0.2}},
                        "pretrain", ("sinkd_kd", "sinkd_sinkhorn")),
    "smoe_dropout+dropout_schedule": ({"smoe_dropout": {"experts": 4, "k_min": 1},
                                       "dropout_schedule": {"rate": 0.1, "start_step": 3}}, "pretrain",
                                      ("smoe_k", "dropout_rate")),
    "send+smoe_dropout": ({"send": {**SEND, "site": "mlp"}, "smoe_dropout": {"experts": 4, "k_min": 1}}, "pretrain",
                          ("send_dropped", "smoe_k")),
}
CELLS = [pytest.param(pair, stage, (i + stage) % 2 == 0, id=f"{pair}-zero{stage}" + ("-resume" if (i + stage) % 2 == 0 else ""))
         for i, pair in enumerate(PAIRS) for stage in (2, 3)]
PORTS = {(pair, stage): 29400 + 10 * i + 4 * (stage - 2) for i, pair in enumerate(PAIRS) for stage in (2, 3)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One data cache for every run here (one tokenizer, built once) and a tiny pretrained 2-block run (fact world,
    8 steps): the base the fine-tuning pairs start from, and SinKD's teacher (a causal LM with the students'
    tokenizer)."""
    root = tmp_path_factory.mktemp("pairs")
    cfg = tiny_config(root, name="pretrained")
    cfg["data"]["cache_dir"] = str(root / "cache")
    cfg["model"]["overrides"]["num_hidden_layers"] = 2  # SeND tracks a block that another block reads
    assert train_main([str(write_config(root, cfg, "pretrained.yaml"))]) == 0
    return root


def _config(tmp_path: Path, shared: Path, pair: str, stage: int) -> Path:
    methods, kind, _ = PAIRS[pair]
    methods = json.loads(json.dumps(methods).replace('"TEACHER"', json.dumps(str(shared / "runs" / "pretrained"))))
    cfg = tiny_config(tmp_path, name="pair", deepspeed=zero_json(tmp_path, stage), methods=methods,
                      training={"max_steps": STEPS, "save_steps": SAVE, "per_device_train_batch_size": 4,
                                "lr_scheduler_type": "constant"})
    cfg["data"]["cache_dir"] = str(shared / "cache")
    if kind == "pretrain":
        cfg["model"]["overrides"]["num_hidden_layers"] = 2
    else:
        cfg["data"] = {**cfg["data"], **ARITHMETIC}
        cfg["model"] = {"preset": None, "name_or_path": str(shared / "runs" / "pretrained")}
        if kind == "lora":
            cfg["model"]["lora"] = LORA
    return write_config(tmp_path, cfg)


def _final_state(checkpoint: Path) -> dict[str, dict[str, torch.Tensor] | dict]:
    """Every weight file of a checkpoint (the model's, or a LoRA run's adapters) and every rank's method state."""
    state: dict = {path.name: load_file(path) for path in checkpoint.glob("*.safetensors")}
    state.update({path.name: torch.load(path, weights_only=True) for path in checkpoint.glob("workbench_methods_rank*.pt")})
    assert any(name.endswith(".safetensors") for name in state) and "workbench_methods_rank1.pt" in state
    return state


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs after resume"
    elif isinstance(a, float) and a != a:  # NaN (SeND's overlap before a second selection)
        assert b != b, where
    else:
        assert a == b, where


@pytest.mark.parametrize(("pair", "stage", "resume"), CELLS)
def test_pair_on_two_ranks(tmp_path, shared, pair, stage, resume):
    config = _config(tmp_path, shared, pair, stage)
    run_dir = tmp_path / "runs" / "pair"
    port = PORTS[(pair, stage)]
    deepspeed_train(config, 2, port)
    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    for metric in PAIRS[pair][2]:
        assert all(metric in r for r in logged), f"{metric} missing from the logs of {pair}"
    if "send_dropped" in logged[-1]:
        assert logged[-1]["send_dropped"] > 0  # SeND chose indices and drops them
    if "dropout_rate" in logged[-1]:
        assert [r["dropout_rate"] for r in logged] == [0.0] * 3 + [0.1] * 5
    if not resume:
        return
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    killed = _config(killed_dir, shared, pair, stage)
    killed_run = killed_dir / "runs" / "pair"
    kill_when_step_reached(deepspeed_command(TRAIN, str(killed), ranks=2, port=port + 1),
                           killed_run / "metrics.jsonl", KILL_STEP)
    assert not (killed_run / f"checkpoint-{STEPS}").exists()
    out = deepspeed_train(killed, 2, port + 2, "--resume")
    assert f"checkpoint-{SAVE}" in out
    _assert_equal(_final_state(run_dir / f"checkpoint-{STEPS}"), _final_state(killed_run / f"checkpoint-{STEPS}"), pair)
