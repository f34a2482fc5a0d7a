"""Masked Thought: which tokens the collator masks and how often, the schedule and the step each batch belongs to
(accumulation, dataloader workers, resume, ranks), the <mask> embedding, options, and use in a plain SFTTrainer."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN, deepspeed_command, run, tiny_config, train_main, write_config
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import TrainerControl, TrainerState, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from workbench.collators import MaskedThoughtCollator, MaskSchedule, add_mask_token, init_mask_embedding
from workbench.config import ModelConfig, load_config
from workbench.distributed_launch import free_port
from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.methods.masked_thought import MaskedThought, MaskedThoughtConfig
from workbench.models import build_model, train_bpe_tokenizer

EOS, PAD, MASK, VOCAB = 0, 1, 99, 100
PROBE = "tests.methods.masked_thought_probe:MaskProbe"
ARITHMETIC = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2}, "block_size": 128}


def _features(count: int, seed: int = 0) -> list[dict]:
    """Prompt/completion examples as TRL tokenises them: prompt labels -100, completion ending with EOS."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompt = torch.randint(10, 60, (int(torch.randint(2, 8, (1,), generator=rng)),), generator=rng).tolist()
        completion = torch.randint(10, 60, (int(torch.randint(1, 12, (1,), generator=rng)),), generator=rng).tolist()
        out.append({"input_ids": prompt + completion + [EOS], "labels": [-100] * len(prompt) + completion + [EOS]})
    return out


def _collator(p_max: float = 1.0, schedule: str = "constant", total_steps: int = 100, accumulation: int = 1,
              seed: int = 0, rank: int = 0, padding_free: bool = False, pad_to_multiple_of: int | None = None,
              **options) -> MaskedThoughtCollator:
    masks = MaskSchedule(p_max=p_max, schedule=schedule)
    masks.configure(total_steps, accumulation, seed, rank)
    masks.start_epoch(0)
    inner = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=padding_free,
                                            pad_to_multiple_of=pad_to_multiple_of)
    return MaskedThoughtCollator(inner, masks, mask_token_id=MASK, pad_token_id=PAD, vocab_size=VOCAB, **options)


def _masked(batch: dict, clean: dict) -> torch.Tensor:
    return batch["input_ids"] != clean["input_ids"]


def _expected(record: dict, micro: int, probe: dict, p_max: float, schedule: str = "ramp",
              ramp_fraction: float = 0.66, rank: int | None = None) -> torch.Tensor:
    """The input_ids the collator should have built for a recorded training micro-batch (mask replacement)."""
    masks = MaskSchedule(p_max=p_max, schedule=schedule, ramp_fraction=ramp_fraction)
    masks.configure(probe["max_steps"], probe["gradient_accumulation_steps"], probe["seed"],
                    probe["rank"] if rank is None else rank)
    labels, seen = torch.tensor(record["labels"]), torch.tensor(record["input_ids"])
    collator = MaskedThoughtCollator(None, masks, mask_token_id=probe["mask_token_id"])
    return collator.corrupt(torch.where(labels != -100, labels, seen), labels != -100, record["step"], micro)


# ----------------------------------------------------------------------------------------------------------
# Which tokens, how often
# ----------------------------------------------------------------------------------------------------------


def test_every_completion_token_and_eos_masked_at_p1_prompt_padding_and_labels_untouched():
    features = _features(6)
    collator = _collator(p_max=1.0)
    clean = collator.collator(features)
    batch = collator(features)
    completion = clean["labels"] != -100
    assert torch.equal(batch["labels"], clean["labels"])  # labels are the original tokens
    assert (batch["input_ids"][completion] == MASK).all()
    assert torch.equal(batch["input_ids"][~completion], clean["input_ids"][~completion])  # prompt and padding
    ends = [len(f["input_ids"]) - 1 for f in features]
    assert all(clean["input_ids"][i, e] == EOS and batch["input_ids"][i, e] == MASK for i, e in enumerate(ends))
    assert (clean["attention_mask"] == 0).any()  # the batch had padding, and it kept its pad ids

    question = _collator(p_max=1.0, target="prompt")(features)  # the question-masked control
    prompt = (clean["labels"] == -100) & clean["attention_mask"].bool()
    assert (question["input_ids"][prompt] == MASK).all()
    assert torch.equal(question["input_ids"][~prompt], clean["input_ids"][~prompt])


@pytest.mark.parametrize(("schedule", "step", "p"), [("constant", 0, 0.3), ("ramp", 30, 0.4 * 30 / (0.66 * 100 + 1))])
def test_masked_fraction_is_p_within_a_binomial_bound(schedule, step, p):
    collator = _collator(p_max=0.3 if schedule == "constant" else 0.4, schedule=schedule, accumulation=10_000)
    collator.schedule.start_epoch(step)
    masked = eligible = 0
    for seed in range(150):
        features = _features(8, seed=seed)
        clean = collator.collator(features)
        batch = collator(features)
        completion = clean["labels"] != -100
        assert not _masked(batch, clean)[~completion].any()
        masked += int(_masked(batch, clean)[completion].sum())
        eligible += int(completion.sum())
    # 99.9% Wilson score interval of the observed fraction must contain p
    z, frac = 3.2905, masked / eligible
    centre = (frac + z * z / (2 * eligible)) / (1 + z * z / eligible)
    half = z * math.sqrt(frac * (1 - frac) / eligible + z * z / (4 * eligible**2)) / (1 + z * z / eligible)
    assert eligible > 5000 and centre - half <= p <= centre + half, (masked, eligible, p)


def test_padding_free_and_packed_batches_mask_only_their_target():
    features = _features(4, seed=3)
    packed = {"input_ids": features[0]["input_ids"] + features[1]["input_ids"],
              "labels": features[0]["labels"] + features[1]["labels"],
              "seq_lengths": [len(features[0]["input_ids"]), len(features[1]["input_ids"])]}
    single = [{**f, "seq_lengths": [len(f["input_ids"])]} for f in features[2:]]
    for examples in (features, [packed, *single]):  # padding-free, and packed rows (position_ids restart)
        completion_only = _collator(p_max=1.0, padding_free=True, pad_to_multiple_of=64)
        clean = completion_only.collator(examples)
        assert "attention_mask" not in clean and clean["input_ids"].shape == (1, 64)
        real = torch.arange(64) < sum(len(f["input_ids"]) for f in examples)
        completion = clean["labels"][0] != -100
        batch = completion_only(examples)["input_ids"][0]
        assert (batch[completion] == MASK).all() and torch.equal(batch[~completion], clean["input_ids"][0][~completion])
        question = _collator(p_max=1.0, padding_free=True, pad_to_multiple_of=64, target="prompt")(examples)
        question = question["input_ids"][0]
        assert (question[real & ~completion] == MASK).all()
        assert (question[~real] == PAD).all() and torch.equal(question[completion], clean["input_ids"][0][completion])


@pytest.mark.parametrize("replacement", ["mask", "pad", "random"])
def test_replacement_tokens(replacement):
    collator = _collator(p_max=0.5, replacement=replacement)
    features = _features(16, seed=1)
    clean = collator.collator(features)
    batch = collator(features)
    changed = batch["input_ids"][_masked(batch, clean)]
    assert changed.numel() > 20 and not _masked(batch, clean)[clean["labels"] == -100].any()
    if replacement == "random":  # randint(0, vocab_size - 1), special tokens included
        assert changed.min() >= 0 and changed.max() < VOCAB and len(set(changed.tolist())) > 10
    else:
        assert (changed == (MASK if replacement == "mask" else PAD)).all()


# ----------------------------------------------------------------------------------------------------------
# The schedule and the step of each batch
# ----------------------------------------------------------------------------------------------------------


def test_ramp_and_constant_schedules():
    ramp = MaskSchedule()  # the official defaults: 0 -> 0.4 over 66% of the steps
    ramp.configure(total_steps=300)
    assert ramp.rate(0) == 0.0
    assert ramp.rate(100) == pytest.approx(0.4 * 100 / (0.66 * 300 + 1))  # the middle of the ramp: ~0.2
    assert ramp.rate(198) == pytest.approx(0.4 * 198 / 199) and ramp.rate(199) == 0.4 == ramp.rate(299)
    constant = MaskSchedule(p_max=0.2, schedule="constant")
    assert constant.rate(0) == constant.rate(10**6) == 0.2
    with pytest.raises(ValueError, match="ramp needs the run's length"):
        MaskSchedule().rate(3)


def test_micro_batches_of_one_step_share_it_and_epochs_restart_the_count():
    masks = MaskSchedule()
    masks.configure(total_steps=20, gradient_accumulation_steps=2)
    masks.start_epoch(5)  # e.g. a run resumed at step 5
    assert [masks.next_batch() for _ in range(5)] == [(5, 0), (5, 1), (6, 0), (6, 1), (7, 0)]
    masks.start_epoch(8)  # the last step of an epoch may have fewer micro-batches
    assert masks.next_batch() == (8, 0)
    masks.training = False  # after training (evaluation: see below)
    assert masks.next_batch() is None


def test_masks_are_a_function_of_seed_rank_and_step():
    features = _features(8, seed=2)

    def draws(**key) -> list[torch.Tensor]:
        collator = _collator(p_max=0.5, accumulation=2, **key)
        return [collator(features)["input_ids"] for _ in range(4)]

    same, again = draws(seed=1), draws(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(same, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(same, draws(seed=2), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(same, draws(seed=1, rank=1), strict=True))
    assert not torch.equal(same[0], same[1])  # micro-batches of one step draw afresh


def test_dataloader_workers_mask_each_batch_with_its_own_step():
    """Two worker processes, several batches ahead of the main process, over two epochs: every batch gets the
    (step, micro-batch) of its place in the epoch, as without workers."""
    features = _features(14, seed=4)
    for workers in (0, 2):
        collator = _collator(p_max=0.4, schedule="ramp", total_steps=12, accumulation=3)
        loader = DataLoader(features, batch_size=2, collate_fn=collator, num_workers=workers)
        seen = []
        for first in (0, 3):  # 7 batches per epoch: steps 0-2 (3 + 3 + 1 micro-batches), then 3-5
            collator.schedule.start_epoch(first)
            seen += [batch["input_ids"] for batch in loader]
        positions = [(first + i // 3, i % 3) for first in (0, 3) for i in range(7)]
        expected = [collator.corrupt(*_clean_and_eligible(collator, features[2 * (i % 7): 2 * (i % 7) + 2]), *pos)
                    for i, pos in enumerate(positions)]
        assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True)), workers
        assert any(not torch.equal(a, collator.collator(features[2 * (i % 7): 2 * (i % 7) + 2])["input_ids"])
                   for i, a in enumerate(seen))


def _clean_and_eligible(collator: MaskedThoughtCollator, features: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    clean = collator.collator(features)
    return clean["input_ids"], collator.eligible(clean, features)


def test_evaluation_batches_are_not_masked_wherever_the_callback_runs():
    """Evaluation is due once any callback set `control.should_evaluate` at the step's end (DefaultFlowCallback,
    before or after ours); the schedule reads the flag when the batch is built. The Trainer resets it when the
    evaluation ends (CallbackHandler.on_evaluate) and at each step's start."""
    collator = _collator(p_max=1.0)
    callback = collator.callback()
    collator.schedule.training = False
    features = _features(4)
    clean = collator.collator(features)["input_ids"]
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    state, control = TrainerState(max_steps=10), TrainerControl()

    def masked() -> bool:
        return not torch.equal(collator(features)["input_ids"], clean)

    assert not masked()  # e.g. eval_on_start, before the first epoch
    callback.on_train_begin(args, state, control)
    callback.on_epoch_begin(args, state, control)
    assert masked()
    callback.on_step_end(args, state, control)
    control.should_evaluate = True  # set by a callback after ours
    assert not masked()
    control.should_evaluate = False  # the evaluation is over
    assert masked()
    callback.on_train_end(args, state, control)
    assert not masked()  # trainer.evaluate() after training


def test_unsupported_loaders_are_refused():
    from workbench.methods.masked_thought import unsupported_loader

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    assert "IterableDataset" in unsupported_loader(None, Stream())
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], dataloader_in_order=False)
    assert "dataloader_in_order" in unsupported_loader(args, [])
    with pytest.raises(RuntimeError, match="add collator.callback"):
        MaskedThoughtCollator(lambda f: f, MaskSchedule(), mask_token_id=MASK)([])


# ----------------------------------------------------------------------------------------------------------
# The <mask> token and the options
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([f"Question: what is {i} plus {i}?\nAnswer: {2 * i}" for i in range(60)], 300)


def _rows_are_mean_of_the_others(model, token_id: int) -> bool:
    weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    return all(torch.allclose(w[token_id], torch.cat([w[:token_id], w[token_id + 1:]]).mean(0), atol=1e-7, rtol=0)
               for w in weights)


def test_mask_embedding_starts_at_the_mean_of_the_other_rows_fresh_or_resized(tmp_path, tokenizer):
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    pretrained = build_model(ModelConfig(preset="pythia-tiny", overrides=small), tokenizer)  # untied embed_out
    pretrained.save_pretrained(tmp_path / "base")
    for cfg in (ModelConfig(preset="pythia-tiny", overrides=small), ModelConfig(name_or_path=str(tmp_path / "base"))):
        tok = copy.deepcopy(tokenizer)
        method = MaskedThought()
        method.prepare_tokenizer(tok)
        assert tok.mask_token == "<mask>" and len(tok) == len(tokenizer) + 1
        model = method.prepare_model(build_model(cfg, tok, added_tokens=1))
        assert model.get_input_embeddings().weight.shape[0] == len(tok)
        assert _rows_are_mean_of_the_others(model, tok.mask_token_id)
    kept = MaskedThought()  # a tokenizer that already has a mask token (a run's saved tokenizer) keeps its rows
    kept.prepare_tokenizer(tok)
    before = model.get_input_embeddings().weight.clone()
    torch.nn.init.normal_(model.get_input_embeddings().weight[tok.mask_token_id])
    changed = model.get_input_embeddings().weight.clone()
    kept.prepare_model(model)
    assert not kept.added_mask_token and torch.equal(model.get_input_embeddings().weight, changed)
    assert not torch.equal(before, changed)
    for replacement in ("pad", "random"):  # no token added
        other = copy.deepcopy(tokenizer)
        MaskedThought(MaskedThoughtConfig(replacement=replacement)).prepare_tokenizer(other)
        assert len(other) == len(tokenizer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"p_max": 1.5}, r"field 'methods.masked_thought': p_max must be in \[0, 1\], got 1.5"),
        ({"ramp_fraction": 0}, r"ramp_fraction must be in \(0, 1\]"),
        ({"schedule": "cosine"}, r"field 'methods.masked_thought.schedule': .*'ramp' or 'constant'"),
        ({"replacement": "unk"}, r"field 'methods.masked_thought.replacement': .*'mask', 'pad' or 'random'"),
        ({"target": "answer"}, r"field 'methods.masked_thought.target': .*'completion' or 'prompt'"),
        ({"pmax": 0.2}, r"field 'methods.masked_thought.pmax': unknown option \(did you mean 'p_max'\?\)"),
    ],
)
def test_bad_options_are_one_line_config_errors_naming_the_field(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write_config(tmp_path, tiny_config(tmp_path, methods={"masked_thought": options})))
    assert "\n" not in str(err.value)
    for field in ("schedule", "replacement", "target"):  # the dataclass alone checks them too
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            MaskedThoughtConfig(**{field: "x"})


def test_a_pretraining_run_is_refused_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path, tiny_config(tmp_path, methods={"masked_thought": {}}))
    assert train_main([str(config)]) == 2
    assert "field 'methods.masked_thought': needs fine-tuning examples" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# In a plain TRL SFTTrainer
# ----------------------------------------------------------------------------------------------------------


def test_plain_sft_trainer_with_the_collator(tmp_path, tokenizer):
    from datasets import Dataset
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = copy.deepcopy(tokenizer)
    add_mask_token(tok)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2))
    init_mask_embedding(model, tok.mask_token_id, len(tok))
    schedule = MaskSchedule(p_max=0.5, ramp_fraction=0.5)
    collator = MaskedThoughtCollator.from_tokenizer(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
                                                    tok, schedule)
    rows = Dataset.from_list([{"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}"}
                              for i in range(40)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, logging_steps=1,
                     eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                     max_length=64, gradient_checkpointing=False, disable_tqdm=True, learning_rate=1e-3)
    logged: list[float] = []

    class Logged(TrainerCallback):  # after the collator's callback, as a logger would be
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.extend([logs["masked_thought_p"]] if "masked_thought_p" in logs else [])

    trainer = SFTTrainer(model=model, args=args, train_dataset=rows.select(range(32)),
                         eval_dataset=rows.select(range(32, 40)), processing_class=tok, data_collator=collator,
                         callbacks=[collator.callback(), Logged()])
    seen: list[tuple[bool, int, int]] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((m.training, trainer.state.global_step,
                                      int((kw["input_ids"] == tok.mask_token_id).sum()))), with_kwargs=True)
    trainer.train()
    masked = {step: n for training, step, n in seen if training}
    assert masked[0] == 0 and all(masked[s] > 0 for s in (1, 2, 3))  # p = 0, 1/6, 1/3, 1/2
    assert any(not training for training, _, _ in seen) and all(n == 0 for t, _, n in seen if not t)
    assert logged == pytest.approx([0, 1 / 6, 1 / 3, 0.5])


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning runs
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny pretrained run (fact world, 8 steps) that the fine-tuning runs start from."""
    tmp = tmp_path_factory.mktemp("base")
    assert train_main([str(write_config(tmp, tiny_config(tmp, name="base"), "base.yaml"))]) == 0
    return tmp / "runs" / "base"


def _finetune(tmp_path: Path, base: Path, name: str, methods: dict, data: dict | None = None,
              deepspeed: str | None = None, **training) -> Path:
    cfg = tiny_config(tmp_path, name=name, data=data or ARITHMETIC, methods={**methods, PROBE: {}}, deepspeed=deepspeed)
    cfg["model"] = {"preset": None, "name_or_path": str(base)}
    cfg["training"] = {**cfg["training"], "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                       "lr_scheduler_type": "constant", **training}
    return write_config(tmp_path, cfg, f"{name}.yaml")


def _probe(run_dir: Path, rank: int = 0) -> dict:
    probe = json.loads((run_dir / "mask_probe" / f"rank{rank}.json").read_text())
    tokenizer = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    probe["mask_token_id"] = next(t["id"] for t in tokenizer if t["content"] == "<mask>")
    return probe


def _mask_count(probe: dict, kind: str) -> int:
    return sum(int((torch.tensor(r["input_ids"]) == probe["mask_token_id"]).sum()) for r in probe[kind])


def _check_masks(probe: dict, p_max: float, **schedule) -> list[tuple[int, int]]:
    """Every recorded micro-batch holds exactly the masks of its (step, micro-batch); returns those positions."""
    positions, micro = [], {}
    for record in probe["records"]:
        micro[record["step"]] = micro.get(record["step"], -1) + 1
        positions.append((record["step"], micro[record["step"]]))
        expected = _expected(record, micro[record["step"]], probe, p_max, **schedule)
        assert expected.tolist() == record["input_ids"], positions[-1]
    return positions


@pytest.mark.integration
def test_a_run_logs_the_ramp_and_resumes_with_the_same_masks(tmp_path, base_run):
    methods = {"masked_thought": {"p_max": 0.4, "ramp_fraction": 0.5}}
    config = _finetune(tmp_path, base_run, "ft", methods, max_steps=6, save_steps=3, eval_strategy="steps",
                       eval_steps=2)
    assert train_main([str(config)]) == 0
    run_dir = tmp_path / "runs" / "ft"
    logged = {r["step"]: r["masked_thought_p"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert logged == pytest.approx({1: 0.0, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.4})  # p of step s - 1 of 6
    probe = _probe(run_dir)
    assert probe["mask_row_error"] < 1e-7  # the base's embeddings, grown by <mask>
    assert _check_masks(probe, 0.4, ramp_fraction=0.5) == [(s, 0) for s in range(6)]
    assert _mask_count(probe, "records") > 10 and len(probe["evaluations"]) >= 3 and _mask_count(probe, "evaluations") == 0
    uninterrupted = load_file(run_dir / "checkpoint-6" / "model.safetensors")
    shutil.rmtree(run_dir / "checkpoint-6")
    assert train_main([str(config), "--resume"]) == 0  # from checkpoint-3
    resumed = _probe(run_dir)
    assert resumed["records"] == probe["records"][3:]  # the same batches, masked the same way
    after = {r["step"]: r["masked_thought_p"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert after == logged
    weights = load_file(run_dir / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], weights[k]) for k in uninterrupted)


@pytest.mark.integration
def test_dataloader_workers_in_a_run_mask_with_the_step_of_their_batch(tmp_path, base_run):
    """Two persistent workers, two micro-batches per step, epochs of 3.5 steps: the masks of every micro-batch
    are those of its own (step, micro-batch), as the main process would have drawn them."""
    methods = {"masked_thought": {"p_max": 0.4, "ramp_fraction": 0.5}}
    config = _finetune(tmp_path, base_run, "workers", methods, max_steps=8, save_steps=100, gradient_accumulation_steps=2,
                       dataloader_num_workers=2, dataloader_persistent_workers=True, eval_strategy="steps", eval_steps=3)
    assert train_main([str(config)]) == 0
    probe = _probe(tmp_path / "runs" / "workers")
    assert probe["evaluations"] and _mask_count(probe, "evaluations") == 0  # evaluation workers too
    positions = _check_masks(probe, 0.4, ramp_fraction=0.5)
    # 28 training examples (TRL drops those cut before their completion): 7 micro-batches of 4 per epoch, so
    # each epoch is 3 steps of 2 micro-batches and a last step of 1; the second epoch starts at step 4
    assert positions == [(s, m) for s in range(8) for m in range(2) if not (s in (3, 7) and m == 1)]


@pytest.mark.integration
def test_two_ranks_draw_different_masks(tmp_path, base_run):
    """Both ranks see the same examples (one repeated row); their masks differ, each the draw of its own rank.
    Under ZeRO-3, so the <mask> rows are set to the mean of the others on partitioned embeddings."""
    rows = tmp_path / "rows.jsonl"
    row = {"prompt": "Question: what is 12 plus 30?\nAnswer:", "completion": " 12 + 30 = 42 so the answer is 42 #### 42"}
    rows.write_text((json.dumps(row) + "\n") * 32)
    methods = {"masked_thought": {"p_max": 0.4, "schedule": "constant"}}
    data = {"source": str(rows), "block_size": 128, "validation_fraction": 0.0}
    config = _finetune(tmp_path, base_run, "ranks", methods, data=data, deepspeed="configs/deepspeed/zero3.json",
                       max_steps=3, save_steps=100)
    result = run(deepspeed_command(TRAIN, str(config), ranks=2, port=free_port()), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probes = [_probe(tmp_path / "runs" / "ranks", rank) for rank in (0, 1)]
    for probe in probes:
        assert probe["mask_row_error"] < 1e-7
        assert _check_masks(probe, 0.4, schedule="constant") == [(s, 0) for s in range(3)]
    for first, second in zip(probes[0]["records"], probes[1]["records"], strict=True):
        assert first["labels"] == second["labels"]  # the same examples
        assert first["input_ids"] != second["input_ids"]  # masked differently
        other_rank = _expected(second, 0, probes[1], 0.4, schedule="constant", rank=0)
        assert other_rank.tolist() == first["input_ids"]


@pytest.mark.integration
def test_packed_run_masks_only_completions(tmp_path, base_run):
    """`data.packing`: padding-free rows of several examples; the masks are still those of each (step, micro)."""
    methods = {"masked_thought": {"p_max": 0.4, "schedule": "constant"}}
    config = _finetune(tmp_path, base_run, "packed", methods, data={**ARITHMETIC, "packing": True}, max_steps=3,
                       save_steps=100)
    assert train_main([str(config)]) == 0
    probe = _probe(tmp_path / "runs" / "packed")
    assert _check_masks(probe, 0.4, schedule="constant") == [(s, 0) for s in range(3)]
    first = probe["records"][0]
    assert len(first["input_ids"]) == 1 and (torch.tensor(first["input_ids"]) == probe["mask_token_id"]).any()
