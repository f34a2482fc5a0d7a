"""How many processes tokenise (`datasets.map`'s num_proc) when `data.num_proc` is not set: the available cores,
at most 8, for a large dataset; one for a small one, for generated examples and for packed fine-tuning rows."""

from __future__ import annotations

import os

import pytest

from workbench.config import DataConfig
from workbench.data import finetune, loading


@pytest.fixture
def cores(monkeypatch):
    """Set how many cores this process may run on."""
    return lambda n: monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


@pytest.mark.parametrize(("available", "rows", "processes"), [
    (16, 10_000_000, 8),  # capped
    (4, 10_000_000, 4),  # the cores this process may use (Slurm's allocation, taskset)
    (16, 60_000, 3),  # one per 20,000 rows
    (16, 500, 1),  # small: start-up costs more than it saves
])
def test_the_default_is_the_cores_for_a_large_dataset_and_one_for_a_small(cores, available, rows, processes):
    cores(available)
    count, why = loading.map_processes(None, rows)
    assert count == processes and f"with {processes} process" in why and f"{available} cores" in why


def test_a_configured_count_and_generated_rows(cores):
    cores(16)
    assert loading.map_processes(3, 10_000_000) == (3, "[workbench] tokenising with 3 processes (data.num_proc)")
    assert loading.map_processes(None, None)[0] == 1


def test_fine_tuning_counts_its_rows_except_when_packing(tmp_path, cores, monkeypatch):
    cores(16)
    monkeypatch.setattr(loading, "ROWS_PER_MAP_PROCESS", 10)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "q{i}", "completion": " a{i}"}}\n' for i in range(45)))
    assert finetune.tokenising_processes(DataConfig(source=str(rows)))[0] == 4
    assert finetune.tokenising_processes(DataConfig(source=str(rows), max_documents=25))[0] == 2
    assert finetune.tokenising_processes(DataConfig(source=str(rows), packing=True))[0] == 1
    assert finetune.tokenising_processes(DataConfig(source=str(rows), packing=True, num_proc=2))[0] == 2
    assert finetune.tokenising_processes(DataConfig(source="synthetic:arithmetic"))[0] == 1
