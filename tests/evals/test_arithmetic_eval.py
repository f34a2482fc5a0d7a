"""Generative evaluation on arithmetic word problems: the three sets (in-distribution, an irrelevant sentence
added, one step longer) never come from training; the number after the last "####" is scored as the
generator's `parse_gsm8k_answer` reads it; a model that cannot answer scores 0 and an oracle 1."""

from __future__ import annotations

import operator
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import launch_main

from workbench.data.arithmetic import ArithmeticConfig, arithmetic_problems
from workbench.errors import ConfigError
from workbench.gsm8k import parse_gsm8k_answer
from workbench_eval.config import EvalConfig, EvalTask
from workbench_eval.data import (
    ARITHMETIC_FEWSHOT,
    EVAL_SEED_OFFSET,
    arithmetic,
    arithmetic_irrelevant,
    arithmetic_longer,
    arithmetic_validation,
    run_data_options,
)
from workbench_eval.evaluator import build_tasks
from workbench_eval.results import read_results
from workbench_eval.specs import spec_names
from workbench_eval.sweep import run_target

# Small problems, so that the evaluation seed stream meets problems of the training set and has to drop them.
CROWDED = {"num_problems": 3000, "num_steps": 1, "max_value": 10, "seed": 5}
TRAINED = {"num_problems": 200, "num_steps": 2, "max_value": 30, "seed": 3}
SETS = ("arithmetic_in_dist", "arithmetic_irrelevant", "arithmetic_longer")
_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def _options(synthetic: dict) -> dict:
    return run_data_options({"source": "synthetic:arithmetic", "synthetic": synthetic})


def _checked_equations(worked: str) -> int:
    """The number of equation lines of a worked answer, each recomputed; the last result is the "#### N"."""
    *lines, final = worked.splitlines()
    results = []
    for line in lines:
        a, op, b, c = _EQUATION.search(line).groups()
        assert _OPS[op](int(a), int(b)) == int(c), line
        assert not results or int(a) == results[-1], "each step starts from the previous result"
        results.append(int(c))
    assert final == f"#### {results[-1]}"
    return len(lines)


# ---------------------------------------------------------------------------------------------------------
# The three sets
# ---------------------------------------------------------------------------------------------------------


def test_sets_never_ask_a_training_question_nor_one_twice():
    training = set(arithmetic_problems(ArithmeticConfig(**CROWDED))["question"])
    sets = {name: build(**_options(CROWDED)) for name, build in
            [("in_dist", arithmetic), ("irrelevant", arithmetic_irrelevant), ("longer", arithmetic_longer)]}
    for docs in sets.values():
        asked = list(docs["train"]["question"]) + list(docs["test"]["question"])
        assert len(docs["train"]) == ARITHMETIC_FEWSHOT and len(docs["test"]) > 100
        assert not training & set(asked) and len(set(asked)) == len(asked)
    # the evaluation stream is another seed's, and on these small problems it does meet training questions
    drawn = arithmetic_problems(ArithmeticConfig(**{**CROWDED, "num_problems": 600,
                                                    "seed": CROWDED["seed"] + EVAL_SEED_OFFSET}))["question"]
    assert 0 < len(training & set(drawn)) < 100
    kept = list(sets["in_dist"]["train"]["question"]) + list(sets["in_dist"]["test"]["question"])
    assert kept[:50] == [q for q in dict.fromkeys(drawn) if q not in training][:50]  # the stream, minus those


def test_the_validation_set_is_of_the_test_kind_but_shares_no_problem_with_it_or_training():
    training = set(arithmetic_problems(ArithmeticConfig(**CROWDED))["question"])
    test, validation = arithmetic(**_options(CROWDED)), arithmetic_validation(**_options(CROWDED))
    tested = set(test["train"]["question"]) | set(test["test"]["question"])
    chosen_on = set(validation["train"]["question"]) | set(validation["test"]["question"])
    assert len(validation["test"]) > 100 and not chosen_on & tested and not chosen_on & training
    assert set(validation["test"]["num_steps"]) == set(test["test"]["num_steps"]) == {1}
    # another seed of the training data: other training, test and validation problems
    other = arithmetic_validation(**_options({**CROWDED, "seed": 6}))["test"]["question"]
    assert len(set(other) & set(validation["test"]["question"])) < len(other) // 2


def test_in_distribution_problems_are_of_the_training_kind():
    docs = arithmetic(**_options(TRAINED))["test"]
    assert set(docs["num_steps"]) == {2}
    for doc in docs:
        assert _checked_equations(doc["answer"]) == 2
        assert parse_gsm8k_answer(doc["answer"]) == doc["final_answer"]
        assert max(map(int, re.findall(r"\d+", doc["answer"].replace("#### ", "")))) <= 30


def test_longer_problems_have_one_more_step():
    docs = arithmetic_longer(**_options(TRAINED))["test"]
    for doc in docs:
        assert _checked_equations(doc["answer"]) == 3 == doc["num_steps"]
        # the start, one sentence per step, the question
        assert len(re.findall(r"[.?](?: |$)", doc["question"])) == 1 + 3 + 1
    assert not set(docs["question"]) & set(arithmetic_problems(ArithmeticConfig(**TRAINED))["question"])


def test_an_irrelevant_sentence_leaves_the_gold_answer_unchanged():
    plain, distracted = arithmetic(**_options(TRAINED)), arithmetic_irrelevant(**_options(TRAINED))
    for split in ("train", "test"):
        for a, b in zip(plain[split], distracted[split], strict=True):
            assert (b["answer"], b["final_answer"]) == (a["answer"], a["final_answer"])
            question = a["question"].split(". ")[-1]
            body = a["question"][: -len(question) - 1]
            assert question.startswith("How many") and b["question"].startswith(body + " ")
            assert b["question"].endswith(" " + question)
            added = b["question"][len(body) + 1: -len(question) - 1]
            assert added.count(".") == 1 and added.endswith(".") and re.search(r"\b\d+\b", added)
            name, obj = re.fullmatch(r"How many (.+) does (\S+) have now\?", question).group(2, 1)
            assert not (re.search(rf"\b{name}\b", added) and re.search(rf"\b{obj}\b", added)), added
    sentences = [d["question"] for d in distracted["test"]]
    assert len(set(sentences)) == len(sentences)


def test_run_options_reach_the_sets_and_default_without_arithmetic(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": "synthetic:arithmetic",
                                                              "synthetic": TRAINED}}))
    assert run_target(run).world == {"arithmetic": TRAINED, "arithmetic_seen": [TRAINED]}
    fact_run = run_data_options({"source": "synthetic:fact_world", "synthetic": {"num_entities": 40}})
    assert "arithmetic" not in fact_run and fact_run["num_entities"] == 40
    assert set(arithmetic(**fact_run)["test"]["num_steps"]) == {ArithmeticConfig().num_steps}
    assert set(arithmetic_longer()["test"]["num_steps"]) == {ArithmeticConfig().num_steps + 1}
    with pytest.raises(ConfigError, match=r"field 'data.synthetic.num_step': unknown option"):
        arithmetic(**_options({"num_step": 2}))


def test_the_tag_selects_the_three_sets_and_the_prompt_is_the_fine_tuning_format():
    from workbench.data.finetune import QA_PROMPT

    assert spec_names("arithmetic") == list(SETS) and spec_names("arithmetic_longer") == ["arithmetic_longer"]
    tasks = build_tasks(EvalConfig(tasks=[EvalTask(task="arithmetic")]), _options(TRAINED), limit=1)
    assert sorted(tasks) == [(name, style) for name in SETS for style in ("few_shot", "zero_shot")]
    doc = arithmetic(**_options(TRAINED))["test"][0]
    (context, kwargs), = [i.args for i in tasks[("arithmetic_in_dist", "zero_shot")].instances]
    assert context == QA_PROMPT.format(question=doc["question"])
    assert kwargs["until"] == ["\n\nQuestion:"] and kwargs["max_gen_toks"] == 64 * (2 + 1)
    assert tasks[("arithmetic_longer", "zero_shot")].instances[0].args[1]["max_gen_toks"] == 64 * (3 + 1)
    few_shot = tasks[("arithmetic_in_dist", "few_shot")].instances[0].args[0]
    example = arithmetic(**_options(TRAINED))["train"][0]
    assert few_shot.startswith(QA_PROMPT.format(question=example["question"]) + " " + example["answer"] + "\n\n")
    assert few_shot.endswith("\n\n" + context) and few_shot.count("\nAnswer:") == 3 + 1
    with pytest.raises(ConfigError, match=r"unknown task 'arithmetics' \(did you mean 'arithmetic'\?\).*tags: "):
        build_tasks(EvalConfig(tasks=[EvalTask(task="arithmetics")]), {}, 1)


# ---------------------------------------------------------------------------------------------------------
# Answer extraction: lm-eval's regex filter and exact_match agree with parse_gsm8k_answer
# ---------------------------------------------------------------------------------------------------------

TRICKY = [
    ("After buying 3 more, she has 4 + 3 = 7 apples.\n#### 7", 7),
    ("#### 5\nWait, the answer is\n#### 7", 7),  # the last marker counts
    ("#### 5\nWait, the answer is\n#### 7", 5),
    ("#### 1,234", 1234),
    ("####42", 42),
    ("####\n42", 42),
    ("#### 42.0", 42),
    ("#### 42.00 apples", 42),
    ("#### 042", 42),
    ("#### 0,042", 42),
    ("#### 100", 100),
    ("#### 100", 10),
    ("#### 10", 100),
    ("#### 1,000", 1000),
    ("#### 42.", 42),
    ("#### 42 apples. #### then", 42),
    ("#### 42.5", 42),
    ("#### -42", 42),
    ("#### $42", 42),
    ("#### forty-two", 42),
    ("The answer is 42", 42),
    ("", 42),
    ("#### 4 2", 42),
    ("#### 42", 43),
]


def test_extraction_and_exact_match_agree_with_parse_gsm8k_answer():
    tasks = build_tasks(EvalConfig(tasks=[EvalTask(task="arithmetic_in_dist", styles=["zero_shot"])]), {}, 1)
    (task,) = tasks.values()
    (instance,) = task.instances
    scores = []
    for text, gold in TRICKY:
        instance.resps = [text]
        task.apply_filters()
        (filter_key,) = instance.filtered_resps
        result = task.process_results({**instance.doc, "final_answer": gold}, [instance.filtered_resps[filter_key]])
        scores.append(result["exact_match"])
        assert result["exact_match"] == float(parse_gsm8k_answer(text) == gold), (text, gold)
    assert scores == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------
# End to end: a tiny run evaluated by launch/eval.py
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder fine-tuned (in name) on TRAINED problems: its tokenizer and one random tiny checkpoint."""
    from transformers import GPTNeoXForCausalLM

    from workbench.models.presets import preset_config
    from workbench.models.tokenizer import train_bpe_tokenizer

    run = tmp_path_factory.mktemp("arith") / "run"
    problems = arithmetic_problems(ArithmeticConfig(**TRAINED))
    tokenizer = train_bpe_tokenizer([f"{q}\n{a}" for q, a in zip(problems["question"], problems["answer"],
                                                                   strict=True)], 400)
    tokenizer.save_pretrained(str(run / "tokenizer"))
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = preset_config("pythia-tiny", len(tokenizer), ids, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2)
    GPTNeoXForCausalLM(config).save_pretrained(str(run / "checkpoint-1"))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": "synthetic:arithmetic",
                                                              "synthetic": TRAINED}}))
    return run


def _scores(run: Path) -> dict[tuple[str, str], list[float]]:
    return {(r["task"], r["style"]): r["items"] for r in read_results(run / "eval" / "results.jsonl")
            if r["metric"] == "exact_match"}


@pytest.fixture
def one_thread():
    """Token-by-token generation of a tiny model is many times faster on one thread than on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_model_that_cannot_answer_scores_zero(tiny_run, tmp_path, capsys, one_thread):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"] = {"tasks": [{"task": "arithmetic", "styles": ["zero_shot"]}], "limit": 2,
                      "style_options": {"worked_tokens_per_line": 16}}  # the run's own eval section
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert launch_main("eval", [str(run)]) == 0
    assert "3 new cells" in capsys.readouterr().out
    assert _scores(run) == {(name, "zero_shot"): [0.0, 0.0] for name in SETS}


def _oracle(monkeypatch, wrong: set[str]) -> None:
    """Generation replaced by the gold worked answer of each prompt's item (a wrong final number for the
    questions in `wrong`), then a new question whose "####" line the stop sequence must cut off."""
    from lm_eval.models.huggingface import HFLM

    sets = [build(**_options(TRAINED)) for build in (arithmetic, arithmetic_irrelevant, arithmetic_longer)]
    golds = {d["question"]: d for docs in sets for d in docs["test"]}

    def generate(self, context, max_length, stop, **kwargs):
        rows = []
        for row in context:
            question = self.tok_decode(row.tolist()).rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            doc = golds[question]
            answer = doc["answer"].replace(f"#### {doc['final_answer']}", f"#### {doc['final_answer'] + 1}") \
                if question in wrong else doc["answer"]
            reply = f" {answer}\n\nQuestion: How many apples?\nAnswer: #### 999"
            rows.append(torch.tensor(self.tok_encode(reply)))
        generated = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        assert generated.shape[1] <= max_length - context.shape[1]
        return torch.cat([context, generated.to(context.device)], dim=1)

    monkeypatch.setattr(HFLM, "_model_generate", generate)


def test_an_oracle_scores_one_on_every_set_and_style(tiny_run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    _oracle(monkeypatch, wrong=set())
    assert launch_main("eval", [str(run), "--task", "arithmetic", "--limit", "5"]) == 0
    assert _scores(run) == {(name, style): [1.0] * 5 for name in SETS for style in ("zero_shot", "few_shot")}
    records = [r for r in read_results(run / "eval" / "results.jsonl") if r["task"] == "arithmetic_longer"]
    assert {(r["metric"], r["value"], r["n"], r["step"]) for r in records} == {("exact_match", 1.0, 5, 1)}


def test_a_wrong_final_number_scores_zero_on_that_item(tiny_run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    docs = {name: build(**_options(TRAINED))["test"].select(range(6)) for name, build in
            zip(SETS, (arithmetic, arithmetic_irrelevant, arithmetic_longer), strict=True)}
    wrong = {d["question"] for docs_ in docs.values() for d in docs_ if d["final_answer"] % 2}
    _oracle(monkeypatch, wrong)
    assert launch_main("eval", [str(run), "--task", "arithmetic:zero_shot", "--limit", "6"]) == 0
    expected = {(name, "zero_shot"): [float(d["final_answer"] % 2 == 0) for d in docs[name]] for name in SETS}
    assert _scores(run) == expected and {0.0, 1.0} <= {x for v in expected.values() for x in v}


def test_a_run_and_its_base_both_trained_on_arithmetic_are_never_asked_either_set(tmp_path):
    """A base pretrained on arithmetic text (seed 5) and an arm fine-tuned on other problems (seed 6): the
    evaluation sets avoid the questions of both, and are of the arm's kind."""
    from workbench_eval.data import training_data_options

    base_data = {"source": "synthetic:arithmetic", "format": "text", "synthetic": CROWDED}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.yaml").write_text(yaml.safe_dump({"data": base_data}))
    arm = {**CROWDED, "seed": 6, "num_problems": 500}
    options = training_data_options({"model": {"name_or_path": str(tmp_path / "base")},
                                     "data": {"source": "synthetic:arithmetic", "synthetic": arm}})
    assert options["arithmetic"] == arm and len(options["arithmetic_seen"]) == 2
    asked = set(arithmetic(**options)["test"]["question"])
    for trained in (CROWDED, arm):
        assert not asked & set(arithmetic_problems(ArithmeticConfig(**trained))["question"])
    only_arm = set(arithmetic(**_options(arm))["test"]["question"])  # without the lineage, base questions leak
    assert only_arm & set(arithmetic_problems(ArithmeticConfig(**CROWDED))["question"])


def test_gold_nll_is_the_mean_nll_per_token_of_the_gold_worked_answer(tiny_run, tmp_path):
    """Style gold_nll against an independent forward pass: -log p(" " + worked answer | zero-shot prompt) per
    continuation token, averaged over the items."""
    from transformers import AutoTokenizer

    from workbench.data.finetune import QA_PROMPT
    from workbench.models import load_trained_model

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    assert launch_main("eval", [str(run), "--task", "arithmetic_in_dist:gold_nll", "--limit", "4"]) == 0
    (record,) = [r for r in read_results(run / "eval" / "results.jsonl") if r["style"] == "gold_nll"]
    assert record["metric"] == "nll" and record["n"] == 4
    tokenizer, model = AutoTokenizer.from_pretrained(run / "tokenizer"), load_trained_model(run / "checkpoint-1")
    expected = []
    for doc in arithmetic(**_options(TRAINED))["test"].select(range(4)):
        context = tokenizer(QA_PROMPT.format(question=doc["question"]))["input_ids"]
        whole = tokenizer(QA_PROMPT.format(question=doc["question"]) + " " + doc["answer"],
                          )["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        targets = torch.tensor(whole[len(context):])
        logprobs = logits[len(context) - 1:-1].log_softmax(-1).gather(1, targets[:, None])
        expected.append(-logprobs.mean().item())
    assert record["items"] == pytest.approx(expected, rel=1e-4)
    assert record["value"] == pytest.approx(sum(expected) / 4, rel=1e-4)


def test_a_run_is_scored_at_one_step_or_on_the_model_it_started_from(tmp_path):
    from workbench_eval.sweep import base_target, only_step

    base = tmp_path / "base"
    for step in (200, 400):
        (base / f"checkpoint-{step}").mkdir(parents=True)
    run = tmp_path / "run"
    for step in (19, 38):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base)}, "data": {
        "source": "synthetic:arithmetic", "synthetic": TRAINED}}))
    target = run_target(run)
    assert [c.name for c in only_step(target, 38).checkpoints] == ["checkpoint-38"]
    with pytest.raises(ConfigError, match=r"--step 57: run 'run' has no checkpoint-57 \(its steps: 19, 38\)"):
        only_step(target, 57)
    started = base_target(target, run)
    assert started.checkpoints == [base / "checkpoint-400"] and started.world == target.world  # the run's items
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "pythia-tiny"}}))
    with pytest.raises(ConfigError, match="--base: run .* did not start from a local model folder"):
        base_target(target, run)
