"""The checkpoint manifest on a shared file system: each rank measures the files it wrote, rank 0 records those
sizes, also of files it does not see yet or sees stale (two gloo processes, each with its own view of the
checkpoint as two nodes of an NFS mount may have)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing

from workbench.checkpoints import rank_file_sizes, verify_checkpoint, verify_rank_files, write_manifest
from workbench.distributed_launch import free_port
from workbench.errors import CheckpointError
from workbench.layout import MANIFEST
from workbench.trainer import WorkbenchMixin

RANK1_SHARD = "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def test_given_sizes_override_what_rank_0_sees_and_add_what_it_does_not(tmp_path):
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / RANK1_SHARD).write_bytes(b"o" * 100)  # a stale view of rank 1's shard
    write_manifest(tmp_path, 4, {RANK1_SHARD: 128, "rng_state_1.pth": 32})
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert files == {"trainer_state.json": 2, RANK1_SHARD: 128, "rng_state_1.pth": 32}
    (tmp_path / RANK1_SHARD).write_bytes(b"o" * 128)  # what rank 1 wrote, once this node sees it
    with pytest.raises(CheckpointError, match="'rng_state_1.pth' is missing"):
        verify_checkpoint(tmp_path)
    (tmp_path / "rng_state_1.pth").write_bytes(b"r" * 32)
    verify_checkpoint(tmp_path)


def test_a_manifest_written_without_sizes_is_the_same_as_before(tmp_path):
    """Older checkpoints' manifests (`{"step", "files"}`, every file rank 0 sees) still verify."""
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (tmp_path / "rng_state_0.pth").write_bytes(b"r" * 8)
    write_manifest(tmp_path, 2)
    assert json.loads((tmp_path / MANIFEST).read_text()) == {
        "step": 2, "files": {"model.safetensors.index.json": 18, "rng_state_0.pth": 8}}
    verify_checkpoint(tmp_path)


def test_each_rank_measures_its_own_files_and_rank_0_the_shared_ones(tmp_path):
    (tmp_path / "global_step4").mkdir()
    for name, size in [("trainer_state.json", 3), ("rng_state_0.pth", 5), ("rng_state_1.pth", 7),
                       (RANK1_SHARD, 11), ("workbench_logging_rank1.json", 13)]:
        (tmp_path / name).write_bytes(b"x" * size)
    assert rank_file_sizes(tmp_path, 0) == {"trainer_state.json": 3, "rng_state_0.pth": 5}
    assert rank_file_sizes(tmp_path, 1) == {"rng_state_1.pth": 7, RANK1_SHARD: 11, "workbench_logging_rank1.json": 13}


class _SavingBase:
    """Stands for the Trainer's own save: each rank writes its RNG state and optimizer shard, rank 0 the shared
    trainer state."""

    def _save_checkpoint(self, model, trial) -> None:
        checkpoint = Path(self._get_output_dir(trial)) / "checkpoint-4"
        rank = self.args.process_index
        (checkpoint / "global_step4").mkdir(parents=True, exist_ok=True)
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"r" * 32)
        (checkpoint / RANK1_SHARD.replace("rank_1", f"rank_{rank}")).write_bytes(b"o" * 128)
        if rank == 0:
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))


class _SavingTrainer(WorkbenchMixin, _SavingBase):
    """`WorkbenchMixin._save_checkpoint` over `_SavingBase`, with the few Trainer attributes it reads."""


def _save_on_two_ranks(rank: int, port: int, root: str) -> None:
    """One of two gloo ranks, each on its own "node" (`root/node<rank>`, its view of the run folder): rank 0's
    view has a stale copy of rank 1's optimizer shard and no RNG state of rank 1's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    view = Path(root, f"node{rank}")
    if rank == 0:
        (view / "checkpoint-4" / "global_step4").mkdir(parents=True)
        (view / "checkpoint-4" / RANK1_SHARD).write_bytes(b"o" * 100)
    trainer = object.__new__(_SavingTrainer)  # no Trainer: `_save_checkpoint` reads only these
    trainer.args = SimpleNamespace(process_index=rank, should_save=rank == 0)
    trainer.state = SimpleNamespace(global_step=4)
    trainer.methods = SimpleNamespace(checkpointed=lambda: False)
    trainer.accelerator = SimpleNamespace(wait_for_everyone=torch.distributed.barrier)
    trainer.logging_state = lambda: {"loss_sum": 0.0}
    trainer.callback_handler = SimpleNamespace(callbacks=[])
    trainer._get_output_dir = lambda trial: str(view)
    trainer._save_checkpoint(None, None)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_rank_1s_file_sizes_reach_rank_0s_manifest(tmp_path):
    torch.multiprocessing.spawn(_save_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    node0, node1 = tmp_path / "node0" / "checkpoint-4", tmp_path / "node1" / "checkpoint-4"
    files = json.loads((node0 / MANIFEST).read_text())["files"]
    assert files[RANK1_SHARD] == 128 and files["rng_state_1.pth"] == 32
    assert files["workbench_logging_rank1.json"] == (node1 / "workbench_logging_rank1.json").stat().st_size
    assert files["trainer_state.json"] == (node0 / "trainer_state.json").stat().st_size
    shutil.copy(node0 / MANIFEST, node1 / MANIFEST)  # the one manifest, as rank 1's node sees it
    verify_rank_files(node1, 1)
