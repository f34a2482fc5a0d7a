"""EigenScore of sampled answers: which tokens are the answer, the pooled embeddings against a per-sequence
computation, seeding, batched prompts against one at a time, the rank shards, the callback in a plain `Trainer`,
and the evaluator's `eigenscore` task."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import launch_main, tiny_config, train_main, write_config
from datasets import Dataset
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
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
    prompt_shard,
    sample_answers,
    shard_batches,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "home"]
PROMPTS = ["the cat", "a dog ran far", "home", "the mat sat on a", "dog", "far"]  # of 1 to 5 tokens


def tiny_model_and_tokenizer(family: str = "neox"):
    """A 4-block random model over a 12-token word-level vocabulary (<pad> 0, <eos> 1) and its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    shared = {"vocab_size": len(vocab), "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
              "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shared, num_key_value_heads=1, intermediate_size=24))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shared, intermediate_size=32))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model_and_tokenizer()


def test_the_answer_stops_before_the_first_end_token():
    sequences = torch.tensor([[5, 6, 7, 8, 1, 0], [5, 6, 1, 0, 0, 0], [5, 6, 7, 7, 7, 7]])
    mask = _answer_mask(sequences, prompt_length=2, eos_id=1, pad_id=0)
    assert mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_match_each_answer_run_alone(model_and_tokenizer, pooling):
    model, tokenizer = model_and_tokenizer
    """Two left-padded prompts in one batch: each answer's embedding and entropy are those of its unpadded
    sequence (prompt + answer) run alone."""
    config = EigenScoreConfig(samples=6, max_new_tokens=5, pooling=pooling, temperature=2.0)
    prompts = ["the cat", "a dog ran far"]
    sampled = sample_answers(model, tokenizer, prompts, config, seeds=[3, 4])
    with torch.no_grad():
        embeddings, entropy = answer_embeddings(model, sampled, config)
    prompt_length = sampled.prompt_length
    assert prompt_length == 4 and len(sampled.sequences) == 12
    assert {int(sampled.answer[k].sum()) for k in range(12)} - {0} and sampled.answer[:, :prompt_length].sum() == 0
    for k in range(len(sampled.sequences)):
        prompt = tokenizer(prompts[k // 6], add_special_tokens=False)["input_ids"]
        assert sampled.sequences[k, prompt_length - len(prompt):prompt_length].tolist() == prompt
        n = int(sampled.answer[k].sum())
        ids = torch.cat([torch.tensor(prompt), sampled.sequences[k, prompt_length:prompt_length + n]]).unsqueeze(0)
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states[len(out.hidden_states) // 2][0]  # the middle layer, as INSIDE
        if n == 0:
            want = hidden[len(prompt) - 1]
        else:
            want = hidden[-1] if pooling == "last" else hidden[len(prompt):].mean(0)
            probs = torch.softmax(out.logits[0, len(prompt) - 1: len(prompt) + n - 1].double(), -1)
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
    with torch.no_grad():
        embeddings, _ = answer_embeddings(model, sample_answers(model, tokenizer, ["the cat"], config, [0]), config)
    assert math.isclose(a["items"]["eigenscore"][0], float(eigenscore(embeddings.double())), rel_tol=1e-9)


@pytest.mark.parametrize(("family", "pooling"), [("neox", "last"), ("llama", "mean")])
def test_batched_prompts_score_as_one_at_a_time(family, pooling):
    """Prompts of 1 to 5 tokens, 4 per generate call (left-padded) or one per call: the same samples (each
    prompt has its own seed) and so the same scores, to float rounding."""
    model, tokenizer = tiny_model_and_tokenizer(family)
    options = {"samples": 5, "max_new_tokens": 6, "temperature": 1.5, "pooling": pooling}
    alone = eigenscore_report(model, tokenizer, PROMPTS, EigenScoreConfig(**options, batch_size=1))
    batched = eigenscore_report(model, tokenizer, PROMPTS, EigenScoreConfig(**options, batch_size=4))
    assert alone["items"]["answer_tokens"] == batched["items"]["answer_tokens"]
    assert len(set(alone["items"]["answer_tokens"])) > 1  # answers of different lengths were drawn
    for name in ("ees", "eigenscore", "entropy"):
        assert batched["items"][name] == pytest.approx(alone["items"][name], rel=1e-6, abs=1e-6, nan_ok=True)


def test_each_prompt_is_sampled_from_its_own_seed(model_and_tokenizer):
    """A prompt's answers do not change with the prompts batched beside it, and do change with its seed."""
    model, tokenizer = model_and_tokenizer
    config = EigenScoreConfig(samples=4, max_new_tokens=5, temperature=2.0)
    alone = sample_answers(model, tokenizer, ["dog"], config, seeds=[7])
    beside = sample_answers(model, tokenizer, ["the mat sat on a", "dog"], config, seeds=[2, 7])
    other_seed = sample_answers(model, tokenizer, ["dog"], config, seeds=[8])
    width = alone.answer.sum(1).max()

    def answers(s):
        return s.sequences[:, s.prompt_length:s.prompt_length + width] * s.answer[:, s.prompt_length:][:, :width]

    assert torch.equal(answers(beside)[4:], answers(alone))
    assert not torch.equal(answers(other_seed), answers(alone))


def test_prompt_shards_tile_the_prompts_and_every_rank_runs_as_many_batches():
    for count, world, batch_size in [(6, 2, 2), (7, 3, 2), (2, 4, 1), (5, 1, 8), (9, 4, 3)]:
        shards = [prompt_shard(count, world, rank) for rank in range(world)]
        assert [i for shard in shards for i in shard] == list(range(count))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        plans = [shard_batches(count, world, rank, batch_size) for rank in range(world)]
        totals = {len(batches) + dummies for batches, dummies in plans}
        assert totals == {math.ceil(math.ceil(count / world) / batch_size)}
        for shard, (batches, _) in zip(shards, plans, strict=True):
            assert [i for batch in batches for i in batch] == list(shard)
            assert all(1 <= len(batch) <= batch_size for batch in batches)
    assert shard_batches(7, 3, 2, 2) == ([range(5, 7)], 1)  # shares 3, 2, 2: two batches on rank 0, one here
    assert shard_batches(2, 4, 3, 1) == ([], 1)  # no prompt for rank 3: one dummy batch


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="samples must be >= 2"):
        EigenScoreConfig(samples=1)
    with pytest.raises(ValueError, match="pooling"):
        EigenScoreConfig(pooling="first")
    with pytest.raises(ValueError, match="batch_size"):
        EigenScoreConfig(batch_size=0)


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
