"""Tables as Markdown, LaTeX and CSV against hand-checked golden files, the `table` and `plot`
commands, and the results frame rebuilt from MLflow."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.results_store import read_results, write_trial_rows
from analysis.tables import markdown_cells, table_stats, to_csv, to_latex, to_markdown
from orchestrator.tracking.names import KERNEL_LABEL_TAG, PARENT_TAG, TRIAL_ID_TAG

from helpers import invoke

GOLDEN = Path(__file__).parent / "golden"


@dataclass(frozen=True)
class Trial:
    """One trial as the tracker sees it: config columns and its reports, step -> {(metric, factor): value}."""

    trial_id: str
    label: str
    kernel: str
    params: dict[str, float]
    seed: int
    reports: dict[int, dict[tuple[str, float | None], float]]
    status: str = "TERMINATED"
    task: str = "sort"
    n_layer: int = 2
    num_examples: int | None = None

    def rows(self, run_id: str | None = None) -> list[dict]:
        k = self.params.get("k")
        base = dict(
            task=self.task,
            kernel=self.kernel,
            kernel_label=self.label,
            alpha=self.params.get("alpha"),
            k=None if k is None else int(k),
            b=self.params.get("b"),
            n_layer=self.n_layer,
            num_examples=self.num_examples,
            seed=self.seed,
            status=self.status,
            mlflow_run_id=run_id,
        )
        return [
            dict(
                base,
                trial_id=self.trial_id,
                metric=metric,
                length_factor=factor,
                step=step,
                value=value,
            )
            for step, values in self.reports.items()
            for (metric, factor), value in values.items()
        ]


def sort_trial(
    number: int,
    label: str,
    kernel: str,
    params: dict,
    seed: int,
    em1: float,
    em2: float,
    status: str = "TERMINATED",
) -> Trial:
    """Exact match `em1`, `em2` at 1× and 2× at the last evaluation (step 200); a perfect, earlier
    evaluation at step 100 must not count. A failed trial reported at step 100 only."""

    def report(e1: float, e2: float, loss: float) -> dict:
        return {
            ("exact_match", 1.0): e1,
            ("exact_match", 2.0): e2,
            ("support_size", 1.0): 4.0 * e1,
            ("support_size", 2.0): 8.0 * e2,
            ("train_loss", None): loss,
        }

    reports = (
        {100: report(em1, em2, 2.0)}
        if status == "ERROR"
        else {100: report(1.0, 1.0, 2.0), 200: report(em1, em2, 1.0)}
    )
    return Trial(f"trial{number:02d}", label, kernel, params, seed, reports, status)


# Cells in tests/golden/length_table.*: 1×: Gaussian (0.90+0.95+0.99)/3 = 0.9467, Biweight
# (0.91+0.93)/2 = 0.92 (its seed 2 failed: missing, though it reported), kNN (0.80+0.86)/2 = 0.83;
# 2×: 0.30, 0.55, 0.64.
LENGTH_TRIALS = [
    sort_trial(0, "Gaussian", "softmax", {}, 0, 0.90, 0.20),
    sort_trial(1, "Gaussian", "softmax", {}, 1, 0.95, 0.30),
    sort_trial(2, "Gaussian", "softmax", {}, 2, 0.99, 0.40),
    sort_trial(3, "Biweight", "entmax", {"alpha": 1.5}, 0, 0.91, 0.50),
    sort_trial(4, "Biweight", "entmax", {"alpha": 1.5}, 1, 0.93, 0.60),
    sort_trial(
        5, "Biweight", "entmax", {"alpha": 1.5}, 2, 0.97, 0.61, status="ERROR"
    ),  # failed: missing, though it reported
    sort_trial(6, "Uniform kNN, k = 2", "topk_uniform", {"k": 2.0}, 0, 0.80, 0.62),
    sort_trial(
        7, "Uniform kNN, k = 2", "topk_uniform", {"k": 2.0}, 1, 0.86, 0.66
    ),  # no seed 2: [2/3]
]


def regbench_trial(
    number: int, label: str, seed: int, size: int, accuracy: float, tvd: float
) -> Trial:
    reports = {
        50: {("accuracy", None): 0.0, ("tvd", None): 99.0, ("val_loss", None): 2.0},
        100: {("accuracy", None): accuracy, ("tvd", None): tvd, ("val_loss", None): 1.0},
    }
    return Trial(
        f"trial{number:02d}",
        label,
        "softmax" if label == "Gaussian" else "entmax",
        {} if label == "Gaussian" else {"alpha": 1.5},
        seed,
        reports,
        task="regbench",
        num_examples=size,
    )


# tests/golden/regbench_table.*: accuracy at 1000: Gaussian (80+90)/2 = 85 (best seed 90), Biweight
# (84+86)/2 = 85: a tie, both bold; TVD at 1000: 15 and 13, best seed 10 (lower is better).
REGBENCH_TRIALS = [
    regbench_trial(0, "Gaussian", 0, 1000, 80.0, 20.0),
    regbench_trial(1, "Gaussian", 1, 1000, 90.0, 10.0),
    regbench_trial(2, "Biweight", 0, 1000, 84.0, 12.0),
    regbench_trial(3, "Biweight", 1, 1000, 86.0, 14.0),
    regbench_trial(4, "Biweight", 0, 5000, 95.0, 5.0),
]


def frame(trials: list[Trial]) -> pd.DataFrame:
    return pd.DataFrame([row for trial in trials for row in trial.rows()])


def store(folder: Path, trials: list[Trial]) -> Path:
    for trial in trials:
        write_trial_rows(folder, trial.trial_id, trial.rows())
    return folder


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


def test_length_table_in_three_formats():
    stats = table_stats(frame(LENGTH_TRIALS), planned_seeds=3)
    assert to_markdown(markdown_cells(stats)) == golden("length_table.md")
    assert to_latex(stats) == golden("length_table.tex")
    assert to_csv(stats) == golden("length_table.csv")


def test_regbench_table_in_three_formats():
    stats = table_stats(frame(REGBENCH_TRIALS), by="num_examples", planned_seeds=2)
    assert to_markdown(markdown_cells(stats)) == golden("regbench_table.md")
    assert to_latex(stats) == golden("regbench_table.tex")
    assert to_csv(stats) == golden("regbench_table.csv")


def test_latex_escapes_labels_and_keeps_seed_note_as_text():
    trial = sort_trial(0, "top_k & 50% #1", "softmax", {}, 0, 0.5, 0.25)
    latex = to_latex(table_stats(frame([trial]), planned_seeds=2))
    assert r"top\_k \& 50\% \#1 & $\textbf{0.50}^{(\underline{0.50})}$ [1/2] &" in latex


def test_table_stats_defaults_and_unknown_metric():
    results = frame(LENGTH_TRIALS)
    assert [c.key for c in table_stats(results, metric="support_size").columns] == [
        "sort_1x",
        "sort_2x",
    ]
    lm = frame([Trial("t", "Gaussian", "softmax", {}, 0, {10: {("val_loss", None): 3.0}})])
    assert table_stats(lm, by="n_layer").columns[0].lower_is_better
    with pytest.raises(
        ValueError,
        match="no results for metric 'nope' by length_factor; metrics present: exact_match, support_size",
    ):
        table_stats(results, metric="nope")


def test_cli_table_formats(tmp_path):
    sweep = store(tmp_path / "sweep", LENGTH_TRIALS)
    result = invoke("table", sweep)
    assert result.exit_code == 0, result.output
    assert result.stdout == golden("length_table.md")
    assert invoke("table", sweep, "--format", "latex").stdout == golden("length_table.tex")
    out = tmp_path / "table.csv"
    assert invoke("table", sweep, "--format", "csv", "--out", out).exit_code == 0
    assert out.read_text() == golden("length_table.csv")

    regbench = store(tmp_path / "regbench", REGBENCH_TRIALS)
    assert invoke("table", regbench, "--by", "num_examples").stdout == golden("regbench_table.md")
    only_tvd = invoke("table", regbench, "--by", "num_examples", "--metric", "tvd").stdout
    assert (
        only_tvd.splitlines()[0] == "| Kernel | tvd ↓ num_examples=1000 | tvd ↓ num_examples=5000 |"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{empty}"], "no results in"),
        (["{sweep}", "--metric", "nope"], "metrics present: exact_match, support_size"),
        (
            ["{sweep}", "--by", "dropout"],
            "unknown --by 'dropout'; choose from length_factor, num_examples, n_layer",
        ),
        (["{sweep}", "--format", "html"], "'html' is not one of 'md', 'latex', 'csv'"),
        ([], "give either DIR or --from-mlflow"),
        (
            ["{sweep}", "--from-mlflow", "sqlite:///x.db", "--experiment", "x"],
            "give either DIR or --from-mlflow",
        ),
        (["--from-mlflow", "sqlite:///x.db"], "--from-mlflow needs --experiment"),
        (["{sweep}", "--experiment", "x"], "--experiment goes with --from-mlflow"),
    ],
)
def test_cli_table_errors(tmp_path, args, message):
    paths = {"{empty}": tmp_path / "empty", "{sweep}": store(tmp_path / "sweep", LENGTH_TRIALS[:1])}
    result = invoke("table", *(paths.get(a, a) for a in args))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def flat_config(trial: Trial) -> dict:
    """The trial's config as the tracker logs it to MLflow: flattened, defaults filled in."""
    from mosaic_core.config import TrialConfig, flatten

    return flatten(
        TrialConfig.model_validate(
            {
                "seed": trial.seed,
                "task": {"name": trial.task},
                "model": {
                    "kernel": trial.kernel,
                    "kernel_params": trial.params,
                    "n_layer": trial.n_layer,
                },
                "train": {"max_steps": 200},  # the last evaluation of every trial that finished
            }
        ).model_dump()
    )


def config_columns(trials: list[Trial]) -> dict[str, dict]:
    """Per trial, the columns the tracker derives from its config: n_embd, n_head, lr, weight_decay
    as the config's defaults, planned_steps, and `config`, the keys these trials differ in but the seed."""
    from analysis.schema import config_json, varied_keys

    flats = {trial.trial_id: flat_config(trial) for trial in trials}
    varied = varied_keys(flats.values())
    assert varied == ["model.kernel", "model.kernel_params.alpha", "model.kernel_params.k", "seed"]
    return {
        trial_id: {
            "n_embd": flat["model.n_embd"],
            "n_head": flat["model.n_head"],
            "lr": flat["train.lr"],
            "weight_decay": flat["train.weight_decay"],
            "planned_steps": flat["train.max_steps"],
            "config": config_json(flat, varied),
        }
        for trial_id, flat in flats.items()
    }


def mlflow_sweep(tmp_path: Path, trials: list[Trial]) -> tuple[str, dict[str, str]]:
    """A SQLite MLflow store as `SweepTracker` fills it, plus an older invocation that must be
    ignored; returns the URI and the child run id of each trial."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "sort-sweep", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    old = client.create_run(experiment, run_name="old", start_time=1_000).info.run_id
    stale = client.create_run(
        experiment, start_time=1_001, tags={PARENT_TAG: old, KERNEL_LABEL_TAG: "Stale"}
    )
    client.log_batch(stale.info.run_id, metrics=[Metric("exact_match_1x", 0.0, 0, 200)])
    parent = client.create_run(experiment, run_name="new", start_time=2_000).info.run_id
    run_ids = {}
    for trial in trials:
        run = client.create_run(
            experiment,
            run_name=trial.trial_id,
            start_time=3_000,
            tags={
                PARENT_TAG: parent,
                TRIAL_ID_TAG: trial.trial_id,
                KERNEL_LABEL_TAG: trial.label,
            },
        )
        run_id = run_ids[trial.trial_id] = run.info.run_id
        params = [Param(key, str(value)) for key, value in flat_config(trial).items()]
        metrics = [
            Metric(metric if factor is None else f"{metric}_{factor:g}x", value, 0, step)
            for step, values in trial.reports.items()
            for (metric, factor), value in values.items()
        ]
        client.log_batch(run_id, params=params, metrics=metrics)
        client.set_terminated(run_id, status="FAILED" if trial.status == "ERROR" else "FINISHED")
    client.set_terminated(parent)
    return uri, run_ids


def test_results_from_mlflow_equal_the_results_store(tmp_path):
    from analysis.mlflow_source import results_from_mlflow

    uri, run_ids = mlflow_sweep(tmp_path, LENGTH_TRIALS)
    columns = config_columns(LENGTH_TRIALS)
    for trial in LENGTH_TRIALS:
        rows = [{**row, **columns[trial.trial_id]} for row in trial.rows(run_ids[trial.trial_id])]
        write_trial_rows(tmp_path / "sweep", trial.trial_id, rows)
    keys = ["trial_id", "metric", "length_factor", "step"]
    expected = read_results(tmp_path / "sweep").sort_values(keys).reset_index(drop=True)
    rebuilt = results_from_mlflow(uri, "sort-sweep")
    pd.testing.assert_frame_equal(rebuilt.sort_values(keys).reset_index(drop=True), expected)
    assert set(rebuilt["status"]) == {"TERMINATED", "ERROR"}
    assert rebuilt["config"].str.contains('"model.kernel_params.alpha": 1.5').sum() > 0

    result = invoke("table", "--from-mlflow", uri, "--experiment", "sort-sweep")
    assert result.exit_code == 0, result.output
    assert result.stdout == golden("length_table.md")
    missing = invoke("table", "--from-mlflow", uri, "--experiment", "nope")
    assert missing.exit_code == 2 and "no MLflow experiment 'nope'" in missing.stderr


def lm_trials() -> list[Trial]:
    """Validation loss every 100 steps and the per-position OOD curve at the end, two depths."""
    trials = []
    for number, (label, kernel, params, n_layer, seed) in enumerate(
        [
            (label, kernel, params, n_layer, seed)
            for label, kernel, params in [
                ("Gaussian", "softmax", {}),
                ("Biweight", "entmax", {"alpha": 1.5}),
            ]
            for n_layer in (2, 4)
            for seed in (0, 1)
        ]
    ):
        offset = 0.1 * seed + (0.2 if kernel == "entmax" else 0.0)
        reports = {
            step: {("val_loss", None): 5.0 / (1 + step / 100) + offset}
            for step in range(100, 600, 100)
        }
        reports[500].update(
            {
                (f"ood_loss_ema/pos{p}", None): 4.0 - 0.3 * np.log2(p) + offset
                for p in (1, 2, 4, 8, 16)
            }
        )
        trials.append(
            Trial(
                f"lm{number:02d}", label, kernel, params, seed, reports, task="lm", n_layer=n_layer
            )
        )
    return trials


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    image = imread(path)
    assert path.stat().st_size > 0 and image.size > 0 and image.std() > 0


def test_plots_written_only_where_data_exists(tmp_path):
    from analysis.plots import make_plots

    length = make_plots(frame(LENGTH_TRIALS), tmp_path / "length")
    assert [p.name for p in length] == [
        "training_curves.png",
        "exact_match_vs_length.png",
        "support_size_vs_length.png",
    ]
    lm = make_plots(frame(lm_trials()), tmp_path / "lm")
    assert [p.name for p in lm] == [
        "training_curves.png",
        "val_loss_vs_step.png",
        "ood_loss_per_position.png",
    ]
    # RegBench's own figures need val_loss; its training curves (accuracy vs. step) need not
    regbench = make_plots(frame(REGBENCH_TRIALS).query("metric != 'val_loss'"), tmp_path / "rb")
    assert [p.name for p in regbench] == ["training_curves.png"]
    for path in length + lm + regbench:
        assert path.parent.parent == tmp_path
        check_png(path)
    no_data = frame(REGBENCH_TRIALS).query("metric == 'tvd'")
    assert make_plots(no_data, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def two_task_trials() -> list[Trial]:
    """The sort trials, and two of a reverse task evaluated at 1×, 2× and 4× (a factor sort lacks)."""
    reports = {
        200: {("exact_match", 1.0): 0.9, ("exact_match", 2.0): 0.5, ("exact_match", 4.0): 0.1}
    }
    return LENGTH_TRIALS + [
        replace(trial, trial_id=f"rev{trial.trial_id}", task="reverse", reports=reports)
        for trial in LENGTH_TRIALS[:2]
    ]


def inside(inner, outer) -> bool:
    return (
        outer.x0 <= inner.x0
        and inner.x1 <= outer.x1
        and outer.y0 <= inner.y0
        and inner.y1 <= outer.y1
    )


def test_length_figure_is_log2_with_ticks_at_the_factors_and_a_panel_per_task():
    from analysis.plots import LENGTH_AXIS, figures

    figure = figures(frame(two_task_trials()))["exact_match_vs_length"]
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["reverse", "sort"]  # one panel per task
    for ax, factors in zip(axes, ([1.0, 2.0, 4.0], [1.0, 2.0])):
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert list(ax.get_xticks()) == factors and list(ax.get_xticks(minor=True)) == []
        assert [label.get_text() for label in ax.get_xticklabels()] == [f"{f:g}" for f in factors]
        assert ax.get_xlabel() == LENGTH_AXIS == "× eval_length"
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert inside(figure._suptitle.get_window_extent(renderer), figure.bbox)


@pytest.mark.parametrize("trials", ["length", "two_tasks", "lm", "regbench"])
def test_legends_cover_no_title_and_no_panel_and_kernels_differ_in_style(trials):
    """Every figure: its legend's box (Matplotlib window extents) meets no panel and no title, and
    curves of different kernels differ in line style and marker, not in colour alone."""
    from analysis.plots import figures

    results = {
        "length": LENGTH_TRIALS,
        "two_tasks": two_task_trials(),
        "lm": lm_trials(),
        "regbench": REGBENCH_TRIALS,
    }[trials]
    drawn = figures(frame(results))
    assert drawn
    for stem, figure in drawn.items():
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        (legend,) = figure.legends
        box = legend.get_window_extent(renderer)
        titles = [figure._suptitle, *(ax.title for ax in figure.get_axes())]
        for text in titles:
            assert not box.overlaps(text.get_window_extent(renderer)), (stem, text.get_text())
        for ax in figure.get_axes():
            assert not box.overlaps(ax.get_window_extent(renderer)), stem
            assert inside(ax.title.get_window_extent(renderer), figure.bbox)
        styles = {}
        for ax in figure.get_axes():
            for line in ax.get_lines():
                kernel = line.get_label().split(" · ")[0].split(" [")[0]
                styles.setdefault(kernel, set()).add((line.get_linestyle(), line.get_marker()))
        assert all(len(style) == 1 for style in styles.values()), (stem, styles)
        distinct = {next(iter(style)) for style in styles.values()}
        assert len(distinct) == len(styles), (stem, styles)


def test_figures_in_each_format_at_300_dpi(tmp_path):
    from matplotlib.image import imread

    from analysis.plots import figures, make_plots

    paths = make_plots(frame(LENGTH_TRIALS), tmp_path, ("png", "pdf", "svg"))
    assert sorted(p.name for p in paths) == sorted(
        f"{stem}.{suffix}"
        for stem in ("training_curves", "exact_match_vs_length", "support_size_vs_length")
        for suffix in ("png", "pdf", "svg")
    )
    width, height = figures(frame(LENGTH_TRIALS))["exact_match_vs_length"].get_size_inches()
    # 300 pixels an inch
    assert imread(tmp_path / "exact_match_vs_length.png").shape[:2] == (
        round(height * 300),
        round(width * 300),
    )
    assert (tmp_path / "exact_match_vs_length.pdf").read_bytes().startswith(b"%PDF")
    assert "<svg" in (tmp_path / "exact_match_vs_length.svg").read_text()


def test_cli_plot_formats(tmp_path):
    sweep = store(tmp_path / "sweep", LENGTH_TRIALS)
    result = invoke("plot", sweep, "--format", "pdf,svg", "--format", "PNG")
    assert result.exit_code == 0, result.output
    suffixes = sorted(Path(line).suffix for line in result.stdout.splitlines())
    assert suffixes == [".pdf"] * 3 + [".png"] * 3 + [".svg"] * 3  # three figures
    wrong = invoke("plot", sweep, "--format", "png,jpg")
    assert (
        wrong.exit_code == 2
        and "--format jpg is not a figure format; give png, pdf, svg" in wrong.stderr
    )


def test_cli_plot(tmp_path):
    sweep = store(tmp_path / "sweep", LENGTH_TRIALS + lm_trials())
    result = invoke("plot", sweep)
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == [
        "training_curves.png",
        "exact_match_vs_length.png",
        "val_loss_vs_step.png",
        "ood_loss_per_position.png",
        "support_size_vs_length.png",
    ]
    assert all(p.parent == sweep / "plots" and p.is_file() for p in paths)
    only_test_metrics = [
        replace(
            t,
            reports={
                step: {key: value for key, value in values.items() if key[0] == "tvd"}
                for step, values in t.reports.items()
            },
        )
        for t in REGBENCH_TRIALS
    ]
    nothing = invoke("plot", store(tmp_path / "regbench", only_test_metrics))
    assert nothing.exit_code == 2 and "metrics present: tvd" in nothing.stderr
