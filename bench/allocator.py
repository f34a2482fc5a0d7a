"""What the memory allocator costs a tiny model's training step: glibc's malloc vs tcmalloc, measured interleaved.

    python bench/allocator.py [--steps 15] [--repeats 3] [--threads 1] [--parallel 1]

Each measurement is a new interpreter (an allocator is chosen when a process starts, `LD_PRELOAD`) that times
AdamW forward+backward+step of models the reproductions train: `pythia-tiny` on 16 x 128 tokens (the
repetition studies), its 4-layer version on 16 x 256 tokens (the BOSE experiments) and the moe-proxy study's
`mixtral-tiny` and `mixtral-dense-tiny` on 16 x 128, with one torch thread,
as a run of `--parallel 2` has on two cores. Allocators alternate repeat by repeat so both see the same
machine state. Prints ms per step (median over repeats), the ratio tcmalloc / glibc, and whether the final
losses are bit-identical (they should be: only where memory comes from differs). `workbench.processes` starts
study and experiment runs with tcmalloc where the machine has it. Never a timed assert: the ratio is the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

MODELS = {"pythia-tiny, 16 x 128": ("pythia-tiny", 128, {}),
          "pythia-tiny 4 layers, 16 x 256": ("pythia-tiny", 256, {"num_hidden_layers": 4}),
          "mixtral-tiny, 16 x 128": ("mixtral-tiny", 128, {}),
          "mixtral-dense-tiny, 16 x 128": ("mixtral-dense-tiny", 128, {})}


def child(preset: str, block: int, overrides: dict, steps: int, threads: int) -> None:
    """Time `steps` training steps here; print 'ms_per_step final_loss'."""
    import torch
    from moe_proxy_cost import tokenizer_of_size

    from workbench.config import ModelConfig
    from workbench.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, overrides=overrides), tokenizer_of_size(2048)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 2048, (16, block))

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    print(f"{(time.perf_counter() - start) / steps * 1000:.3f} {loss!r}")


def measure(name: str, library: str | None, args: argparse.Namespace) -> tuple[float, str]:
    """ms per step (the mean over `--parallel` processes timed at once) and the final loss."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if library:
        env.update(LD_PRELOAD=library, TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40))
    command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--threads", str(args.threads)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(args.parallel)]
    outputs = [process.communicate()[0].split() for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a timing process of {name} failed")
    return statistics.mean(float(out[-2]) for out in outputs), outputs[0][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1,
                        help="processes timed at once (2: as a study with --parallel 2 loads two cores)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*MODELS[args.child], args.steps, args.threads)
        return 0
    from workbench.processes import allocator_env

    library = allocator_env().get("LD_PRELOAD")
    if not library:
        print("no tcmalloc here (e.g. apt install libtcmalloc-minimal4), or WORKBENCH_MALLOC=system / LD_PRELOAD "
              "is set: nothing to compare")
        return 1
    print(f"{args.parallel} process(es) at once, {args.threads} torch thread(s) each, {args.steps} steps x "
          f"{args.repeats} repeats, interleaved; tcmalloc = {library}")
    for name in MODELS:
        times: dict[str, list[float]] = {"glibc": [], "tcmalloc": []}
        losses: dict[str, set[str]] = {"glibc": set(), "tcmalloc": set()}
        for _ in range(args.repeats):
            for allocator, preload in (("glibc", None), ("tcmalloc", library)):
                ms, loss = measure(name, preload, args)
                times[allocator].append(ms)
                losses[allocator].add(loss)
        glibc, tcmalloc = statistics.median(times["glibc"]), statistics.median(times["tcmalloc"])
        same = "bit-identical" if losses["glibc"] == losses["tcmalloc"] and len(losses["glibc"]) == 1 else \
            f"DIFFERENT ({sorted(losses['glibc'])} vs {sorted(losses['tcmalloc'])})"
        print(f"  {name:32s} glibc {glibc:7.1f} ms/step, tcmalloc {tcmalloc:7.1f} ms/step, "
              f"tcmalloc / glibc {tcmalloc / glibc:.3f}; final losses {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
