"""The `sinkd` method through `launch/train.py` on both run kinds (one process): a classifier student with the
batch-wise Sinkhorn over its (N, C) logits, a causal-LM student with the per-sequence token form; and the
one-line config errors for a teacher of another vocabulary, tokenizer or label set."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, train_main, write_config
from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification, Trainer, TrainingArguments

from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.methods import build_methods

FACT_TF = {"source": "synthetic:fact_tf", "synthetic": {"num_entities": 30, "seed": 1, "statements_per_fact": 2},
           "block_size": 24, "validation_fraction": 0.2}
SINKD_METRICS = {"sinkd_ce", "sinkd_kd", "sinkd_sinkhorn"}


def _train(tmp_path, name: str, **sections) -> int:
    cfg = tiny_config(tmp_path, name=name, **sections)
    return train_main([str(write_config(tmp_path, cfg, f"{name}.yaml"))])


@pytest.mark.parametrize("kind", ["classification", "causal"])
def test_sinkd_through_launch(tmp_path, kind):
    data = FACT_TF if kind == "classification" else {}
    assert _train(tmp_path, "teacher", data=data, training={"max_steps": 6, "save_steps": 6}) == 0
    teacher = str(tmp_path / "runs" / "teacher")
    methods = {"sinkd": {"teacher": teacher, "beta": 0.01, "kd": "js"}}
    assert _train(tmp_path, "student", data=data, methods=methods, training={"max_steps": 4, "save_steps": 4}) == 0
    rows = read_jsonl(tmp_path / "runs" / "student" / "metrics.jsonl")
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 4 and all(set(r) >= SINKD_METRICS for r in logged)
    assert all(r["sinkd_sinkhorn"] > 0 and r["sinkd_kd"] >= 0 for r in logged)
    final = [r for r in rows if "eval_loss" in r][-1]
    assert ("eval_accuracy" if kind == "classification" else "eval_token_accuracy") in final


def test_a_teacher_with_another_tokenizer_is_one_line(tmp_path, capsys):
    assert _train(tmp_path, "teacher", training={"max_steps": 2, "save_steps": 2},
                  model={"tokenizer_vocab_size": 288}) == 0
    capsys.readouterr()
    methods = {"sinkd": {"teacher": str(tmp_path / "runs" / "teacher")}}
    assert _train(tmp_path, "student", methods=methods) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: field 'methods.sinkd.teacher'") and "288 tokens" in err and "320 tokens" in err


def test_a_classifier_teacher_with_other_labels_is_a_config_error(tmp_path):
    def classifier(labels: int) -> GPTNeoXForSequenceClassification:
        config = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_labels=labels, pad_token_id=0)
        return GPTNeoXForSequenceClassification(config)

    classifier(3).save_pretrained(tmp_path / "teacher")
    [method] = build_methods({"sinkd": {"teacher": str(tmp_path / "teacher")}})
    trainer = Trainer(model=classifier(2), args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                                   use_cpu=True))
    with pytest.raises(ConfigError, match="classifies into 3 labels and the student into 2"):
        method.setup(trainer)
    # the same label set: the loss hook uses the batch-wise Sinkhorn over the (N, C) logits
    classifier(2).save_pretrained(tmp_path / "teacher2")
    [method] = build_methods({"sinkd": {"teacher": str(tmp_path / "teacher2"), "beta": 0.5}})
    student = classifier(2)
    method.setup(Trainer(model=student, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                               use_cpu=True)))
    ids = torch.randint(1, 64, (5, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0, 1])}
    outputs = student(**inputs)
    loss = method.loss(student, inputs, outputs, outputs.loss)
    from workbench.losses import kd_loss, sinkhorn_distance

    teacher_logits = method.teacher_logits(inputs)
    expected = 0.1 * outputs.loss + 0.9 * kd_loss(outputs.logits, teacher_logits, "kl", 2.0) \
        + 0.5 * sinkhorn_distance(outputs.logits, teacher_logits)
    torch.testing.assert_close(loss, expected)
