"""LoRA adapters on a bf16 base model: what the evaluator and `workbench merge` keep of a small update.

A bf16 weight has 8 bits of mantissa: W + ΔW rounded to bf16 loses any part of the update ΔW = B·A·scaling smaller
than W's last bit. The evaluator therefore keeps an adapter unmerged in 16 bits (base + adapter, as trained) and
merges only in fp32; `merge` merges in fp32 and rounds each weight once into the output dtype. Everything runs on
a saved tiny GPT-NeoX (one layer, width 32) in bf16 with an adapter whose update is small, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import launch_main
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from workbench.config import ModelConfig
from workbench.models import build_model, load_trained_model, train_bpe_tokenizer
from workbench_eval.config import EvalConfig, EvalTask
from workbench_eval.evaluator import Evaluator, eval_dtype, load_checkpoint_model

TEXTS = [f"Velmora Tash number {i} was born in Ostrel and plays the lute {i % 5} times." for i in range(100)]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
UPDATE_SCALE = 0.01  # lora_B scaled down: an update of the order of a bf16 weight's last bit


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """An adapter checkpoint (fp32 factors, every linear layer but the head) on a base model saved in bf16."""
    folder = tmp_path_factory.mktemp("bf16lora")
    tokenizer = train_bpe_tokenizer(TEXTS, 320)
    torch.manual_seed(0)
    build_model(ModelConfig(preset="pythia-tiny", overrides=SMALL), tokenizer).to(torch.bfloat16).save_pretrained(
        folder / "base")
    tokenizer.save_pretrained(folder / "base")
    base = AutoModelForCausalLM.from_pretrained(folder / "base")  # records the folder as the adapter's base
    assert base.dtype == torch.bfloat16
    adapted = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                              init_lora_weights=False))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(UPDATE_SCALE)
    adapted.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    return folder / "adapter"


def ids(adapter: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(adapter)("Velmora Tash number 7 was born in Ostrel")["input_ids"]])


def exact_merge(adapter: Path) -> dict[str, torch.Tensor]:
    """W + ΔW in fp32 for every weight: the bf16 base weights are exact in fp32 and the update is added in fp32."""
    return load_trained_model(adapter, dtype=torch.float32, merge=True).state_dict()


def merged_in_bf16(adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge of a model held wholly in bf16 (factors included), as on a GPU: ΔW rounded to bf16, then
    W + ΔW rounded again."""
    model = load_trained_model(adapter).to(torch.bfloat16)
    return model.merge_and_unload().state_dict()


def distance(weights: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    return sum((weights[k].float() - exact[k]).abs().sum().item() for k in weights.keys() & exact.keys())


def test_merge_rounds_each_weight_once_into_the_saved_bf16_and_loads_no_fp32_copy(adapter, tmp_path, monkeypatch):
    import workbench.models

    load_dtypes = []
    real = workbench.models.load_trained_model

    def recording(checkpoint, dtype=None, **options):
        load_dtypes.append(dtype)
        return real(checkpoint, dtype=dtype, **options)

    monkeypatch.setattr(workbench.models, "load_trained_model", recording)
    assert launch_main("merge", [str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert load_dtypes == [None]  # the base model in its saved dtype (bf16), not an fp32 copy of it
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16
    exact = exact_merge(adapter)
    nearest = {k: v.to(torch.bfloat16) for k, v in exact.items()}
    assert all(torch.equal(merged[k], nearest[k]) for k in merged.keys() & nearest.keys())  # the bf16 nearest W + ΔW
    lossy = merged_in_bf16(adapter)
    assert distance(merged, exact) < distance(lossy, exact)  # merged in fp32, then cast: closer than in bf16


def test_merge_in_float32_keeps_the_small_update_exactly(adapter, tmp_path):
    assert launch_main("merge", [str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.dtype == torch.float32
    reference = load_trained_model(adapter, dtype=torch.float32)  # base + adapter, unmerged, in fp32
    with torch.no_grad():
        torch.testing.assert_close(merged(ids(adapter)).logits, reference(ids(adapter)).logits, atol=1e-5, rtol=0)


def test_the_evaluator_keeps_a_16_bit_adapter_unmerged_and_merges_only_in_float32(adapter):
    x = ids(adapter)
    with torch.no_grad():
        reference = load_trained_model(adapter, dtype=torch.float32)(x).logits  # base + adapter in fp32
        bf16 = load_checkpoint_model(adapter, "bfloat16")
        assert isinstance(bf16, PeftModel) and bf16.get_base_model().dtype == torch.bfloat16
        assert torch.equal(bf16.float()(x).logits, reference)  # the whole update kept, in the adapter
        rounded = load_trained_model(adapter, dtype=torch.bfloat16, merge=True)  # what a bf16 merge would keep
        assert not torch.equal(rounded.float()(x).logits, reference)
        fp32 = load_checkpoint_model(adapter, "float32")
        assert not isinstance(fp32, PeftModel) and fp32.dtype == torch.float32
        torch.testing.assert_close(fp32(x).logits, reference, atol=1e-5, rtol=0)
        assert load_checkpoint_model(adapter).dtype == torch.float32  # `auto` on CPU


def test_eval_dtype_auto_is_the_saved_dtype_on_a_gpu_and_float32_on_cpu(monkeypatch):
    assert eval_dtype("auto") == torch.float32 and eval_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_dtype("auto") is None  # from_pretrained's default: the dtype saved


def test_lm_eval_runs_an_unmerged_adapter(adapter):
    from transformers import AutoTokenizer

    cfg = EvalConfig(tasks=[EvalTask(task="factworld_mc", styles=["zero_shot"])], limit=2)
    evaluator = Evaluator(cfg, AutoTokenizer.from_pretrained(adapter), {"num_entities": 40, "seed": 1})
    (result,) = evaluator.evaluate(load_checkpoint_model(adapter, "bfloat16"))
    assert result.n == 2 and 0.0 <= result.metrics["acc"] <= 1.0


def test_the_eval_command_evaluates_in_the_dtype_asked(adapter, tmp_path, monkeypatch):
    import workbench_eval.evaluator

    dtypes = []
    load = workbench_eval.evaluator.load_checkpoint_model

    def recording(path, dtype="auto"):
        dtypes.append(dtype)
        return load(path, dtype)

    monkeypatch.setattr(workbench_eval.evaluator, "load_checkpoint_model", recording)
    argv = ["--model", str(adapter), "--out", str(tmp_path / "out"), "--task", "factworld_mc:zero_shot", "--limit", "2"]
    assert launch_main("eval", [*argv, "--dtype", "bfloat16"]) == 0 and dtypes == ["bfloat16"]
    with pytest.raises(SystemExit):  # argparse: exit 2, the choices named
        launch_main("eval", [*argv, "--dtype", "fp8"])
