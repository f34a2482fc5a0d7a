"""`training.full_determinism`: deterministic kernels for runs that must repeat bit for bit on GPUs (CUDA's
`index_add_` and embedding backward are not deterministic by default). On CPU: the option reaches torch inside
the run, and a bad value is a one-line config error naming the field."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_config
from transformers import TrainerCallback

from workbench.config import ExperimentConfig, load_config
from workbench.errors import ConfigError
from workbench.run import train
from workbench.trainer import DETERMINISTIC_CUBLAS_WORKSPACE

# what transformers' `enable_full_determinism` sets in the environment of the process
DETERMINISM_VARIABLES = ("CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING", "ASCEND_LAUNCH_BLOCKING",
                         "HCCL_DETERMINISTIC", "FLASH_ATTENTION_DETERMINISTIC")


class _SeeDeterminism(TrainerCallback):
    """Records, at every training step, what torch and cuBLAS are told."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool, bool, str | None]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                          torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))


@pytest.fixture
def restored_determinism(monkeypatch):
    """Leaves the process's torch flags and environment as they were."""
    for name in DETERMINISM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1:]


@pytest.mark.parametrize("deterministic", [True, False])
def test_full_determinism_reaches_torch_inside_the_run(tmp_path, restored_determinism, deterministic):
    cfg = ExperimentConfig(**tiny_config(tmp_path, training={"max_steps": 2, "save_steps": 2,
                                                             "full_determinism": deterministic}))
    probe = _SeeDeterminism()
    train(cfg, callbacks=[probe])
    if deterministic:
        assert probe.seen == [(True, True, False, DETERMINISTIC_CUBLAS_WORKSPACE)] * 2
    else:
        assert probe.seen == [(False, *probe.seen[0][1:3], None)] * 2


def test_a_bad_full_determinism_value_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set training.full_determinism=maybe: field 'training.full_determinism'"):
        load_config("configs/quickstart.yaml", ["training.full_determinism=maybe"])
    with pytest.raises(ConfigError, match=r"field 'training.deterministic'.*did you mean 'full_determinism'"):
        load_config("configs/quickstart.yaml", ["training.deterministic=true"])
