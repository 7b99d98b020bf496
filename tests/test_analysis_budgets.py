"""One budget per cell and seed noise, on hand-made results stores (no pipeline in the loop): a
seed stopped early is never averaged with seeds that trained longer, and a cell's 95 % interval is
the Student-t one, computed here by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.plots import figures
from analysis.results_store import mark_interrupted, read_results, write_trial_rows
from analysis.tables import (
    markdown_cells,
    search_ranking,
    table_stats,
    to_csv,
    to_latex,
    to_markdown,
)

from helpers import invoke

PLANNED = 1000


def trial_rows(seed: int, status: str, values: dict[int, float], **extra) -> list[dict]:
    """Exact match at 2× of a Biweight sort trial planned for 1000 steps, at each step given."""
    return [
        {
            "task": "sort",
            "kernel": "entmax",
            "kernel_label": "Biweight",
            "alpha": 1.5,
            "seed": seed,
            "metric": "exact_match",
            "length_factor": 2.0,
            "step": step,
            "value": value,
            "status": status,
            "planned_steps": PLANNED,
            **extra,
        }
        for step, value in values.items()
    ]


def store(tmp_path, trials: dict[str, list[dict]]) -> pd.DataFrame:
    """Write the trials as a results store and read it back, as `table` does."""
    for trial_id, rows in trials.items():
        write_trial_rows(tmp_path, trial_id, rows)
    return read_results(tmp_path)


def the_issue_s_search(tmp_path) -> pd.DataFrame:
    """search_smoke's winner: seed 0 stopped by ASHA at step 250 (0.0), seed 1 trained to 1000
    (0.215 there, 0.1 at 250); their mean, 0.1075, mixes two budgets."""
    searched = {"searched": '{"train.lr": 0.003}'}
    return store(
        tmp_path,
        {
            "t0": trial_rows(0, "STOPPED", {250: 0.0}, **searched),
            "t1": trial_rows(1, "TERMINATED", {250: 0.1, 500: 0.15, 1000: 0.215}, **searched),
        },
    )


def test_a_seed_stopped_by_asha_is_left_out_of_the_cell_and_named(tmp_path):
    stats = table_stats(the_issue_s_search(tmp_path), planned_seeds=2)
    cell = stats.columns[0].stats.loc["Biweight"]
    assert (cell["mean"], cell["max"], cell["seeds"]) == (0.215, 0.215, 1)  # never 0.1075
    assert cell["note"] == "1 stopped by ASHA at step 250"
    assert to_markdown(markdown_cells(stats)) == (
        "| Kernel | sort 2× |\n|---|---|\n"
        "| Biweight | **0.21**^(<u>0.21</u>) [1/2, note 1] |\n"
        "\nnote 1: 1 stopped by ASHA at step 250\n"
    )
    header, row = to_csv(stats).splitlines()
    assert header == (
        "row,kernel_label,sort_2x_mean,sort_2x_max,sort_2x_seeds,sort_2x_ci_low,sort_2x_ci_high,"
        "sort_2x_note"
    )
    assert row == "Biweight,Biweight,0.215,0.215,1,,,1 stopped by ASHA at step 250"
    assert r"\multicolumn{2}{l}{\footnotesize note 1: 1 stopped by ASHA at step 250} \\" in (
        to_latex(stats)
    )


def test_a_search_ranking_over_such_seeds_compares_them_at_step_250(tmp_path):
    ranking = search_ranking(the_issue_s_search(tmp_path), "exact_match_2x", "max")
    assert ranking.to_dict("list") == {
        "exact_match_2x mean at step 250": ["0.05"],  # (0.0 + 0.1) / 2, both at step 250
        "best seed": ["0.1"],
        "seeds": [2],
        "furthest step": [250],
        "mean there": ["0.05"],
    }
    assert ranking.attrs["notes"][0].startswith("compared at step 250:")
    assert ranking.attrs["notes"][1] == "seeds short of their planned steps: 1 stopped by ASHA"


def test_seeds_all_stopped_early_are_shown_at_their_step_and_take_no_bold(tmp_path):
    results = store(
        tmp_path,
        {
            "full0": trial_rows(0, "TERMINATED", {1000: 0.5}, alpha=1.25, kernel_label="a"),
            "full1": trial_rows(1, "TERMINATED", {1000: 0.3}, alpha=1.25, kernel_label="a"),
            "early0": trial_rows(0, "STOPPED", {250: 0.9}, kernel_label="b"),
            "early1": trial_rows(1, "STOPPED", {250: 0.7}, kernel_label="b"),
        },
    )
    cells = markdown_cells(table_stats(results, planned_seeds=2))
    assert cells["sort 2×"].to_dict() == {
        "a": "**0.40**^(<u>0.50</u>)",  # the best full-budget cell, though b's 0.80 is higher
        "b": "0.80^(0.90) [note 1]",
    }
    assert cells.attrs["notes"] == [
        "note 1: shown at step 250 of 1000; 2 stopped by ASHA at step 250"
    ]


def test_the_table_after_ctrl_c_marks_interrupted_and_running_seeds(tmp_path):
    results = store(
        tmp_path,
        {
            "done": trial_rows(0, "TERMINATED", {500: 0.1, 1000: 0.6}),
            "cut": trial_rows(1, "INTERRUPTED", {500: 0.2}),
            "live": trial_rows(2, "RUNNING", {500: 0.3}),
        },
    )
    cell = table_stats(results, planned_seeds=3).columns[0].stats.loc["Biweight"]
    assert (cell["mean"], cell["seeds"]) == (0.6, 1)
    assert cell["note"] == "1 interrupted at step 500; 1 still running at step 500"


def test_after_ctrl_c_the_running_trials_are_marked_interrupted(tmp_path):
    store(
        tmp_path,
        {
            "done": trial_rows(0, "TERMINATED", {500: 0.1, 1000: 0.6}),
            "cut": trial_rows(1, "RUNNING", {250: 0.1, 500: 0.2}),
        },
    )
    assert mark_interrupted(tmp_path) == ["cut"]
    results = read_results(tmp_path)
    assert results.groupby("trial_id")["status"].unique().map(list).to_dict() == {
        "cut": ["INTERRUPTED"],
        "done": ["TERMINATED"],
    }
    assert len(results) == 4 and mark_interrupted(tmp_path) == []
    note = table_stats(results).columns[0].stats.loc["Biweight", "note"]
    assert note == "1 interrupted at step 500"


def test_a_store_without_planned_steps_compares_seeds_by_their_last_step(tmp_path):
    """Older stores (or other tools') say nothing of the plan: the longest-trained seeds count."""
    results = store(
        tmp_path,
        {
            "a": trial_rows(0, "TERMINATED", {1000: 0.6}, planned_steps=None),
            "b": trial_rows(1, "RUNNING", {500: 0.2}, planned_steps=None),
        },
    )
    cell = table_stats(results).columns[0].stats.loc["Biweight"]
    assert (cell["mean"], cell["note"], bool(cell["full_budget"])) == (
        0.6,
        "1 still running at step 500",
        True,
    )


def test_the_interval_of_three_seeds_is_the_student_t_one(tmp_path):
    """0.2, 0.4, 0.6: mean 0.4, s = 0.2, and for 2 degrees of freedom the t quantile has the
    closed form t_q = (2q − 1) / √(2q(1 − q)): at q = 0.975, 0.95 / √0.04875 = 4.3027."""
    results = store(
        tmp_path,
        {
            f"t{seed}": trial_rows(seed, "TERMINATED", {1000: v})
            for seed, v in enumerate([0.2, 0.4, 0.6])
        },
    )
    stats = table_stats(results)
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    half = t * 0.2 / math.sqrt(3)
    cell = stats.columns[0].stats.loc["Biweight"]
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx((0.4 - half, 0.4 + half), rel=1e-9)
    row = to_csv(stats).splitlines()[1].split(",")
    assert [float(value) for value in row[5:7]] == pytest.approx([0.4 - half, 0.4 + half])
    cells = markdown_cells(stats, ci=True)
    assert cells["sort 2×"]["Biweight"] == "**0.40** ± 0.50^(<u>0.60</u>)"  # half width 0.4968
    assert cells.attrs["notes"][-1].startswith("±: half width of the 95 % Student-t interval")
    assert r"$\textbf{0.40} \pm 0.50^{(\underline{0.60})}$" in to_latex(stats, ci=True)
    shown = invoke("table", tmp_path, "--ci").stdout.splitlines()
    assert shown[2] == "| Biweight | **0.40** ± 0.50^(<u>0.60</u>) |"
    assert shown[-1].startswith("±: half width of the 95 % Student-t interval over seeds")


def test_a_length_figure_leaves_the_stopped_seed_out_and_names_it(tmp_path):
    figure = figures(the_issue_s_search(tmp_path))["exact_match_vs_length"]
    # one legend per figure, under its panels
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["Biweight [1 stopped by ASHA at step 250]"]
    (line,) = figure.axes[0].get_lines()
    assert list(line.get_ydata()) == [0.215]
