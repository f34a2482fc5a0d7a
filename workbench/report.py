"""What a finished run prints: where everything went and what to run next."""

from __future__ import annotations

import math

from workbench.checkpoints import list_checkpoints


def print_run_summary(result, config_path: str, overrides: list[str] | None = None) -> None:
    """Where the run's files went, and the commands that continue it or repeat it on two ranks."""
    run = result.run_dir
    kept = " ".join(f"--set {o}" for o in overrides or [] if not o.startswith(("training.max_steps=", "name=")))
    again = f"{config_path} {kept}".strip()
    checkpoints = list_checkpoints(run)
    ppl = f" (perplexity {math.exp(result.eval_loss):.2f})" if result.eval_loss is not None else ""
    lines = [
        "",
        f"Finished {run.name}: {result.global_step} steps in {result.precision}, "
        f"train loss {result.train_loss:.4f}"
        + (f", validation NLL {result.eval_loss:.4f}{ppl}" if result.eval_loss is not None else ""),
        f"  config        {run / 'config.yaml'}",
        f"  metrics       {run / 'metrics.jsonl'}  (one JSON line per logging step)",
        f"  checkpoints   {', '.join(c.name for c in checkpoints)}  in {run}/",
        f"  tokenizer     {run / 'tokenizer'}",
        f"  tensorboard   tensorboard --logdir {run / 'tensorboard'}",
        "Next:",
        *([f"  python launch/eval.py {run}   # evaluate every checkpoint (BOSE styles, Kendall-tau stability)"]
          if result.objective == "causal" else []),  # the evaluator scores causal LMs
        f"  deepspeed launch/train.py {again} --set name={run.name} --resume "
        f"--set training.max_steps={2 * result.global_step}   # train further",
        f"  deepspeed --num_gpus 2 launch/train.py {again} --set name={run.name}-2ranks   # the same on two ranks",
    ]
    print("\n".join(lines))
