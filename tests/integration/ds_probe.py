"""Train a config like launch/train.py, then write this rank's view: steps taken and a parameter digest.

    deepspeed --num_gpus 2 tests/integration/ds_probe.py exp.yaml OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from workbench.config import load_config
from workbench.distributed_launch import exit_distributed
from workbench.run import train

if __name__ == "__main__":
    config_path, out_dir = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    cfg = load_config(config_path)
    import transformers

    captured = {}
    original = transformers.Trainer.train

    def train_and_capture(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        captured["trainer"] = self
        return output

    transformers.Trainer.train = train_and_capture
    result = train(cfg)
    trainer = captured["trainer"]
    digest = hashlib.sha256()
    for name, param in sorted(trainer.model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({
            "rank": rank,
            "world_size": trainer.args.world_size,
            "global_step": result.global_step,
            "param_sha256": digest.hexdigest(),
            "train_batches": len(trainer.get_train_dataloader()),
        })
    )
    exit_distributed(0)  # as launch/train.py leaves: no C++ teardown abort after a finished two-rank run
