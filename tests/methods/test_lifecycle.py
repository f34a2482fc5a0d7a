"""The method lifecycle beyond the hooks' calls (tests/integration/test_zero_matrix.py runs every hook under
DeepSpeed): architecture changes and resume, LoRA with full-fine-tuning methods, lazy registration, import paths,
and `workbench.distributed` without DeepSpeed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import REPO, subprocess_env, tiny_config, train_main, write_config
from safetensors.torch import load_file
from torch import nn

from workbench.config import load_config
from workbench.distributed import full_parameter, set_full_parameter
from workbench.errors import ConfigError
from workbench.methods import METHODS, Method, register


@pytest.fixture
def widening_method():
    """A method that adds a layer to the model (as SMoE conversion changes the MLPs)."""

    @dataclasses.dataclass
    class WidenConfig:
        width: int = 3

    @register("test_widen")
    class Widen(Method):
        Config = WidenConfig

        def prepare_model(self, model):
            model.extra_head = nn.Linear(model.config.hidden_size, self.config.width)
            return model

    yield Widen
    METHODS.pop("test_widen")


@pytest.fixture
def full_finetuning_method():
    @register("test_full")
    class Full(Method):
        needs_full_finetuning = True

    yield Full
    METHODS.pop("test_full")


@pytest.mark.integration
def test_resuming_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, widening_method, capsys):
    """A method's layer of width 3 in the checkpoint, width 5 in the model: never resumed on fresh weights."""
    narrow = write_config(tmp_path, tiny_config(tmp_path, name="arch", methods={"test_widen": {"width": 3}},
                                                training={"max_steps": 2, "save_steps": 2}))
    assert train_main([str(narrow)]) == 0
    widened = write_config(tmp_path, tiny_config(tmp_path, name="arch", methods={"test_widen": {"width": 5}},
                                                 training={"max_steps": 4, "save_steps": 2}), "widened.yaml")
    assert train_main([str(widened), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint ") and "does not fit the model" in err and "extra_head" in err, err
    assert not (tmp_path / "runs" / "arch" / "checkpoint-4").exists()
    same = write_config(tmp_path, tiny_config(tmp_path, name="arch", methods={"test_widen": {"width": 3}},
                                              training={"max_steps": 4, "save_steps": 2}), "same.yaml")
    assert train_main([str(same), "--resume"]) == 0  # the same architecture resumes, the method's layer included
    saved = load_file(tmp_path / "runs" / "arch" / "checkpoint-4" / "model.safetensors")
    assert saved["extra_head.weight"].shape == (3, 32)


def test_lora_with_a_method_that_trains_every_weight_is_a_config_error(tmp_path, full_finetuning_method):
    cfg = tiny_config(tmp_path, methods={"test_full": {}})
    cfg["model"] = {"name_or_path": str(tmp_path / "base"), "lora": {}}
    (tmp_path / "base").mkdir()
    with pytest.raises(ConfigError, match=r"field 'model.lora': method 'test_full' trains every weight"):
        load_config(write_config(tmp_path, cfg))


def test_a_method_by_import_path_and_a_bad_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    cfg = tiny_config(tmp_path, methods={"tests.integration.hook_probe:HookProbe": {"bump": 0.25}})
    assert load_config(write_config(tmp_path, cfg)).methods == {
        "tests.integration.hook_probe:HookProbe": {"bump": 0.25, "target": "final_layer_norm.bias"}}
    for bad, message in (("no.such.module:Thing", "cannot import method"), ("workbench.io:atomic_write_text",
                                                                             "is not a Method subclass")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, tiny_config(tmp_path, methods={bad: {}})))


@pytest.mark.integration
def test_validating_a_config_imports_only_the_methods_it_names(tmp_path):
    plain = write_config(tmp_path, tiny_config(tmp_path), "plain.yaml")
    named = write_config(tmp_path, tiny_config(tmp_path, methods={"dropout_schedule": {}}), "named.yaml")
    probe = ("import sys; from workbench.config import load_config; load_config(sys.argv[1]); "
             "print('workbench.methods.dropout_schedule' in sys.modules)")
    seen = [subprocess.run([sys.executable, "-c", probe, str(p)], env=subprocess_env(), capture_output=True,
                           text=True, cwd=REPO).stdout.strip() for p in (plain, named)]
    assert seen == ["False", "True"]


def test_full_parameter_access_without_deepspeed_is_the_parameter_itself():
    layer = nn.Linear(3, 2)
    value = full_parameter(layer.weight)
    assert torch.equal(value, layer.weight) and value.data_ptr() != layer.weight.data_ptr()  # a copy
    set_full_parameter(layer.weight, value + 1)
    assert torch.equal(layer.weight, value + 1)
    with pytest.raises(ValueError, match="shape"):
        set_full_parameter(layer.weight, torch.zeros(3, 3))
