"""Self-slimmable evaluation of SMoE checkpoints: `launch/eval.py --experts` (and `eval.experts`) evaluates each
cell at each number of active experts, records it as style `<style>@k<K>`, resumes per k and reports per k."""

from __future__ import annotations

import pytest
from conftest import launch_main, tiny_config, train_main, write_config

from workbench.io import read_jsonl
from workbench_eval.results import experts_style, read_results, split_experts_style

pytestmark = pytest.mark.integration  # two runs trained, then evaluated at each k

MODEL = {"overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experts_eval")
    smoe = tiny_config(tmp, name="smoe", methods={"smoe_dropout": {"experts": 4}}, model=MODEL)
    dense = tiny_config(tmp, name="dense", model=MODEL)
    for cfg, file in ((smoe, "smoe.yaml"), (dense, "dense.yaml")):
        assert train_main([str(write_config(tmp, cfg, file))]) == 0
    return tmp / "runs" / "smoe", tmp / "runs" / "dense"


def test_style_suffix_round_trips():
    assert experts_style("zero_shot", None) == "zero_shot"
    assert split_experts_style(experts_style("blank_ppl", 16)) == ("blank_ppl", 16)
    assert split_experts_style("zero_shot") == ("zero_shot", None)


def test_each_checkpoint_at_each_k_resumes_and_is_reported(runs, tmp_path, capsys):
    smoe, _ = runs
    out = tmp_path / "out"
    argv = [str(smoe), "--out", str(out), "--task", "factworld_mc:blank_ppl", "--limit", "3", "--experts", "1,4"]
    assert launch_main("eval", argv) == 0
    records = read_results(out / "results.jsonl")
    cells = {(r["checkpoint"], r["style"], r["experts"]) for r in records}
    assert cells == {(c, f"blank_ppl@k{k}", k) for c in ("checkpoint-4", "checkpoint-8") for k in (1, 4)}
    by_k = {r["experts"]: r["value"] for r in records if r["checkpoint"] == "checkpoint-8" and r["metric"] == "acc"}
    assert set(by_k) == {1, 4}
    assert launch_main("eval", argv) == 0 and "0 new cells" in capsys.readouterr().out  # resumable per k
    assert launch_main("eval", [*argv[:-1], "all"]) == 0  # all = 1, 2, 4: only k = 2 is new
    assert "2 new cells" in capsys.readouterr().out  # 2 checkpoints x 1 task x (k = 2)
    assert {r["experts"] for r in read_jsonl(out / "results.jsonl")} == {1, 2, 4}
    report = (out / "report.md").read_text()
    assert "## Scores per number of active experts k" in report
    table = report.split("## Scores per number of active experts k")[1].split("##")[0]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "k |" not in line
            ] == ["1", "2", "4"]


def test_k_changes_the_model_and_k_equal_e_is_the_saved_model(runs, tmp_path):
    smoe, _ = runs
    out = tmp_path / "out"
    argv = [str(smoe), "--out", str(out), "--task", "factworld_mc:blank_ppl", "--limit", "4"]
    assert launch_main("eval", argv) == 0  # as saved: eval_k None = all 4 experts
    assert launch_main("eval", [*argv, "--experts", "1,4"]) == 0
    scores = {(r["style"], r["checkpoint"]): r["items"] for r in read_jsonl(out / "results.jsonl")
              if r["metric"] == "gold_ppl"}
    assert scores[("blank_ppl@k4", "checkpoint-8")] == scores[("blank_ppl", "checkpoint-8")]
    assert scores[("blank_ppl@k1", "checkpoint-8")] != scores[("blank_ppl", "checkpoint-8")]


def test_dense_model_with_experts_is_a_clear_error(runs, tmp_path, capsys):
    smoe, dense = runs
    assert launch_main("eval", [str(dense), "--out", str(tmp_path), "--experts", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a dense model, not an SMoE checkpoint" in err and "--experts" in err
    assert not (tmp_path / "results.jsonl").exists()
    assert launch_main("eval", [str(smoe), "--out", str(tmp_path), "--experts", "8"]) == 2
    assert "8 is not a number of experts" in capsys.readouterr().err
    assert launch_main("eval", [str(smoe), "--out", str(tmp_path), "--experts", "two"]) == 2
    assert "--experts: give numbers of experts" in capsys.readouterr().err
