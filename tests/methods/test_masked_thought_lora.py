"""Masked Thought's added `<mask>` on LoRA: the adapter checkpoint carries the frozen `<mask>` embedding rows, and
the evaluator's loader and `workbench merge` rebuild the trained model from it, for tied and untied embeddings and
for a padded vocabulary that does not grow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import launch_main, tiny_config, train_main, write_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from workbench.config import load_config
from workbench.models import load_trained_model
from workbench.models.lora import ADAPTER_WEIGHTS, ADDED_ROWS
from workbench.run import train

ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}
BASES = {  # name: (preset, extra overrides); tiny_config's vocabulary is 320 tokens
    "untied": ("pythia-tiny", {}),
    "tied": ("llama-tiny", {"num_key_value_heads": 2}),
    "untied-padded": ("pythia-tiny", {"vocab_size": 384}),  # <mask> takes a padding row: nothing grows
}


class FinalLogits(TrainerCallback):
    """Records the trained model's logits on `input_ids` at the end of training (in eval mode)."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids, self.logits = input_ids, None

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.input_ids).logits
        model.train()


def _lora_mask_run(tmp_path: Path, base: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A base run of `BASES[base]`, then 2 LoRA + Masked Thought (`<mask>`) steps on it: (its checkpoint, the
    probe's input ids with `<mask>` among them, the trained model's logits on them)."""
    preset, overrides = BASES[base]
    base_cfg = tiny_config(tmp_path, name="base")
    base_cfg["model"] = {**base_cfg["model"], "preset": preset,
                         "overrides": {**base_cfg["model"]["overrides"], **overrides}}
    assert train_main([str(write_config(tmp_path, base_cfg, "base.yaml"))]) == 0
    cfg = tiny_config(tmp_path, name="ft", data=ARITHMETIC, methods={"masked_thought": {"p_max": 0.4}})
    cfg["model"] = {"preset": None, "name_or_path": str(tmp_path / "runs" / "base"),
                    "lora": {"r": 4, "lora_dropout": 0.0}}
    cfg["training"] = {**cfg["training"], "max_steps": 2, "save_steps": 2, "learning_rate": 1e-2,
                       "lr_scheduler_type": "constant"}
    mask_id = 320  # the tokenizer's 320 tokens, then <mask>
    input_ids = torch.tensor([[5, 17, mask_id, 40, mask_id, 3, 99, 250]])
    probe = FinalLogits(input_ids)
    train(load_config(write_config(tmp_path, cfg, "ft.yaml")), callbacks=[probe])
    checkpoint = tmp_path / "runs" / "ft" / "checkpoint-2"
    assert AutoTokenizer.from_pretrained(str(checkpoint)).mask_token_id == mask_id
    return checkpoint, input_ids, probe.logits


@pytest.mark.parametrize("base", list(BASES))
def test_a_lora_mask_run_loads_and_merges_into_the_model_it_trained(tmp_path, base):
    checkpoint, input_ids, trained = _lora_mask_run(tmp_path, base)
    for merge in (False, True):
        model = load_trained_model(checkpoint, merge=merge)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-5)
    out = tmp_path / "merged"
    assert launch_main("merge", [str(checkpoint), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, trained, rtol=1e-5, atol=1e-5)
    assert merged.config.tie_word_embeddings == (base == "tied")
    with safe_open(str(checkpoint / ADDED_ROWS), framework="pt") as handle:  # the frozen rows, saved
        assert handle.get_tensor("token_ids").tolist() == [320]
        assert ("output" in set(handle.keys())) == (base != "tied")  # noqa: SIM118
    with safe_open(str(checkpoint / ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())  # noqa: SIM118 (a safetensors handle is not iterable)
        assert not any(handle.get_slice(k).get_shape()[0] < 321 for k in keys if "lora_" not in k)
