"""EigenScore on 2 gloo ranks: each rank scores its share of the prompts, the scores are gathered on every rank
and equal the single-process ones; with generation synchronised across ranks (ZeRO-3's `synced_gpus`), the rank
with fewer prompts runs a dummy batch, so every generate call has its partner and nothing hangs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "metrics"))
from test_hallucination import PROMPTS, tiny_model_and_tokenizer  # noqa: E402

from workbench.metrics import hallucination  # noqa: E402
from workbench.metrics.hallucination import EigenScoreConfig, eigenscore_report  # noqa: E402

OPTIONS = {"samples": 4, "max_new_tokens": 5, "temperature": 1.5}
PROMPT_COUNT = 5  # shares 3 and 2: rank 1 runs one dummy batch of batch_size 1


def _rank(rank: int, store: str, out: str, synced: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        hallucination._zero3_world = lambda: synced  # ZeRO-3's lock-step generation, on gloo
        model, tokenizer = tiny_model_and_tokenizer()
        report = eigenscore_report(model, tokenizer, PROMPTS[:PROMPT_COUNT], EigenScoreConfig(**OPTIONS,
                                                                                             batch_size=1))
        Path(out, f"rank{rank}.json").write_text(json.dumps(report["items"]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("synced", [False, True], ids=["ddp", "zero3-synced"])
def test_two_ranks_score_their_shares_and_gather_the_single_process_scores(tmp_path, synced):
    model, tokenizer = tiny_model_and_tokenizer()
    want = eigenscore_report(model, tokenizer, PROMPTS[:PROMPT_COUNT], EigenScoreConfig(**OPTIONS))["items"]
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path), synced), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(got) == set(want)
        for name, values in want.items():
            assert got[name] == pytest.approx(values, rel=1e-6, abs=1e-6, nan_ok=True)
