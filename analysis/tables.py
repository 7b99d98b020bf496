"""Tables in the paper's formats, built from the results store's DataFrame."""

from __future__ import annotations

import pandas as pd

MISSING = "—"


def _column_cells(col: pd.DataFrame, planned_seeds: int | None, lower_is_better: bool = False) -> dict[str, str]:
    """`mean^(best seed)` per kernel label; marks are decided on the shown (2-decimal) numbers.

    The best seed is the max (the min for a lower-is-better metric such as a loss or a TVD).
    """
    pick = min if lower_is_better else max
    mean = col["mean"].map("{:.2f}".format)
    top = col["min" if lower_is_better else "max"].map("{:.2f}".format)
    best_mean, best_max = pick(mean.astype(float)), pick(top.astype(float))
    cells = {}
    for label in col.index:
        m, x, n = mean[label], top[label], col.at[label, "seeds"]
        m = f"**{m}**" if float(m) == best_mean else m
        x = f"<u>{x}</u>" if float(x) == best_max else x
        short = f" [{n}/{planned_seeds}]" if planned_seeds and n < planned_seeds else ""
        cells[label] = f"{m}^({x}){short}"
    return cells


def length_generalization_table(
    results: pd.DataFrame,
    *,
    metric: str = "exact_match",
    row_order: list[str] | None = None,
    planned_seeds: int | None = None,
) -> pd.DataFrame:
    """Table 2: kernel labels × (task, length factor), each cell `mean^(max)` over seeds.

    Only each trial's last evaluation counts, so a table of a running sweep shows current values.
    Best mean per column is bold, the column's overall max underlined; a cell with fewer seeds
    than planned says `[n/N]`.
    """
    rows = results[(results["metric"] == metric) & results["length_factor"].notna()]
    last = rows[rows["step"] == rows.groupby("trial_id")["step"].transform("max")]
    stats = last.groupby(["task", "length_factor", "kernel_label"]).agg(
        mean=("value", "mean"), max=("value", "max"), min=("value", "min"), seeds=("seed", "nunique")
    )
    seen = list(dict.fromkeys(last["kernel_label"].dropna()))
    order = row_order or []
    labels = [label for label in order if label in seen] + [label for label in seen if label not in order]

    table = pd.DataFrame(index=pd.Index(labels, name="Kernel"))
    for (task, factor), col in stats.groupby(level=["task", "length_factor"]):
        cells = _column_cells(col.droplevel(["task", "length_factor"]), planned_seeds)
        table[f"{task} {factor:g}×"] = [cells.get(label, MISSING) for label in labels]
    return table


def summary_table(
    results: pd.DataFrame,
    *,
    metrics: list[str],
    by: str,
    lower_is_better: frozenset[str] = frozenset(),
    row_order: list[str] | None = None,
    planned_seeds: int | None = None,
) -> pd.DataFrame:
    """Kernel labels × (metric, value of `by`), e.g. RegBench's accuracy and TVD per training-set
    size (`by="num_examples"`), or the language model's losses per depth (`by="n_layer"`); cells as
    in `length_generalization_table`, from each trial's last evaluation."""
    rows = results[results["metric"].isin(metrics)]
    last = rows[rows["step"] == rows.groupby("trial_id")["step"].transform("max")]
    stats = last.groupby(["metric", by, "kernel_label"]).agg(
        mean=("value", "mean"), max=("value", "max"), min=("value", "min"), seeds=("seed", "nunique")
    )
    seen = list(dict.fromkeys(last["kernel_label"].dropna()))
    order = row_order or []
    labels = [label for label in order if label in seen] + [label for label in seen if label not in order]
    table = pd.DataFrame(index=pd.Index(labels, name="Kernel"))
    for metric in metrics:
        if metric not in stats.index.get_level_values("metric"):
            continue
        for value, col in stats.loc[metric].groupby(level=by):
            cells = _column_cells(col.droplevel(by), planned_seeds, metric in lower_is_better)
            arrow = "↓" if metric in lower_is_better else "↑"
            table[f"{metric} {arrow} {by}={value}"] = [cells.get(label, MISSING) for label in labels]
    return table


def to_markdown(table: pd.DataFrame, *, title: str | None = None) -> str:
    """A GitHub Markdown table with the index as the first column, headed `Kernel`."""

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(["Kernel", *table.columns]), "|" + "---|" * (len(table.columns) + 1)]
    lines += [line([label, *values]) for label, values in zip(table.index, table.itertuples(index=False))]
    text = "\n".join(lines) + "\n"
    return f"**{title}**\n\n{text}" if title else text
