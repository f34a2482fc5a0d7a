"""Evaluate many checkpoints on BOSE tasks with lm-eval's machinery, building the work once.

Tasks, documents, few-shot contexts and request instances are built once per (task, style); each
checkpoint then only swaps the model inside one `HFLM` and runs the requests (tokenisation memoised
across checkpoints). This is what `lm_eval.evaluator.evaluate` does per call, minus rebuilding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import transformers

from workbench.errors import ConfigError
from workbench_eval.config import EvalConfig
from workbench_eval.eigenscore import TASK as EIGENSCORE
from workbench_eval.eigenscore import EigenScoreCell, eigenscore_cells
from workbench_eval.results import CellResult
from workbench_eval.scoring import BlankPplScorer
from workbench_eval.specs import data_config, load_spec, spec_names
from workbench_eval.styles import StyleOptions, styles_for, task_config

NATIVE = "native"
# The evaluator reads local data and checkpoints only: hub access is off while it builds tasks, loads a
# checkpoint and runs it, unless the environment already says otherwise (`hub_offline`).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """`OFFLINE` in the environment for the duration (a variable already set is left as it is), restored after.

    Libraries that read these variables as they are first imported (datasets, lm-eval, evaluate) and are imported
    inside it keep hub access off for the rest of the process, as they would with the variables set outside."""
    added = {key: value for key, value in OFFLINE.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key, value in added.items():
            if os.environ.get(key) == value:
                del os.environ[key]


def quiet() -> None:
    """Silence progress bars and info logs of datasets, transformers and lm-eval."""
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def style_options(options: dict[str, Any]) -> StyleOptions:
    known = {f.name for f in fields(StyleOptions)}
    unknown = set(options) - known
    if unknown:
        from workbench.errors import did_you_mean

        key = sorted(unknown)[0]
        raise ConfigError(f"field 'eval.style_options.{key}': unknown option{did_you_mean(key, known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return StyleOptions(**values)


def build_tasks(cfg: EvalConfig, world: dict[str, Any], limit: int | None) -> dict[tuple[str, str], Any]:
    """(task, style) -> an lm-eval task with its request instances built, for every selected cell.

    `world`: what the tasks may know of the run's training data (`workbench_eval.data.run_data_options`)."""
    from lm_eval.api.task import ConfigurableTask

    opts = style_options(cfg.style_options)
    include = tuple(cfg.include_path)
    tasks: dict[tuple[str, str], Any] = {}
    for selection in cfg.tasks:
        styles = selection.styles
        if selection.task == EIGENSCORE:
            tasks.update(eigenscore_cells(styles, world, limit, opts.eigenscore))
            continue
        if styles == [NATIVE]:
            for name, task in _native_tasks(selection.task).items():
                tasks[(name, NATIVE)] = task
            continue
        overrides = {"dataset_kwargs": selection.dataset_kwargs} if selection.dataset_kwargs else {}
        overrides.update(selection.overrides)
        for name in spec_names(selection.task, include):  # a tag selects several specs
            spec = load_spec(name, include)
            data = data_config(spec, world, overrides)
            for style in styles or styles_for(spec.kind):
                tasks[(spec.task, style)] = ConfigurableTask(config=task_config(spec, style, data, opts))
    for task in tasks.values():
        if isinstance(task, EigenScoreCell):
            continue
        task.set_fewshot_seed(1234)  # what lm_eval.simple_evaluate uses
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    return tasks


def _native_tasks(name: str) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    if not manager.match_tasks([name]):
        raise ConfigError(f"unknown lm-eval task '{name}'")
    try:
        loaded = manager.load([name])["tasks"]
    except Exception as err:  # datasets and lm-eval raise many kinds; the user needs the task and the cause
        raise ConfigError(f"lm-eval task '{name}' could not be loaded: {str(err).splitlines()[0]}") from None
    for task in loaded.values():
        if task.get_config("num_fewshot") is None:
            task.set_config("num_fewshot", 0)
    return loaded


class Evaluator:
    """Runs prebuilt (task, style) cells on any number of models that share one tokenizer."""

    def __init__(self, cfg: EvalConfig, tokenizer, world: dict[str, Any] | None = None,
                 limit: int | None = None) -> None:
        quiet()
        self.cfg, self.tokenizer = cfg, tokenizer
        with hub_offline():
            self.tasks = build_tasks(cfg, world or {}, limit if limit is not None else cfg.limit)
        self._lm = None

    def _language_model(self, model):
        from lm_eval.models.huggingface import HFLM

        if self._lm is None:
            batch_size = lm_batch_size(self.cfg.batch_size, model.device)
            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=batch_size)
            self._lm._encode_pair = lru_cache(maxsize=None)(self._lm._encode_pair)
        else:  # the same tokenizer and architecture: swapping the module is all HFLM needs
            self._lm._model, self._lm._config, self._lm._device = model, model.config, model.device
            self._lm.pretrained = model
        return self._lm

    def release_model(self) -> None:
        """Drop the `HFLM`'s references to the last model evaluated (its tasks, tokenisations and detected batch
        sizes stay), so that the model is freed once its caller lets go of it; the next `evaluate` swaps one in."""
        if self._lm is not None:
            self._lm._model = self._lm.pretrained = None

    @hub_offline()
    def evaluate(self, model, cells: set[tuple[str, str]] | None = None) -> list[CellResult]:
        """Evaluate `model` (eval mode) on `cells` (default: all) and return one result per cell."""
        model.eval()
        lm = self._language_model(model)
        BlankPplScorer.token_counter = lambda ctx, cont: len(lm._encode_pair(ctx, cont)[1])
        chosen = {key: task for key, task in self.tasks.items() if cells is None or key in cells}
        sampled = [task.evaluate(model, self.tokenizer) for task in chosen.values() if isinstance(task, EigenScoreCell)]
        chosen = {key: task for key, task in chosen.items() if not isinstance(task, EigenScoreCell)}
        by_type: dict[str, list] = defaultdict(list)
        for task in chosen.values():
            for instance in task.instances:
                instance.resps, instance.filtered_resps = [], {}
                by_type[instance.request_type].append(instance)
        started = time.perf_counter()
        for request_type, requests in by_type.items():
            cloned = [r for r in requests for _ in range(r.repeats)]
            for response, request in zip(getattr(lm, request_type)(cloned, disable_tqdm=True), cloned, strict=True):
                request.resps.append(response)
        elapsed = time.perf_counter() - started
        total = sum(len(t.instances) for t in chosen.values()) or 1
        return sampled + [self._score(key, task, elapsed * len(task.instances) / total) for key, task in chosen.items()]

    @staticmethod
    def _score(key: tuple[str, str], task, seconds: float) -> CellResult:
        task.apply_filters()
        by_doc: dict[int, list] = defaultdict(list)
        for instance in task.instances:
            by_doc[instance.doc_id].append(instance)
        items: dict[str, list[float]] = defaultdict(list)
        filter_key = next(iter(task.instances[0].filtered_resps)) if task.instances else "none"
        for doc_id in sorted(by_doc):
            instances = sorted(by_doc[doc_id], key=lambda i: i.idx)
            result = task.process_results(instances[0].doc, [i.filtered_resps[filter_key] for i in instances])
            for metric, value in result.items():
                items[metric].append(float(value))
        aggregation = task.aggregation()
        metrics = {m: float(aggregation[m](v)) for m, v in items.items()}
        return CellResult(key[0], key[1], metrics, dict(items), seconds)


# `eval.batch_size: auto` on CPU, where lm-eval's detection (from 64 down, halving on out-of-memory) has no memory
# limit to find and would run its trial batches at full length
CPU_BATCH_SIZE = 32


def lm_batch_size(batch_size: int | str, device) -> int | str:
    """The batch size for lm-eval's `HFLM` on `device`: `eval.batch_size` as given, except `auto`/`auto:N` on CPU,
    which is `CPU_BATCH_SIZE`."""
    import torch

    if isinstance(batch_size, str) and torch.device(device).type == "cpu":
        return CPU_BATCH_SIZE
    return batch_size


def eval_dtype(dtype: str = "auto"):
    """The torch dtype to load a checkpoint in for `eval.dtype`: None (the dtype saved) for `auto` on a GPU,
    float32 for `auto` on CPU (a bf16 model on CPU can run tens of times slower than fp32, depending on the
    processor), else the named dtype."""
    import torch

    if dtype == "auto":
        return None if torch.cuda.is_available() else torch.float32
    return getattr(torch, dtype)


def load_checkpoint_model(path: str | Path, dtype: str = "auto"):
    """A checkpoint's model from its safetensors (no remote code) in `eval_dtype(dtype)`, on the current GPU when
    there is one, else on CPU. A LoRA adapter checkpoint loads on its base model, merged when the model is in
    float32 (exact); in a 16-bit dtype it stays unmerged (base + adapter, as trained: a merged 16-bit weight
    would round away an update smaller than its last bit). Weights that do not fit the architecture are a
    CheckpointError."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workbench.models import load_trained_model

    device_map = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else None
    with hub_offline():
        model = load_trained_model(path, dtype=eval_dtype(dtype), device_map=device_map,
                                   auto_class=AutoModelForCausalLM)
    return model.merge_and_unload().eval() if isinstance(model, PeftModel) and model.dtype == torch.float32 else model


def free_accelerator_memory() -> None:
    """Collect unreachable objects (a model in a reference cycle is freed only then) and return the CUDA caching
    allocator's free blocks to the device, so that memory freed by the evaluator is usable by training again."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
