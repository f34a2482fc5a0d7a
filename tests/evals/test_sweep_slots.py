"""Evaluation sweeps `--parallel` at a time (`sweep_all`): each in a slot with its share of the cores and, on a
GPU machine, a GPU of its own (CUDA_VISIBLE_DEVICES); on CPU the cores shared out as before."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from workbench.errors import ConfigError
from workbench.study import runner
from workbench.study.runner import Slot, cpu_share
from workbench_eval import sweep as sweep_module
from workbench_eval.config import EvalConfig
from workbench_eval.sweep import evaluation_slots, model_target, sweep_all


def _record_slots(monkeypatch, jobs: int) -> list[tuple[str, int | None, dict[str, str] | None]]:
    """Replace `warm_process` with one that records (target, threads, env) of each sweep and returns only when
    all `jobs` sweeps are in it at once (so each holds its own slot)."""
    seen: list[tuple[str, int | None, dict[str, str] | None]] = []
    together = threading.Barrier(jobs, timeout=30)

    def warm_process(function, args, log: Path, threads: int | None = None, env: dict[str, str] | None = None):
        assert function is sweep_module.sweep
        seen.append((args[0].name, threads, env))
        together.wait()
        return 0

    monkeypatch.setattr("workbench.processes.warm_process", warm_process)
    monkeypatch.setattr("workbench.processes.preload", lambda *modules: None)
    return seen


def _jobs(tmp_path: Path, names: list[str]) -> list:
    return [(model_target(str(tmp_path / name), tmp_path / "out" / name), EvalConfig()) for name in names]


def test_two_parallel_sweeps_get_different_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["3", "5"])
    seen = _record_slots(monkeypatch, 2)
    sweep_all(_jobs(tmp_path, ["a", "b"]), parallel=2)
    devices = sorted(env["CUDA_VISIBLE_DEVICES"] for _, _, env in seen)
    assert devices == ["3", "5"]


def test_on_cpu_parallel_sweeps_share_out_the_cores_and_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    seen = _record_slots(monkeypatch, 2)
    sweep_all(_jobs(tmp_path, ["a", "b"]), parallel=2)
    assert sorted((name, threads, env or {}) for name, threads, env in seen) == [("a", cpu_share(2), {}),
                                                                               ("b", cpu_share(2), {})]
    assert evaluation_slots(2) == [Slot(cpu_share(2))] * 2


def test_more_parallel_sweeps_than_gpus_is_a_config_error_naming_parallel(monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0", "1"])
    with pytest.raises(ConfigError, match="--parallel 3: .* use --parallel 2"):
        evaluation_slots(3)


def test_a_failed_parallel_sweep_raises_with_its_log(tmp_path):
    """Real sweeps in forked processes on CPU: a model folder that is not there fails its sweep, which is
    raised with its log's tail."""
    with pytest.raises(RuntimeError, match=r"evaluating missing-a failed, see .*results\.log"):
        sweep_all(_jobs(tmp_path, ["missing-a", "missing-b"]), parallel=2)
    assert (tmp_path / "out" / "missing-b" / "results.log").is_file()
