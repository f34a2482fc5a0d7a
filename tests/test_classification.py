"""Sequence classification as a run kind: the `synthetic:fact_tf` generator, labelled local files, the config
errors, the metrics, and a run through `launch/train.py` (eval_accuracy logged, the classifier saved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config, train_main, write_config
from transformers import EvalPrediction

from workbench.config import DataConfig, ExperimentConfig
from workbench.data.loading import FactTrueFalseConfig, _fact_true_false
from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.kinds.classification import (
    check_classification,
    classification_metrics,
    is_classification,
    labelled_rows,
)

FACT_TF = {"source": "synthetic:fact_tf", "synthetic": {"num_entities": 30, "seed": 1, "statements_per_fact": 2},
           "block_size": 24, "validation_fraction": 0.2}


def test_fact_tf_rows_are_distinct_labelled_statements_of_the_world():
    from workbench.data.synthetic import FactWorld, FactWorldConfig

    rows = _fact_true_false(FactTrueFalseConfig(num_entities=20, seed=3, statements_per_fact=3))
    assert rows.column_names == ["text", "label", "entity", "attribute"]
    assert len(set(rows["text"])) == len(rows) and set(rows["label"]) == {0, 1}
    world = FactWorld(FactWorldConfig(num_entities=20, seed=3))
    first = world.true_false()  # variant 0 is the original draw, first in the rows
    assert rows["text"][: 3] == first["statement"][: 3]
    truth = {e.name: e.attributes for e in world.entities}
    for text, label, entity, attribute in zip(rows["text"], rows["label"], rows["entity"], rows["attribute"],
                                              strict=True):
        assert label == 0 or truth[entity][attribute].lower() in text.lower()
    assert len(rows) > 1.5 * len(first)  # the variants add wordings and wrong values
    assert rows.to_list() == _fact_true_false(FactTrueFalseConfig(num_entities=20, seed=3,
                                                                   statements_per_fact=3)).to_list()
    with pytest.raises(ValueError, match="statements_per_fact"):
        FactTrueFalseConfig(statements_per_fact=0)


def test_fact_value_rows_ask_every_fact_for_its_value_in_every_wording():
    from workbench.data.loading import _fact_value
    from workbench.data.synthetic import ATTRIBUTES, FactWorld, FactWorldConfig

    options = FactWorldConfig(num_entities=12, seed=2, attributes_per_entity=4)
    rows = _fact_value(options)
    assert rows.column_names == ["text", "label", "entity", "attribute"]
    world = FactWorld(options)
    truth = {e.name: e.attributes for e in world.entities}
    specs = {spec.name: spec for spec in ATTRIBUTES}
    asked: dict[tuple[str, str], int] = {}
    for text, label, entity, attribute in zip(rows["text"], rows["label"], rows["entity"], rows["attribute"],
                                              strict=True):
        assert label == truth[entity][attribute] and entity in text  # the fact's value; the entity is named
        assert label.lower() not in text.lower().split()  # the answer is never in the prompt
        asked[(entity, attribute)] = asked.get((entity, attribute), 0) + 1
    assert len(asked) == 12 * 4  # every fact
    for (_, attribute), count in asked.items():  # every question, and the statements with the entity first
        spec = specs[attribute]
        cut = [t for t in spec.statements if t.index("{e}") < t.replace("{av}", "{v}").index("{v}")]
        assert count == len(spec.questions) + len(cut)
    assert len(set(rows["text"])) == len(rows) and len(set(rows["label"])) > 20  # many classes
    assert rows.to_list() == _fact_value(options).to_list()
    assert is_classification(DataConfig(source="synthetic:fact_value"))


def test_which_runs_classify():
    assert is_classification(DataConfig(source="synthetic:fact_tf"))
    assert is_classification(DataConfig(source="rows.jsonl", label_column="y"))
    assert not is_classification(DataConfig(source="synthetic:fact_world"))
    assert not is_classification(DataConfig(source="synthetic:arithmetic"))
    assert not is_classification(DataConfig(source="rows.jsonl"))


@pytest.mark.parametrize(("data", "model", "extra", "message"), [
    ({"packing": True}, {}, {}, "field 'data.packing': applies to fine-tuning"),
    ({"prompt_column": "q"}, {}, {}, "field 'data.prompt_column': applies to fine-tuning"),
    ({"repetition": {"budget_tokens": 100, "unique_tokens": 50}}, {}, {}, "field 'data.repetition'"),
    ({"format": "prompt_completion"}, {}, {}, "field 'data.format'"),
    ({"objective": "span_corruption"}, {}, {}, "field 'data.objective'"),
    ({}, {"name_or_path": "gpt2", "preset": None, "lora": {}}, {}, "field 'model.lora'"),
    # eval.on_save is the evaluator's to refuse: tests/evals/test_eval_config.py
])
def test_options_of_other_run_kinds_are_config_errors(data, model, extra, message):
    cfg = ExperimentConfig.model_validate({"data": {"source": "synthetic:fact_tf", **data}, "model": model, **extra})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        check_classification(cfg)
    assert "\n" not in str(err.value)


def test_labelled_files_integer_and_string_labels(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"sentence": s, "y": y}) + "\n"
                            for s, y in [("good film", "pos"), ("bad film", "neg"), ("", "pos"), ("fine", "pos")]))
    rows, names = labelled_rows(DataConfig(source=str(path), text_column="sentence", label_column="y"))
    assert names == ["neg", "pos"] and rows["labels"] == [1, 0, 1] and rows["text"] == ["good film", "bad film",
                                                                                        "fine"]
    with pytest.raises(ConfigError, match=r"field 'data.label_column': 'label' is not a column of .*sentence, y"):
        labelled_rows(DataConfig(source=str(path), text_column="sentence", label_column="label"))
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n')
    rows, names = labelled_rows(DataConfig(source=str(path), label_column="label"))
    assert names == ["0", "1", "2"] and rows["labels"] == [0, 2]
    path.write_text('{"text": "a", "label": 0.5}\n{"text": "b", "label": 1.5}\n')
    with pytest.raises(ConfigError, match="integers or strings"):
        labelled_rows(DataConfig(source=str(path), label_column="label"))


def test_classification_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    labels = np.array([0, 0, 0])
    metrics = classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["nll"] == pytest.approx(-log_probs[:, 0].mean())


def test_classifier_trains_through_launch_and_saves_a_classifier(tmp_path, capsys):
    cfg = tiny_config(tmp_path, name="cls", data=FACT_TF, training={"max_steps": 6, "save_steps": 6})
    assert train_main([str(write_config(tmp_path, cfg))]) == 0
    assert "accuracy" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "cls"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    final = [r for r in rows if "eval_accuracy" in r][-1]
    assert 0.0 <= final["eval_accuracy"] <= 1.0 and final["eval_nll"] > 0 and final["step"] == 6
    from transformers import AutoModelForSequenceClassification

    from workbench.models import load_trained_model

    model = load_trained_model(run_dir / "checkpoint-6", auto_class=AutoModelForSequenceClassification)
    assert type(model).__name__ == "GPTNeoXForSequenceClassification" and model.config.num_labels == 2
    assert model.config.pad_token_id is not None


def test_a_missing_label_column_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text('{"text": "a b", "y": 1}\n{"text": "c d", "y": 0}\n' * 4)
    cfg = tiny_config(tmp_path, name="cls", data={"source": str(tmp_path / "rows.jsonl"), "label_column": "label"})
    assert train_main([str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: field 'data.label_column': 'label' is not a column") and "text, y" in err
    assert not (tmp_path / "runs" / "cls" / "config.yaml").exists()
