"""Tables in the paper's formats, built from the results store's DataFrame."""

from __future__ import annotations

import pandas as pd

MISSING = "—"


def _column_cells(col: pd.DataFrame, planned_seeds: int | None) -> dict[str, str]:
    """`mean^(max)` per kernel label; marks are decided on the shown (2-decimal) numbers."""
    mean = col["mean"].map("{:.2f}".format)
    top = col["max"].map("{:.2f}".format)
    best_mean, best_max = mean.astype(float).max(), top.astype(float).max()
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
        mean=("value", "mean"), max=("value", "max"), seeds=("seed", "nunique")
    )
    seen = list(dict.fromkeys(last["kernel_label"].dropna()))
    order = row_order or []
    labels = [label for label in order if label in seen] + [label for label in seen if label not in order]

    table = pd.DataFrame(index=pd.Index(labels, name="Kernel"))
    for (task, factor), col in stats.groupby(level=["task", "length_factor"]):
        cells = _column_cells(col.droplevel(["task", "length_factor"]), planned_seeds)
        table[f"{task} {factor:g}×"] = [cells.get(label, MISSING) for label in labels]
    return table


def to_markdown(table: pd.DataFrame, *, title: str | None = None) -> str:
    """A GitHub Markdown table with the index as the first column, headed `Kernel`."""

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(["Kernel", *table.columns]), "|" + "---|" * (len(table.columns) + 1)]
    lines += [line([label, *values]) for label, values in zip(table.index, table.itertuples(index=False))]
    text = "\n".join(lines) + "\n"
    return f"**{title}**\n\n{text}" if title else text
