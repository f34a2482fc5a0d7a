"""Peak memory of one training step with each fine-tuning method against the plain step of the same model, at
large vocabularies (goal: at most 1.5x the plain step's peak).

    python bench/memory.py                                    # about 10 minutes on 2 CPU cores
    python bench/memory.py --vocab 32768 --methods sinkd --json memory.json

Every case is one fine-tuning run of 2 optimizer steps, trained through `workbench.run.train` as
`bench/method_overhead.py` trains its arms (its fine-tuning config, `synthetic:arithmetic`, its LoRA/full and
SeND overrides), in a fresh process of its own. The base (the quickstart's `pythia-tiny`, width 128, 2 blocks,
trained 1 step, its embeddings and output layer resized to V rows) is made once per V; it is SinKD's teacher too.
Sequences are the arithmetic problems, padded per batch and cut at `--block-size` tokens; the table gives the
tokens per step measured. Methods run with their defaults, except SeND, which tracks and drops every step.
Baselines: LoRA without a method for ALLoRA (LoRA is its shape), full fine-tuning for every other method.

The measured step is the second (the optimizer state exists by then and counts as before-the-step memory).
CPU: the process's peak resident set during the step (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, with its
high-water mark reset to the current resident size by `/proc/self/clear_refs` at the step's start) minus the
resident size at that start, so the interpreter, imports, weights and optimizer state are excluded; glibc's
mmap threshold is pinned (`distill_step.pin_malloc`) so freed tensors leave the resident set. GPU:
`torch.cuda.max_memory_allocated` over the step minus `memory_allocated` at its start.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_step import _status_mib, pin_malloc  # noqa: E402
from method_overhead import FINETUNE, FULL, LORA, REPO, SEND_EVERY_STEP, _quiet_train  # noqa: E402
from timing import cpu_name, set_threads, write_results  # noqa: E402

TARGET_RATIO = 1.5
MEASURED_STEP = 2
BASELINES: dict[str, list[str]] = {"full": FULL, "lora": LORA}
METHODS: dict[str, tuple[str, list[str]]] = {  # method -> (its baseline, overrides of the method arm)
    "allora": ("lora", [*LORA, "methods={allora: {}}"]),
    "masked_thought": ("full", [*FULL, "methods={masked_thought: {}}"]),
    "send": ("full", [*FULL, f"methods={{send: {SEND_EVERY_STEP}}}"]),
    "sinkd": ("full", [*FULL, "methods={sinkd: {teacher: BASE}}"]),
    "smoe_dropout": ("full", [*FULL, "methods={smoe_dropout: {}}"]),
    "drop_path": ("full", [*FULL, "methods={drop_path: {}}"]),
    "dropout_schedule": ("full", [*FULL, "methods={dropout_schedule: {}}"]),
}


# ----------------------------------------------------------------------------------------------------------
# In the case's own process: one run, the peak of its second step
# ----------------------------------------------------------------------------------------------------------


class StepPeak(TrainerCallback):
    """Memory the measured step needs above what existed at its start: MiB, and the tokens it trained on."""

    def __init__(self, step: int) -> None:
        self.step, self.start_mib, self.peak_mib, self.tokens = step, 0.0, None, 0
        self.gpu = torch.cuda.is_available()

    def count_tokens(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training:
            self.tokens = int(ids.numel())

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        model.register_forward_pre_hook(self.count_tokens, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        if state.global_step != self.step - 1:
            return
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
            return
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark := the resident size now
        self.start_mib = _status_mib("VmRSS")

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if state.global_step != self.step:
            return
        if self.gpu:
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20 - self.start_mib
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.start_mib


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning run of `case` (its overrides, base, folder); its step's peak MiB and tokens."""
    from workbench.config import load_config

    pin_malloc()
    set_threads(case["threads"])
    folder = Path(case["folder"])
    overrides = [o.replace("BASE", case["base"]) for o in case["overrides"]]
    cfg = load_config(FINETUNE, [
        f"name={case['name']}", f"runs_dir={folder}", f"model.name_or_path={case['base']}", "deepspeed=null",
        f"precision={case['precision']}", f"training.max_steps={MEASURED_STEP}",
        f"training.per_device_train_batch_size={case['batch_size']}", f"data.block_size={case['block_size']}",
        "training.eval_strategy=no", "training.save_steps=100000", "training.logging_steps=100000",
        "training.report_to=[]", "training.disable_tqdm=true", "eval.on_save=false",
        "data.synthetic.num_problems=200", f"data.cache_dir={folder / 'cache'}", *overrides])
    peak = StepPeak(MEASURED_STEP)
    _quiet_train(cfg, [peak])
    return {"peak_mib": peak.peak_mib, "tokens": peak.tokens}


# ----------------------------------------------------------------------------------------------------------
# The parent: base runs, one subprocess per case, the table
# ----------------------------------------------------------------------------------------------------------


def make_bases(folder: Path, vocabs: list[int], precision: str) -> dict[int, Path]:
    """Per vocabulary size V, a model folder (weights and tokenizer) to fine-tune: the quickstart model trained
    one step, its embeddings and output layer resized to V rows (the tokenizer keeps its 2,048 tokens)."""
    from transformers import AutoTokenizer

    from workbench.checkpoints import newest_complete_checkpoint
    from workbench.config import load_config
    from workbench.layout import TOKENIZER_DIR
    from workbench.models import load_trained_model

    cfg = load_config(REPO / "workbench" / "configs" / "quickstart.yaml", [
        "name=base", f"runs_dir={folder}", "deepspeed=null", f"precision={precision}", "training.max_steps=1",
        "training.eval_strategy=no", "training.save_steps=1", "training.report_to=[]", "training.disable_tqdm=true",
        "data.synthetic.num_entities=100", f"data.cache_dir={folder / 'cache'}"])
    _quiet_train(cfg, [])
    checkpoint = newest_complete_checkpoint(folder / "base", report=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "base" / TOKENIZER_DIR))
    bases = {}
    for vocab in vocabs:
        model = load_trained_model(checkpoint)
        model.resize_token_embeddings(vocab, mean_resizing=False)
        bases[vocab] = folder / f"base-{vocab}"
        model.save_pretrained(bases[vocab])
        tokenizer.save_pretrained(bases[vocab])
    return bases


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """`run_case` in a fresh interpreter (the peak of one process is one case's)."""
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"case {case['name']} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072], help="vocabulary sizes V")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per sequence at most")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if min(args.batch_size, args.block_size) < 1:
        parser.error("--batch-size and --block-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    if args.case is not None:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    where = "GPU: max_memory_allocated" if torch.cuda.is_available() else \
        "CPU: peak resident set (ru_maxrss, mark reset at the step's start)"
    print(f"# {cpu_name()}, torch {torch.__version__}, precision {args.precision}, batch {args.batch_size}, "
          f"block {args.block_size}; load average {os.getloadavg()}")
    print(f"# peak of step {MEASURED_STEP} above the process's memory at its start ({where}); imports, weights, "
          "optimizer state excluded; one fresh process per case")
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        folder = Path(tmp)
        bases = make_bases(folder, args.vocab, args.precision)
        for vocab in args.vocab:
            common = {"base": str(bases[vocab]), "folder": str(folder), "precision": args.precision,
                      "batch_size": args.batch_size, "block_size": args.block_size, "threads": args.threads}
            needed = {METHODS[m][0] for m in args.methods}
            baselines = {b: measure({**common, "name": f"{b}-{vocab}", "overrides": BASELINES[b]}) for b in needed}
            for method in args.methods:
                baseline, overrides = METHODS[method]
                result = measure({**common, "name": f"{method}-{vocab}", "overrides": overrides})
                base_peak = baselines[baseline]
                rows.append({"method": method, "vocab": vocab, "baseline": baseline, "baseline_mib":
                             base_peak["peak_mib"], "method_mib": result["peak_mib"], "tokens": result["tokens"],
                             "ratio": result["peak_mib"] / base_peak["peak_mib"]})
                print(f"  V={vocab} {method}: {rows[-1]['ratio']:.2f}x", flush=True)
    print(f"# load average after {os.getloadavg()}")
    print(f"{'method':<17} {'V':>7} {'tokens':>6} {'baseline':>8} {'base MiB':>9} {'method MiB':>10} {'ratio':>6}"
          f"  goal <= {TARGET_RATIO}")
    for row in rows:
        verdict = "ok" if row["ratio"] <= TARGET_RATIO else "MISSED"
        print(f"{row['method']:<17} {row['vocab']:>7} {row['tokens']:>6} {row['baseline']:>8} "
              f"{row['baseline_mib']:>9.0f} {row['method_mib']:>10.0f} {row['ratio']:>6.2f}  {verdict}")
    write_results(args.json, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
