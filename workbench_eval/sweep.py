"""Sweeping a run's checkpoints (or one model) with the evaluator, resumably, into `eval/results.jsonl`
(or another folder's `results.jsonl`); `sweep_all` sweeps several targets at a time, each in a warm-forked process."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from workbench.checkpoints import list_checkpoints, verify_checkpoint
from workbench.errors import CheckpointError, ConfigError
from workbench.io import append_jsonl
from workbench.layout import EVAL_DIR, MANIFEST, RESULTS, RUN_CONFIG, TOKENIZER_DIR, checkpoint_step
from workbench_eval.config import EvalConfig
from workbench_eval.data import training_data_options
from workbench_eval.results import cell_records, done_cells, experts_style, read_results, skip_record

if TYPE_CHECKING:
    from workbench.study.runner import Slot


@dataclass
class Target:
    """What to evaluate: a run folder with checkpoints, or one model (hub name or local folder)."""

    name: str
    results: Path  # <run>/eval/results.jsonl, or <out>/results.jsonl
    checkpoints: list[Path]
    tokenizer: str
    world: dict[str, Any] = field(default_factory=dict)  # what tasks may know of its training data
    eval_cfg: EvalConfig | None = None


def run_target(run_dir: Path, out_dir: Path | None = None) -> Target:
    """A training run: its checkpoints, tokenizer, training data's options (fact world, arithmetic problems;
    `workbench_eval.data.run_data_options`) and `eval` section from its config.yaml.

    Results go to `out_dir`/results.jsonl, by default the run's own `eval/` folder."""
    config_path = run_dir / RUN_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder: no config.yaml")
    config = yaml.safe_load(config_path.read_text()) or {}
    world = training_data_options(config)
    tokenizer = run_dir / TOKENIZER_DIR
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"'{run_dir}' has no checkpoint-* folders to evaluate")
    eval_cfg = EvalConfig.model_validate(config["eval"]) if "eval" in config else None
    return Target(run_dir.name, (out_dir or run_dir / EVAL_DIR) / RESULTS, checkpoints,
                  str(tokenizer if tokenizer.is_dir() else checkpoints[-1]), world, eval_cfg)


def only_step(target: Target, step: int) -> Target:
    """`target` with only its checkpoint of `step` (a ConfigError naming the steps it has, where none is)."""
    chosen = [c for c in target.checkpoints if step_of(c) == step]
    if not chosen:
        have = ", ".join(str(step_of(c)) for c in target.checkpoints)
        raise ConfigError(f"--step {step}: run '{target.name}' has no checkpoint-{step} (its steps: {have})")
    return replace(target, checkpoints=chosen)


def base_target(target: Target, run_dir: Path) -> Target:
    """`target` (a run) with the model the run started from in place of its checkpoints: `model.name_or_path`
    of its config.yaml, the newest checkpoint where that is a run folder; scored with the run's tokenizer and
    training data's options, so the items are the run's own."""
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}
    start = (config.get("model") or {}).get("name_or_path")
    if not start or not Path(start).is_dir():
        raise ConfigError(f"--base: run '{run_dir}' did not start from a local model folder "
                          f"(model.name_or_path: {start!r})")
    checkpoints = list_checkpoints(Path(start))
    return replace(target, name=f"{target.name} (base)", checkpoints=[checkpoints[-1] if checkpoints else Path(start)])


def model_target(model: str, out_dir: Path) -> Target:
    """One model by hub name or local path; results go to `out_dir`/results.jsonl."""
    return Target(Path(model).name, out_dir / RESULTS, [Path(model)], model)


def step_of(checkpoint: Path) -> int | None:
    """The training step in a `checkpoint-<step>` folder name; None for any other name."""
    return checkpoint_step(checkpoint)


def chance_accuracy(task: Any) -> float | None:
    """Accuracy of guessing uniformly among a built multiple-choice lm-eval task's options: the mean over
    its documents of 1/(number of options), counted from its request instances; None for other tasks."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or not getattr(task, "instances", None):
        return None
    metrics = {m.get("metric") for m in getattr(getattr(task, "config", None), "metric_list", None) or []}
    per_option = 2 if "acc_mutual_info" in metrics else 1  # lm-eval adds an unconditional request per option
    options: dict[Any, int] = {}
    for instance in task.instances:
        options[instance.doc_id] = options.get(instance.doc_id, 0) + 1
    return sum(per_option / k for k in options.values()) / len(options)


def expert_counts(checkpoint: Path, experts: list[int] | str | None) -> list[int | None]:
    """The numbers of active experts to evaluate `checkpoint` at (`eval.experts`, `launch/eval.py --experts`):
    [None] (the model as saved) without `experts`; `all`: 1, 2, 4, ..., E. A ConfigError for a model that is
    not an SMoE checkpoint (config.json records no `smoe` conversion) or a k outside [1, E]."""
    if not experts:
        return [None]
    from workbench.models.moe_model import expert_levels, runnable_expert_counts

    runnable = runnable_expert_counts(checkpoint)
    if not runnable:
        raise ConfigError(f"eval.experts (--experts): '{checkpoint}' is a dense model, not an SMoE checkpoint "
                          "(its config.json records no `smoe` conversion); evaluate it without --experts")
    total = max(runnable)
    counts = expert_levels(total) if experts == "all" else list(experts)
    bad = [k for k in counts if k not in runnable]
    if bad:
        raise ConfigError(f"eval.experts (--experts): {bad[0]} is not a number of experts of '{checkpoint}' "
                          f"(it has {total} per layer: give 1 to {total}, or `all`)")
    return counts


def sweep(target: Target, cfg: EvalConfig, limit: int | None = None, evaluator=None, progress: bool = True) -> int:
    """Evaluate every (checkpoint, task, style) cell of `target` not yet in its results, for an SMoE model at each
    of `cfg.experts` active experts (cells (checkpoint, task, `style@k<K>`)); returns cells done."""
    from workbench_eval.evaluator import Evaluator

    limit = limit if limit is not None else cfg.limit
    done = done_cells(read_results(target.results), limit)
    counts = {c: expert_counts(c, cfg.experts) for c in target.checkpoints}  # a dense model fails before any work
    if evaluator is None:
        from transformers import AutoTokenizer

        evaluator = Evaluator(cfg, AutoTokenizer.from_pretrained(target.tokenizer), target.world, limit)
    pending = {c: [(key, k) for k in counts[c] for key in sorted(evaluator.tasks)
                   if (c.name, key[0], experts_style(key[1], k)) not in done] for c in target.checkpoints}
    finished = 0
    with tqdm(total=sum(map(len, pending.values())), desc=f"evaluating {target.name}", unit="cell",
              disable=not progress) as bar:
        for checkpoint, cells in pending.items():
            if cells:
                finished += _sweep_checkpoint(target, checkpoint, cells, evaluator, cfg, limit, bar)
    return finished


def _sweep_checkpoint(target: Target, checkpoint: Path, cells: list[tuple[tuple[str, str], int | None]],
                      evaluator, cfg: EvalConfig, limit: int | None, bar: tqdm) -> int:
    """Evaluate `cells` ((task, style), experts) of one checkpoint, appending each to the target's results (a
    checkpoint that cannot be loaded is a skip record); returns cells done. The model is loaded once and freed
    before returning (`Evaluator.release_model`, `free_accelerator_memory`), so that a sweep, or an evaluation
    on save beside training, holds at most one model of its own at a time."""
    from workbench.models.moe_model import set_active_experts
    from workbench_eval.evaluator import free_accelerator_memory, load_checkpoint_model

    step = step_of(checkpoint)
    try:
        if (checkpoint / MANIFEST).exists():
            verify_checkpoint(checkpoint)
        model = load_checkpoint_model(checkpoint, cfg.dtype)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        tqdm.write(f"skipping {checkpoint.name}: {reason}")
        append_jsonl(target.results, skip_record(target.name, checkpoint.name, step, reason))
        bar.update(len(cells))
        return 0
    try:
        for cell, k in cells:  # one cell at a time: a killed sweep loses at most the cell in progress
            if k is not None:
                set_active_experts(model, k)
            (result,) = evaluator.evaluate(model, {cell})
            chance = chance_accuracy(evaluator.tasks.get(cell))
            append_jsonl(target.results,
                         *cell_records(target.name, checkpoint.name, step, result, limit, chance, experts=k))
            bar.update(1)
    finally:
        evaluator.release_model()
        del model
        free_accelerator_memory()
    return len(cells)


def evaluation_slots(parallel: int) -> list[Slot]:
    """The `parallel` slots evaluation sweeps go in: each the machine's cores shared out (`cpu_share`) and one GPU
    of those this process sees (`visible_gpus`, `device_groups`), no two slots the same one; no GPUs on a CPU
    machine. A ConfigError naming --parallel where there are fewer GPUs than slots."""
    from workbench.study.runner import Slot, cpu_share, device_groups, visible_gpus

    return [Slot(cpu_share(parallel), devices) for devices in device_groups(visible_gpus(), parallel, 1)]


def sweep_all(jobs: list[tuple[Target, EvalConfig]], limit: int | None = None, parallel: int = 1) -> None:
    """`sweep` each (target, eval config) of `jobs` (cells already in its results are skipped), `parallel` at a time
    (`workbench.study.runner.in_slots`, each sweep in one of the `evaluation_slots`: its share of the cores and its
    own GPU, as CUDA_VISIBLE_DEVICES), each in a process forked from the warm server (`workbench.processes`) with
    its progress in `<results>.log` beside the target's results; raises with the log's tail for a sweep that
    failed."""
    from workbench.processes import preload, warm_process
    from workbench.study.runner import in_slots

    preload(__name__)

    def one(job: tuple[Target, EvalConfig], slot: Slot) -> None:
        target, cfg = job
        log = target.results.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        if warm_process(sweep, (target, cfg, limit), log, slot.threads, slot.env()) != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"evaluating {target.name} failed, see {log}:\n{tail}")

    for _ in in_slots(one, jobs, evaluation_slots(parallel)):
        pass
