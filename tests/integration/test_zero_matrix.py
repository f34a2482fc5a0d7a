"""Every ZeRO stage in configs/deepspeed/ x 1 and 2 ranks, and the CPU-offload variants on 2 ranks: train, save, resume, identical ranks, every hook.

Each cell trains 4 steps with `HookProbe` (tests/integration/hook_probe.py: a method implementing every
hook) saving at steps 2 and 4, deletes checkpoint-4, resumes from checkpoint-2 and checks that:
- the resumed checkpoint-4 weights are bit-equal to the uninterrupted ones;
- every rank ends with the same parameters (gathered under ZeRO-3);
- each hook saw what it should: the token the tokenizer hook added, the world size and ZeRO stage in `setup`,
  `num_items_in_batch` summed over ranks, the method state restored on resume, and the parameter changed
  after every optimizer step through `workbench.distributed` (lost at the next step unless it reached the
  optimizer's master copy).
The 2-rank cells run by default; the 1-rank cells (ZeRO-2 on 1 rank is also covered by test_deepspeed.py)
and the offload cells run with `pytest -m slow`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN, deepspeed_command, run, tiny_config, write_config
from safetensors.torch import load_file

PROBE = "tests.integration.hook_probe:HookProbe"
BLOCK, BATCH, STEPS, BUMP = 32, 4, 4, 0.5
STAGES = [0, 1, 2, 3]
CELLS = [pytest.param(f"zero{stage}", stage, 2, id=f"zero{stage}-2ranks") for stage in STAGES] + [
    pytest.param(f"zero{stage}", stage, 1, id=f"zero{stage}-1rank", marks=pytest.mark.slow) for stage in STAGES
] + [  # the CPU-offload variants (optimizer states; ZeRO-3 also the parameters) for models that do not fit
    pytest.param(f"zero{stage}_offload", stage, 2, id=f"zero{stage}_offload-2ranks", marks=pytest.mark.slow)
    for stage in (2, 3)
]


def _launch(config: Path, ranks: int, port: int, *extra: str) -> str:
    result = run(deepspeed_command(TRAIN, str(config), *extra, ranks=ranks, port=port))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _probe(run_dir: Path, phase: str, ranks: int) -> list[dict]:
    return [json.loads((run_dir / "probe" / f"rank{r}-{phase}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize(("deepspeed", "stage", "ranks"), CELLS)
def test_stage_ranks_train_save_resume_and_every_hook(tmp_path, deepspeed, stage, ranks):
    cfg = tiny_config(
        tmp_path, name="cell", deepspeed=f"configs/deepspeed/{deepspeed}.json", data={"max_documents": 8},
        methods={PROBE: {"bump": BUMP}},
        training={"max_steps": STEPS, "save_steps": 2, "per_device_train_batch_size": BATCH,
                  "lr_scheduler_type": "constant"},
    )
    if stage == 3:  # the evaluator on save loads each checkpoint on rank 0 alone, outside ZeRO-3's partitioning
        cfg["eval"] = {"on_save": True, "on_save_limit": 4, "tasks": [{"task": "factworld_mc", "styles": ["blank_ppl"]}]}
    config = write_config(tmp_path, cfg)
    run_dir = tmp_path / "runs" / "cell"
    port = 29800 + 10 * stage + ranks + (5 if "offload" in deepspeed else 0)
    _launch(config, ranks, port)
    uninterrupted = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    fresh = _probe(run_dir, "fresh", ranks)
    shutil.rmtree(run_dir / "checkpoint-4")
    out = _launch(config, ranks, port + 1, "--resume")
    assert "resuming from" in out and "checkpoint-2" in out
    resumed = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        if "offload" in deepspeed:
            # DeepSpeedCPUAdam (the offload configs' optimizer) keeps Adam's bias corrections beta^t as a running
            # product and recomputes them with pow() after a resume (DeepSpeed's cpu_adam.h, IncrementStep):
            # the resumed weights agree with the uninterrupted ones to float rounding, not bit for bit
            torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert (uninterrupted[name] == resumed[name]).all(), f"{name} differs after resume ({deepspeed}, {ranks} ranks)"
    after = _probe(run_dir, "resumed", ranks)

    for view in fresh + after:
        assert view["world_size"] == ranks and view["zero_stage"] == stage and view["global_step"] == STEPS
        assert view["token_id"] == view["vocab"] - 1 and view["embedding_rows"] >= view["vocab"]
        # the step's loss tokens over all ranks, given per rank: what the model's own loss is normalised by
        assert all(n == BATCH * (BLOCK - 1) for n in view["num_items"]), view["num_items"]
        assert view["logits_with_graph"]
        assert view["steps_seen"] == STEPS and view["state_intact"]
        # the bump was applied after every step and kept by the optimizer (Adam moves a weight ~1e-3 a step)
        assert abs(view["target_mean"] - STEPS * BUMP) < 0.02, view["target_mean"]
        assert view["batches_collated"] > 0
    assert [v["restored_steps"] for v in after] == [2] * ranks
    for views in (fresh, after):
        assert len({v["param_sha256"] for v in views}) == 1, "ranks ended with different parameters"
        assert len({round(v["forward_loss"], 5) for v in views}) == 1, "ranks disagree on one batch's loss"
    if stage == 3:
        evaluated = {json.loads(line)["checkpoint"] for line in (run_dir / "eval" / "results.jsonl").open()}
        assert evaluated == {"checkpoint-2", "checkpoint-4"}
    saved_vocab = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    assert any(t["content"] == "<probe>" for t in saved_vocab)


def test_the_probe_is_importable_by_its_yaml_name(monkeypatch):
    from workbench.methods import build_methods

    monkeypatch.syspath_prepend(str(REPO))  # as the launched runs have it (PYTHONPATH)
    (probe,) = build_methods({PROBE: {"bump": 0.25}})
    assert probe.config.bump == 0.25 and (REPO / "tests" / "integration" / "hook_probe.py").is_file()
