"""The study runner: grid, skip, resume, failure handling, aggregation, --only, submitit's local executor."""

from __future__ import annotations

import csv
import shutil

import pytest
from conftest import REPO
from study_files import launch, write_study

from workbench.errors import ConfigError
from workbench.study import aggregate, collect_run, grid, load_study, run_status


def test_grid_names_and_zip(tmp_path):
    study = load_study(write_study(tmp_path, axes={"training.learning_rate": [1e-3, 2e-3],
                                              "model.preset": ["pythia-tiny", "llama-tiny"]}, combine="zip"))
    names = [r.name for r in grid(study)]
    assert names == ["learning_rate=0.001_preset=pythia-tiny_seed=0", "learning_rate=0.001_preset=pythia-tiny_seed=1",
                     "learning_rate=0.002_preset=llama-tiny_seed=0", "learning_rate=0.002_preset=llama-tiny_seed=1"]
    with pytest.raises(ConfigError, match="same number of values"):
        load_study(write_study(tmp_path, axes={"a.b": [1, 2], "c.d": [1]}, combine="zip"))
    with pytest.raises(ConfigError, match="training.learnig_rate"):
        load_study(write_study(tmp_path, set={"training.learnig_rate": 1}))


@pytest.mark.integration
def test_study_runs_skips_resumes_and_records_failures(tmp_path):
    # the second variant passes config validation but fails in the run: more unique tokens than the corpus has
    too_much = {"data.repetition.budget_tokens": 2**22, "data.repetition.unique_tokens": 2**22}
    path = write_study(tmp_path, axes={"data": {"all": {}, "too-much": too_much}}, seeds=[0, 1])
    result = launch(str(path))
    assert result.returncode == 1, result.stderr[-2000:]  # the others finish first, then the failures are named
    assert "error: study s: 2 of 4 runs failed: data=too-much_seed=0" in result.stderr, result.stderr[-2000:]
    study = load_study(path)
    runs = grid(study)
    statuses = {r.name: run_status(r) for r in runs}
    assert [s["status"] for s in statuses.values()] == ["done", "done", "failed", "failed"]
    error = statuses["data=too-much_seed=0"]["error"]  # the run's one-line error
    assert error.startswith("error:") and "data.repetition" in error and "exceeds the corpus" in error
    rows = list(csv.DictReader((tmp_path / "runs/s/results.csv").open()))
    assert rows[0]["loss_n"] == "2" and float(rows[0]["loss_std"]) >= 0
    # a finished run is skipped
    log = runs[0].run_dir / "train.log"
    size = log.stat().st_size
    assert launch(str(path)).returncode == 1 and log.stat().st_size == size
    # a killed run (no status, newest checkpoint gone) resumes from its checkpoint
    (runs[1].run_dir / "study_status.json").unlink()
    shutil.rmtree(runs[1].run_dir / "checkpoint-4")
    assert launch(str(path), "--only", runs[1].name).returncode == 0
    assert "resuming from" in (runs[1].run_dir / "train.log").read_text()
    assert run_status(runs[1])["status"] == "done" and (runs[1].run_dir / "checkpoint-4").is_dir()


@pytest.mark.integration
def test_a_run_config_error_stops_the_study_before_any_run(tmp_path):
    path = write_study(tmp_path, axes={"training.learning_rate": [1e-3, "fast"]}, seeds=[0])
    result = launch(str(path))
    assert result.returncode == 2 and "run 'learning_rate=fast_seed=0'" in result.stderr
    assert "training.learning_rate" in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_dry_run_and_unknown_only(tmp_path):
    path = write_study(tmp_path)
    result = launch(str(path), "--dry-run")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all("\tpending\t" in line for line in lines)
    assert "study s: 4 runs: 4 pending" in result.stderr  # the run count, off stdout (one run a line)
    bad = launch(str(path), "--only", "nope")
    assert bad.returncode == 2 and "no run named 'nope'" in bad.stderr


def test_aggregation_against_hand_made_metrics(tmp_path):
    study = load_study(write_study(tmp_path))
    runs = grid(study)
    losses = {0: [3.0, 2.0, 2.5], 1: [4.0, 1.0, 3.0]}
    for r in runs:
        r.run_dir.mkdir(parents=True)
        with (r.run_dir / "metrics.jsonl").open("w") as handle:
            for step, loss in enumerate(losses[r.seed], start=1):
                handle.write(f'{{"step": {step}, "loss": {loss}}}\n')
    (runs[1].run_dir / "eval").mkdir()
    (runs[1].run_dir / "eval" / "results.jsonl").write_text(
        '{"step": 2, "task": "t", "style": "s", "metric": "acc", "value": 0.25}\n'
        '{"step": 3, "task": "t", "style": "s", "metric": "acc", "value": 0.5}\n'
        '{"step": 3, "checkpoint": "checkpoint-4", "status": "skipped", "reason": "corrupt"}\n')
    row = collect_run(runs[1], ["loss"])
    assert (row["loss"], row["best_loss"], row["best_step_loss"]) == (3.0, 1.0, 2)
    high = collect_run(runs[1], ["loss:max"])
    assert (high["best_loss"], high["best_step_loss"]) == (4.0, 1)
    assert "best_loss" not in collect_run(runs[1], ["loss:last"]) and collect_run(runs[1], ["loss:last"])["loss"] == 3.0
    assert row["t.s.acc"] == 0.5  # the last evaluated checkpoint's score
    table = aggregate([collect_run(r, ["loss"]) for r in runs], list(study.axes), ["loss", "best_loss"])
    assert len(table) == 2
    assert table[0]["loss_mean"] == pytest.approx(2.75) and table[0]["loss_std"] == pytest.approx(0.3535534, 1e-6)
    assert table[0]["best_loss_mean"] == pytest.approx(1.5) and table[0]["loss_n"] == 2
    from workbench.study import PlotSpec, write_results

    study.plots.extend([PlotSpec(kind="final", x="training.learning_rate", y="loss"),
                        PlotSpec(kind="curve", y="loss", name="loss_curves")])
    results, report = write_results(study, runs)
    text = report.read_text()
    assert "![loss_vs_training.learning_rate](loss_vs_training.learning_rate.png)" in text
    assert (results.parent / "loss_curves.png").is_file()
    rows = list(csv.DictReader(results.open()))
    assert {r["training.learning_rate"] for r in rows} == {"0.001", "0.002"} and "t.s.acc_mean" in rows[1]


@pytest.mark.integration
def test_submitit_local_executor(tmp_path):
    path = write_study(tmp_path, seeds=[0], axes={"training.learning_rate": [1e-3]})
    result = launch(str(path), "--executor", "submitit-local")
    assert result.returncode == 0, result.stderr[-2000:]
    (only,) = grid(load_study(path))
    assert run_status(only)["status"] == "done"
    assert list((tmp_path / "runs/s/submitit").glob("*_result.pkl"))


def test_variant_axes_name_runs_and_set_their_overrides(tmp_path):
    variants = {"none": {}, "dropout-0.3": {"methods.dropout_schedule.rate": 0.3, "training.weight_decay": 0.1}}
    study = load_study(write_study(tmp_path, axes={"regulariser": variants, "training.learning_rate": [1e-3]}, seeds=[0]))
    runs = grid(study)
    assert [r.name for r in runs] == ["regulariser=none_learning_rate=0.001_seed=0",
                                      "regulariser=dropout-0.3_learning_rate=0.001_seed=0"]
    assert runs[1].values == {"regulariser": "dropout-0.3", "training.learning_rate": 1e-3}
    overrides = runs[1].overrides()
    assert "methods.dropout_schedule.rate=0.3" in overrides and "training.weight_decay=0.1" in overrides
    assert not any(o.startswith("regulariser") for o in overrides)
    with pytest.raises(ConfigError, match="regulariser=bad.*dropout_schedule"):
        load_study(write_study(tmp_path, axes={"regulariser": {"bad": {"methods.dropout_schedule.rte": 0.3}}}))


@pytest.mark.integration
def test_profiles_make_a_separate_smaller_grid(tmp_path):
    profiles = {"quick": {"seeds": [5], "axes": {"training.learning_rate": [1e-3]}, "set": {"training.max_steps": 2}}}
    path = write_study(tmp_path, profiles=profiles)
    study = load_study(path, "quick")
    assert study.study == "s-quick" and study.profile == "quick" and study.seeds == [5]
    assert [r.name for r in grid(study)] == ["learning_rate=0.001_seed=5"]
    assert "training.max_steps=2" in grid(study)[0].overrides()
    assert grid(study)[0].run_dir == tmp_path / "runs" / "s-quick" / "learning_rate=0.001_seed=5"
    with pytest.raises(ConfigError, match="no profile 'scale'"):
        load_study(path, "scale")
    lines = launch(str(path), "--quick", "--dry-run").stdout.strip().splitlines()
    assert lines == [f"learning_rate=0.001_seed=5\tpending\t{tmp_path}/runs/s-quick/learning_rate=0.001_seed=5"]
    with pytest.raises(ConfigError, match="not an axis"):
        load_study(write_study(tmp_path, profiles={"quick": {"axes": {"model.preset": ["llama-tiny"]}}}), "quick")
    with pytest.raises(ConfigError, match="key:max"):
        load_study(write_study(tmp_path, collect=["loss:best"]))


def test_paired_deltas_against_the_reference_run():
    from workbench.study import DeltaSpec
    from workbench.study.analysis import add_deltas

    rows = [{"seed": s, "u": u, "size": z, "nll": 1.0 + s + (2.0 if u == "small" else 0.0) + (0.5 if z == "b" else 0)}
            for s in (0, 1) for u in ("all", "small") for z in ("a", "b")]
    rows.append({"seed": 2, "u": "small", "size": "a", "nll": 9.0})  # no reference run for seed 2
    add_deltas(rows, DeltaSpec(axis="u", reference="all", keys=["nll"]), ["u", "size"])
    assert [r.get("delta_nll") for r in rows] == [0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 2.0, 2.0, None]


def test_deltas_against_another_column_of_the_reference_run():
    """An SMoE arm's score at k active experts against the dense reference's score as saved (`against`)."""
    from workbench.study import DeltaSpec
    from workbench.study.analysis import add_deltas

    rows = [{"seed": s, "arm": "dense", "t.z.em": 0.1 * s} for s in (0, 1)]
    rows += [{"seed": s, "arm": "moe", "t.z@k2.em": 0.5 + 0.1 * s, "t.z@k4.em": 0.7} for s in (0, 1)]
    spec = DeltaSpec(axis="arm", reference="dense", keys=["t.z@k2.em", "t.z@k4.em"],
                     against={"t.z@k2.em": "t.z.em", "t.z@k4.em": "t.z.em"})
    add_deltas(rows, spec, ["arm"])
    assert [r.get("delta_t.z@k2.em") for r in rows] == [None, None, 0.5, pytest.approx(0.5)]
    assert [r.get("delta_t.z@k4.em") for r in rows] == [None, None, 0.7, pytest.approx(0.6)]
    add_deltas(rows, DeltaSpec(axis="arm", reference="dense", keys=["t.z@k2.em"]), ["arm"])  # same key: none
    assert "delta_t.z@k2.em" not in rows[0]


def test_an_experts_plot_draws_each_arm_against_k_and_a_dense_arm_as_a_line(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    from workbench.study import PlotSpec, StudyConfig
    from workbench.study.collect import aggregate
    from workbench.study.report import _draw_experts, draw

    rows = [{"arm": "dense", "seed": s, "t.z.em": 0.3 + 0.01 * s} for s in (0, 1)]
    rows += [{"arm": "moe", "seed": s, **{f"t.z@k{k}.em": 0.1 * k + 0.01 * s for k in (1, 2, 4)}} for s in (0, 1)]
    columns = ["t.z.em"] + [f"t.z@k{k}.em" for k in (1, 2, 4)]
    table = aggregate(rows, ["arm"], columns)
    study = StudyConfig(study="s", base="b.yaml", axes={"arm": ["dense", "moe"]})
    plot = PlotSpec(kind="experts", y="t.z.em", label="exact match", name="em_k")
    path = draw(plot, study, [], table, tmp_path)
    assert path == tmp_path / "em_k.png" and matplotlib.image.imread(path).shape[0] > 100
    _, ax = plt.subplots()
    assert _draw_experts(ax, plot, study, table) == "bars: ± 1 std over seeds"
    (moe,) = [bars.lines[0] for bars in ax.containers if bars.get_label() == "arm=moe"]
    assert list(moe.get_xdata()) == [1, 2, 4] and list(moe.get_ydata()) == pytest.approx([0.105, 0.205, 0.405])
    (dense,) = [line for line in ax.get_lines() if line.get_label() == "arm=dense (no experts; band ± 1 std)"]
    assert list(dense.get_ydata()) == pytest.approx([0.305, 0.305])
    assert ax.get_xscale() == "log" and "active experts" in ax.get_xlabel()


def test_agreement_best_x_kendall_tau_and_cost():
    from scipy import stats

    from workbench.study import AgreementSpec
    from workbench.study.analysis import agreement

    dense = {0.0: 3.0, 0.1: 2.0, 0.3: 2.5, 0.5: 4.0}
    moe = {0.0: 3.5, 0.1: 2.6, 0.3: 2.4, 0.5: 4.5}
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for x in dense:
            rows.append({"seed": seed, "m": "dense", "rate": x, "nll": dense[x] + shift, "sec": 10.0, "flops": 4.0})
            rows.append({"seed": seed, "m": "moe", "rate": x, "nll": moe[x] - shift, "sec": 5.0, "flops": 1.0})
    result = agreement(rows, AgreementSpec(group="m", x="rate", y="nll", cost=["sec", "flops"]), maximize=False)
    assert result["groups"]["dense"]["best_x"] == 0.1 and result["groups"]["moe"]["best_x"] == 0.3
    regret = result["pairs"][0]["regret"]  # the dense model at the MoE's choice (0.3) against its own best (0.1)
    assert regret["moe for dense"]["per_seed"] == pytest.approx({0: 0.5, 1: 0.5})
    assert regret["moe for dense"]["ci95_bootstrap"] == pytest.approx([0.5, 0.5])
    assert regret["dense for moe"]["mean"] == pytest.approx(0.2)
    (pair,) = result["pairs"]
    assert pair["same_best_x"] is False
    expected = stats.kendalltau([dense[x] + 0.05 for x in dense], [moe[x] - 0.05 for x in dense]).statistic
    assert pair["tau_of_means"] == pytest.approx(expected) and pair["tau_per_seed_mean"] == pytest.approx(expected)
    assert result["groups"]["dense"]["cost"] == {"sec": 80.0, "flops": 32.0}
    assert pair["cost_ratio"] == {"sec": 2.0, "flops": 4.0}
    best_high = agreement(rows, AgreementSpec(group="m", x="rate", y="nll", cost=[]), maximize=True)
    assert best_high["groups"]["dense"]["best_x"] == 0.5
    # the best value (mean over seeds) and how much the mean moves across x: the learning-rate sensitivity
    assert result["groups"]["dense"]["best_y"] == pytest.approx(2.05)
    assert result["groups"]["moe"]["y_range"] == pytest.approx(4.45 - 2.35)


def test_agreement_on_a_higher_is_better_evaluator_column_takes_its_maximum():
    from workbench.study import StudyConfig
    from workbench.study.analysis import compare

    rows = [{"seed": 0, "m": "a", "rate": x, "t.s.exact_match": y} for x, y in ((0.1, 0.2), (0.3, 0.6), (1.0, 0.4))]
    spec = {"kind": "agreement", "group": "m", "x": "rate", "y": "t.s.exact_match"}
    study = StudyConfig(study="s", base="b.yaml", axes={"m": ["a"], "rate": [0.1, 0.3, 1.0]},
                        compare=[{**spec, "best": "max"}])
    assert compare(study, rows)[0]["groups"]["a"]["best_x"] == 0.3
    study = StudyConfig(study="s", base="b.yaml", axes={"m": ["a"], "rate": [0.1, 0.3, 1.0]}, compare=[spec])
    assert compare(study, rows)[0]["groups"]["a"]["best_x"] == 0.1  # auto: a loss-like column, lowest


@pytest.mark.parametrize("path", sorted((REPO / "workbench" / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_studies_and_their_profiles_load(path):
    study = load_study(path)
    assert grid(study)
    for profile in study.profiles:
        smaller = load_study(path, profile)
        assert smaller.study == f"{study.study}-{profile}" and grid(smaller)
    if "quick" in study.profiles:
        assert len(grid(load_study(path, "quick"))) < len(grid(study))


@pytest.mark.integration
def test_a_study_run_launched_by_deepspeed_on_two_ranks(tmp_path):
    path = write_study(tmp_path, seeds=[0], axes={"training.learning_rate": [1e-3]},
                  launcher={"kind": "deepspeed", "num_gpus": 2})
    result = launch(str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    (only,) = grid(load_study(path))
    assert run_status(only)["status"] == "done", (only.run_dir / "train.log").read_text()[-3000:]
    # the Trainer saved one RNG state per rank: the run really had two
    assert sorted(p.name for p in (only.run_dir / "checkpoint-4").glob("rng_state_*.pth")) == [
        "rng_state_0.pth", "rng_state_1.pth"]


@pytest.mark.integration
def test_an_arm_that_repeats_another_arms_training_is_trained_once_and_collected_under_its_labels(tmp_path):
    # `long` at 4 steps is the same training as `short` at 4 steps; the rule links it (and names the arm it reads)
    axes = {"training.max_steps": [4, 2], "schedule": {"short": {}, "long": {}}}
    rule = [{"where": {"training.max_steps": 4, "schedule": "long"}, "use": {"schedule": "short"}}]
    path = write_study(tmp_path, axes=axes, seeds=[0], same_as=rule)
    runs = {r.name: r for r in grid(load_study(path))}
    repeat = runs["max_steps=4_schedule=long_seed=0"]
    assert repeat.same_as == "max_steps=4_schedule=short_seed=0" and repeat.run_dir == runs[repeat.same_as].run_dir
    assert [r.same_as for r in runs.values()].count(None) == 3  # the 2-step arms are trained as usual
    dry = launch(str(path), "--dry-run")
    assert "(the same training as max_steps=4_schedule=short_seed=0)" in dry.stdout
    result = launch(str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the same training as max_steps=4_schedule=short_seed=0, done (not trained again)" in result.stdout
    assert not (tmp_path / "runs/s/max_steps=4_schedule=long_seed=0").exists()
    rows = {(r["training.max_steps"], r["schedule"]): r for r in csv.DictReader((tmp_path / "runs/s/results.csv").open())}
    assert rows[("4", "long")]["loss_mean"] == rows[("4", "short")]["loss_mean"] != rows[("2", "long")]["loss_mean"]
    # --only on the repeat trains the arm it repeats; a rule naming no axis is an error naming the field
    assert "running that" in launch(str(path), "--only", repeat.name).stdout
    bad = write_study(tmp_path, axes=axes, seeds=[0], same_as=[{"where": {"schedul": "long"}, "use": {}}])
    with pytest.raises(ConfigError, match=r"same_as\[0\]\.where.*'schedul' is not an axis"):
        load_study(bad)
