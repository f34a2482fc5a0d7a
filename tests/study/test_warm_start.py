"""`workbench.processes`: a run forked from the warm server trains exactly as a new interpreter does, and reports bad
input the same way (exit code 2, the one-line error in its log)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config, write_config

from workbench.processes import train_process

pytestmark = pytest.mark.integration  # whole runs, forked from the warm server and in new interpreters

TIMINGS = ("runtime", "per_second")  # wall-clock figures: the only keys allowed to differ


def _without_timings(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMINGS)} for row in rows]


def test_a_warm_run_trains_like_a_new_interpreter_and_reports_bad_input(tmp_path, monkeypatch):
    config = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 2,
                                                                      "eval_strategy": "steps", "eval_steps": 2}))
    for mode, cold in (("warm", "0"), ("cold", "1")):
        monkeypatch.setenv("WORKBENCH_COLD_START", cold)
        assert train_process([str(config), "--set", f"name={mode}"], tmp_path / f"{mode}.log", threads=1) == 0
    warm, cold = (_without_timings(tmp_path / "runs" / mode / "metrics.jsonl") for mode in ("warm", "cold"))
    assert any("eval_loss" in row for row in warm) and warm == cold
    assert "[workbench] run folder" in (tmp_path / "warm.log").read_text()  # the run's output went to its log

    monkeypatch.setenv("WORKBENCH_COLD_START", "0")
    log = tmp_path / "bad.log"
    assert train_process([str(config), "--set", "training.learnig_rate=1"], log) == 2
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training.learnig_rate" in errors[0]
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing written for the bad run


def _maps() -> None:
    from pathlib import Path

    print("tcmalloc loaded" if "tcmalloc" in Path("/proc/self/maps").read_text() else "glibc malloc")


def test_runs_start_with_tcmalloc_where_the_machine_has_it_and_train_the_same(tmp_path, monkeypatch):
    import ctypes.util

    import pytest

    from workbench.processes import allocator_env, warm_process

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("WORKBENCH_MALLOC", raising=False)
    real = allocator_env()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    assert allocator_env()["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    monkeypatch.setenv("WORKBENCH_MALLOC", "system")
    assert allocator_env() == {}
    monkeypatch.delenv("WORKBENCH_MALLOC")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")  # the user's own choice is kept
    assert allocator_env() == {}
    monkeypatch.undo()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator_env() == {}
    monkeypatch.undo()
    if not real:
        pytest.skip("no tcmalloc on this machine (apt install libtcmalloc-minimal4)")
    log = tmp_path / "maps.log"
    assert warm_process(_maps, (), log) == 0 and log.read_text().strip() == "tcmalloc loaded"
    # a new interpreter with and without it: the same training, to the last bit
    config = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 4,
                                                                      "eval_strategy": "steps", "eval_steps": 2}))
    monkeypatch.setenv("WORKBENCH_COLD_START", "1")
    for malloc in ("tcmalloc", "system"):
        monkeypatch.setenv("WORKBENCH_MALLOC", malloc)
        assert train_process([str(config), "--set", f"name={malloc}"], tmp_path / f"{malloc}.log", threads=1) == 0
    with_tcmalloc, with_glibc = (_without_timings(tmp_path / "runs" / m / "metrics.jsonl") for m in ("tcmalloc", "system"))
    assert any("eval_loss" in row for row in with_glibc) and with_tcmalloc == with_glibc
