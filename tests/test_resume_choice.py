"""Which checkpoint a run resumes from: rank 0 chooses from the files every rank reads, every rank checks its own
files, and all ranks get the same answer or the same one-line error (two gloo processes here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

from workbench.checkpoints import file_rank, verify_rank_files, verify_shared_files, write_manifest
from workbench.config import ExperimentConfig
from workbench.distributed_launch import free_port
from workbench.errors import CheckpointError
from workbench.run import find_resume_checkpoint

RANK1_SHARD = "global_step{step}/zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize(("name", "rank"), [
    ("rng_state_1.pth", 1),
    ("global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt", 1),
    ("global_step4/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", 12),
    ("global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt", 0),
    ("workbench_methods_rank3.pt", 3),
    ("workbench_logging_rank0.json", 0),
    ("global_step4/mp_rank_00_model_states.pt", None),
    ("rng_state.pth", None),
    ("model.safetensors", None),
    ("trainer_state.json", None),
])
def test_file_rank_names_the_rank_that_reads_a_checkpoint_file(name, rank):
    assert file_rank(name) == rank


def fake_run(root: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """A run folder with 2-rank checkpoints: shared files, each rank's RNG state and optimizer shard, a manifest."""
    run_dir = root / "runs" / "r"
    for step in steps:
        checkpoint = run_dir / f"checkpoint-{step}"
        (checkpoint / f"global_step{step}").mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (checkpoint / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 64)
        for rank in (0, 1):
            (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"r" * 32)
            (checkpoint / RANK1_SHARD.format(step=step).replace("rank_1", f"rank_{rank}")).write_bytes(b"o" * 128)
        write_manifest(checkpoint, step)
    return run_dir


def test_rank_0_checks_the_shared_files_and_each_rank_its_own(tmp_path):
    checkpoint = fake_run(tmp_path) / "checkpoint-4"
    (checkpoint / RANK1_SHARD.format(step=4)).write_bytes(b"o" * 100)  # as a stale view from another node
    verify_shared_files(checkpoint)
    verify_rank_files(checkpoint, 0)
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt' has 100 bytes"):
        verify_rank_files(checkpoint, 1)
    (checkpoint / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="'trainer_state.json' has 1 bytes, expected"):
        verify_shared_files(checkpoint)


def test_one_process_resumes_from_the_newest_checkpoint_whole_for_its_rank(tmp_path):
    run_dir = fake_run(tmp_path)
    cfg = ExperimentConfig(name="r", runs_dir=str(tmp_path / "runs"))
    (run_dir / "checkpoint-4" / "rng_state_0.pth").unlink()
    reports: list[str] = []
    assert find_resume_checkpoint(cfg, resume=True, report=reports.append) == str(run_dir / "checkpoint-2")
    assert len(reports) == 1 and "'rng_state_0.pth' is missing (rank 0)" in reports[0]


def _choose_on_two_ranks(rank: int, port: int, runs_dir: str, targets: list[str | None], out: str) -> None:
    """One of two gloo ranks: `find_resume_checkpoint` for each of `targets` ('auto' under --resume when None),
    its answers or errors and its reports to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    outcomes = []
    for target in targets:
        reports: list[str] = []
        cfg = ExperimentConfig(name="r", runs_dir=runs_dir, resume_from_checkpoint=target)
        try:
            outcome = {"checkpoint": find_resume_checkpoint(cfg, resume=True, report=reports.append)}
        except CheckpointError as err:
            outcome = {"error": str(err)}
        outcomes.append({**outcome, "reports": reports})
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))
    torch.distributed.destroy_process_group()


def test_two_ranks_agree_on_the_checkpoint_and_on_the_error_when_rank_1_misses_its_shard(tmp_path):
    """Rank 1's optimizer shard of checkpoint-4 is missing: under --resume both ranks skip to checkpoint-2 (each
    knows why: `train` reports on rank 0 only); given checkpoint-4 by path, both ranks raise the same one-line
    error naming the file."""
    run_dir = fake_run(tmp_path)
    (run_dir / "checkpoint-4" / RANK1_SHARD.format(step=4)).unlink()
    targets = [None, str(run_dir / "checkpoint-4")]
    torch.multiprocessing.spawn(_choose_on_two_ranks, args=(free_port(), str(tmp_path / "runs"), targets,
                                                            str(tmp_path)), nprocs=2)
    automatic, given = zip(*(json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)), strict=True)
    assert [view["checkpoint"] for view in automatic] == [str(run_dir / "checkpoint-2")] * 2
    assert len(automatic[0]["reports"]) == 1 and automatic[1]["reports"] == automatic[0]["reports"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt' is missing (rank 1)" in automatic[0]["reports"][0]
    assert given[0]["error"] == given[1]["error"]
    assert "\n" not in given[0]["error"] and "zero_pp_rank_1_mp_rank_00_optim_states.pt' is missing" in given[0]["error"]
