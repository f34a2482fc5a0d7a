"""EigenScore of sampled answers: which tokens are the answer, the pooled embeddings against a per-sequence
computation, seeding, the callback in a plain `Trainer`, and the evaluator's `eigenscore` task."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import launch_main, tiny_config, train_main, write_config
from datasets import Dataset
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from workbench.io import read_jsonl
from workbench.metrics.eigenscore import eigenscore
from workbench.metrics.hallucination import (
    EigenScoreCallback,
    EigenScoreConfig,
    _answer_mask,
    answer_embeddings,
    eigenscore_report,
    sample_answers,
)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "home"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=4,
                                             num_attention_heads=2, intermediate_size=32, pad_token_id=0,
                                             eos_token_id=1, bos_token_id=1))
    return model.eval(), tokenizer


def test_the_answer_stops_before_the_first_end_token():
    sequences = torch.tensor([[5, 6, 7, 8, 1, 0], [5, 6, 1, 0, 0, 0], [5, 6, 7, 7, 7, 7]])
    mask = _answer_mask(sequences, prompt_length=2, eos_id=1, pad_id=0)
    assert mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_match_each_answer_run_alone(model_and_tokenizer, pooling):
    model, tokenizer = model_and_tokenizer
    config = EigenScoreConfig(samples=6, max_new_tokens=5, pooling=pooling, temperature=2.0)
    sequences, answer, prompt_length = sample_answers(model, tokenizer, "the cat", config, seed=3)
    with torch.no_grad():
        embeddings, entropy = answer_embeddings(model, sequences, answer, prompt_length, config)
    for k in range(len(sequences)):
        n = int(answer[k].sum())
        ids = sequences[k, : prompt_length + n].unsqueeze(0)
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states[len(out.hidden_states) // 2][0]  # the middle layer, as INSIDE
        if n == 0:
            want = hidden[prompt_length - 1]
        else:
            want = hidden[-1] if pooling == "last" else hidden[prompt_length:].mean(0)
            probs = torch.softmax(out.logits[0, prompt_length - 1: prompt_length + n - 1].double(), -1)
            want_entropy = float(-(probs * probs.log()).sum(-1).mean())
            assert math.isclose(float(entropy[k]), want_entropy, rel_tol=1e-4)
        torch.testing.assert_close(embeddings[k], want, rtol=1e-4, atol=1e-5)


def test_report_is_seeded_and_leaves_the_global_rng_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = EigenScoreConfig(samples=5, max_new_tokens=4, temperature=1.5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = eigenscore_report(model, tokenizer, ["the cat", "a dog ran"], config)
    assert torch.equal(torch.get_rng_state(), before)
    b = eigenscore_report(model, tokenizer, ["the cat", "a dog ran"], config)
    assert a["items"] == b["items"] and set(a["items"]) == {"ees", "eigenscore", "entropy", "answer_tokens"}
    assert abs(a["ees"] - a["eigenscore"]) < 0.05 * abs(a["eigenscore"])
    sequences, answer, prompt_length = sample_answers(model, tokenizer, "the cat", config, seed=0)
    with torch.no_grad():
        embeddings, _ = answer_embeddings(model, sequences, answer, prompt_length, config)
    assert math.isclose(a["items"]["eigenscore"][0], float(eigenscore(embeddings.double())), rel_tol=1e-9)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="samples must be >= 2"):
        EigenScoreConfig(samples=1)
    with pytest.raises(ValueError, match="pooling"):
        EigenScoreConfig(pooling="first")


class _Reporter(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self.logs.append(dict(logs or {}))


def test_callback_logs_in_a_plain_trainer(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    data = Dataset.from_dict({"input_ids": [[2, 3, 4, 5, 6, 7, 8, 9]] * 16, "labels": [[2, 3, 4, 5, 6, 7, 8, 9]] * 16})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                             logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    callback = EigenScoreCallback(["the cat", "a dog"], tokenizer, EigenScoreConfig(samples=4, max_new_tokens=3))
    reporter = _Reporter()  # stands for TensorBoard and metrics.jsonl: a callback after it that reads the logs
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[reporter])
    trainer.callback_handler.callbacks.insert(0, callback)
    trainer.train()
    logged = [r for r in reporter.logs if "eigenscore_ees" in r]
    assert [r["eigenscore_step"] for r in logged] == [2, 4]
    assert all(math.isfinite(r["eigenscore_ees"]) and math.isfinite(r["eigenscore_entropy"]) for r in logged)


def test_evaluator_task_and_completion_style(tmp_path):
    cfg = tiny_config(tmp_path, name="es", training={"max_steps": 4, "save_steps": 2})
    assert train_main([str(write_config(tmp_path, cfg))]) == 0
    run = tmp_path / "runs" / "es"
    argv = [str(run), "--task", "eigenscore", "--task", "factworld_qa:completion", "--limit", "3"]
    assert launch_main("eval", argv) == 0
    records = read_jsonl(run / "eval" / "results.jsonl")
    cells = {(r["checkpoint"], r["task"], r["style"], r["metric"]) for r in records}
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        for metric in ("ees", "eigenscore", "entropy"):
            assert (checkpoint, "eigenscore", "completion", metric) in cells
        assert (checkpoint, "factworld_qa", "completion", "em") in cells
    assert all(r["n"] == 3 for r in records)
    assert (run / "eval" / "eigenscore.png").is_file()
    assert launch_main("eval", [str(run), "--task", "eigenscore:answer"]) == 2


def test_every_fact_question_has_a_completion_prompt():
    from workbench_eval.data import factworld_qa
    from workbench_eval.specs import SpecReader, load_spec

    read = SpecReader(load_spec("factworld_qa"))
    for doc in factworld_qa(num_entities=60, seed=3)["test"]:
        before, _ = read.cloze(doc)
        assert before and doc["answer"] not in before
