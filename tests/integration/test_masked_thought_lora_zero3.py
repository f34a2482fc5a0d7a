"""Masked Thought's added `<mask>` on LoRA under ZeRO-3 (1 CPU rank, 2 steps): the Trainer saves no frozen weight
there, so the adapter file holds no embedding matrix; the checkpoint's `added_token_embeddings.safetensors`
carries the `<mask>` rows, and the loader rebuilds the grown embeddings from it (the mean of the base's rows)."""

from __future__ import annotations

import torch
from conftest import deepspeed_train, tiny_config, train_main, write_config, zero_json
from safetensors import safe_open

from workbench.checkpoints import verify_checkpoint
from workbench.models import load_trained_model
from workbench.models.lora import ADAPTER_WEIGHTS, ADDED_ROWS

ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}


def test_a_lora_mask_run_under_zero3_saves_the_mask_rows_and_loads(tmp_path):
    assert train_main([str(write_config(tmp_path, tiny_config(tmp_path, name="base"), "base.yaml"))]) == 0
    base = tmp_path / "runs" / "base"
    cfg = tiny_config(tmp_path, name="ft", data=ARITHMETIC, methods={"masked_thought": {"p_max": 0.4}},
                      deepspeed=zero_json(tmp_path, 3))
    cfg["model"] = {"preset": None, "name_or_path": str(base), "lora": {"r": 4, "lora_dropout": 0.0}}
    cfg["training"] = {**cfg["training"], "max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4}
    deepspeed_train(write_config(tmp_path, cfg, "ft.yaml"), 1, 29871)
    checkpoint = tmp_path / "runs" / "ft" / "checkpoint-2"
    verify_checkpoint(checkpoint)
    with safe_open(str(checkpoint / ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())  # noqa: SIM118 (a safetensors handle is not iterable)
        assert all("lora_" in key for key in keys)  # ZeRO-3: no frozen embedding matrix saved
    with safe_open(str(checkpoint / ADDED_ROWS), framework="pt") as handle:
        assert handle.get_tensor("token_ids").tolist() == [320]
    pretrained = load_trained_model(sorted(base.glob("checkpoint-*"))[-1])
    model = load_trained_model(checkpoint, merge=True)
    for trained, original in ((model.get_input_embeddings(), pretrained.get_input_embeddings()),
                              (model.get_output_embeddings(), pretrained.get_output_embeddings())):
        assert trained.weight.shape[0] == 321
        torch.testing.assert_close(trained.weight[:320], original.weight)  # frozen
        torch.testing.assert_close(trained.weight[320], original.weight.mean(0), rtol=1e-5, atol=1e-6)
