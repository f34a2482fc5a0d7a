"""The BOSE evaluator: golden prompts per style, scoring against a hand-written torch loop, resumable sweeps,
corrupt checkpoints, bad names, stock-task variants on local fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch_main, tiny_config, train_main, write_config

from workbench.errors import ConfigError
from workbench_eval.config import EvalConfig, EvalTask
from workbench_eval.evaluator import Evaluator, build_tasks, load_checkpoint_model
from workbench_eval.results import read_results
from workbench_eval.sweep import run_target, sweep

WORLD = {"num_entities": 40, "seed": 1}
FIXTURES = REPO / "tests" / "fixtures" / "stock"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny fact-world run with checkpoints at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(tmp, name="evalrun", data={"synthetic": WORLD},
                      training={"max_steps": 6, "save_steps": 2})
    assert train_main([str(write_config(tmp, cfg))]) == 0
    return tmp / "runs" / "evalrun"


def _first_context(task_name: str, style: str, world=WORLD) -> tuple:
    cfg = EvalConfig(tasks=[EvalTask(task=task_name, styles=[style])], limit=1)
    (task,) = build_tasks(cfg, world, limit=1).values()
    return task.instances[0].args


ITEM_MC = "Question: In which country does Quilny Taro live?\nAnswer:"
ITEM_QA = "Question: Where does Quilny Taro live?\nAnswer:"
GOLDEN = {
    ("factworld_mc", "zero_shot"): (ITEM_MC, " Daravia"),
    ("factworld_mc", "letter"): (
        "Question: In which country does Quilny Taro live?\nA. Daravia\nB. Quorland\nC. Tzerrin\nD. Kaldora\nAnswer:",
        " A"),
    ("factworld_mc", "blank_ppl"): ("Quilny Taro currently lives in", " Daravia."),
    ("factworld_mc", "few_shot"): (
        "Question: What is the favourite flower of Veloxrin Isor?\nAnswer: sunflower\n\n"
        "Question: Where was Nykor Ithta born?\nAnswer: Brisca\n\n"
        "Question: Which institution did Veloxrin Isor graduate from?\nAnswer: Marrowfield University\n\n" + ITEM_MC,
        " Daravia"),
    ("factworld_mc", "iclip"): (
        "Choose the correct answer. Finish with 'The answer is X'.\n\n"
        "Question: What is the favourite flower of Veloxrin Isor?\nAnswer: The answer is sunflower.\n\n"
        "Question: Where was Nykor Ithta born?\nAnswer: The answer is Brisca.\n\n"
        "Question: Which institution did Veloxrin Isor graduate from?\nAnswer: The answer is Marrowfield University.\n\n"
        + ITEM_MC, " The answer is Daravia."),
    ("factworld_qa", "zero_shot"): ITEM_QA,
    ("factworld_qa", "few_shot"): (
        "Question: What is the favourite flower of Veloxrin Isor?\nAnswer: sunflower\n\n"
        "Question: Where was Nykor Ithta born?\nAnswer: Brisca\n\n"
        "Question: Where did Veloxrin Isor study?\nAnswer: Marrowfield University\n\n" + ITEM_QA),
    ("factworld_qa", "iclip"): (
        "Answer the question. Finish with 'The answer is X'.\n\n"
        "Question: What is the favourite flower of Veloxrin Isor?\nAnswer: The favourite flower of Veloxrin Isor "
        "is the sunflower. The answer is sunflower.\n\n"
        "Question: Where was Nykor Ithta born?\nAnswer: Nykor Ithta was born in Brisca. The answer is Brisca.\n\n"
        "Question: Where did Veloxrin Isor study?\nAnswer: Veloxrin Isor studied at Marrowfield University. "
        "The answer is Marrowfield University.\n\n" + ITEM_QA),
    ("factworld_qa", "instruction_only"): "Answer the question. Finish with 'The answer is X'.\n\n" + ITEM_QA,
}


@pytest.mark.parametrize("cell", sorted(GOLDEN))
def test_rendered_prompts_match_golden_strings(cell):
    args = _first_context(*cell)
    want = GOLDEN[cell]
    assert (args if isinstance(want, tuple) else args[0]) == want


def _manual_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """Sum of log p(continuation tokens | context) with a plain log-softmax loop, and the token count."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):] if context else whole
    ids = torch.tensor([(ctx if context else [tokenizer.eos_token_id]) + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = ids.shape[1] - len(cont)
    return sum(logprobs[start - 1 + i, tok].item() for i, tok in enumerate(cont)), len(cont)


@pytest.mark.parametrize("style", ["zero_shot", "letter", "blank_ppl", "iclip"])
def test_scoring_matches_a_hand_written_loop(trained_run, style):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    model = load_checkpoint_model(trained_run / "checkpoint-6")
    cfg = EvalConfig(tasks=[EvalTask(task="factworld_mc", styles=[style])], limit=6)
    evaluator = Evaluator(cfg, tokenizer, WORLD)
    (result,) = evaluator.evaluate(model)
    task = evaluator.tasks[("factworld_mc", style)]
    correct = []
    for doc_id in sorted({i.doc_id for i in task.instances}):
        instances = sorted((i for i in task.instances if i.doc_id == doc_id), key=lambda i: i.idx)
        manual = [_manual_loglikelihood(model, tokenizer, *i.args) for i in instances]
        for instance, (ll, _) in zip(instances, manual, strict=True):
            assert instance.resps[0][0] == pytest.approx(ll, abs=1e-4)
        gold = instances[0].doc["label"]
        if style == "blank_ppl":  # mean NLL per scored token; argmin; a tie goes to the lowest index
            scores = [-ll / n for ll, n in manual]
            correct.append(float(min(range(len(scores)), key=lambda k: (scores[k], k)) == gold))
        else:
            lls = [ll for ll, _ in manual]
            correct.append(float(max(range(len(lls)), key=lambda k: (lls[k], -k)) == gold))
    assert result.items["acc"] == correct
    assert result.metrics["acc"] == pytest.approx(sum(correct) / len(correct))


def test_sweep_writes_results_report_and_resumes(trained_run, monkeypatch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = EvalConfig(tasks=[EvalTask(task="factworld_mc", styles=["zero_shot", "blank_ppl"]),
                            EvalTask(task="factworld_qa", styles=["zero_shot"])], limit=5, bootstrap=50)
    target = run_target(run)
    target.world = WORLD
    calls = {"n": 0}
    original = Evaluator.evaluate

    def dies_after_four_cells(self, model, cells=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the sweep is killed while evaluating its fifth cell
        return original(self, model, cells)

    monkeypatch.setattr(Evaluator, "evaluate", dies_after_four_cells)
    with pytest.raises(KeyboardInterrupt):
        sweep(target, cfg, progress=False)
    assert len({(r["checkpoint"], r["task"], r["style"]) for r in read_results(target.results)}) == 4
    monkeypatch.setattr(Evaluator, "evaluate", original)
    assert sweep(target, cfg, progress=False) == 9 - 4  # only the missing cells
    records = read_results(target.results)
    cells = [(r["checkpoint"], r["task"], r["style"], r["metric"]) for r in records]
    assert len(cells) == len(set(cells)) == 3 * (2 + 2 + 2)  # acc+acc_norm, acc+gold_ppl, em+f1
    assert sweep(target, cfg, progress=False) == 0
    from workbench_eval.report import write_report

    report = write_report(records, target.results.parent, "run", n_boot=50).read_text()
    assert "Kendall's tau-b" in report and "| factworld_mc | blank_ppl | acc |" in report
    assert (target.results.parent / "factworld_mc.png").is_file()


def test_corrupt_checkpoint_is_skipped_and_reported(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    cfg = EvalConfig(tasks=[EvalTask(task="factworld_mc", styles=["zero_shot"])], limit=3, bootstrap=0)
    target = run_target(run)
    target.world = WORLD
    assert sweep(target, cfg, progress=False) == 2
    skipped = [r for r in read_results(target.results) if r.get("status") == "skipped"]
    assert [r["checkpoint"] for r in skipped] == ["checkpoint-4"] and "corrupt" in skipped[0]["reason"]
    from workbench_eval.report import write_report

    assert "`checkpoint-4`: " in write_report(read_results(target.results), target.results.parent, "run").read_text()


def test_bad_task_and_style_names():
    with pytest.raises(ConfigError, match=r"unknown task 'factworld_mcq' \(did you mean 'factworld_mc'\?\)"):
        build_tasks(EvalConfig(tasks=[EvalTask(task="factworld_mcq")]), WORLD, 1)
    with pytest.raises(ConfigError, match=r"unknown style 'blank'.*valid for multiple_choice: zero_shot"):
        build_tasks(EvalConfig(tasks=[EvalTask(task="factworld_mc", styles=["blank"])]), WORLD, 1)


def test_cli_bad_task_is_one_line_exit_2(trained_run, capsys):
    assert launch_main("eval", [str(trained_run), "--task", "nosuchtask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown task 'nosuchtask'") and "factworld_mc" in err[-1]


STOCK = {
    "arc_easy_bose": ("test", "arc_easy.jsonl", "Question: Which of these is a source of light?\nAnswer:", " a rock"),
    "hellaswag_bose": ("validation", "hellaswag.jsonl", "Cooking: A man cracks eggs into a bowl. He", " whisks them with a fork."),
    "piqa_bose": ("validation", "piqa.jsonl", "Question: To boil water,\nAnswer:", " put it in a pot on a hot stove."),
}


@pytest.mark.parametrize("name", sorted(STOCK))
def test_stock_task_variants_on_local_fixtures(trained_run, name):
    from transformers import AutoTokenizer

    split, filename, first_context, first_choice = STOCK[name]
    task = EvalTask(task=name, styles=["zero_shot", "letter", "blank_ppl", "few_shot"],
                    dataset_kwargs={"data_files": {split: str(FIXTURES / filename)}})
    evaluator = Evaluator(EvalConfig(tasks=[task], style_options={"num_fewshot": 1}),
                          AutoTokenizer.from_pretrained(trained_run / "tokenizer"))
    zero_shot = evaluator.tasks[(name, "zero_shot")]
    assert zero_shot.instances[0].args == (first_context, first_choice)
    results = {r.style: r for r in evaluator.evaluate(load_checkpoint_model(trained_run / "checkpoint-6"))}
    n_docs = len((FIXTURES / filename).read_text().splitlines())
    assert all(r.n == n_docs and 0.0 <= r.metrics["acc"] <= 1.0 for r in results.values())
    blank = evaluator.tasks[(name, "blank_ppl")].instances[0].args
    if name == "hellaswag_bose":  # the spec's cloze: context, then the ending fills the blank
        assert blank == ("Cooking: A man cracks eggs into a bowl. He", " whisks them with a fork.")


def test_results_lines_are_json_with_items(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    target = run_target(run)
    target.world, target.checkpoints = WORLD, target.checkpoints[-1:]
    sweep(target, EvalConfig(tasks=[EvalTask(task="factworld_qa", styles=["zero_shot"])], limit=4), progress=False)
    lines = [json.loads(line) for line in Path(target.results).read_text().splitlines()]
    assert {line["metric"] for line in lines} == {"em", "f1"}
    assert all(line["n"] == 4 == len(line["items"]) and line["step"] == 6 for line in lines)


@pytest.mark.integration
def test_eval_on_save_during_training_leaves_training_unchanged(tmp_path):
    from safetensors.torch import load_file

    eval_section = {"on_save": True, "on_save_limit": 3, "bootstrap": 0,
                    "tasks": [{"task": "factworld_mc", "styles": ["zero_shot", "blank_ppl"]}]}
    model = {"overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "hidden_dropout": 0.1}}
    plain = tiny_config(tmp_path, name="plain", model=model, data={"synthetic": WORLD})
    evaluated = tiny_config(tmp_path, name="evaluated", model=model, data={"synthetic": WORLD},
                            eval=eval_section, save_at_steps=[1])
    assert train_main([str(write_config(tmp_path, plain, "a.yaml"))]) == 0
    assert train_main([str(write_config(tmp_path, evaluated, "b.yaml"))]) == 0
    run = tmp_path / "runs" / "evaluated"
    records = read_results(run / "eval" / "results.jsonl")
    assert {(r["checkpoint"], r["style"]) for r in records} == {
        (f"checkpoint-{s}", style) for s in (1, 4, 8) for style in ("zero_shot", "blank_ppl")}
    assert all(r["n"] == 3 for r in records)
    a = load_file(tmp_path / "runs/plain/checkpoint-8/model.safetensors")
    b = load_file(run / "checkpoint-8/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating on save consumed no training randomness


def test_entity_pools_are_disjoint_and_sft_data_avoids_test_entities():
    from workbench_eval.data import entity_pools, factworld_mc, factworld_qa, factworld_sft

    test, sft, fewshot = entity_pools(40)
    assert not (set(test) & set(sft)) and not (set(test) | set(sft)) & set(fewshot)
    assert sorted(test + sft + fewshot) == list(range(40))
    qa, mc = factworld_qa(**WORLD), factworld_mc(**WORLD)
    tuned = {p.split("\n")[0] for p in factworld_sft(**WORLD)["prompt"]}
    asked = list(qa["test"]["question"]) + list(mc["test"]["question"])
    assert not tuned & {f"Question: {q}" for q in asked}


def test_instruction_tuning_writes_an_evaluable_run(trained_run, tmp_path):
    """A fine-tuning run from a fact-world run (as the consistency reproduction makes its instruct models)
    is evaluated on its base's fact world: the evaluator follows `model.name_or_path` back to the base run."""
    cfg = tiny_config(tmp_path, name="instruct", data={"source": "synthetic:fact_qa", "synthetic": WORLD,
                                                          "block_size": 64},
                      training={"max_steps": 3, "save_steps": 3, "per_device_train_batch_size": 4})
    cfg["model"] = {"preset": None, "name_or_path": str(trained_run)}
    assert train_main([str(write_config(tmp_path, cfg))]) == 0
    final = tmp_path / "runs" / "instruct" / "checkpoint-3"
    assert (final / "model.safetensors").is_file()
    target = run_target(tmp_path / "runs" / "instruct")
    assert {k: target.world[k] for k in WORLD} == WORLD and target.checkpoints == [final]
    assert target.world["validation_fraction"] == 0.1  # the base run's held-out split, not the QA data's
    assert sweep(target, EvalConfig(tasks=[EvalTask(task="factworld_qa", styles=["zero_shot"])], limit=2),
                 progress=False) == 1


def _eval_main(argv):
    return launch_main("eval", argv)


def test_any_local_model_folder_as_a_model(trained_run, tmp_path):
    import shutil

    model_dir = tmp_path / "my-model"
    shutil.copytree(trained_run / "checkpoint-6", model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained_run / "tokenizer" / name, model_dir / name)
    out = tmp_path / "out"
    assert _eval_main(["--model", str(model_dir), "--out", str(out), "--task", "factworld_mc:zero_shot",
                       "--limit", "3"]) == 0
    (record,) = [r for r in read_results(out / "results.jsonl") if r["metric"] == "acc"]
    assert record["checkpoint"] == "my-model" and record["n"] == 3 and (out / "report.md").is_file()


def test_out_folder_for_runs_holds_results_report_plots_and_resumes(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = tmp_path / "elsewhere"
    argv = [str(run), "--out", str(out), "--task", "factworld_mc:zero_shot,blank_ppl", "--limit", "3"]
    assert _eval_main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"results.jsonl", "report.md", "factworld_mc.png"}
    assert not (run / "eval").exists()  # nothing in the run's own eval/
    records = read_results(out / "results.jsonl")
    assert len({(r["checkpoint"], r["style"]) for r in records}) == 3 * 2
    assert {r["chance"] for r in records if r["metric"] == "acc"} == {0.25}  # 4 options per fact-world item
    assert not any("chance" in r for r in records if r["metric"] == "gold_ppl")
    capsys.readouterr()
    assert _eval_main(argv) == 0 and "run: 0 new cells" in capsys.readouterr().out  # resumes at the new place
    kept = [r for r in records if not (r["checkpoint"] == "checkpoint-4" and r["style"] == "blank_ppl")]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert _eval_main(argv) == 0 and "run: 1 new cells" in capsys.readouterr().out  # only the missing cell
    assert not (run / "eval").exists()


def test_out_folder_with_several_runs_gets_a_folder_per_run(trained_run, tmp_path, capsys):
    import shutil

    for name in ("a", "b"):
        shutil.copytree(trained_run, tmp_path / name, ignore=shutil.ignore_patterns("checkpoint-2", "checkpoint-4"))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--task", "factworld_mc:zero_shot", "--limit", "2"]
    assert _eval_main([str(tmp_path / "a"), str(tmp_path / "b"), *argv]) == 0
    for name in ("a", "b"):
        assert {r["run"] for r in read_results(out / name / "results.jsonl")} == {name}
        assert (out / name / "report.md").is_file() and not (tmp_path / name / "eval").exists()
    shutil.copytree(tmp_path / "a", tmp_path / "again" / "a")
    capsys.readouterr()
    assert _eval_main([str(tmp_path / "a"), str(tmp_path / "again" / "a"), "--out", str(tmp_path / "clash")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out: several runs are named 'a'")
    assert not (tmp_path / "clash").exists()


def test_list_prints_the_task_specs_without_loading_a_model():
    import subprocess
    import sys

    import yaml

    code = ("import runpy, sys; sys.argv = ['eval.py', '--list']\n"
            "try:\n    runpy.run_path('launch/eval.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.splitlines()[-1] == "heavy: []"
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for path in (REPO / "workbench_eval" / "tasks").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        assert rows[spec["task"]].split()[1] == spec["kind"], path
    assert rows["factworld_mc"].endswith("zero_shot, few_shot, iclip, letter, blank_ppl")
    assert rows["factworld_qa"].endswith("zero_shot, few_shot, iclip, instruction_only, completion")
    assert "`lm_eval --tasks list`" in out and ":native" in out


def test_list_includes_the_specs_of_an_include_path(tmp_path, capsys):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mine.yaml").write_text((REPO / "workbench_eval" / "tasks" / "factworld_qa.yaml").read_text()
                                     .replace("task: factworld_qa", "task: my_qa"))
    config = tmp_path / "eval.yaml"
    config.write_text(f"include_path: [{specs}]\n")
    assert _eval_main(["--list", "--config", str(config)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert rows["my_qa"][1] == "open" and "factworld_mc" in rows


def test_consistency_from_a_yaml_listing_the_models(trained_run, tmp_path):
    import shutil

    runs = []
    for i in range(3):
        for kind in ("base", "instruct"):
            shutil.copytree(trained_run, tmp_path / f"{kind}{i}")
        runs.append(i)
    listing = tmp_path / "models.yaml"
    listing.write_text(f"base: [{', '.join(str(tmp_path / f'base{i}') for i in runs)}]\n"
                       f"instruct: [{', '.join(str(tmp_path / f'instruct{i}') for i in runs)}]\n")
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text("tasks: [{task: factworld_mc, styles: [zero_shot, blank_ppl]}]\nlimit: 3\n")
    assert _eval_main(["--consistency", str(listing), "--config", str(eval_yaml), "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "consistency.json").read_text())
    assert {(r["style"], r["metric"]) for r in rows} == {("zero_shot", "acc"), ("blank_ppl", "acc")}


def test_generation_matches_a_hand_written_greedy_loop(trained_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    model = load_checkpoint_model(trained_run / "checkpoint-6")
    cfg = EvalConfig(tasks=[EvalTask(task="factworld_qa", styles=["zero_shot"])], limit=3,
                     style_options={"max_gen_toks": 6})
    evaluator = Evaluator(cfg, tokenizer, WORLD)
    evaluator.evaluate(model)
    for instance in evaluator.tasks[("factworld_qa", "zero_shot")].instances:
        context, kwargs = instance.args
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(kwargs["max_gen_toks"]):
                logits = model(torch.tensor([ids + generated])).logits[0, -1]
                generated.append(int(logits.argmax()))
                text = tokenizer.decode(generated)
                if any(stop in text for stop in kwargs["until"]) or generated[-1] == tokenizer.eos_token_id:
                    break
        text = tokenizer.decode(generated, skip_special_tokens=True)
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert instance.resps[0] == text


def test_questions_never_ask_about_entities_held_out_from_training():
    from workbench.data.packing import split_documents
    from workbench.data.synthetic import FactWorld, FactWorldConfig
    from workbench_eval.data import factworld_mc, untrained_entities

    world = FactWorld(FactWorldConfig(num_entities=60, seed=2))
    corpus = world.corpus()  # the documents a run splits, one per entity, in entity order
    held_out_names = set(split_documents(corpus, 0.1, seed=5)["validation"]["entity"])
    options = {"num_entities": 60, "seed": 2, "validation_fraction": 0.1, "split_seed": 5}
    held_out = untrained_entities(60, options)
    assert {world.entities[i].name for i in held_out} == held_out_names and len(held_out) == 6
    asked = set(factworld_mc(**options)["test"]["entity"])
    assert asked and not asked & held_out_names
    assert untrained_entities(60, {"max_documents": 50}) == set(range(50, 60))


def test_held_out_entities_with_question_answer_and_other_world_documents_in_the_corpus():
    """Documents appended after the entity paragraphs change the split; the evaluator replays it."""
    from workbench.data.loading import FactCorpusConfig, generator
    from workbench.data.packing import split_documents
    from workbench_eval.data import untrained_entities

    corpus_options = {"num_entities": 60, "seed": 2, "sentences_per_fact": 4, "qa_share": 0.05, "other_share": 0.3}
    corpus = generator("synthetic:fact_world").build(FactCorpusConfig(**corpus_options))
    assert len(corpus) > 60
    validation = split_documents(corpus, 0.1, seed=5)["validation"]
    names = [e["entity"] for e in corpus.select(range(60))]
    held_out_names = {name for name, text in zip(validation["entity"], validation["text"], strict=True)
                      if name in names and not text.startswith("Question: ")}
    held_out = untrained_entities(60, {**corpus_options, "validation_fraction": 0.1, "split_seed": 5})
    assert {names[i] for i in held_out} == held_out_names
