"""What a training step costs on the MoE proxy vs its dense twin (repetition study 4), measured interleaved.

    python bench/moe_proxy_cost.py [--steps 20] [--repeats 5] [--batch 16] [--block 128]

Builds `mixtral-tiny` (4 experts of width 256, top-1) and `mixtral-dense-tiny` (one FFN of width 1024) with
the same vocabulary, and times AdamW forward+backward+step on the same random batches, alternating the two
models repeat by repeat so both see the same machine state. Prints FLOPs by active parameters (the 6N rule,
`workbench/models/flops.py`), seconds per step (median over repeats) and the dense / MoE ratios. Never a
timed assert: the ratio is the result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import cpu_name, set_threads
from transformers import PreTrainedTokenizerFast

from workbench.config import ModelConfig
from workbench.models import build_model
from workbench.models.flops import active_parameters, training_flops
from workbench.models.tokenizer import train_bpe_tokenizer

PAIR = ("mixtral-tiny", "mixtral-dense-tiny")


def tokenizer_of_size(vocab: int) -> PreTrainedTokenizerFast:
    texts = [f"entity {i} lives in town {i % 97} and likes colour {i % 13}" for i in range(4000)]
    return train_bpe_tokenizer(texts, vocab)


def seconds_per_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args(argv)
    threads = set_threads()
    torch.manual_seed(0)
    tokenizer = tokenizer_of_size(2048)
    models = {name: build_model(ModelConfig(preset=name), tokenizer).train() for name in PAIR}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    batches = [torch.randint(0, len(tokenizer), (args.batch, args.block)) for _ in range(args.steps)]
    for name in PAIR:  # warm-up
        seconds_per_step(models[name], optimizers[name], batches[:3])
    times: dict[str, list[float]] = {name: [] for name in PAIR}
    for repeat in range(args.repeats):
        for name in PAIR if repeat % 2 == 0 else PAIR[::-1]:
            times[name].append(seconds_per_step(models[name], optimizers[name], batches))
    print(f"{cpu_name()}, {threads} threads, fp32; batch {args.batch} x {args.block} tokens, "
          f"{args.steps} steps x {args.repeats} repeats, interleaved")
    tokens = args.batch * args.block
    rows = {}
    for name in PAIR:
        active = active_parameters(models[name])
        flops = training_flops(active, tokens)
        rows[name] = (models[name].num_parameters(), active, flops, statistics.median(times[name]))
        print(f"  {name:20s} parameters {rows[name][0] / 1e6:.3f}M, active {rows[name][1] / 1e6:.3f}M, "
              f"{flops / 1e9:.2f} GFLOP/step, {rows[name][3] * 1e3:.1f} ms/step (median; "
              f"min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f})")
    dense, moe = rows[PAIR[1]], rows[PAIR[0]]
    print(f"dense / MoE: FLOPs {dense[2] / moe[2]:.2f}x, wall time per step {dense[3] / moe[3]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
