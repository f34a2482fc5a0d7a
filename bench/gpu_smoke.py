"""The GPU smoke check: the paths a GPU user takes first, a few steps each, one line per check.

    bash bench/gpu_smoke.sh [WHEELS_DIR]        # install offline from a folder of wheels, then run this
    python bench/gpu_smoke.py                   # already installed: every GPU this machine has
    python bench/gpu_smoke.py --ranks 1 --only quickstart-resume lora-base-zero3

Each check launches `deepspeed --num_gpus N --module workbench_cli.train` (or the evaluator, or a bench script) in
its own process, writes its log to `WORKDIR/<check>.log` and prints one line: PASS or FAIL, seconds, and what it
measured (on a failure, the last error line and the log's path). Under 5 minutes on one H100; it also runs on a
CPU-only machine (slowly, ranks become CPU processes, memory is the peak resident set), which is how it is tested.

Checks, in order (later ones start from the runs of earlier ones):
  quickstart-resume   the quickstart for 40 steps (ZeRO-2, `training.full_determinism`), checkpoint-40 deleted and
                      resumed from checkpoint-20: resumed weights bit-equal to the uninterrupted ones, or the
                      largest difference
  lora-base-zero3     LoRA fine-tuning on arithmetic (ZeRO-3), then that LoRA run as the base of full fine-tuning
                      under ZeRO-3 (every parameter trainable)
  send-zero3          SeND with tracking every 2 steps (ZeRO-3)
  smoe-zero3          SMoE-Dropout conversion of the ~21M pythia-medium preset into 16 experts (ZeRO-3)
  sinkd-zero3         SinKD from the quickstart run as teacher (ZeRO-3, per-sequence Sinkhorn, default top-k)
  masked-thought-lora Masked Thought on a LoRA run (ZeRO-3)
  allora-update       ALLoRA, `apply: update` (ZeRO-3)
  eval-on-save        evaluation on save at two checkpoints, the device memory after each (one model copy at most)
  eigenscore          EigenScore of sampled continuations: batched over prompts against one prompt at a time
  sinkd-memory-32k    peak memory of one SinKD step at a 32k vocabulary with the default settings, against the
                      plain step (bench/memory.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_LIMIT = 600  # seconds any one launched process may take


class Smoke:
    """What the checks share: the work folder, the rank count, and how to launch a run there."""

    def __init__(self, workdir: Path, ranks: int, device: str) -> None:
        self.workdir, self.ranks, self.device = workdir, ranks, device
        self.runs = workdir / "runs"
        self.port = 29950

    def launch(self, log: Path, command: list[str]) -> str:
        """Run `command` in the work folder with its output in `log`; the output, or RuntimeError with its
        last error line."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        start = log.stat().st_size if log.exists() else 0
        with log.open("a") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=STEP_LIMIT)
        with log.open() as written:
            written.seek(start)
            text = written.read()
        if result.returncode != 0:
            raise RuntimeError(f"exit {result.returncode}: {last_error(text)}")
        return text

    def train(self, log: Path, config: str, *settings: str, resume: bool = False) -> str:
        """`deepspeed --num_gpus R --module workbench_cli.train config --set ...` (runs go to WORKDIR/runs, a log
        line every step); its output."""
        self.port += 1
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(self.ranks),
                   "--master_port", str(self.port), "--module", "workbench_cli.train", config]
        for setting in (f"runs_dir={self.runs}", "training.report_to=[]", "training.disable_tqdm=true",
                        "training.logging_steps=1", *settings):
            command += ["--set", setting]
        return self.launch(log, command + (["--resume"] if resume else []))

    def python(self, log: Path, *args: str) -> str:
        return self.launch(log, [sys.executable, *args])


def last_error(text: str) -> str:
    """The last line of a log that says what went wrong."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error:", "Exception", "FAILED")):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def final_loss(run: Path) -> str:
    losses = [row["loss"] for row in metrics(run) if "loss" in row]
    return f"last loss {losses[-1]:.3f}" if losses else "no loss logged"


# --- the checks ---------------------------------------------------------------------------------------------
ZERO3 = "deepspeed=configs/deepspeed/zero3.json"
FINETUNE = "configs/finetune/arithmetic-lora.yaml"
SHORT = ("training.eval_strategy=no", "eval.on_save=false")


def quickstart_resume(smoke: Smoke, log: Path) -> str:
    settings = ("training.max_steps=40", "training.save_steps=20", "training.eval_steps=20",
                "training.full_determinism=true", "name=quickstart")
    smoke.train(log, "configs/quickstart.yaml", *settings)
    run = smoke.runs / "quickstart"
    uninterrupted = load_weights(run / "checkpoint-40")
    shutil.rmtree(run / "checkpoint-40")
    smoke.train(log, "configs/quickstart.yaml", *settings, resume=True)
    resumed = load_weights(run / "checkpoint-40")
    largest = max(float((uninterrupted[k].double() - resumed[k].double()).abs().max()) for k in uninterrupted)
    verdict = "bit-equal" if largest == 0 else f"max |diff| {largest:.2e}"
    return f"40 steps on {smoke.ranks} rank(s), resumed from checkpoint-20: {verdict}; {final_loss(run)}"


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def lora_base_zero3(smoke: Smoke, log: Path) -> str:
    base = f"model.name_or_path={smoke.runs / 'quickstart'}"
    smoke.train(log, FINETUNE, base, ZERO3, *SHORT, "training.max_steps=6", "training.save_steps=6",
                "name=lora")
    out = smoke.train(log, FINETUNE, f"model.name_or_path={smoke.runs / 'lora'}", "model.lora=null", ZERO3, *SHORT,
                      "training.max_steps=4", "training.save_steps=4", "training.learning_rate=1e-4",
                      "name=full-from-lora")
    trainable = next((line.strip() for line in out.splitlines() if "trainable" in line), "no parameter count")
    if "trainable, 100.0%" not in trainable:
        raise RuntimeError(f"full fine-tuning from a LoRA run must train every parameter: {trainable}")
    return f"full fine-tuning from the LoRA run, every parameter trainable; {final_loss(smoke.runs / 'full-from-lora')}"


def send_zero3(smoke: Smoke, log: Path) -> str:
    smoke.train(log, "configs/quickstart.yaml", ZERO3, *SHORT, "training.max_steps=8", "training.save_steps=8",
                "methods={send: {track_every: 2, window: 2, drop_intervals: 2, tracking_max: 32}}", "name=send")
    dropped = [row for row in metrics(smoke.runs / "send") if any(k.startswith("send") for k in row)]
    return f"{len(dropped)} log rows with SeND metrics; {final_loss(smoke.runs / 'send')}"


def smoe_zero3(smoke: Smoke, log: Path) -> str:
    smoke.train(log, "configs/quickstart.yaml", ZERO3, *SHORT, "model.preset=pythia-medium",
                "training.max_steps=6", "training.save_steps=6", "training.per_device_train_batch_size=8",
                "methods={smoe_dropout: {experts: 16}}", "name=smoe")
    return f"pythia-medium as 16 experts per MLP; {final_loss(smoke.runs / 'smoe')}"


def sinkd_zero3(smoke: Smoke, log: Path) -> str:
    teacher = smoke.runs / "quickstart"
    smoke.train(log, "configs/quickstart.yaml", ZERO3, *SHORT, "training.max_steps=6", "training.save_steps=6",
                f"model.tokenizer={teacher / 'tokenizer'}", "model.overrides={num_hidden_layers: 1}",
                f"methods={{sinkd: {{teacher: {teacher}}}}}", "name=sinkd")
    return f"student of 1 layer from the quickstart teacher; {final_loss(smoke.runs / 'sinkd')}"


def masked_thought_lora(smoke: Smoke, log: Path) -> str:
    smoke.train(log, FINETUNE, f"model.name_or_path={smoke.runs / 'quickstart'}", ZERO3, *SHORT,
                "training.max_steps=6", "training.save_steps=6", "methods={masked_thought: {}}", "name=mft")
    return final_loss(smoke.runs / "mft")


def allora_update(smoke: Smoke, log: Path) -> str:
    smoke.train(log, FINETUNE, f"model.name_or_path={smoke.runs / 'quickstart'}", ZERO3, *SHORT,
                "model.lora.lora_dropout=0.0", "training.max_steps=6", "training.save_steps=6",
                "methods={allora: {apply: update}}", "name=allora")
    return final_loss(smoke.runs / "allora")


def eval_on_save(smoke: Smoke, log: Path) -> str:
    out = smoke.train(log, FINETUNE, f"model.name_or_path={smoke.runs / 'quickstart'}", "training.max_steps=4",
                      "training.save_steps=2", "training.eval_strategy=no", "eval.on_save_limit=8", "name=evalsave")
    lines = [line.split("] ", 1)[1] for line in out.splitlines() if "evaluated on save" in line]
    return "; ".join(lines) if lines else "no evaluation on save reported"


def eigenscore(smoke: Smoke, log: Path) -> str:
    out = smoke.python(log, str(REPO / "bench" / "eigenscore.py"), "--quick", "--no-sweep", "--device", smoke.device)
    lines = [line.strip() for line in out.splitlines() if "batched" in line]
    return lines[-1] if lines else last_error(out)


def sinkd_memory(smoke: Smoke, log: Path) -> str:
    out = smoke.python(log, str(REPO / "bench" / "memory.py"), "--methods", "sinkd", "--vocab", "32000")
    lines = [line.strip() for line in out.splitlines() if "sinkd" in line]
    return lines[-1] if lines else last_error(out)


CHECKS: dict[str, Callable[[Smoke, Path], str]] = {
    "quickstart-resume": quickstart_resume,
    "lora-base-zero3": lora_base_zero3,
    "send-zero3": send_zero3,
    "smoe-zero3": smoe_zero3,
    "sinkd-zero3": sinkd_zero3,
    "masked-thought-lora": masked_thought_lora,
    "allora-update": allora_update,
    "eval-on-save": eval_on_save,
    "eigenscore": eigenscore,
    "sinkd-memory-32k": sinkd_memory,
}


def device_summary() -> tuple[str, int, str]:
    """What this machine trains on (for the first line), its GPU count (1 without GPUs) and its device type."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"{torch.cuda.device_count()} x {name}, torch {torch.__version__}", torch.cuda.device_count(), "cuda"
    return f"no GPU (CPU processes), torch {torch.__version__}", 1, "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=None, help="ranks per run (default: every GPU, else 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs and logs go (default: a temp dir)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run only these checks")
    args = parser.parse_args(argv)
    summary, gpus, device = device_summary()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="workbench-smoke-"))
    workdir.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(workdir, args.ranks or gpus, device)
    print(f"workbench GPU smoke check: {summary}; {smoke.ranks} rank(s); logs in {workdir}", flush=True)
    failed = 0
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        log = workdir / f"{name}.log"
        start = time.monotonic()
        try:
            detail, status = check(smoke, log), "PASS"
        except Exception as err:  # one line per check, whatever went wrong: the log has the rest
            detail, status = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} ({log})", "FAIL"
            failed += 1
        print(f"{status}  {name:<20} {time.monotonic() - start:6.1f} s  {detail}", flush=True)
    print(f"{'all checks passed' if not failed else f'{failed} check(s) failed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
