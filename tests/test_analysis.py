import pandas as pd
import pytest

from analysis.results_store import read_results, write_trial_rows
from analysis.schema import RESULT_COLUMNS
from analysis.tables import Headline, headlines, markdown_cells, table_stats, to_markdown


def length_generalization_table(frame: pd.DataFrame, **options) -> pd.DataFrame:
    return markdown_cells(table_stats(frame, by="length_factor", **options))


# Last-step exact match per (kernel label, seed, length factor); hand-computed cells below.
FINAL = {
    "Softmax": {0: (0.90, 0.20), 1: (0.95, 0.30), 2: (0.99, 0.40)},  # means 0.9467, 0.30
    "1.5-entmax": {0: (0.91, 0.50), 1: (0.93, 0.60), 2: (0.97, 0.61)},  # means 0.9367, 0.57
}


def trial_rows(label: str, seed: int, values: tuple[float, ...], factors=(1.0, 2.0)) -> list[dict]:
    trial = f"{label}-{seed}"
    base = dict(trial_id=trial, task="sort", kernel_label=label, seed=seed, status="TERMINATED")
    rows = [dict(base, metric="exact_match", length_factor=f, step=100, value=1.0) for f in factors]
    rows += [
        dict(base, metric="exact_match", length_factor=f, step=200, value=v)
        for f, v in zip(factors, values)
    ]
    rows += [dict(base, metric="loss", length_factor=1.0, step=200, value=9.0)]
    rows += [dict(base, metric="exact_match", length_factor=None, step=300, value=1.0)]
    return rows


def results(final=FINAL, extra=()) -> pd.DataFrame:
    rows = [
        r
        for label, seeds in final.items()
        for seed, v in seeds.items()
        for r in trial_rows(label, seed, v)
    ]
    return pd.DataFrame(rows + list(extra))


def test_table_cells_use_last_step_mean_max_bold_underline():
    table = length_generalization_table(results(), planned_seeds=3)
    assert list(table.columns) == ["sort 1×", "sort 2×"]
    assert table.to_dict("index") == {
        "Softmax": {"sort 1×": "**0.95**^(<u>0.99</u>)", "sort 2×": "0.30^(0.40)"},
        "1.5-entmax": {"sort 1×": "0.94^(0.97)", "sort 2×": "**0.57**^(<u>0.61</u>)"},
    }


def test_missing_seed_is_flagged():
    final = {"Softmax": FINAL["Softmax"], "1.5-entmax": {0: (0.91, 0.50), 1: (0.93, 0.60)}}
    table = length_generalization_table(results(final), planned_seeds=3)
    assert table.loc["1.5-entmax"].tolist() == ["0.92^(0.93) [2/3]", "**0.55**^(<u>0.60</u>) [2/3]"]
    assert table.loc["Softmax"].tolist() == ["**0.95**^(<u>0.99</u>)", "0.30^(0.40)"]


def test_ties_on_shown_values_all_marked_and_missing_cell():
    topk = trial_rows("Top-k", 0, (0.951,), factors=(1.0,))  # shows 0.95 like Softmax's 0.9467
    # seeds planned: the most another row has
    table = length_generalization_table(results(extra=topk))
    assert table.loc["Top-k"].tolist() == ["**0.95**^(0.95) [1/3]", "—"]
    assert table.loc["Softmax", "sort 1×"] == "**0.95**^(<u>0.99</u>)"


def test_row_order():
    topk = trial_rows("Top-k", 0, (0.5, 0.5))
    table = length_generalization_table(
        results(extra=topk), row_order=["1.5-entmax", "Absent", "Softmax"]
    )
    assert list(table.index) == ["1.5-entmax", "Softmax", "Top-k"]


def test_task_stays_in_column_key():
    other = [
        dict(r, task="copy", trial_id="copy-" + r["trial_id"])
        for r in trial_rows("Softmax", 0, (0.5, 0.25))
    ]
    table = length_generalization_table(results(extra=other))
    assert list(table.columns) == ["copy 1×", "copy 2×", "sort 1×", "sort 2×"]
    assert table.loc["1.5-entmax", "copy 1×"] == "—"


def test_to_markdown():
    table = length_generalization_table(results(), row_order=["1.5-entmax"])
    assert to_markdown(table, title="Table 2") == (
        "**Table 2**\n\n"
        "| Kernel | sort 1× | sort 2× |\n"
        "|---|---|---|\n"
        "| 1.5-entmax | 0.94^(0.97) | **0.57**^(<u>0.61</u>) |\n"
        "| Softmax | **0.95**^(<u>0.99</u>) | 0.30^(0.40) |\n"
    )


def test_write_twice_replaces_trial_rows(tmp_path):
    write_trial_rows(
        tmp_path, "t1", [dict(r, trial_id="t1") for r in trial_rows("Softmax", 0, (0.1, 0.2))]
    )
    write_trial_rows(tmp_path, "t2", [dict(metric="loss", step=1, value=3.0)])
    write_trial_rows(tmp_path, "t1", [dict(metric="loss", step=2, value=1.5)])
    df = read_results(tmp_path).sort_values("trial_id")
    assert df[["trial_id", "step", "value"]].values.tolist() == [["t1", 2, 1.5], ["t2", 1, 3.0]]
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 2


def test_leftover_temp_file_is_ignored(tmp_path):
    part = write_trial_rows(tmp_path, "t1", [dict(metric="loss", step=1, value=3.0)])
    (part.parent / ".part-crashed.tmp").write_bytes(b"half a parquet file")
    assert read_results(tmp_path)["value"].tolist() == [3.0]
    assert pd.read_parquet(tmp_path / "results.parquet")["value"].tolist() == [3.0]


def test_unsafe_trial_id_stays_inside_store(tmp_path):
    part = write_trial_rows(tmp_path, "../a/b:c", [dict(metric="loss", step=1, value=3.0)])
    write_trial_rows(tmp_path, "../a/b_c", [dict(metric="loss", step=1, value=4.0)])
    assert part.parent == tmp_path / "results.parquet"
    assert sorted(read_results(tmp_path)["trial_id"]) == ["../a/b:c", "../a/b_c"]


def test_empty_store_has_typed_columns(tmp_path):
    empty = read_results(tmp_path)
    assert empty.empty and list(empty.columns) == RESULT_COLUMNS
    (tmp_path / "results.parquet").mkdir()
    assert list(read_results(tmp_path).columns) == RESULT_COLUMNS
    write_trial_rows(tmp_path, "t1", [dict(metric="loss", step=1, value=3.0)])
    assert empty.dtypes.equals(read_results(tmp_path).dtypes)


def test_unknown_column_or_other_trial_raises(tmp_path):
    with pytest.raises(ValueError, match="'temperature'"):
        write_trial_rows(tmp_path, "t1", [dict(metric="loss", step=1, value=3.0, temperature=1.0)])
    with pytest.raises(ValueError, match="'other'"):
        write_trial_rows(tmp_path, "t1", [dict(trial_id="other", metric="loss", step=1, value=3.0)])
    assert read_results(tmp_path).empty


def test_nulls_round_trip(tmp_path):
    common = dict(task="sort", metric="exact_match", length_factor=1.0, step=1, value=0.5)
    write_trial_rows(tmp_path, "soft", [dict(common, kernel="softmax", kernel_label="Softmax")])
    write_trial_rows(
        tmp_path, "ent", [dict(common, kernel="entmax", kernel_label="1.5-entmax", alpha=1.5)]
    )
    df = read_results(tmp_path).set_index("trial_id")
    assert pd.isna(df.at["soft", "alpha"]) and df.at["ent", "alpha"] == 1.5
    assert df["k"].isna().all() and str(df["k"].dtype) == "Int64"
    assert pd.isna(df.at["soft", "mlflow_run_id"])


def regbench_rows(label: str, seed: int, size: int, accuracy: float, tvd: float) -> list[dict]:
    common = {
        "trial_id": f"{label}-{seed}-{size}",
        "kernel_label": label,
        "seed": seed,
        "num_examples": size,
        "task": "regbench",
        "step": 100,
    }
    # an earlier evaluation: ignored
    return [
        {**common, "metric": "accuracy", "value": accuracy},
        {**common, "metric": "tvd", "value": tvd},
        {**common, "metric": "accuracy", "value": 0.0, "step": 50},
    ]


def test_summary_table_marks_the_lowest_tvd_and_the_highest_accuracy():
    rows = [
        *regbench_rows("Gaussian", 0, 1000, 80.0, 20.0),
        *regbench_rows("Gaussian", 1, 1000, 90.0, 10.0),
        *regbench_rows("Biweight", 0, 1000, 84.0, 12.0),
        *regbench_rows("Biweight", 1, 1000, 86.0, 14.0),
        *regbench_rows("Biweight", 0, 5000, 95.0, 5.0),
    ]
    table = markdown_cells(
        table_stats(
            pd.DataFrame(rows),
            by="num_examples",
            select="last",
            row_order=["Gaussian", "Biweight"],
            planned_seeds=2,
        )
    )
    assert list(table.columns) == [
        "accuracy ↑ num_examples=1000",
        "accuracy ↑ num_examples=5000",
        "tvd ↓ num_examples=1000",
        "tvd ↓ num_examples=5000",
    ]
    # tie: both bold
    assert table.loc["Gaussian"].tolist() == [
        "**85.00**^(<u>90.00</u>)",
        "—",
        "15.00^(<u>10.00</u>)",
        "—",
    ]
    assert table.loc["Biweight"].tolist() == [
        "**85.00**^(86.00)",
        "**95.00**^(<u>95.00</u>) [1/2]",
        "**13.00**^(12.00)",
        "**5.00**^(<u>5.00</u>) [1/2]",
    ]


def test_search_ranking_compares_suggestions_at_the_step_every_seed_reached():
    from analysis.tables import search_ranking, to_markdown

    def rows(trial, searched, seed, values):
        return [
            {
                "trial_id": trial,
                "kernel_label": "Biweight",
                "searched": searched,
                "seed": seed,
                "metric": "exact_match",
                "length_factor": factor,
                "step": step,
                "value": value,
            }
            for step, (factor, value) in values
        ]

    a, b = (
        '{"train.lr": 0.0027389695952, "model.n_layer": 3}',
        '{"train.lr": 0.001, "model.n_layer": 1}',
    )
    frame = pd.DataFrame(
        rows("t1", a, 0, [(10, (2.0, 0.9)), (20, (2.0, 0.2)), (20, (1.0, 1.0))])
        + rows("t2", a, 1, [(10, (2.0, 0.3)), (20, (2.0, 0.4))])
        + rows("t3", b, 0, [(10, (2.0, 0.1)), (20, (2.0, 0.5))])
        + rows("t4", b, 1, [(10, (2.0, 0.6))])  # stopped early at 10: every seed is taken at 10
    )
    ranking = search_ranking(frame, "exact_match_2x", "max")
    # at step 10: a (0.9 + 0.3) / 2 = 0.6, b (0.1 + 0.6) / 2 = 0.35; mixing budgets would have
    # ranked b first: (0.5 + 0.6) / 2 = 0.55 against (0.2 + 0.4) / 2 = 0.3
    assert list(ranking.index) == [
        "Biweight train.lr=0.002739 model.n_layer=3",
        "Biweight train.lr=0.001 model.n_layer=1",
    ]
    assert ranking.to_dict("list") == {
        "exact_match_2x mean at step 10": ["0.6", "0.35"],
        "best seed": ["0.9", "0.6"],
        "seeds": [2, 2],
        "furthest step": [20, 10],
        "mean there": ["0.3", "0.35"],
    }
    assert list(search_ranking(frame, "exact_match_2x", "min").index)[0].endswith("model.n_layer=1")
    markdown = to_markdown(ranking, index_header="Suggestion").splitlines()
    assert markdown[0] == (
        "| Suggestion | exact_match_2x mean at step 10 | best seed | seeds | furthest step | mean there |"
    )
    assert markdown[-1].startswith(
        "compared at step 10: the highest step every seed of every suggestion reached"
    )


def test_search_ranking_names_the_variant_when_the_search_chose_it():
    from analysis.tables import search_ranking

    frame = pd.DataFrame(
        [
            {
                "trial_id": t,
                "kernel_label": "Gaussian",
                "searched": f'{{"variant": "softmax model.n_layer={n}", "train.lr": 0.001}}',
                "seed": 0,
                "metric": "val_loss",
                "length_factor": None,
                "step": 5,
                "value": v,
            }
            for t, n, v in (("a", 1, 2.0), ("b", 2, 1.5))
        ]
    )
    assert list(search_ranking(frame, "val_loss", "min").index) == [
        "softmax model.n_layer=2 train.lr=0.001",
        "softmax model.n_layer=1 train.lr=0.001",
    ]


def test_headlines_name_each_reported_familys_metric_lengths_and_direction():
    """One answer for status's best so far and the MLflow link's order: exact match (higher is
    better) at the lengths it was evaluated at, validation loss (lower is better); accuracy, not
    reported, is left out."""
    results = pd.DataFrame(
        {
            "metric": ["train_loss", "exact_match", "exact_match", "val_loss"],
            "length_factor": [None, 2.0, 1.0, None],
        }
    )
    assert headlines(results) == [
        Headline("exact_match", [1.0, 2.0], lower_is_better=False),
        Headline("val_loss", [], lower_is_better=True),
    ]
