"""Checkpoint sweeps: the workbench evaluator against `lm_eval.simple_evaluate` called afresh per checkpoint.

    python bench/eval_sweep.py                     # trains a tiny run with 16 checkpoints, then N = 4 and 16
    python bench/eval_sweep.py --run 'runs/bose-stability/arm=held-out_seed=0' --limit 100   # a stability run

Both paths get the same lm-eval task configs (every prompt style of factworld_mc and factworld_qa), the
same checkpoints (loaded the same way) and the same `HFLM` batch size, in one process, one after the other
for each N. Prints the wall-time ratio, items per second, and whether every score is identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from workbench_eval.config import EvalConfig  # noqa: E402
from workbench_eval.evaluator import Evaluator, load_checkpoint_model, quiet  # noqa: E402
from workbench_eval.scoring import BlankPplScorer  # noqa: E402
from workbench_eval.specs import data_config, load_spec  # noqa: E402
from workbench_eval.styles import StyleOptions, styles_for, task_config  # noqa: E402
from workbench_eval.sweep import run_target  # noqa: E402


def tiny_run(out: Path, checkpoints: int) -> Path:
    """Train a ~1M-parameter model with `checkpoints` evenly spaced checkpoints (about half a minute)."""
    import subprocess

    steps = 8 * checkpoints
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), str(REPO / "workbench" / "configs" / "quickstart.yaml"),
           "--overwrite", "--set", "name=eval-bench", "--set", f"runs_dir={out}", "--set", "deepspeed=null",
           "--set", "precision=fp32", "--set", f"training.max_steps={steps}", "--set", "training.save_steps=8",
           "--set", "training.save_total_limit=null", "--set", "training.eval_strategy=no",
           "--set", "training.disable_tqdm=true"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out / "eval-bench"


def configs(world: dict) -> list[dict]:
    opts = StyleOptions()
    out = []
    for name in ("factworld_mc", "factworld_qa"):
        spec = load_spec(name)
        data = data_config(spec, world, {})
        out += [task_config(spec, style, data, opts) for style in styles_for(spec.kind)]
    return out


def baseline(checkpoints: list[Path], tokenizer, world: dict, limit: int, batch_size: int) -> tuple[float, dict]:
    """`simple_evaluate` per checkpoint, tasks built afresh each time (what a loop over checkpoints does)."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    scores, start = {}, time.perf_counter()
    for checkpoint in checkpoints:
        lm = HFLM(pretrained=load_checkpoint_model(checkpoint), tokenizer=tokenizer, batch_size=batch_size)
        BlankPplScorer.token_counter = lambda ctx, cont, lm=lm: len(lm._encode_pair(ctx, cont)[1])
        tasks = [ConfigurableTask(config=cfg) for cfg in configs(world)]
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, bootstrap_iters=0, log_samples=False)
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                if "," in key and "stderr" not in key:
                    scores[(checkpoint.name, task, key.split(",")[0])] = float(value)
    return time.perf_counter() - start, scores


def workbench(checkpoints: list[Path], tokenizer, world: dict, limit: int, batch_size: int) -> tuple[float, dict]:
    start = time.perf_counter()
    evaluator = Evaluator(EvalConfig(limit=limit, batch_size=batch_size), tokenizer, world)
    scores = {}
    for checkpoint in checkpoints:
        for cell in evaluator.evaluate(load_checkpoint_model(checkpoint)):
            for metric, value in cell.metrics.items():
                scores[(checkpoint.name, f"{cell.task}.{cell.style}", metric)] = value
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run folder with at least 16 checkpoints (default: train one)")
    parser.add_argument("--limit", type=int, default=50, help="items per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    quiet()
    from transformers import AutoTokenizer

    run = args.run or tiny_run(Path(tempfile.mkdtemp(prefix="eval-bench-")), max(args.sizes))
    target = run_target(run)
    tokenizer = AutoTokenizer.from_pretrained(target.tokenizer)
    world = target.world or {"num_entities": 1000, "seed": 0}
    items_per_checkpoint = args.limit * len(configs(world))
    print(f"run {run}: {len(target.checkpoints)} checkpoints; {len(configs(world))} task-styles x {args.limit} items")
    print(f"{'N':>3} {'simple_evaluate s':>18} {'workbench s':>12} {'ratio':>6} {'items/s base':>13} "
          f"{'items/s wb':>11}  identical")
    for n in args.sizes:
        chosen = target.checkpoints[-n:]
        if len(chosen) < n:
            raise SystemExit(f"the run has only {len(target.checkpoints)} checkpoints; need {n}")
        base_s, base = baseline(chosen, tokenizer, world, args.limit, args.batch_size)
        ours_s, ours = workbench(chosen, tokenizer, world, args.limit, args.batch_size)
        same = base.keys() == ours.keys() and all(base[k] == ours[k] for k in base)
        items = n * items_per_checkpoint
        print(f"{n:>3} {base_s:>18.1f} {ours_s:>12.1f} {base_s / ours_s:>6.2f} {items / base_s:>13.0f} "
              f"{items / ours_s:>11.0f}  {same} ({len(base)} scores)")


if __name__ == "__main__":
    main()
