"""Bad input: each a one-line message naming the field or file, exit code 2, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TRAIN, run, tiny_config, train_main, write_config

from workbench.config import load_config
from workbench.errors import ConfigError
from workbench.yaml_text import apply_override


def _error_of(argv: list[str], capsys) -> str:
    code = train_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err  # progress bars may come before it
    return errors[0]


def _with(tmp_path: Path, **sections) -> str:
    return str(write_config(tmp_path, tiny_config(tmp_path, **sections)))


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"trainig": {"max_steps": 3}}, ["unknown field 'trainig'", "did you mean 'training'"]),
        ({"training": {"learning_rat": 0.1}}, ["training.learning_rat", "did you mean 'learning_rate'"]),
        ({"training": {"learning_rate": "fast"}}, ["training.learning_rate", "'fast'"]),
        ({"training": {"max_steps": [1, 2]}}, ["training.max_steps"]),
        ({"training": {"output_dir": "x"}}, ["training.output_dir", "set 'name' and 'runs_dir' instead"]),
        ({"data": {"block_size": 2}}, ["data.block_size", "greater than or equal to 8"]),
        ({"data": {"validation_fraction": 1.5}}, ["data.validation_fraction", "less than 1"]),
        ({"data": {"blok_size": 64}}, ["unknown field 'data.blok_size'", "did you mean 'block_size'"]),
        ({"model": {"preset": "pythia-tinyy"}}, ["model.preset", "did you mean 'pythia-tiny'"]),
        ({"methods": {"no_such_method": {}}}, ["methods.no_such_method", "unknown method"]),
        ({"methods": {"dropout_schedule": {"rate": 2}}}, ["field 'methods.dropout_schedule': rate must be in [0, 1)"]),
        ({"methods": {"dropout_schedule": {"rat": 0.1}}}, ["methods.dropout_schedule.rat", "did you mean 'rate'"]),
        ({"data": {"noise": {"word_replace_prob": 2}}}, ["field 'data.noise'", "word_replace_prob"]),
        ({"precision": "fp8"}, ["field 'precision'", "'fp8'"]),
        ({"deepspeed": "configs/deepspeed/zero9.json"}, ["field 'deepspeed'", "zero9.json' not found"]),
        ({"model": {"overrides": {"hiden_size": 8}}}, ["model.overrides.hiden_size", "did you mean 'hidden_size'"]),
        ({"data": {"source": "no/such/file.jsonl"}}, ["data.source", "no/such/file.jsonl' not found"]),
        ({"data": {"text_column": "body"}}, ["data.text_column", "'body'"]),
        ({"resume_from_checkpoint": "/nonexistent/checkpoint-4"}, ["resume_from_checkpoint", "not found"]),
        ({"model": {"preset": None, "name_or_path": "./no-such-model"}}, ["model.name_or_path", "./no-such-model' not found"]),
        ({"data": {"objective": "span_corruption"}}, ["data.objective", "span_corruption needs an encoder-decoder"]),
        ({"model": {"preset": "t5-tiny", "overrides": {}}, "data": {"objective": "causal"}},
         ["data.objective", "causal needs a decoder-only"]),
        ({"data": {"span_corruption": {"noise_density": 2}}}, ["data.span_corruption", "noise_density"]),
        ({"model": {"preset": "t5-tiny", "overrides": {}}, "eval": {"on_save": True}}, ["eval.on_save", "encoder-decoder"]),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, sections, expected):
    err = _error_of([_with(tmp_path, **sections)], capsys)
    for fragment in expected:
        assert fragment in err, err


def test_missing_config_file(tmp_path, capsys):
    err = _error_of([str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml' not found" in err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntraining:\n  max_steps: [1, 2\n")
    err = _error_of([str(path)], capsys)
    assert "broken.yaml" in err and "YAML syntax error at line" in err


def test_bad_override_syntax(tmp_path, capsys):
    err = _error_of([_with(tmp_path), "--set", "training.max_steps"], capsys)
    assert "expected key=value" in err


def test_override_into_non_section():
    data = {"name": "x"}
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_override(data, "name.sub=1")


def test_overrides_parse_yaml_values(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    cfg = load_config(path, ["training.learning_rate=3e-4", "data.block_size=64", "training.report_to=[]"])
    assert cfg.training["learning_rate"] == pytest.approx(3e-4)
    assert cfg.data.block_size == 64 and cfg.training["report_to"] == []


def test_quickstart_config_is_valid():
    cfg = load_config(REPO / "workbench" / "configs" / "quickstart.yaml")
    assert cfg.model.preset == "pythia-tiny" and cfg.deepspeed.endswith("zero2.json")


def test_tokenizer_model_vocabulary_mismatch(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model_dir = tmp_path / "small-vocab-model"
    config = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           vocab_size=50)
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    # a tokenizer with far more than 50 tokens: train one through a normal tiny run's data pipeline
    from workbench.config import DataConfig
    from workbench.data import load_documents
    from workbench.models import train_bpe_tokenizer

    docs = load_documents(DataConfig(synthetic={"num_entities": 30}))
    train_bpe_tokenizer(docs["text"], 300).save_pretrained(tmp_path / "tok")
    err = _error_of(
        [_with(tmp_path, model={"preset": None, "name_or_path": str(model_dir), "tokenizer": str(tmp_path / "tok"),
                           "overrides": {}})], capsys
    )
    assert "has only 50 embedding rows" in err and "tok" in err


def test_error_from_the_real_command_line(tmp_path):
    cfg = tiny_config(tmp_path, training={"learning_rat": 1})
    result = run([sys.executable, str(TRAIN), str(write_config(tmp_path, cfg))])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'exp.yaml'}: field 'training.learning_rat': [learning_rat] is not a TrainingArguments "
        "field (did you mean 'learning_rate'?)"
    ] or "did you mean 'learning_rate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path)))
    from workbench.config import dump_config

    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["training"]["max_steps"] == 8


def test_yaml_1_2_booleans_and_floats(tmp_path):
    cfg = tiny_config(tmp_path)
    path = write_config(tmp_path, cfg)
    text = path.read_text().replace("training:\n", "training:\n  eval_strategy: no\n  weight_decay: 1e-2\n")
    path.write_text(text)
    loaded = load_config(path, ["training.save_strategy=no", "training.logging_first_step=true"])
    assert loaded.training["eval_strategy"] == "no" and loaded.training["save_strategy"] == "no"
    assert loaded.training["weight_decay"] == 0.01 and loaded.training["logging_first_step"] is True


def test_a_bad_override_names_the_set_not_the_file(tmp_path, capsys):
    path = _with(tmp_path)
    err = _error_of([path, "--set", "training.learning_rat=1e-3"], capsys)
    assert err == ("error: --set training.learning_rat=1e-3: field 'training.learning_rat': is not a TrainingArguments "
                   "field (did you mean 'learning_rate'?)")
    err = _error_of([path, "--set", "trainig.max_steps=3"], capsys)  # a section typo: the --set under it
    assert err.startswith("error: --set trainig.max_steps=3: unknown field 'trainig'"), err
    err = _error_of([_with(tmp_path, training={"learning_rat": 1}), "--set", "training.max_steps=3"], capsys)
    assert err.startswith(f"error: {path}: field 'training.learning_rat'"), err  # the file's own typo


def test_value_origin_is_the_last_set_that_wrote_the_field():
    from workbench.config import value_origin

    overrides = ["data.noise.seed=1", "training.max_steps=3", "training={max_steps: 4}"]
    assert value_origin("a.yaml", overrides, "training.max_steps") == "--set training={max_steps: 4}"
    assert value_origin("a.yaml", overrides, "data.noise") == "--set data.noise.seed=1"
    assert value_origin("a.yaml", overrides, "data.block_size") == "a.yaml"
    assert value_origin("a.yaml", overrides, "train") == "a.yaml"  # a prefix of a name is not its section


@pytest.mark.parametrize(
    ("report_to", "expected"),
    [
        ("[wandbb]", "field 'training.report_to': unknown integration 'wandbb' (did you mean 'wandb'?); valid: all, none"),
        ("tensorbord", "unknown integration 'tensorbord' (did you mean 'tensorboard'?)"),
        ("[tensorboard, wandb]", "field 'training.report_to': 'wandb' is not installed (pip install wandb)"),
        ("[azure_ml]", "'azure_ml' is not installed (pip install azureml-core)"),
    ],
)
def test_report_to_is_checked_at_load(tmp_path, capsys, monkeypatch, report_to, expected):
    monkeypatch.setattr("workbench.config.installed_integrations", lambda: {"tensorboard"})
    err = _error_of([_with(tmp_path), "--set", f"training.report_to={report_to}"], capsys)
    assert err.startswith(f"error: --set training.report_to={report_to}: ") and expected in err, err
    assert not (tmp_path / "runs").exists()  # before any work


@pytest.mark.parametrize("report_to", ["[]", "none", "all", "[tensorboard]", "tensorboard"])
def test_report_to_accepts_installed_all_and_none(tmp_path, monkeypatch, report_to):
    monkeypatch.setattr("workbench.config.installed_integrations", lambda: {"tensorboard"})
    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path)), [f"training.report_to={report_to}"])
    assert cfg.training["report_to"] == yaml.safe_load(report_to)


def test_installed_integrations_follow_transformers():
    from transformers.integrations import get_available_reporting_integrations

    from workbench.config import installed_integrations

    assert set(get_available_reporting_integrations()) <= installed_integrations()
    assert "tensorboard" in installed_integrations()  # a dependency of the project


def test_preset_and_name_or_path_both_set_is_an_error(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    both = _with(tmp_path, model={"preset": "pythia-tiny", "name_or_path": str(model_dir)})
    err = _error_of([both], capsys)
    assert err.startswith(f"error: {both}: field 'model': 'preset' (pythia-tiny) and 'name_or_path'"), err
    err = _error_of([_with(tmp_path), "--set", f"model.name_or_path={model_dir}"], capsys)
    assert err.startswith(f"error: --set model.name_or_path={model_dir}: field 'model'") and "both set" in err


def test_name_or_path_alone_needs_no_preset_and_round_trips(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    data = tiny_config(tmp_path)
    data["model"] = {"name_or_path": str(model_dir)}  # the default preset is not "set"
    cfg = load_config(write_config(tmp_path, data))
    assert cfg.model.name_or_path == str(model_dir)
    from workbench.config import dump_config

    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").model.name_or_path == str(model_dir)
    assert load_config(write_config(tmp_path, tiny_config(tmp_path))).model.preset == "pythia-tiny"


@pytest.mark.parametrize(("field", "name"), [("data.source", "nobody-here/no-such-corpus-7f3a"),
                                             ("model.name_or_path", "nobody-here/no-such-model-7f3a")])
def test_hub_source_offline_fails_before_any_work(tmp_path, capsys, monkeypatch, field, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [f"{field}={name}"] + (["model.preset=null"] if field.startswith("model") else [])
    path = _with(tmp_path, precision="auto")
    err = _error_of([path, *(a for o in overrides for a in ("--set", o))], capsys)
    assert f"field '{field}': '{name}' is not a local" in err and "hub access is off (HF_HUB_OFFLINE=1)" in err, err
    assert "precision" not in capsys.readouterr().out  # nothing measured
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_hub_source_unreachable_fails_fast(tmp_path, monkeypatch):
    import socket

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"field 'data.source': .* the hub \(http://127.0.0.1:{port}\) is unreachable"):
        load_config(write_config(tmp_path, tiny_config(tmp_path)), ["data.source=nobody-here/no-such-corpus-7f3a"])


def test_integers_stay_integers(tmp_path):
    from workbench.config import config_yaml

    cfg = load_config(REPO / "workbench" / "configs" / "quickstart.yaml")
    assert type(cfg.training["warmup_steps"]) is int and cfg.training["warmup_steps"] == 30  # typed float
    assert type(cfg.training["learning_rate"]) is float
    text = config_yaml(cfg)
    assert "\n  warmup_steps: 30\n" in text and "\n  learning_rate: 0.001\n" in text
    assert load_config(REPO / "workbench" / "configs" / "quickstart.yaml", ["training.warmup_steps=0.1"]).training[
        "warmup_steps"] == 0.1
