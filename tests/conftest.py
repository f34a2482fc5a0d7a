"""Shared test helpers: a tiny experiment config and launchers for `python` and `deepspeed` runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workbench.io import read_jsonl

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


def tiny_config(tmp_path: Path, name: str = "tiny", **sections) -> dict:
    """A config that trains a ~50k-parameter GPT-NeoX on 120 fact-world entities in seconds."""
    cfg = {
        "name": name,
        "runs_dir": str(tmp_path / "runs"),
        "seed": 7,
        "precision": "fp32",
        "deepspeed": None,
        "model": {
            "preset": "pythia-tiny",
            "tokenizer_vocab_size": 320,
            "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        },
        "data": {
            "source": "synthetic:fact_world",
            "synthetic": {"num_entities": 120, "seed": 1},
            "block_size": 32,
            "validation_fraction": 0.1,
            "cache_dir": str(tmp_path / "cache"),
        },
        "training": {
            "max_steps": 8,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 4,
            "report_to": [],
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, filename: str = "exp.yaml") -> Path:
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(cfg))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def deepspeed_command(script: Path, *args: str, ranks: int = 1, port: int = 29611) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), str(script), *args]


def run(cmd: list[str], timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def deepspeed_train(config: Path, ranks: int, port: int, *extra: str) -> str:
    """`deepspeed launch/train.py config` on `ranks` CPU ranks; asserts it succeeded, returns its stdout."""
    result = run(deepspeed_command(TRAIN, str(config), *extra, ranks=ranks, port=port))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def zero_method_config(tmp_path: Path, name: str, stage: int, methods: dict) -> Path:
    """A tiny 2-block config under ZeRO `stage` with `methods`: 8 steps of 4 per rank, saved at 4 and 8."""
    cfg = tiny_config(tmp_path, name=name, deepspeed=f"configs/deepspeed/zero{stage}.json", methods=methods,
                      training={"max_steps": 8, "save_steps": 4, "per_device_train_batch_size": 4,
                                "lr_scheduler_type": "constant"})
    cfg["model"]["overrides"]["num_hidden_layers"] = 2
    return write_config(tmp_path, cfg)


@pytest.fixture
def tiny(tmp_path: Path):
    """A function: section overrides -> path of a written tiny config."""
    return lambda **sections: write_config(tmp_path, tiny_config(tmp_path, **sections))


def launch_main(script: str, argv: list[str]) -> int:
    """Call launch/<script>.py's `main` in this process, loaded as the script is (a thin script over
    `workbench_cli.<script>`, the `workbench <script>` command)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{script}_entry", REPO / "launch" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def train_main(argv: list[str]) -> int:
    return launch_main("train", argv)


INTEGRATION = REPO / "tests" / "integration"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """Every test under tests/integration/ (DeepSpeed ranks, an installed wheel) is in the `integration` tier
    unless it is `slow`: the three tiers (plain `pytest`, `-m integration`, `-m slow`) never overlap."""
    for item in items:
        if INTEGRATION in item.path.parents and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


def kill_when_step_reached(cmd: list[str], metrics: Path, kill_step: int, timeout: float = 300) -> None:
    """Launch `cmd` and kill -9 its whole process group once `metrics` logs `kill_step`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and any(r.get("step", 0) >= kill_step for r in read_jsonl(metrics)):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"run ended before step {kill_step} (rc {proc.returncode})"


def zero_json(tmp_path: Path, stage: int) -> str:
    """The built-in ZeRO `stage` JSON written to `tmp_path`; under ZeRO-3 every parameter is partitioned
    (`stage3_param_persistence_threshold: 0`), so tiny models exercise the partitioned paths."""
    settings = json.loads((REPO / "workbench" / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    if stage == 3:
        settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(settings))
    return str(path)


def shared_memory_left(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce buffers in /dev/shm of the runs that met at `port` (each rank unlinks its own once
    every rank has mapped it: `workbench.distributed_launch.release_shared_memory`)."""
    return sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


# --- the family matrix (tests/families.py) ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """A function: family name -> the folder of its tiny random model and tokenizer, built once per session."""
    from families import FAMILY, build_family_folder

    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in built:
            built[name] = build_family_folder(FAMILY[name], root / name)
        return built[name]

    return folder


def family_config(tmp_path: Path, folder: Path, name: str, data: dict, lora: dict | None = None,
                  **sections) -> dict:
    """`tiny_config` for the model saved in `folder` (`model.name_or_path`, as a download; no preset or overrides),
    trained on `data` for 2 steps of 4 examples, saved at step 2, with LoRA adapters when `lora` is given."""
    cfg = tiny_config(tmp_path, name=name, data=data, **sections)
    cfg["model"] = {"preset": None, "name_or_path": str(folder), **({"lora": lora} if lora is not None else {})}
    cfg["training"] = {**cfg["training"], "max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4,
                       **sections.get("training", {})}
    return cfg
