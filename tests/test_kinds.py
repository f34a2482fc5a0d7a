"""Run kinds (`workbench.kinds`): which kind a config is, and a new kind as one module trained by `run.train`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling

from workbench import kinds
from workbench.config import ExperimentConfig
from workbench.kinds import DataPieces, RunKind, kind_for, register_kind
from workbench.models import build_model, train_bpe_tokenizer
from workbench.run import train
from workbench.trainer import WorkbenchTrainer

SENTENCES = [f"the lute of house {i} plays {i % 7} songs at dawn" for i in range(64)]


def config(tmp_path, **sections) -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_config(tmp_path, **sections))


@pytest.mark.parametrize(("data", "expected"), [
    ({}, "pretrain"),
    ({"source": "synthetic:arithmetic", "synthetic": {"num_problems": 40}}, "finetune"),
    ({"source": "synthetic:fact_tf"}, "classification"),
])
def test_each_config_is_of_one_built_in_kind(tmp_path, data, expected):
    cfg = tiny_config(tmp_path)
    cfg["data"].update(data)
    assert kind_for(ExperimentConfig.model_validate(cfg)).name == expected


def test_the_kinds_are_tried_classification_fine_tuning_pretraining():
    assert [kind.name for kind in kinds.run_kinds()] == ["classification", "finetune", "pretrain"]


@pytest.fixture
def sentence_kind():
    """A kind of run the workbench does not have: a causal LM on a fixed list of sentences, one per row."""

    @register_kind(before="pretrain")
    class Sentences(RunKind):
        name = "sentences"

        @classmethod
        def matches(cls, cfg):
            return cfg.data.source == "synthetic:fact_world" and cfg.name.startswith("sentences")

        def data(self, args):
            tokenizer = train_bpe_tokenizer(SENTENCES, 200)
            rows = Dataset.from_dict(tokenizer(SENTENCES, truncation=True, max_length=16))
            collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
            return DataPieces(tokenizer, WorkbenchTrainer, rows, None, {"data_collator": collator},
                              f"{len(rows)} sentences")

        def model(self, tokenizer, pieces, added_tokens):
            return build_model(self.cfg.model, tokenizer, added_tokens)

    yield Sentences
    kinds.KINDS.pop("sentences")
    kinds._ORDER.remove("sentences")


def test_a_new_kind_is_one_class_and_trains_through_run_train(tmp_path, sentence_kind, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    cfg = config(tmp_path, name="sentences-1")
    assert [kind.name for kind in kinds.run_kinds()] == ["classification", "finetune", "sentences", "pretrain"]
    assert kind_for(cfg) is sentence_kind
    result = train(cfg)
    assert (result.kind, result.objective, result.global_step) == ("sentences", "causal", 8)
    assert result.eval_loss is None and torch.isfinite(torch.tensor(result.train_loss))
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == list(range(1, 9))
    assert (result.run_dir / "checkpoint-8" / "workbench_manifest.json").is_file()
    assert kind_for(config(tmp_path, name="other")).name == "pretrain"  # the new kind claims only its own runs
