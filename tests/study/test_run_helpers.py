"""The runner's helpers for scripts that train a study built in Python (the BOSE reproductions): `in_parallel`
and `run_all_or_raise`, without training anything (the run itself is faked)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import yaml

from workbench.study import runner
from workbench.study.plan import StudyConfig, plan


def test_in_parallel_gives_results_in_order_with_the_cores_shared_out():
    seen_threads: set[int] = set()
    running, peak = [0], [0]
    lock = threading.Lock()

    def job(item: int, threads: int) -> int:
        seen_threads.add(threads)
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 * (3 - item))  # the first item finishes last
        with lock:
            running[0] -= 1
        return item * 10

    assert list(runner.in_parallel(job, [0, 1, 2], parallel=2)) == [0, 10, 20]
    assert seen_threads == {max(1, (os.cpu_count() or 1) // 2)} and peak[0] == 2


def test_in_parallel_raises_a_jobs_exception_at_its_turn():
    def job(item: int, threads: int) -> int:
        if item == 1:
            raise ValueError("item 1")
        return item

    results = runner.in_parallel(job, [0, 1, 2], parallel=1)
    assert next(results) == 0
    with pytest.raises(ValueError, match="item 1"):
        next(results)


def test_run_all_or_raise_names_each_run_that_did_not_finish_with_its_log(tmp_path, monkeypatch):
    study = StudyConfig(study="s", base="base.yaml", runs_dir=str(tmp_path), axes={"arm": {"a": {}, "b": {}}})

    def fake_execute(study, run, threads=None, port=None):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        failed = run.values["arm"] == "b"
        (run.run_dir / "train.log").write_text("step 1\nerror: the loss is NaN\n" if failed else "ok\n")
        status = {"status": "failed", "error": "error: the loss is NaN"} if failed else {"status": "done"}
        (run.run_dir / runner.STATUS).write_text(yaml.safe_dump(status))
        return status

    monkeypatch.setattr(runner, "execute", fake_execute)
    with pytest.raises(RuntimeError, match=r"study s: 1 of 2 runs did not finish") as error:
        runner.run_all_or_raise(study, plan(study), progress=lambda line: None)
    assert "arm=b_seed=0: error: the loss is NaN" in str(error.value) and "arm=a" not in str(error.value)
    monkeypatch.setattr(runner, "execute", lambda study, run, threads=None: {"status": "done"})
    (tmp_path / "s" / "arm=b_seed=0" / runner.STATUS).write_text(yaml.safe_dump({"status": "done"}))
    runner.run_all_or_raise(study, plan(study), progress=lambda line: None)  # every run done: no error
