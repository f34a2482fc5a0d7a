"""The project as a user installs it: a wheel built from the repository, installed into a fresh virtual
environment, and its `workbench` command run in an empty directory outside the repository.

The fresh environment sees this environment's dependencies (torch, transformers, deepspeed, ...) through a
`.pth` file holding the path of this environment's site-packages: a plain path line adds that folder to
`sys.path` without processing the `.pth` files inside it, so the editable install of this repository (an
import hook started by its own `.pth`) stays off there, and `workbench` can only come from the wheel. The
test checks that it does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from workbench.checkpoints import verify_checkpoint
from workbench.distributed_launch import free_port
from workbench.io import read_jsonl

pytestmark = pytest.mark.integration

# Not part of a source tree: what a checkout gathers from use (a copy leaves the checkout untouched by the build).
LOCAL = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", ".cache", "*.egg-info", "__pycache__",
                               ".pytest_cache", ".ruff_cache")
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
                      "PMI_SIZE", "PMIX_RANK")
COMMANDS = ("train", "eval", "study", "merge")
# The quickstart, shortened: 4 steps, saved and evaluated at step 4, a smaller fact world and vocabulary.
QUICK = ["--set", "training.max_steps=4", "--set", "training.save_steps=4", "--set", "training.eval_steps=4",
         "--set", "training.logging_steps=2", "--set", "training.warmup_steps=0",
         "--set", "data.synthetic.num_entities=120", "--set", "model.tokenizer_vocab_size=320"]


def _env(venv: Path) -> dict[str, str]:
    """A user's shell with the venv activated: no launcher variables, no PYTHONPATH into the repository."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARIABLES, "PYTHONPATH", "VIRTUAL_ENV")}
    outer_bin = str(Path(sys.executable).parent)  # ninja and the compilers DeepSpeed's JIT ops may want
    env.update({"PATH": os.pathsep.join([str(venv / "bin"), outer_bin, env.get("PATH", "")]),
                "VIRTUAL_ENV": str(venv), "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _run(cmd: list, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the venv with the wheel installed, the environment that has it activated)."""
    root = tmp_path_factory.mktemp("wheel")
    source, wheels, venv = root / "src", root / "wheels", root / "venv"
    shutil.copytree(REPO, source, ignore=LOCAL)
    subprocess.run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", wheels], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("*.whl")
    assert wheel.name.startswith("llm_workbench-"), wheel.name  # the distribution name, not `workbench`
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                    wheel], check=True, capture_output=True, timeout=300)
    return venv, _env(venv)


@pytest.fixture
def empty(tmp_path) -> Path:
    """An empty directory outside the repository, to run the command in."""
    folder = tmp_path / "empty"
    folder.mkdir()
    assert not folder.resolve().is_relative_to(REPO)
    return folder


def test_the_wheel_is_what_the_new_environment_imports(installed, empty):
    venv, env = installed
    code = ("import json, sys, importlib.resources as r, workbench, workbench_cli, workbench_eval\n"
            "print(json.dumps({'modules': [m.__file__ for m in (workbench, workbench_cli, workbench_eval)],\n"
            "  'finders': [type(f).__name__ for f in sys.meta_path], 'path': sys.path,\n"
            "  'data': [str(r.files('workbench') / 'configs' / 'quickstart.yaml'),\n"
            "           str(r.files('workbench_eval') / 'tasks' / 'factworld_qa.yaml')]}))")
    seen = json.loads(_run([venv / "bin" / "python", "-c", code], empty, env).stdout)
    for file in seen["modules"] + seen["data"]:
        assert Path(file).resolve().is_relative_to(venv.resolve()), seen
        assert not Path(file).resolve().is_relative_to(REPO), seen
    assert all(Path(f).is_file() for f in seen["data"]), seen["data"]
    assert not any("Editable" in finder for finder in seen["finders"]), seen["finders"]
    assert sysconfig.get_paths()["purelib"] in seen["path"]  # the dependencies come from this environment


def test_the_command_lists_its_subcommands_and_each_has_help(installed, empty):
    venv, env = installed
    workbench = venv / "bin" / "workbench"
    out = _run([workbench, "--help"], empty, env).stdout
    listed = [line.split()[0] for line in out.split("commands:\n", 1)[1].splitlines() if line.startswith("  ")]
    assert listed[:4] == list(COMMANDS), out
    for command in COMMANDS:
        assert _run([workbench, command, "--help"], empty, env).stdout.startswith(f"usage: workbench {command} ")
    bad = subprocess.run([workbench, "trian"], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr
    assert list(empty.iterdir()) == []


def test_the_quickstart_trains_through_the_installed_command_outside_the_repository(installed, empty):
    venv, env = installed
    out = _run([venv / "bin" / "workbench", "train", *QUICK], empty, env).stdout
    run = empty / "runs" / "quickstart"
    assert f"[workbench] run folder {run}\n" in out
    assert "no launcher" in out and "zero2.json" in out  # the built-in DeepSpeed config, found in the wheel
    verify_checkpoint(run / "checkpoint-4")  # complete: its manifest and every file it lists
    assert (run / "checkpoint-4" / "global_step4").is_dir()  # saved by the DeepSpeed engine
    rows = read_jsonl(run / "metrics.jsonl")
    assert any(r.get("step") == 4 and "eval_loss" in r for r in rows), rows
    assert any("train_runtime" in r for r in rows), rows
    assert (run / "config.yaml").is_file() and (run / "tokenizer").is_dir()
    assert sorted(p.name for p in empty.iterdir()) == [".cache", "runs"]  # everything went under the directory


def test_deepspeed_starts_the_installed_train_module(installed, empty):
    """`deepspeed --module workbench_cli.train` (the launcher runs `python -u -m workbench_cli.train
    --local_rank=0 ...`), here with --dry-run: the module starts, takes --local_rank, finds the quickstart."""
    venv, env = installed
    launcher = [venv / "bin" / "python", "-m", "deepspeed.launcher.runner"]  # the venv's python starts the ranks
    result = _run([*launcher, "--num_gpus", "1", "--master_port", free_port(), "--module", "workbench_cli.train",
                   "--dry-run"], empty, env)
    assert "'-m', 'workbench_cli.train', '--local_rank=0', '--dry-run'" in result.stdout  # how the rank started
    assert "# configs/quickstart.yaml: resolved by --dry-run" in result.stdout, result.stdout[-3000:]
    assert f"# run folder: {empty / 'runs' / 'quickstart'}\n" in result.stdout
    assert list(empty.iterdir()) == []  # a dry run writes nothing
