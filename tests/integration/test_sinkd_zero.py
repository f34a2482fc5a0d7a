"""SinKD on a sequence classifier under DeepSpeed ZeRO 0-3 on 2 ranks, through `launch/train.py`.

A tiny classifier teacher is trained once (no DeepSpeed); a smaller student distils from it with the
`sinkd_probe` recorder (the `sinkd` method plus files of what each rank's loss hook saw). Per cell:

- the teacher is prepared as TRL prepares reference models: a DeepSpeed inference engine without an
  optimizer, requires_grad off, no parameter shared with the student; ZeRO-3 partitions it (its large
  parameters are held as 1/2 shards between forward passes), the other stages hold a full copy (stage 0);
- the batch-wise Sinkhorn term is per rank: on each rank and step it equals `sinkhorn_distance` of that rank's
  local batch alone (N = the per-device batch), not that of the two ranks' batches together (with near-constant
  early distributions the global value is close to the sum of the local ones, so only inequality to the global
  value itself is asserted);
- the teacher's logits equal those of the saved teacher run on that rank's local batch, at every step (its
  weights never change);
- a run resumed from its middle checkpoint ends bit-equal to the uninterrupted one, and the teacher's files are
  unchanged.

ZeRO-2 and ZeRO-3 run by default, ZeRO-0/1 with `pytest -m slow`."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch
from conftest import TRAIN, deepspeed_train, run, tiny_config, write_config
from safetensors.torch import load_file

from workbench.losses import sinkhorn_distance

CELLS = [pytest.param(stage, id=f"zero{stage}", marks=[] if stage in (2, 3) else [pytest.mark.slow])
         for stage in range(4)]
PROBE = "tests.integration.sinkd_probe:SinkdProbe"
BATCH = 8
DATA = {"source": "synthetic:fact_tf", "synthetic": {"num_entities": 30, "seed": 1, "statements_per_fact": 2},
        "block_size": 24, "validation_fraction": 0.1}
TEACHER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2}


def _classifier_config(tmp_path, name: str, **sections) -> dict:
    cfg = tiny_config(tmp_path, name=name, data=DATA, **sections)
    cfg["data"]["cache_dir"] = str(tmp_path.parent / "cache")  # teacher and student share one tokenizer
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A trained teacher run (12 steps, one process, no DeepSpeed) and the digest of its checkpoint files."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = _classifier_config(root, "teacher", training={"max_steps": 12, "save_steps": 12})
    cfg["model"]["overrides"] = TEACHER
    result = run([sys.executable, str(TRAIN), str(write_config(root, cfg))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = root / "runs" / "teacher"
    return folder, _digest(folder / "checkpoint-12")


def _digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _offline_teacher(folder):
    from transformers import AutoModelForSequenceClassification

    from workbench.models import load_trained_model

    return load_trained_model(folder / "checkpoint-12", auto_class=AutoModelForSequenceClassification)


@pytest.mark.parametrize("stage", CELLS)
def test_sinkd_classifier_on_two_ranks(tmp_path, teacher, stage):
    teacher_run, teacher_digest = teacher
    cfg = _classifier_config(tmp_path, "student", deepspeed=f"configs/deepspeed/zero{stage}.json",
                             methods={PROBE: {"teacher": str(teacher_run), "beta": 0.05, "alpha": 0.5}},
                             training={"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": BATCH,
                                       "lr_scheduler_type": "constant"})
    config = write_config(tmp_path, cfg)
    run_dir = tmp_path / "runs" / "student"
    port = 29700 + 10 * stage
    deepspeed_train(config, 2, port)

    # the teacher: an inference engine, no optimizer, frozen, partitioned under ZeRO-3 only
    for rank in (0, 1):
        setup = json.loads((run_dir / "probe" / f"rank{rank}-setup-0.json").read_text())
        assert setup["world_size"] == 2 and setup["teacher_class"] == "DeepSpeedEngine"
        assert setup["teacher_engine_stage"] == (3 if stage == 3 else 0)
        assert setup["teacher_optimizer"] == ("DeepSpeedZeRoOffload" if stage == 3 else "NoneType")
        assert not setup["teacher_basic_optimizer"] and not setup["teacher_requires_grad"]
        assert not setup["teacher_training"] and not setup["shares_student_parameters"]
        if stage == 3:
            assert setup["teacher_partitioned"] > 0
            assert setup["teacher_local_elements"] < 0.75 * setup["teacher_full_elements"]
        else:
            assert setup["teacher_partitioned"] == 0
            assert setup["teacher_local_elements"] == setup["teacher_full_elements"]

    # the batch-wise term sees the local batch; the teacher's logits are the saved teacher's, at every step
    offline = _offline_teacher(teacher_run)
    records = {(r, s): torch.load(run_dir / "probe" / f"rank{r}-step{s}.pt", weights_only=True)
               for r in (0, 1) for s in range(1, 5)}
    for step in range(1, 5):
        local = [records[(r, step)] for r in (0, 1)]
        ids = [r["input_ids"] for r in local]
        assert ids[0].shape != ids[1].shape or not torch.equal(ids[0], ids[1])  # each rank its own batch
        for record in local:
            student, teacher_logits = record["student_logits"], record["teacher_logits"]
            assert student.shape == (BATCH, 2)
            expected = sinkhorn_distance(student.double(), teacher_logits.double())
            torch.testing.assert_close(record["parts"]["sinkhorn"].double(), expected, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                reference = offline(input_ids=record["input_ids"], attention_mask=record["attention_mask"]).logits
            torch.testing.assert_close(teacher_logits, reference, rtol=1e-4, atol=1e-5)
        together = sinkhorn_distance(torch.cat([r["student_logits"] for r in local]).double(),
                                     torch.cat([r["teacher_logits"] for r in local]).double())
        for record in local:  # not the value over both ranks' batches (N = 16)
            assert not torch.allclose(record["parts"]["sinkhorn"].double(), together, rtol=1e-2)

    # resume from the middle checkpoint: bit-equal weights and losses; the teacher's files untouched
    straight = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    shutil.rmtree(run_dir / "checkpoint-4")
    deepspeed_train(config, 2, port + 1, "--resume")
    resumed = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    assert set(straight) == set(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    for rank in (0, 1):
        for step in (3, 4):
            again = torch.load(run_dir / "probe" / f"rank{rank}-step{step}.pt", weights_only=True)
            assert torch.equal(again["total"], records[(rank, step)]["total"])
    assert (run_dir / "probe" / "rank0-setup-1.json").is_file()
    assert _digest(teacher_run / "checkpoint-12") == teacher_digest
