"""Claims and verdicts: the paired test, the minimum detectable effect, Holm's adjustment and the fixed verdict
rule checked against independent computations (SciPy's t-test and noncentral t); a claim's runs chosen at each
arm's best rate, with a grid that does not bracket it failing the report; the checkpoint chosen by a task metric."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from scipy import stats
from study_files import write_study

from workbench.errors import ConfigError
from workbench.stats import VERDICTS, holm, minimum_detectable_effect, paired_test, verdict
from workbench.study import load_study
from workbench.study.claims import ClaimSpec, evaluate_claims
from workbench.study.selection import SelectSpec, base_dir, scores_at, scoring_commands, selected_step


@pytest.mark.parametrize("n", [3, 5, 10])
def test_paired_test_matches_scipy_and_the_mde_has_80_percent_power(n):
    rng = random.Random(n)
    diffs = [rng.gauss(0.4, 1.0) for _ in range(n)]
    test = paired_test(diffs)
    reference = stats.ttest_1samp(diffs, 0.0)
    low, high = reference.confidence_interval(0.95)
    assert (test.low, test.high, test.p_value) == pytest.approx((low, high, reference.pvalue), rel=1e-9)
    # power of the two-sided paired t-test at a true effect of MDE (noncentral t, independent of the formula)
    nc = test.mde / (test.sd / math.sqrt(n))
    critical = stats.t.ppf(0.975, n - 1)
    power = stats.nct.sf(critical, n - 1, nc) + stats.nct.cdf(-critical, n - 1, nc)
    assert 0.75 < power < 0.85
    assert minimum_detectable_effect(1.0, 5) == pytest.approx((2.7764451 + 0.9409646) / math.sqrt(5), rel=1e-6)
    assert math.isnan(minimum_detectable_effect(1.0, 1))


def test_the_verdict_rule_in_its_order():
    def test_of(diffs):
        return paired_test(diffs)

    assert verdict(test_of([1.0, 1.1, 0.9, 1.2]), expected=0.5) == "reproduces"
    assert verdict(test_of([1.0, 1.1, 0.9, 1.2]), expected=-0.5) == "opposite"
    tight = test_of([0.01, -0.01, 0.02, -0.02, 0.0])
    assert verdict(tight, expected=0.5) == "no effect at this scale" and tight.mde < 0.5
    wide = test_of([1.0, -1.2, 0.8, -0.9])
    assert verdict(wide, expected=0.5) == "underpowered" and wide.mde > 0.5
    assert verdict(test_of([0.3]), expected=0.1) == "underpowered"  # one seed: no interval
    assert set(VERDICTS) == {"reproduces", "opposite", "no effect at this scale", "underpowered"}


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan, 0.01]) == pytest.approx([0.5, math.nan, 0.02], nan_ok=True)


def _rows():
    """Two adapters x three rates x four seeds: `b` is 0.3 above `a` at its best rate (the middle one for `a`,
    the highest for `b`)."""
    rows = []
    for seed in range(4):
        noise = 0.01 * seed
        for rate, loss_a, loss_b in ((0.001, 2.0, 1.9), (0.01, 1.5, 1.6), (0.1, 1.8, 1.4)):
            rows.append({"seed": seed, "adapter": "a", "lr": rate, "loss": loss_a + noise, "acc": 0.5 + noise})
            rows.append({"seed": seed, "adapter": "b", "lr": rate, "loss": loss_b + noise, "acc": 0.8 + 2 * noise})
    return rows


def test_a_claim_reads_each_arm_at_its_best_rate_and_fails_an_unbracketed_grid():
    claim = ClaimSpec(name="c", claim="b beats a", axis="adapter", arm="b", reference="a", metric="acc",
                      at_best={"axis": "lr", "by": "loss", "best": "min"},
                      paper={"value": 0.1, "unit": "relative", "source": "Table 1", "carry": "relative"})
    (result,) = evaluate_claims([claim], _rows(), {"adapter": ["a", "b"], "lr": ["0.001", "0.01", "0.1"]})
    assert result["at_best"] == {"arm": "0.1", "reference": "0.01"}
    assert result["difference"] == pytest.approx(0.3 + 0.015) and result["n"] == 4
    assert result["paper_effect_here"] == pytest.approx(0.1 * (0.5 + 0.015))
    assert result["verdict"] == "reproduces"
    assert len(result["checks"]) == 1 and "b: best lr 0.1 is at the edge" in result["checks"][0]


def test_claims_are_checked_against_the_axes(tmp_path):
    paper = {"value": 0.1, "unit": "points", "source": "Table 1", "carry": "absolute"}
    claim = {"name": "c", "claim": "x", "axis": "training.learning_rate", "arm": 0.002, "reference": 0.001,
             "metric": "loss", "paper": paper}
    assert load_study(write_study(tmp_path, claims=[claim])).claims[0].name == "c"
    with pytest.raises(ConfigError, match=r"field 'claims\[0\].arm': 0.005 is not a value"):
        load_study(write_study(tmp_path, claims=[{**claim, "arm": 0.005}]))
    with pytest.raises(ConfigError, match=r"claims.0.paper.value.*a claim needs a direction"):
        load_study(write_study(tmp_path, claims=[{**claim, "paper": {**paper, "value": 0.0}}]))
    with pytest.raises(ConfigError, match=r"field 'claims\[0\].metric': 'los' is not a column"):
        load_study(write_study(tmp_path, claims=[{**claim, "metric": "los"}]))
    axes = {"training.learning_rate": [1e-3, 2e-3], "training.weight_decay": [0.0, 0.1]}
    with pytest.raises(ConfigError, match=r"claims\[0\].where': axis 'training.weight_decay' has several values"):
        load_study(write_study(tmp_path, axes=axes, claims=[claim]))
    fixed = {**claim, "where": {"training.weight_decay": 0.1}}
    profiles = {"quick": {"axes": {"training.weight_decay": [0.0]}}}
    study = write_study(tmp_path, axes=axes, claims=[fixed], profiles=profiles)
    assert load_study(study).claims and not load_study(study, "quick").claims  # a profile keeps what it can test


def _results(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"status": "ok", "style": "zero_shot", "metric": "exact_match", **r}) + "\n"
                            for r in records))


def test_the_checkpoint_is_chosen_on_the_validation_metric_and_the_test_scored_there(tmp_path):
    spec = SelectSpec(by="val.zero_shot.exact_match", test=["t:zero_shot"], limit=300, base=True)
    results = tmp_path / "run" / "eval" / "results.jsonl"
    _results(results, [{"task": "val", "step": s, "value": v} for s, v in ((10, 0.2), (20, 0.6), (30, 0.6))]
             + [{"task": "loss_only", "step": 40, "value": 0.9}])
    assert selected_step(results, spec) == 20  # ties: the earlier step
    assert selected_step(results, spec.model_copy(update={"best": "min"})) == 10
    _results(tmp_path / "run" / "test" / "results.jsonl", [{"task": "t", "step": 20, "value": 0.45}])
    assert scores_at(tmp_path / "run" / "test" / "results.jsonl", 20, "test@") == {"test@t.zero_shot.exact_match": 0.45}
    step, base = scoring_commands(tmp_path / "run", spec, 20, tmp_path / "b")
    assert step[-4:] == ["--step", "20", "--out", str(tmp_path / "run" / "test")] and "300" in step
    assert "--base" in base and base[-1] == str(tmp_path / "b")
    # the base is scored once per base model and set of test items, beside the base
    start = {"model.name_or_path": str(tmp_path / "pre")}
    one = base_dir(tmp_path / "a", {**start, "data.synthetic.seed": 1, "training.learning_rate": 0.1}, spec)
    assert one == base_dir(tmp_path / "b", {**start, "data.synthetic.seed": 1}, spec) and one.parent == tmp_path / "pre"
    assert one != base_dir(tmp_path / "a", {**start, "data.synthetic.seed": 2}, spec)
    assert base_dir(tmp_path / "a", {}, spec) == tmp_path / "a" / "test-base"


def test_the_noise_floor_is_the_variance_over_re_scorings_and_the_excess_what_is_left(tmp_path):
    from workbench.study.selection import NoiseSpec, noise_columns, noise_commands

    run = tmp_path / "run"
    column = "eigenscore.completion.ees"
    _results(run / "eval" / "results.jsonl", [{"task": "eigenscore", "style": "completion", "metric": "ees",
                                               "step": s, "value": 1.0} for s in (20, 40)])
    spec = NoiseSpec(tasks=["eigenscore:completion"], seeds=3, limit=60)
    commands = noise_commands(run, spec, 40, {"limit": 9, "style_options": {"eigenscore": {"samples": 10}}})
    assert len(commands) == 3 and commands[1][1][:3] == [str(run), "--step", "40"]
    written = json.loads(commands[1][0].read_text())["eval"]
    assert written["style_options"]["eigenscore"] == {"samples": 10, "seed": 2000} and written["limit"] == 9
    scores = [0.8, 1.1, 0.95]
    for k, value in enumerate(scores, start=1):
        _results(run / "noise" / f"seed={k}" / "results.jsonl", [{"task": "eigenscore", "style": "completion",
                                                                   "metric": "ees", "step": 40, "value": value}])
    got = noise_columns(run, spec, {f"res@{column}": 0.05})
    assert got[f"noise@{column}"] == pytest.approx(np.var(scores, ddof=1))
    assert got[f"excess@{column}"] == pytest.approx(0.05 - np.var(scores, ddof=1))
    assert noise_commands(run, spec, 40, {}) == []  # done: nothing to re-score


def test_a_published_study_rewrites_its_block_of_the_method_page_and_nothing_else(tmp_path):
    from workbench.study.report import write_page_block

    page = tmp_path / "docs" / "methods" / "m.md"
    page.parent.mkdir(parents=True)
    page.write_text("# M\n\nbefore\n<!-- study s -->\nold table\n<!-- /study s -->\nafter\n")
    write_page_block(page, "s", ["## Claims", "", "| a |", "|---|"], tmp_path / "docs" / "results" / "s")
    text = page.read_text()
    assert text.startswith("# M\n\nbefore\n<!-- study s -->\n#### Claims (generated by the study)")
    assert "old table" not in text and text.endswith("<!-- /study s -->\nafter\n")
    assert "[../results/s/report.md](../results/s/report.md)" in text
    with pytest.raises(ConfigError, match="has no block '<!-- study t -->'"):
        write_page_block(page, "t", [], tmp_path)


def test_after_training_the_runner_scores_the_test_at_the_chosen_checkpoint_or_fails_the_run(tmp_path, monkeypatch):
    from workbench.study import plan, runner

    study = load_study(write_study(tmp_path, axes={"training.learning_rate": [1e-3]}, seeds=[0],
                                   select={"by": "val.zero_shot.exact_match", "test": ["t:zero_shot"], "limit": 7}))
    (run,) = plan(study)
    calls = []

    def fake_eval(module, arguments, log, threads, env):
        calls.append(arguments)
        _results(run.run_dir / "test" / "results.jsonl", [{"task": "t", "step": 2, "value": 0.25}])
        return 0

    monkeypatch.setattr(runner, "module_process", fake_eval)
    _results(run.run_dir / "eval" / "results.jsonl", [{"task": "val", "step": s, "value": v} for s, v in ((2, 0.5),
                                                                                                      (4, 0.1))])
    assert runner.score_after_training(study, run, runner.Slot()) is None
    assert calls == [[str(run.run_dir), "--limit", "7", "--task", "t:zero_shot", "--step", "2", "--out",
                      str(run.run_dir / "test")]]
    assert runner.score_after_training(study, run, runner.Slot()) is None and len(calls) == 1  # done: not again
    (run.run_dir / "eval" / "results.jsonl").unlink()
    failed = runner.score_after_training(study, run, runner.Slot())
    assert failed["status"] == "failed" and "no checkpoint of the run has 'val.zero_shot.exact_match'" in failed["error"]
    assert runner.run_status(run)["status"] == "failed"


def test_per_seed_fields_follow_each_arms_seed(tmp_path):
    from workbench.study import plan

    runs = plan(load_study(write_study(tmp_path, per_seed=["data.synthetic.seed", "methods.send.seed"])))
    assert {(r.seed, r.settings["data.synthetic.seed"], r.settings["methods.send.seed"]) for r in runs} == {
        (0, 0, 0), (1, 1, 1)}
