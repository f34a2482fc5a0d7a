"""The evaluation report and its plots from small, hand-made results: metric directions, small-sample
warnings, explained dashes, readable plots (chance line, labelled steps, item count), `chance` per cell."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import REPO

from workbench_eval.report import MIN_CHECKPOINTS, MIN_ITEMS, plot_scores, series, task_figure, write_report
from workbench_eval.results import METRICS, metric_info
from workbench_eval.sweep import chance_accuracy


def _record(step: int, style: str, metric: str, items: list[float], task: str = "factworld_mc",
            chance: float | None = None) -> dict:
    record = {"run": "r", "checkpoint": f"checkpoint-{step}", "step": step, "task": task, "style": style,
              "metric": metric, "value": sum(items) / len(items), "n": len(items), "items": items, "limit": None}
    return record if chance is None else {**record, "chance": chance}


def _accuracy_run(steps: list[int], n_items: int, chance: float = 0.25) -> list[dict]:
    """Two styles of factworld_mc acc whose item-level correctness rises with the step index."""
    records = []
    for i, step in enumerate(steps):
        for style, slope in (("zero_shot", 1), ("blank_ppl", 2)):
            correct = min(n_items, (i + 1) * slope)
            records.append(_record(step, style, "acc", [1.0] * correct + [0.0] * (n_items - correct),
                                   chance=chance))
    return records


def _row(report: str, task: str, style: str, metric: str) -> list[str]:
    (line,) = [x for x in report.splitlines() if x.startswith(f"| {task} | {style} | {metric} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_falling_perplexity_counts_as_improving(tmp_path):
    ppl = [11.58, 4.68, 4.21, 3.9, 3.5]  # the reported series, extended past the small-sample warning
    records = [_record(100 * (i + 1), "blank_ppl", "gold_ppl", [v] * 2) for i, v in enumerate(ppl)]
    report = write_report(records, tmp_path, "r", n_boot=0).read_text()
    cells = _row(report, "factworld_mc", "blank_ppl", "gold_ppl")
    falls = sum(b < a for a, b in zip(ppl, ppl[1:], strict=False)) / (len(ppl) - 1)
    assert cells[3] == "lower" and float(cells[8]) == pytest.approx(falls) == 1.0
    assert float(cells[4]) == pytest.approx(-1.0)


def test_every_metric_has_a_direction_and_the_docs_state_it():
    assert metric_info("gold_ppl").higher_is_better is False
    assert all(metric_info(m).higher_is_better for m in ("acc", "acc_norm", "em", "f1"))
    assert metric_info("word_perplexity").higher_is_better is False  # a native lm-eval metric: lm-eval's own
    docs = (REPO / "docs" / "evaluation.md").read_text()
    for name, metric in METRICS.items():
        (row,) = re.findall(rf"^\| `{name}` \| (\w+) \|", docs, flags=re.M)
        assert row == ("higher" if metric.higher_is_better else "lower"), name


def test_few_checkpoints_and_items_are_warned_about(tmp_path):
    report = write_report(_accuracy_run([10, 20, 40], n_items=8), tmp_path, "r", n_boot=0).read_text()
    warnings = [line for line in report.splitlines() if line.startswith("> **Warning")]
    assert len(warnings) == 2
    assert "only 3 checkpoints" in warnings[0] and f"p = {2 / math.factorial(3):.3f}" in warnings[0]
    assert "factworld_mc has only 8 items" in warnings[1] and f"{0.5 / math.sqrt(8):.2f}" in warnings[1]
    assert report.index("> **Warning") < report.index("## Scores per checkpoint")  # visible at the top
    single = write_report(_accuracy_run([10], n_items=MIN_ITEMS), tmp_path / "one", "r", n_boot=0).read_text()
    assert "> **Warning: only 1 checkpoint.**" in single and "| factworld_mc | zero_shot | acc |" not in single
    steps = [10 * 2**i for i in range(MIN_CHECKPOINTS)]
    enough = write_report(_accuracy_run(steps, n_items=MIN_ITEMS), tmp_path / "ok", "r", n_boot=0).read_text()
    assert "Warning" not in enough


def test_dashes_in_the_stability_table_are_explained(tmp_path):
    steps = [10, 20, 40, 80, 160]
    records = _accuracy_run(steps, n_items=12)
    records += [_record(s, "zero_shot", "f1", [0.0] * 12, task="factworld_qa") for s in steps]
    report = write_report(records, tmp_path, "r", n_boot=20, early_fraction=0.3).read_text()
    flat = _row(report, "factworld_qa", "zero_shot", "f1")
    assert flat[4] == "– (constant)" and flat[5] == "–" and flat[6] == "– (too few checkpoints)"
    rising = _row(report, "factworld_mc", "blank_ppl", "acc")
    assert rising[4] == "1.000" and rising[6] == "– (too few checkpoints)"  # ceil(0.3 * 5) = 2 < 3
    legend = report.split("| var |")[1].split("## Plots")[0]
    assert "- – (constant): the score is the same at every checkpoint" in legend
    assert "- – (too few checkpoints) in tau early: the early window (the first 30% of the 5 checkpoints: 2)" in legend
    assert "- [–, –]: no bootstrap interval" in legend


def test_plot_has_labelled_steps_a_chance_line_and_the_item_count(tmp_path):
    import matplotlib.pyplot as plt

    steps = [4, 6, 9, 13, 19, 28, 41, 60, 88, 129, 189, 277, 376]
    chance = (1 / 4 + 1 / 4 + 1 / 3) / 3  # items with 4, 4 and 3 options
    by_series = series(_accuracy_run(steps, n_items=30, chance=chance))
    fig = task_figure("factworld_mc", by_series)
    (ax,) = fig.axes
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([chance, chance])
    assert dashed[0].get_label() == f"chance (random option): {chance:.1%}"
    assert "chance" in [t.get_text() for t in ax.get_legend().get_texts()][-1]
    labels = {int(t.get_text().replace(",", "")): t.get_position()[0] for t in ax.get_xticklabels()}
    assert 2 <= len(labels) <= 8 and {steps[0], steps[-1]} <= set(labels) <= set(steps)
    assert all(label == pos for label, pos in labels.items())  # each label sits on its checkpoint
    assert sorted({*ax.get_xticks(minor=True), *labels}) == steps  # a tick at every checkpoint (labelled: major)
    assert "n = 30 items" in ax.get_title() and "accuracy" in ax.get_ylabel() and "step" in ax.get_xlabel()
    plt.close(fig)
    fig = task_figure("factworld_mc", series(_accuracy_run(steps[:3], n_items=30, chance=0.25)))
    assert [line.get_label() for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"] == [
        "chance (1 of 4 options): 25%"]
    plt.close(fig)
    (path,) = plot_scores(by_series, tmp_path)
    assert path == tmp_path / "factworld_mc.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_open_task_plot_has_no_chance_line():
    import matplotlib.pyplot as plt

    records = [_record(s, "zero_shot", "f1", [0.5, 0.0, 0.25], task="factworld_qa") for s in (2, 4, 6)]
    fig = task_figure("factworld_qa", series(records))
    (ax,) = fig.axes
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "6"] and "F1" in ax.get_ylabel()
    plt.close(fig)


class _Instance:
    def __init__(self, doc_id: int) -> None:
        self.doc_id = doc_id


class _Task:
    def __init__(self, output_type: str, options: list[int], metrics: tuple[str, ...] = ("acc",)) -> None:
        self.OUTPUT_TYPE = output_type
        self.instances = [_Instance(d) for d, k in enumerate(options) for _ in range(k)]
        self.config = type("Config", (), {"metric_list": [{"metric": m} for m in metrics]})()


def test_chance_accuracy_from_the_request_instances():
    assert chance_accuracy(_Task("multiple_choice", [4, 4, 2])) == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    mutual = _Task("multiple_choice", [8, 6], metrics=("acc", "acc_mutual_info"))  # a request per option, twice
    assert chance_accuracy(mutual) == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert chance_accuracy(_Task("generate_until", [1, 1])) is None
    assert chance_accuracy(None) is None


def test_report_plots_land_in_the_folder_given(tmp_path):
    out = tmp_path / "not" / "yet"
    path = write_report(_accuracy_run([1, 2, 3, 4, 5], 4), out, "r", n_boot=0)
    assert path == out / "report.md" and (out / "factworld_mc.png").is_file()
    assert "![factworld_mc](factworld_mc.png)" in path.read_text()
    assert not list(Path(tmp_path).glob("*.png"))
