"""The command line of launch/train.py: conflicting flags, a run without a launcher, where runs go, --dry-run,
--list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TRAIN, subprocess_env, tiny_config, train_main, write_config
from test_config import _error_of

from workbench.checkpoints import verify_checkpoint
from workbench.config import load_config

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
                      "PMI_SIZE", "PMIX_RANK")


def _fake_run(tmp_path: Path) -> Path:
    """A run folder with a checkpoint in it, as a finished run leaves it (the contents do not matter here)."""
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_text("weights")
    return checkpoint.parent


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def test_resume_with_overwrite_is_one_line_and_deletes_nothing(tmp_path, capsys):
    run = _fake_run(tmp_path)
    path = write_config(tmp_path, tiny_config(tmp_path))
    before = _files(tmp_path)
    err = _error_of([str(path), "--resume", "--overwrite"], capsys)
    assert err.startswith("error: argument --overwrite: not allowed with argument --resume"), err
    assert _files(tmp_path) == before and (run / "checkpoint-4" / "model.safetensors").is_file()


def test_overwrite_with_resume_from_checkpoint_in_the_config_deletes_nothing(tmp_path, capsys):
    run = _fake_run(tmp_path)
    path = write_config(tmp_path, tiny_config(tmp_path, resume_from_checkpoint="auto"))
    before = _files(tmp_path)
    err = _error_of([str(path), "--overwrite"], capsys)
    assert "--overwrite deletes" in err and "resume_from_checkpoint: auto" in err, err
    assert _files(tmp_path) == before and (run / "checkpoint-4").is_dir()


def test_unknown_argument_is_one_line(tmp_path, capsys):
    err = _error_of([str(write_config(tmp_path, tiny_config(tmp_path))), "--bogus"], capsys)
    assert err.startswith("error: unrecognized arguments: --bogus"), err


@pytest.mark.integration
def test_python_without_a_launcher_runs_deepspeed_in_one_process(tmp_path):
    """The README's `python launch/train.py my.yaml` (no launcher, one process) with a DeepSpeed config."""
    cfg = tiny_config(tmp_path, deepspeed="configs/deepspeed/zero2.json", data={"max_documents": 8},
                      training={"max_steps": 2, "save_steps": 2})
    env = {k: v for k, v in subprocess_env().items() if k not in LAUNCHER_VARIABLES}
    result = subprocess.run([sys.executable, str(TRAIN), str(write_config(tmp_path, cfg))], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "no launcher" in line]
    assert len(notes) == 1 and "zero2.json" in notes[0] and "127.0.0.1:" in notes[0], result.stdout[-3000:]
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint-2"
    verify_checkpoint(checkpoint)
    assert (checkpoint / "global_step2").is_dir()  # saved by the DeepSpeed engine


def test_relative_runs_dir_and_cache_dir_follow_the_current_directory(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, runs_dir="runs", data={"cache_dir": ".cache/wb"}, training={"max_steps": 2})
    path = write_config(tmp_path, cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"[workbench] run folder {elsewhere / 'runs' / 'tiny'}\n" in out
    verify_checkpoint(elsewhere / "runs" / "tiny" / "checkpoint-2")
    assert (elsewhere / ".cache" / "wb" / "blocks").is_dir()
    assert not (REPO / "runs" / "tiny").exists()


@pytest.mark.parametrize("flag", ["--dry-run", "--print-config"])
def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys, flag):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert train_main([flag, "--set", "training.max_steps=5"]) == 0  # the bundled quickstart, from elsewhere
    out = capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    assert f"# run folder: {cwd / 'runs' / 'quickstart'}\n" in out
    assert f"# data cache: {cwd / '.cache' / 'workbench'}\n" in out
    assert "\nprecision: auto  # decided at start" in out
    assert "\n  warmup_steps: 30\n" in out
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    again = load_config(printed)  # what it prints is a config that loads back to the same config
    assert again == load_config("configs/quickstart.yaml", ["training.max_steps=5"])
    assert again.training["max_steps"] == 5


def test_dry_run_reports_bad_input_like_a_run(tmp_path, capsys):
    err = _error_of(["--dry-run", "--set", "training.learning_rat=1"], capsys)
    assert "--set training.learning_rat=1: field 'training.learning_rat'" in err


def test_list_deepspeed_configs_with_their_stage(capsys):
    assert train_main(["--list", "deepspeed"]) == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:]]
    files = sorted((REPO / "workbench" / "configs" / "deepspeed").glob("*.json"))
    assert [name for name, _ in rows] == [f"configs/deepspeed/{f.name}" for f in files]  # their names in a config
    for (_, what), path in zip(rows, files, strict=True):
        zero = json.loads(path.read_text())["zero_optimization"]
        assert what.strip().split(",")[0] == f"ZeRO stage {zero['stage']}"
        assert ("offloaded to cpu" in what) == ("offload_optimizer" in zero), what


def test_list_presets_with_parameter_counts(capsys):
    from workbench.models import model_class
    from workbench.models.presets import PRESETS, preset_config

    assert train_main(["--list", "presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2,048-token vocabulary" in lines[0]
    rows = {line.split()[0]: line.split()[-1] for line in lines[1:]}
    assert set(rows) == set(PRESETS)
    config = preset_config("pythia-tiny", 2048, {})
    built = model_class(config).from_config(config)  # a real model, counted the plain way
    assert rows["pythia-tiny"] == f"{sum(p.numel() for p in built.parameters()) / 1e6:.2f}M"


def test_list_methods_with_options(capsys):
    from workbench.methods import available_methods

    assert train_main(["--list", "methods"]) == 0
    out = capsys.readouterr().out
    assert set(available_methods()) <= {line.split()[0] for line in out.splitlines()[1:]}
    assert "dropout_schedule" in out and "rate=0.1" in out


def test_list_of_something_unknown(capsys):
    err = _error_of(["--list", "model"], capsys)
    assert "--list: invalid choice: 'model'" in err


def test_list_is_a_light_command():
    """`--list deepspeed` reads JSON files only: no torch, transformers or deepspeed import."""
    code = (f"import runpy, sys\nsys.argv = [{str(TRAIN)!r}, '--list', 'deepspeed']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    env = {k: v for k, v in subprocess_env().items() if k not in LAUNCHER_VARIABLES}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
    assert "ZeRO stage 2" in result.stdout


def test_print_config_yaml_parses(tmp_path, capsys):
    assert train_main([str(write_config(tmp_path, tiny_config(tmp_path))), "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["precision"] == "fp32" and printed["training"]["max_steps"] == 8
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("model", "methods", "message"), [
    ({}, {"smoe_dropout": {"experts": 3}},
     "error: field 'methods.smoe_dropout': GPTNeoXForCausalLM: experts (3) must divide the MLP width 64 of layer 0"),
    ({"preset": "t5-tiny", "overrides": {}}, {"drop_path": {}},
     "error: field 'methods.drop_path': T5ForConditionalGeneration: 2 layer stacks"),
])
def test_a_model_a_method_cannot_act_on_is_one_line_before_anything_is_written(tmp_path, capsys, model, methods,
                                                                              message):
    cfg = tiny_config(tmp_path, methods=methods)
    cfg["model"].update(model)
    path = write_config(tmp_path, cfg)
    before = _files(tmp_path)
    err = _error_of([str(path)], capsys)
    assert err.startswith(message), err
    assert _files(tmp_path) == before  # no run folder, no prepared data
